"""Segment-local + global attention (HAT) on the Triton kernels, differentiable and traceable.

Two ``torch.library`` custom ops wrap the launchers of :mod:`lhattn.kernels.segment`:

* ``lhattn::segment_attn_fwd(q, k, v, query_mask, key_mask, global_keys, seg_start, seg_end,
  segment_size, scale, dropout_p=0, dropout_state=None) -> (out, lse)`` -- ``segment_size >= 1``
  for fixed segments, else ``seg_start``/``seg_end`` (``[B, N]``,
  :func:`lhattn._index.segment_bounds`) give them;
* ``lhattn::segment_attn_bwd(dout, q, k, v, out, lse, key_mask, global_keys, seg_start,
  seg_end, segment_size, scale, dropout_p=0, dropout_state=None) -> (dq, dk, dv)``;

each with a fake (meta) implementation, and the forward with ``register_autograd``, so
``torch.compile(fullgraph=True)`` traces a model calling them (forward and backward).

:func:`segment_attention` composes them like the fallback (``lhattn/fallback/segment.py``)
and the sliding-window family: a segment pass for the local rows, in which the global
tokens are an extra key list; then the global rows, gathered with
``torch.ops.lhattn.gather_rows``, attend to every valid key in the dense pass of the
sliding-window op and are scattered back with ``scatter_add_rows``.  Attention dropout
(:mod:`lhattn._dropout`): ``dropout_p`` and the dropout state travel with both ops and with
:func:`attend_global_rows`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .._index import global_indices, segment_bounds, visible_tokens
from ..kernels._core import acc_dtype
from ._common import kernel_unsupported_reason
from ..kernels.segment import segment_bwd, segment_fwd
from ..patterns import Segments
from .sliding_window import attend_global_rows

__all__ = ["segment_attention", "segment_unsupported_reason", "impl", "reason"]


def segment_unsupported_reason(q: Tensor, pattern: Segments) -> Optional[str]:
    """None if the Triton segment kernels can run on ``q``, else a sentence why not."""
    return kernel_unsupported_reason(q, "segment", max_tokens=2 ** 31)


# --------------------------------------------------------------------------------------
# custom ops
# --------------------------------------------------------------------------------------


def _segments(segment_size: int, seg_start: Optional[Tensor], seg_end: Optional[Tensor]) -> dict:
    if segment_size >= 1:
        return dict(segment_size=segment_size)
    return dict(segment_bounds=(seg_start, seg_end))


@torch.library.custom_op("lhattn::segment_attn_fwd", mutates_args=())
def _attn_fwd(
    q: Tensor, k: Tensor, v: Tensor,
    query_mask: Optional[Tensor], key_mask: Optional[Tensor], global_keys: Optional[Tensor],
    seg_start: Optional[Tensor], seg_end: Optional[Tensor], segment_size: int, scale: float,
    dropout_p: float = 0.0, dropout_state: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    return segment_fwd(q, k, v, scale=scale, query_mask=query_mask, key_mask=key_mask, global_keys=global_keys,
                       dropout_p=dropout_p, dropout_state=dropout_state, **_segments(segment_size, seg_start, seg_end))


@_attn_fwd.register_fake
def _attn_fwd_fake(q, k, v, query_mask, key_mask, global_keys, seg_start, seg_end, segment_size, scale,
                   dropout_p=0.0, dropout_state=None):
    b, h, n, d = q.shape
    return q.new_empty((b, h, n, d)), q.new_empty((b, h, n), dtype=acc_dtype(q.dtype))


@torch.library.custom_op("lhattn::segment_attn_bwd", mutates_args=())
def _attn_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    key_mask: Optional[Tensor], global_keys: Optional[Tensor],
    seg_start: Optional[Tensor], seg_end: Optional[Tensor], segment_size: int, scale: float,
    dropout_p: float = 0.0, dropout_state: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    return segment_bwd(dout, q, k, v, out, lse, scale=scale, key_mask=key_mask, global_keys=global_keys,
                       dropout_p=dropout_p, dropout_state=dropout_state, **_segments(segment_size, seg_start, seg_end))


@_attn_bwd.register_fake
def _attn_bwd_fake(dout, q, k, v, out, lse, key_mask, global_keys, seg_start, seg_end, segment_size, scale,
                   dropout_p=0.0, dropout_state=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    (q, k, v, _query_mask, key_mask, global_keys, seg_start, seg_end, segment_size, scale, dropout_p,
     dropout_state) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_mask, global_keys, seg_start, seg_end, dropout_state)
    ctx.args = (segment_size, scale, dropout_p)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, key_mask, global_keys, seg_start, seg_end, dropout_state = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.lhattn.segment_attn_bwd(dout, q, k, v, out, lse, key_mask, global_keys, seg_start,
                                                   seg_end, *ctx.args, dropout_state)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------
# the pattern
# --------------------------------------------------------------------------------------


def segment_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: Segments,
    *,
    key_padding_mask: Optional[Tensor] = None,
    global_mask: Optional[Tensor] = None,
    segment_ids: Optional[Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    dropout_state: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Same contract as :func:`lhattn.reference.segment_attention`: returns
    ``(out [B, H, N, D], lse [B, H, N])``; differentiable in q, k, v.

    Exactly one of ``pattern.segment_size`` and ``segment_ids [B, N]`` (non-decreasing)
    defines the segments (checked by :func:`lhattn.attention`).  ``dropout_state``: int64
    ``[2] = (seed, T)`` (:func:`lhattn._dropout.make_state`), needed when ``dropout_p > 0``."""
    d = q.shape[3]
    scale = d ** -0.5 if scale is None else float(scale)
    valid, glob, local = visible_tokens(key_padding_mask, global_mask)
    gidx = global_indices(glob)  # [B, G] or None
    if segment_ids is None:
        seg_start = seg_end = None
        size = pattern.segment_size
    else:
        seg_start, seg_end = segment_bounds(segment_ids)  # [B, N] each, O(B·N)
        size = 0
    # local rows: their segment's local keys (non-padding, non-global) + every global key
    out, lse = torch.ops.lhattn.segment_attn_fwd(q, k, v, local, local, gidx, seg_start, seg_end, size, scale,
                                                 dropout_p, dropout_state)
    if gidx is None:
        return out, lse
    # global rows (left at 0 / -inf above): every valid key
    return attend_global_rows(out, lse, gidx, valid, q, k, v, scale=scale, dropout_p=dropout_p,
                              dropout_state=dropout_state)


impl = segment_attention
"""Dispatch entry point: ``register_triton_backend(Segments, segment.impl, segment.reason)``."""
reason = segment_unsupported_reason
