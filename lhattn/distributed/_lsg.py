"""LSG over a sharded sequence (:mod:`lhattn.distributed`; semantics: :mod:`lhattn.reference.lsg`).

With ``o`` = block_offset, ``b`` = block_size, ``f`` = sparsity_factor, ``s = b / f``,
``sb`` = sparse_block_size and ``g`` global tokens, a rank whose local rows (``i >= g``) fall in
blocks ``t0 .. t1`` needs, besides its shard:

* the local keys of blocks ``t0 - 1 .. t1 + 1`` (``t1`` when causal) -- at most ``2·b`` tokens of
  halo on each side;
* the tokens that make its compressed keys ``[t0·s + lo, t1·s + hi)``, ``lo`` / ``hi`` the lowest /
  highest offset of the non-empty windows of :meth:`lhattn.LSG.sparse_windows` (either
  ``sparse_geometry``; regular: ``[(t0-1)·s - sb, (t1+2)·s + sb)``, the left part only when causal),
  rounded out to whole blocks.  The reference windows (shifted, one-sided or overlapping) lie
  inside the regular span ``[-s - sb, 2s + sb)``, so in all at most ``(2 + ceil(sb·f / b))·b`` tokens
  per side (this one and the one above).  It computes
  those compressed keys itself (:func:`lhattn.selection.select_sparse` on a block-aligned slice of
  the sequence, with the global tokens marked unusable), so a pooling group or a ``norm`` / ``lsh``
  chunk is never split between ranks;
* the ``g`` global tokens' k/v (all-gathered, O(g·D)); the global rows attend to every rank's keys
  and are merged by log-sum-exp, as for SlidingWindow.

Sequences with ``N - o <= 2·b`` use full attention (LSG's rule): there the halo is the whole
sequence, at most ``2·b + o`` tokens.  ``bos_pooling`` (and ``lsh`` with one bucket per chunk, which
LSG runs as ``bos_pooling``) is not supported: its weights need the first token's query and the
global tokens inside every group.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..fallback._globals import global_key_block
from ..fallback.engine import Dropout, KeyBlock, QueryBlock, blocked_attention
from ..patterns import LSG
from ..selection import SparseKV, compressed_length, select_sparse
from . import _comm as C
from ._attention import _Globals, _with_global_rows

__all__ = ["check_lsg", "lsg_attention"]


def check_lsg(pattern: LSG, global_mask: Optional[Tensor], segment_ids: Optional[Tensor]) -> None:
    for name, val in (("global_mask", global_mask), ("segment_ids", segment_ids)):
        if val is not None:
            raise ValueError(f"{name} is not used by LSG (its global tokens are the first num_global_tokens "
                             f"positions); got {name} with an LSG pattern")
    c = min(pattern.block_size, pattern.sparse_block_size)
    one_bucket = pattern.sparsity_type == "lsh" and pattern.sparsity_factor > 1 and c // pattern.sparsity_factor == 1
    if pattern.has_sparse_keys and (pattern.sparsity_type == "bos_pooling" or one_bucket):
        raise NotImplementedError(
            "context-parallel LSG does not support sparsity_type='bos_pooling' (nor 'lsh' with one bucket per "
            "chunk, which runs as bos_pooling): its weights need the first token's query and the global tokens "
            f"of every group; got {pattern}")


@dataclasses.dataclass(frozen=True)
class _Need:
    """What one rank needs: tokens ``[lo, hi)``; compressed keys of blocks ``[beta_lo, beta_hi)``
    (tokens ``[o + beta_lo·b, min(N, o + beta_hi·b))``), empty when ``beta_lo >= beta_hi``."""

    lo: int
    hi: int
    beta_lo: int
    beta_hi: int


def _t_c(pattern: LSG, n: int) -> int:
    """Rows of the compressed sequence of the whole sequence (``N - o`` when ``f == 1``)."""
    return n - pattern.block_offset if pattern.sparsity_factor == 1 else compressed_length(n, pattern)


def _windows(pattern: LSG) -> List[Tuple[int, int]]:
    """The non-empty sides of :meth:`lhattn.LSG.sparse_windows` (none without sparse keys)."""
    return [w for w in pattern.sparse_windows() if w[0] < w[1]]


def _need(pattern: LSG, n: int, s: int, e: int) -> _Need:
    b, o, g = pattern.block_size, pattern.block_offset, min(pattern.num_global_tokens, n)
    if n - o <= 2 * b:
        return _Need(0, n, 0, 0)
    first = max(s, g)
    if first >= e:  # only global rows here
        return _Need(s, e, 0, 0)
    t0, t1 = (first - o) // b, (e - 1 - o) // b
    lo = min(s, max(o + (t0 - 1) * b, g))
    hi = max(e, min(o + (t1 + (1 if pattern.causal else 2)) * b, n))
    beta_lo = beta_hi = 0
    sides = _windows(pattern)
    if sides:
        sc = b // pattern.sparsity_factor
        p_lo = max(0, t0 * sc + min(w_lo for w_lo, _ in sides))
        p_hi = min(_t_c(pattern, n), t1 * sc + max(w_hi for _, w_hi in sides))
        if p_lo < p_hi:
            beta_lo, beta_hi = p_lo // sc, -(-p_hi // sc)
            lo, hi = min(lo, o + beta_lo * b), max(hi, min(n, o + beta_hi * b))
    return _Need(lo, hi, beta_lo, beta_hi)


class _HaloLSGPlan:
    """The blocks of :class:`lhattn.fallback.lsg._LSGPlan` for this shard's local rows, with keys in
    the halo-extended range; sources ``[local, sparse_left, sparse_right, global]``."""

    def __init__(self, pattern: LSG, n: int, lay: C.Layout, need: _Need, valid_q, valid_k,
                 sparse: Optional[SparseKV], gslots, heads: int, device):
        self.p, self.n, self.need, self.valid_q, self.valid_k = pattern, n, need, valid_q, valid_k
        self.s, self.e = lay.start, lay.end
        self.sparse, self.gslots, self.heads, self.device = sparse, gslots, heads, device

    def _key_mask(self, r0: int, r1: int, k0: int, k1: int, causal: bool) -> Tensor:
        """``[B|1, 1, Bq, L]`` for global rows ``[r0, r1)`` and keys ``[k0, k1)``."""
        mask = torch.ones(1, 1, r1 - r0, k1 - k0, dtype=torch.bool, device=self.device)
        if causal:
            i = torch.arange(r0, r1, device=self.device)[:, None]
            mask = mask & (torch.arange(k0, k1, device=self.device)[None, :] <= i)
        if self.valid_q is not None:
            lo, s = self.need.lo, self.s
            mask = mask & self.valid_k[:, None, None, k0 - lo:k1 - lo] & self.valid_q[:, None, r0 - s:r1 - s, None]
        return mask

    def _sparse_block(self, r0: int, r1: int, p0: int, p1: int) -> Optional[KeyBlock]:
        base = self.need.beta_lo * (self.p.block_size // self.p.sparsity_factor)
        p0, p1 = max(p0, 0, base), min(p1, _t_c(self.p, self.n), base + self.sparse.k.shape[2])
        if p0 >= p1:
            return None
        mask = self.sparse.valid[:, :, None, p0 - base:p1 - base]  # [B, Hv, 1, L]
        if mask.shape[1] not in (1, self.heads):
            mask = mask.repeat_interleave(self.heads // mask.shape[1], dim=1)
        if self.valid_q is not None:
            mask = mask & self.valid_q[:, None, r0 - self.s:r1 - self.s, None]
        return KeyBlock(index=slice(p0 - base, p1 - base), mask=mask)

    def blocks(self):
        p, n, s, e, lo = self.p, self.n, self.s, self.e, self.need.lo
        b, o, g = p.block_size, p.block_offset, min(p.num_global_tokens, n)
        if n - o <= 2 * b:  # full attention (causal if causal), every row of the shard
            for r0 in range(s, e, b):
                r1 = min(e, r0 + b)
                keys = KeyBlock(index=slice(0, n), mask=self._key_mask(r0, r1, 0, n, p.causal))
                yield QueryBlock(rows=slice(r0 - s, r1 - s), keys=[keys, None, None, None])
            return
        first = max(s, g)
        if first >= e:
            return
        sc, windows = b // p.sparsity_factor, p.sparse_windows()
        for t in range((first - o) // b, (e - 1 - o) // b + 1):
            r0, r1 = max(o + t * b, first), min(o + (t + 1) * b, e)
            if r0 >= r1:
                continue
            k0, k1 = max(o + (t - 1) * b, g), min(o + (t + (1 if p.causal else 2)) * b, n)
            keys = [KeyBlock(index=slice(k0 - lo, k1 - lo), mask=self._key_mask(r0, r1, k0, k1, p.causal)),
                    None, None, None]
            if self.sparse is not None:
                for side, (w_lo, w_hi) in enumerate(windows, start=1):
                    keys[side] = self._sparse_block(r0, r1, t * sc + w_lo, t * sc + w_hi)
            if self.gslots is not None:
                rows = None if self.valid_q is None else self.valid_q[:, r0 - s:r1 - s]
                keys[3] = global_key_block(self.gslots, rows)
            yield QueryBlock(rows=slice(r0 - s, r1 - s), keys=keys)


def _compressed(pattern: LSG, n: int, need: _Need, k_ext: Tensor, v_ext: Tensor, valid_ext: Optional[Tensor],
                scale: float) -> Optional[SparseKV]:
    """The compressed keys of blocks ``[beta_lo, beta_hi)``, from the block-aligned token slice that
    makes them (the global tokens, and padding, unusable)."""
    if need.beta_lo >= need.beta_hi:
        return None
    b, o, g = pattern.block_size, pattern.block_offset, min(pattern.num_global_tokens, n)
    t0, t1 = o + need.beta_lo * b, min(n, o + need.beta_hi * b)
    ks, vs = (x[:, :, t0 - need.lo:t1 - need.lo] for x in (k_ext, v_ext))
    usable = (torch.arange(t0, t1, device=k_ext.device) >= g)[None].expand(k_ext.shape[0], -1)
    if valid_ext is not None:
        usable = usable & valid_ext[:, t0 - need.lo:t1 - need.lo]
    # the slice starts a block; the layout is kept (the prepended pooling rounds its epsilon to float32)
    sub = dataclasses.replace(pattern, num_global_tokens=0)
    return select_sparse(ks, ks, vs, sub, key_padding_mask=~usable, scale=scale, impl="ops")


def lsg_attention(q: Tensor, k: Tensor, v: Tensor, pattern: LSG, lay: C.Layout, key_padding_mask: Optional[Tensor],
                  scale: float, dropout_p: float, state: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """This rank's ``(out, lse)`` of :func:`lhattn.attention` with an LSG pattern."""
    bsz, h, n_loc, _ = q.shape
    n = lay.n
    g = min(pattern.num_global_tokens, n)
    needs: List[_Need] = [_need(pattern, n, *lay.shard(t)) for t in range(lay.world)]
    need = needs[lay.rank]
    ranges = [(x.lo, x.hi) for x in needs]
    kv = C.halo(torch.stack([k, v]), lay, ranges, dim=3)
    k_ext, v_ext = kv[0], kv[1]
    valid = None if key_padding_mask is None else ~key_padding_mask
    valid_ext = None if valid is None else C.halo_exchange(valid, lay, ranges, dim=1)
    short = n - pattern.block_offset <= 2 * pattern.block_size

    glb = None
    if g > 0 and not short:
        pos = lay.start + torch.arange(n_loc, device=q.device)
        glob = (pos < g)[None].expand(bsz, -1)
        glob = glob if valid is None else glob & valid
        g_max = max(min(g, e) - min(g, s) for s, e in (lay.shard(t) for t in range(lay.world)))
        glb = _Globals(q, k, v, glob, g_max, lay)
    sparse = None if short else _compressed(pattern, n, need, k_ext, v_ext, valid_ext, scale)
    plan = _HaloLSGPlan(pattern, n, lay, need, valid, valid_ext, sparse, None if glb is None else glb.slots, h,
                        q.device)
    local = (k_ext, v_ext)
    comp = local if sparse is None else (sparse.k, sparse.v)
    gkv = local if glb is None else (glb.k, glb.v)
    drop = None
    if state is not None:
        row_pos = (lay.start + torch.arange(n_loc, device=q.device)).expand(bsz, -1)
        c0 = n + need.beta_lo * (pattern.block_size // pattern.sparsity_factor)
        drop = Dropout(float(dropout_p), state, row_pos, [need.lo, c0, c0, 0],
                       None if glb is None else [None, None, None, glb.pos])
    out, lse = blocked_attention(q, [local, comp, comp, gkv], plan, scale, drop)
    return _with_global_rows(out, lse, glb, k, v, valid, lay, scale, dropout_p, state, causal=pattern.causal)
