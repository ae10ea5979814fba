"""Oracle for LSG attention: explicit key set per query, one dense mask, O(N²) memory.

LSG semantics
-------------
``b`` = block_size, ``sb`` = sparse_block_size, ``f`` = sparsity_factor, ``s = b / f``,
``g`` = num_global_tokens, ``o`` = 0 for ``global_layout="inline"`` (``g`` for ``"prepended"``).
Tokens ``j < g`` are global.  A padding key is never seen; a padding query outputs 0 (lse -inf).

1. ``N - o <= 2b``: full attention -- query ``i`` sees every key (``j <= i`` when causal).
2. Otherwise a global query ``i < g`` sees every key (``j <= i`` when causal), and a query
   ``i >= g`` of block ``t = (i - o) // b`` sees
   * the global keys ``j < g``;
   * the local keys ``j >= g`` with ``o + (t-1)·b <= j < o + (t+2)·b`` (causal:
     ``o + (t-1)·b <= j <= i``);
   * the valid compressed keys ``p`` (``0 <= p < T_c``) of its two windows
     ``t·s + lo <= p < t·s + hi``, ``(lo, hi)`` from :meth:`lhattn.LSG.sparse_windows` -- with
     ``sparse_geometry="regular"`` ``[(t-1)·s - sb, (t-1)·s)`` and ``[(t+2)·s, (t+2)·s + sb)``,
     the ``sb`` compressed keys on each side just beyond the images of blocks ``t-1 .. t+1``;
     with ``"reference"`` (default) the windows of the layout's reference, which may be empty,
     one-sided or shifted.  A key in both windows is counted twice (two columns), as in LSG.
3. The compressed sequence (``T_c = ceil((N - o) / b) · s`` keys; global and padding tokens are
   not usable) is built by ``sparsity_type`` as described in :mod:`lhattn.selection`.

With ``sparse_geometry="reference"`` this equals, in eval mode, ``LSGSelfAttention`` of
``lsg_converter.attention_layers`` (inline, ``g = 1``, ``sb = b``; it has no ``lsh``) and the
``LSGSelfAttention`` of the model files ``modeling_lsg_*.py`` (prepended, any ``g``, ``sb``;
global rows non-causal), for every factor on which they run, up to the differences below
(tests/test_lsg_exact.py: fp64 to 1e-8).

Deliberate differences from LSG
-------------------------------
* Groups of ``pooling`` / ``bos_pooling`` with no usable token stay masked: LSG averages
  ``finfo.min`` mask values, which overflows to -inf in fp32 and *unmasks* such groups
  (end padding of ``f`` or more tokens).  (The model classes' ``pooling`` counts, like us.)
* A padding global key is masked (LSG always shows its global keys); padding rows output 0.
* Causal global rows attend causally (the model classes output the query vector itself).
* ``lsh`` projections come from ``pattern.seed`` on every call (LSG: the global RNG);
  ``torch.manual_seed(seed)`` before an LSG call reproduces them.  When ``c / f == 1``
  (``c = min(b, sb)``) ``lsh`` is ``bos_pooling``, as LSG does for ``f == sb``.
* ``bos_pooling`` scores use ``scale`` (LSG: ``D ** -0.5``, our default).  With GQA, selection
  runs per kv head and ``bos_pooling`` per query head (LSG's multi-query rule).
* ``norm`` breaks ties between equal norms by position (LSG's ``topk`` / ``argsort`` order is
  unspecified).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _dropout
from ..patterns import LSG
from ..selection import select_sparse
from .core import masked_attention, repeat_kv

__all__ = ["lsg_attention", "lsg_direct_mask", "lsg_sparse_masks"]


def lsg_direct_mask(n: int, pattern: LSG, device=None) -> Tensor:
    """``[N, N]`` bool: query ``i`` may see key ``j`` directly (global or local), padding aside."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    g, o, b = pattern.num_global_tokens, pattern.block_offset, pattern.block_size
    causal_ok = (j <= i) if pattern.causal else torch.ones(n, n, dtype=torch.bool, device=device)
    if n - o <= 2 * b:  # LSG's rule: short sequences get full attention
        return causal_ok
    t = torch.div(i - o, b, rounding_mode="floor")
    lo, hi = o + (t - 1) * b, o + (t + (1 if pattern.causal else 2)) * b  # [lo, hi)
    local = (j >= g) & (j >= lo) & (j < hi) & causal_ok
    return torch.where(i < g, causal_ok, local | (j < g))


