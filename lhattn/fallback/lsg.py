"""LSG attention, blocked pure PyTorch: O(N·w) time and memory, no ``N × N`` tensor.

Sparse selection first (:func:`lhattn.selection.select_sparse`, with the C++ gather/scatter ops),
then :func:`~lhattn.fallback.engine.blocked_attention` over four key sources, one query block of
``block_size`` rows at a time (semantics: :mod:`lhattn.reference.lsg`):

* local: ``k, v`` rows ``[max(o + (t-1)·b, g), min(o + (t+2)·b, N))`` (``t+1`` when causal);
* sparse left / right: the compressed ``k, v`` rows ``[t·s + lo, t·s + hi)`` of the two windows of
  :meth:`lhattn.LSG.sparse_windows` (regular geometry: ``[(t-1)·s - sb, (t-1)·s)`` and
  ``[(t+2)·s, (t+2)·s + sb)``), clipped to ``[0, T_c)`` (the same tensors, passed twice);
* global: ``k, v`` rows ``[0, g)``.

Attention dropout uses the columns of the reference's ``[k ; compressed k]`` matrix: token
position for the local and global keys, ``N + p`` for compressed key ``p``.

Global rows (``i < g``) and short sequences (``N - o <= 2·b``) see every key, ``b`` rows at a time.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import Tensor

from ..patterns import LSG
from ..reference.core import repeat_kv
from ..selection import SparseKV, select_sparse
from .engine import KeyBlock, QueryBlock, blocked_attention, make_dropout

__all__ = ["lsg_attention"]


class _LSGPlan:
    """Query blocks of LSG; sources ``[local, sparse_left, sparse_right, global]``."""

    def __init__(self, pattern: LSG, n: int, valid: Optional[Tensor], sparse: Optional[SparseKV], heads: int,
                 device):
        self.p, self.n, self.valid, self.sparse, self.heads, self.device = pattern, n, valid, sparse, heads, device

    def _key_mask(self, rows: slice, lo: int, hi: int, causal: bool) -> Tensor:
        """``[B|1, 1, Bq, L]``: keys ``[lo, hi)`` that rows may see (padding and causality)."""
        mask = torch.ones(1, 1, rows.stop - rows.start, hi - lo, dtype=torch.bool, device=self.device)
        if causal:
            i = torch.arange(rows.start, rows.stop, device=self.device)[:, None]
            mask = mask & (torch.arange(lo, hi, device=self.device)[None, :] <= i)
        if self.valid is not None:
            mask = mask & self.valid[:, None, None, lo:hi] & self.valid[:, None, rows, None]
        return mask

    def _sparse_block(self, rows: slice, lo: int, hi: int) -> Optional[KeyBlock]:
        t_c = self.sparse.k.shape[2]
        lo, hi = max(lo, 0), min(hi, t_c)
        if lo >= hi:
            return None
        mask = self.sparse.valid[:, :, None, lo:hi]  # [B, Hv, 1, L]
        if mask.shape[1] not in (1, self.heads):
            mask = repeat_kv(mask, self.heads)
        if self.valid is not None:
            mask = mask & self.valid[:, None, rows, None]
        return KeyBlock(index=slice(lo, hi), mask=mask)

    def _all_keys(self, start: int, stop: int) -> Iterator[QueryBlock]:
        b = self.p.block_size
        for r in range(start, stop, b):
            rows = slice(r, min(stop, r + b))
            keys = KeyBlock(index=slice(0, self.n), mask=self._key_mask(rows, 0, self.n, self.p.causal))
            yield QueryBlock(rows=rows, keys=[keys, None, None, None])

    def blocks(self) -> Iterator[QueryBlock]:
        p, n = self.p, self.n
        b, o, g = p.block_size, p.block_offset, min(p.num_global_tokens, n)
        if n - o <= 2 * b:
            yield from self._all_keys(0, n)
            return
        yield from self._all_keys(0, g)
        s = b // p.sparsity_factor
        windows = p.sparse_windows()
        glob = None
        for t in range(-(-(n - o) // b)):
            rows = slice(max(o + t * b, g), min(o + (t + 1) * b, n))
            if rows.start >= rows.stop:
                continue
            lo, hi = max(o + (t - 1) * b, g), min(o + (t + (1 if p.causal else 2)) * b, n)
            keys = [KeyBlock(index=slice(lo, hi), mask=self._key_mask(rows, lo, hi, p.causal)), None, None, None]
            if self.sparse is not None:
                for side, (w_lo, w_hi) in enumerate(windows, start=1):
                    keys[side] = self._sparse_block(rows, t * s + w_lo, t * s + w_hi)
            if g > 0:
                glob = KeyBlock(index=slice(0, g), mask=self._key_mask(rows, 0, g, False))
                keys[3] = glob
            yield QueryBlock(rows=rows, keys=keys)


def lsg_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: LSG,
    *,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    dropout_state: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Same contract as :func:`lhattn.reference.lsg.lsg_attention`; returns ``(out, lse)``.

    q: ``[B, H, N, D]``; k, v: ``[B, H_kv, N, D]``; key_padding_mask: ``[B, N]`` bool, True =
    padding; dropout_state: see :mod:`lhattn._dropout` (needed when ``dropout_p > 0``).
    ``out [B, H, N, D]`` in q's dtype, ``lse [B, H, N]`` float32 (float64 for float64).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    h, n = q.shape[1], q.shape[2]
    valid = None if key_padding_mask is None else ~key_padding_mask
    sparse = None
    if n - pattern.block_offset > 2 * pattern.block_size:
        sparse = select_sparse(q, k, v, pattern, key_padding_mask=key_padding_mask, scale=scale, impl="ops")
    local = (k, v)
    if sparse is not None and sparse.k.shape[1] != k.shape[1]:  # bos_pooling under GQA: per query head
        local = (repeat_kv(k, h), repeat_kv(v, h))
    comp = (sparse.k, sparse.v) if sparse is not None else local
    plan = _LSGPlan(pattern, n, valid, sparse, h, q.device)
    dropout = make_dropout(dropout_p, dropout_state, col_offsets=(0, n, n, 0))
    return blocked_attention(q, [local, comp, comp, local], plan, scale, dropout)
