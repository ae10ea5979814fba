"""Sliding-window + global attention on the Triton kernels, differentiable and traceable.

Two ``torch.library`` custom ops wrap the launchers of :mod:`lhattn.kernels.sliding_window`:

* ``lhattn::sliding_window_attn_fwd(q, k, v, query_mask, key_mask, global_keys, left, right,
  dilation, scale, dropout_p=0, dropout_state=None, drop_rows=None) -> (out, lse)`` --
  ``left < 0`` means dense (every key);
* ``lhattn::sliding_window_attn_bwd(dout, q, k, v, out, lse, key_mask, global_keys, left,
  right, dilation, scale, dropout_p=0, dropout_state=None, drop_rows=None) -> (dq, dk, dv)``;

each with a fake (meta) implementation, and the forward with ``register_autograd``, so
``torch.compile(fullgraph=True)`` traces a model calling them (forward and backward).

:func:`sliding_window_attention` composes them exactly like the fallback does
(``lhattn/fallback/_globals.py``): a band pass for the local rows, in which the global
tokens are an extra key list; then the global rows, gathered with
``torch.ops.lhattn.gather_rows``, attend to every valid key (through ``global_qkv`` when
given) in a dense pass, and are scattered back with ``scatter_add_rows``.  Gradients of
the gather/scatter come from those ops' own autograd formulas.

Attention dropout (:mod:`lhattn._dropout`): ``dropout_p`` and the dropout state travel with
both ops (the backward regenerates the keep bits; nothing of size ``N × w`` is saved); the
global rows are gathered, so their token positions go along as ``drop_rows = gidx``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .._index import global_indices, visible_tokens, write_global_rows
from ..kernels._core import acc_dtype
from ._common import kernel_unsupported_reason
from ..kernels.sliding_window import sliding_window_bwd, sliding_window_fwd
from ..patterns import SlidingWindow

__all__ = ["sliding_window_attention", "sliding_window_unsupported_reason", "impl", "reason"]


def sliding_window_unsupported_reason(q: Tensor, pattern: SlidingWindow) -> Optional[str]:
    """None if the Triton sliding-window kernels can run on ``q``, else a sentence why not."""
    return kernel_unsupported_reason(q, "sliding-window", max_tokens=2 ** 31 // max(pattern.dilation, 1))


# --------------------------------------------------------------------------------------
# custom ops
# --------------------------------------------------------------------------------------


def _window(left: int, right: int):
    return None if left < 0 else (left, right)


@torch.library.custom_op("lhattn::sliding_window_attn_fwd", mutates_args=())
def _attn_fwd(
    q: Tensor, k: Tensor, v: Tensor,
    query_mask: Optional[Tensor], key_mask: Optional[Tensor], global_keys: Optional[Tensor],
    left: int, right: int, dilation: int, scale: float,
    dropout_p: float = 0.0, dropout_state: Optional[Tensor] = None, drop_rows: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    if q.shape[2] == 0:  # no query row (e.g. no global token in a compiled graph): launch nothing
        return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=acc_dtype(q.dtype))
    return sliding_window_fwd(q, k, v, window=_window(left, right), dilation=dilation, scale=scale,
                              query_mask=query_mask, key_mask=key_mask, global_keys=global_keys,
                              dropout_p=dropout_p, dropout_state=dropout_state, drop_rows=drop_rows)


@_attn_fwd.register_fake
def _attn_fwd_fake(q, k, v, query_mask, key_mask, global_keys, left, right, dilation, scale, dropout_p=0.0,
                   dropout_state=None, drop_rows=None):
    b, h, n, d = q.shape
    return q.new_empty((b, h, n, d)), q.new_empty((b, h, n), dtype=acc_dtype(q.dtype))


@torch.library.custom_op("lhattn::sliding_window_attn_bwd", mutates_args=())
def _attn_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    key_mask: Optional[Tensor], global_keys: Optional[Tensor],
    left: int, right: int, dilation: int, scale: float,
    dropout_p: float = 0.0, dropout_state: Optional[Tensor] = None, drop_rows: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    if q.shape[2] == 0:
        return q.new_empty(q.shape), torch.zeros_like(k), torch.zeros_like(v)
    return sliding_window_bwd(dout, q, k, v, out, lse, window=_window(left, right), dilation=dilation,
                              scale=scale, key_mask=key_mask, global_keys=global_keys, dropout_p=dropout_p,
                              dropout_state=dropout_state, drop_rows=drop_rows)


@_attn_bwd.register_fake
def _attn_bwd_fake(dout, q, k, v, out, lse, key_mask, global_keys, left, right, dilation, scale, dropout_p=0.0,
                   dropout_state=None, drop_rows=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    (q, k, v, _query_mask, key_mask, global_keys, left, right, dilation, scale, dropout_p, dropout_state,
     drop_rows) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_mask, global_keys, dropout_state, drop_rows)
    ctx.args = (left, right, dilation, scale, dropout_p)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, key_mask, global_keys, dropout_state, drop_rows = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.lhattn.sliding_window_attn_bwd(dout, q, k, v, out, lse, key_mask, global_keys,
                                                          *ctx.args, dropout_state, drop_rows)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------
# the pattern
# --------------------------------------------------------------------------------------


def sliding_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: SlidingWindow,
    *,
    key_padding_mask: Optional[Tensor] = None,
    global_mask: Optional[Tensor] = None,
    global_qkv: Optional[Sequence[Tensor]] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    dropout_state: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Same contract as :func:`lhattn.reference.sliding_window_attention`: returns
    ``(out [B, H, N, D], lse [B, H, N])``; differentiable in q, k, v and ``global_qkv``.
    ``dropout_state``: int64 ``[2] = (seed, T)`` (:func:`lhattn._dropout.make_state`), needed when
    ``dropout_p > 0``."""
    b, _, n, d = q.shape
    scale = d ** -0.5 if scale is None else float(scale)
    valid, glob, local = visible_tokens(key_padding_mask, global_mask)
    gidx = global_indices(glob)  # [B, G] or None
    left, right = min(pattern.left, n), min(pattern.right, n)
    # local rows: band over local keys (non-padding, non-global) + every global key
    out, lse = torch.ops.lhattn.sliding_window_attn_fwd(q, k, v, local, local, gidx, left, right,
                                                        pattern.dilation, scale, dropout_p, dropout_state)
    if gidx is None:
        return out, lse
    # global rows (left at 0 / -inf above): every valid key, through the global projections
    return attend_global_rows(out, lse, gidx, valid, *(global_qkv if global_qkv is not None else (q, k, v)),
                              scale=scale, dropout_p=dropout_p, dropout_state=dropout_state)


def attend_global_rows(out: Tensor, lse: Tensor, gidx: Tensor, valid: Optional[Tensor], q: Tensor, k: Tensor,
                       v: Tensor, *, scale: float, dropout_p: float = 0.0,
                       dropout_state: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Fill the rows ``gidx [B, G]`` of ``(out, lse)`` -- 0 / -inf after a local pass -- with full
    attention of those rows of ``q`` over every valid key of ``k, v`` (the dense op, window None).
    Dropout: the gathered rows keep their token positions (``drop_rows = gidx``)."""
    from .. import _ops  # lazily: needs the compiled lhattn._C

    q_rows = _ops.gather_rows(q, gidx[:, None, :])  # [B, H, G, D]
    out_g, lse_g = torch.ops.lhattn.sliding_window_attn_fwd(q_rows, k, v, gidx >= 0, valid, None, -1, -1, 1,
                                                            scale, dropout_p, dropout_state,
                                                            gidx if dropout_p > 0.0 else None)
    return write_global_rows(out, lse, gidx, out_g, lse_g)


impl = sliding_window_attention
"""Dispatch entry point: ``register_triton_backend(SlidingWindow, sliding_window.impl, sliding_window.reason)``."""
reason = sliding_window_unsupported_reason