def lsg_sparse_masks(n: int, t_c: int, pattern: LSG, device=None) -> tuple[Tensor, Tensor]:
    """Two ``[N, T_c]`` bool: query ``i`` may see compressed key ``p`` through its left / right
    window (the key's validity aside)."""
    i = torch.arange(n, device=device)[:, None]
    p = torch.arange(t_c, device=device)[None, :]
    g, o, b = pattern.num_global_tokens, pattern.block_offset, pattern.block_size
    if n - o <= 2 * b:
        none = torch.zeros(n, t_c, dtype=torch.bool, device=device)
        return none, none
    base = torch.div(i - o, b, rounding_mode="floor") * (b // pattern.sparsity_factor)  # t·s
    return tuple((p >= base + lo) & (p < base + hi) & (i >= g) for lo, hi in pattern.sparse_windows())


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
    """Reference LSG attention (module docstring): keys ``[k ; compressed k ; compressed k]`` (the
    compressed ones once per window) under one mask.  Attention dropout (``dropout_state``,
    :mod:`lhattn._dropout`) uses the columns of ``[k ; compressed k]``: token position, ``N + p``.

    q: ``[B, H, N, D]``; k, v: ``[B, H_kv, N, D]``; key_padding_mask: ``[B, N]`` bool, True =
    padding.  Returns ``out [B, H, N, D]`` (q's dtype) and ``lse [B, H, N]`` (float32; float64
    for float64 inputs).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    bsz, h, n, _ = q.shape
    valid = torch.ones(bsz, n, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        valid = ~key_padding_mask
    rows = valid[:, None, :, None]  # [B, 1, N, 1]: padding queries see nothing
    mask = lsg_direct_mask(n, pattern, q.device)[None, None] & valid[:, None, None, :] & rows
    sparse = None
    if n - pattern.block_offset > 2 * pattern.block_size:
        sparse = select_sparse(q, k, v, pattern, key_padding_mask=key_padding_mask, scale=scale, impl="torch")
    pos = torch.arange(n, device=q.device)
    if sparse is None:
        keep = _dropout.keep_mask(dropout_state, bsz, h, pos, pos) if dropout_p > 0.0 else None
        return masked_attention(q, k, v, mask, scale, dropout_p, keep)
    kc, vc = sparse.k, sparse.v
    if kc.shape[1] != k.shape[1]:  # bos_pooling under GQA: compressed keys per query head
        k, v = repeat_kv(k, h), repeat_kv(v, h)
    valid_c = sparse.valid[:, :, None, :] & rows
    left, right = (m[None, None] & valid_c for m in lsg_sparse_masks(n, kc.shape[2], pattern, q.device))
    # keys [k ; compressed k (left window) ; compressed k (right window)]: a compressed key in both
    # windows is counted twice, as LSG does
    mask = torch.cat([mask.expand(-1, left.shape[1], -1, -1), left, right], dim=-1)  # [B, 1|H_kv|H, N, N+2Tc]
    if mask.shape[1] not in (1, h):
        mask = repeat_kv(mask, h)
    keep = None
    if dropout_p > 0.0:  # compressed key p is column N + p in either window
        c = torch.arange(kc.shape[2], device=q.device) + n
        keep = _dropout.keep_mask(dropout_state, bsz, h, pos, torch.cat([pos, c, c]))
    return masked_attention(q, torch.cat([k, kc, kc], dim=2), torch.cat([v, vc, vc], dim=2), mask, scale, dropout_p,
                            keep)
