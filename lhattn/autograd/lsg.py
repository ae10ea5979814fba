"""LSG attention on the Triton kernels, differentiable and traceable.

Two steps, exactly as the fallback (``lhattn/fallback/lsg.py``):

1. the sparse selection, :func:`lhattn.selection.select_sparse` (``impl="ops"``): plain
   differentiable PyTorch and ``torch.ops.lhattn.gather_rows`` / ``scatter_add_rows``, which
   builds the compressed keys/values ``[B, Hc, Tc, D]`` and their validity;
2. the attention over local, compressed and global keys, two ``torch.library`` custom ops
   wrapping the launchers of :mod:`lhattn.kernels.lsg`:

   * ``lhattn::lsg_attn_fwd(q, k, v, k_sparse, v_sparse, sparse_valid, key_valid, block_size,
     sparse_block_size, sparsity_factor, sparse_windows, num_global_tokens, block_offset, causal, scale,
     dropout_p=0.0, dropout_state=None) -> (out, lse)``;
   * ``lhattn::lsg_attn_bwd(dout, q, k, v, out, lse, k_sparse, v_sparse, sparse_valid, key_valid,
     ...) -> (dq, dk, dv, dk_sparse, dv_sparse)`` (the last two empty without compressed keys);

   each with a fake (meta) implementation, and the forward with ``register_autograd``.  The
   gradients of the compressed keys/values flow back through the selection by ordinary autograd,
   so ``torch.compile(fullgraph=True)`` traces the whole call (forward and backward).

Attention dropout (:mod:`lhattn._dropout`): ``dropout_p`` and the state ``(seed, T)`` go to both
ops; the state is saved for the backward, which regenerates the dropped entries from it.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..kernels._core import acc_dtype
from ..kernels.lsg import is_short, lsg_bwd, lsg_fwd
from ..patterns import LSG
from ..selection import select_sparse
from ._common import kernel_unsupported_reason

__all__ = ["lsg_attention", "lsg_unsupported_reason", "impl", "reason"]


def lsg_unsupported_reason(q: Tensor, pattern: LSG) -> Optional[str]:
    """None if the Triton LSG kernels can run on ``q``, else a sentence saying why not."""
    # the kernels' "no band" width 2 (N + Tc) + 1024 must fit in int32
    why = kernel_unsupported_reason(q, "LSG", max_tokens=(2 ** 31 - 4096) // 4)
    if why is None and pattern.has_sparse_keys and not is_short(q.shape[2], pattern.block_size,
                                                                pattern.block_offset):
        try:
            from .. import _ops  # noqa: F401  (the selection's gather/scatter ops)
        except ImportError as e:
            why = f"the sparse selection needs the compiled ops lhattn._C ({e})"
    return why


def _pairs(flat: List[int]) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """``[left_lo, left_hi, right_lo, right_hi]`` (the ops' flat form) -> the launchers' pairs."""
    return (flat[0], flat[1]), (flat[2], flat[3])


# --------------------------------------------------------------------------------------
# custom ops
# --------------------------------------------------------------------------------------


@torch.library.custom_op("lhattn::lsg_attn_fwd", mutates_args=())
def _attn_fwd(
    q: Tensor, k: Tensor, v: Tensor,
    k_sparse: Optional[Tensor], v_sparse: Optional[Tensor], sparse_valid: Optional[Tensor],
    key_valid: Optional[Tensor],
    block_size: int, sparse_block_size: int, sparsity_factor: int, sparse_windows: List[int], num_global_tokens: int,
    block_offset: int, causal: bool, scale: float, dropout_p: float = 0.0, dropout_state: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    return lsg_fwd(q, k, v, k_sparse, v_sparse, sparse_valid, block_size=block_size,
                   sparse_block_size=sparse_block_size, sparsity_factor=sparsity_factor,
                   num_global_tokens=num_global_tokens, block_offset=block_offset, causal=causal, scale=scale,
                   key_valid=key_valid, dropout_p=dropout_p, dropout_state=dropout_state,
                   sparse_windows=_pairs(sparse_windows))


@_attn_fwd.register_fake
def _attn_fwd_fake(q, k, v, k_sparse, v_sparse, sparse_valid, key_valid, block_size, sparse_block_size,
                   sparsity_factor, sparse_windows, num_global_tokens, block_offset, causal, scale, dropout_p=0.0,
                   dropout_state=None):
    b, h, n, d = q.shape
    return q.new_empty((b, h, n, d)), q.new_empty((b, h, n), dtype=acc_dtype(q.dtype))


@torch.library.custom_op("lhattn::lsg_attn_bwd", mutates_args=())
def _attn_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    k_sparse: Optional[Tensor], v_sparse: Optional[Tensor], sparse_valid: Optional[Tensor],
    key_valid: Optional[Tensor],
    block_size: int, sparse_block_size: int, sparsity_factor: int, sparse_windows: List[int], num_global_tokens: int,
    block_offset: int, causal: bool, scale: float, dropout_p: float = 0.0, dropout_state: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, dkc, dvc = lsg_bwd(dout, q, k, v, out, lse, k_sparse, v_sparse, sparse_valid, block_size=block_size,
                                   sparse_block_size=sparse_block_size, sparsity_factor=sparsity_factor,
                                   num_global_tokens=num_global_tokens, block_offset=block_offset, causal=causal,
                                   scale=scale, key_valid=key_valid, dropout_p=dropout_p,
                                   dropout_state=dropout_state, sparse_windows=_pairs(sparse_windows))
    if k_sparse is None:
        dkc, dvc = q.new_empty((0,)), q.new_empty((0,))
    elif dkc is None:  # compressed keys given but unused (short sequence): zero gradient
        dkc, dvc = torch.zeros_like(k_sparse), torch.zeros_like(v_sparse)
    return dq, dk, dv, dkc, dvc


@_attn_bwd.register_fake
def _attn_bwd_fake(dout, q, k, v, out, lse, k_sparse, v_sparse, sparse_valid, key_valid, *args):
    if k_sparse is None:
        dkc, dvc = q.new_empty((0,)), q.new_empty((0,))
    else:
        dkc, dvc = k_sparse.new_empty(k_sparse.shape), v_sparse.new_empty(v_sparse.shape)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dkc, dvc


def _setup_context(ctx, inputs, output):
    q, k, v, k_sparse, v_sparse, sparse_valid, key_valid, *args, dropout_p, dropout_state = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, k_sparse, v_sparse, sparse_valid, key_valid, dropout_state)
    ctx.args = tuple(args)
    ctx.dropout_p = dropout_p
    ctx.has_sparse = k_sparse is not None
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, k_sparse, v_sparse, sparse_valid, key_valid, dropout_state = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dkc, dvc = torch.ops.lhattn.lsg_attn_bwd(dout, q, k, v, out, lse, k_sparse, v_sparse, sparse_valid,
                                                         key_valid, *ctx.args, ctx.dropout_p, dropout_state)
    if not ctx.has_sparse:
        dkc = dvc = None
    return (dq, dk, dv, dkc, dvc) + (None,) * 12


_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------
# the pattern
# --------------------------------------------------------------------------------------


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
) -> Tuple[Tensor, Tensor]:
    """Same contract as :func:`lhattn.reference.lsg.lsg_attention`: q ``[B, H, N, D]``, k, v
    ``[B, H_kv, N, D]``, key_padding_mask ``[B, N]`` bool (True = padding), attention dropout
    ``dropout_p`` with the state ``dropout_state`` (:mod:`lhattn._dropout`; needed when
    ``dropout_p > 0``).  Returns ``(out [B, H, N, D], lse [B, H, N])``; differentiable in q, k, v
    (through the selection too)."""
    n, d = q.shape[2], q.shape[3]
    scale = d ** -0.5 if scale is None else float(scale)
    sparse = None
    if not is_short(n, pattern.block_size, pattern.block_offset):
        sparse = select_sparse(q, k, v, pattern, key_padding_mask=key_padding_mask, scale=scale, impl="ops")
    kc, vc, sv = (sparse.k, sparse.v, sparse.valid) if sparse is not None else (None, None, None)
    key_valid = None if key_padding_mask is None else ~key_padding_mask
    windows = [x for side in pattern.sparse_windows() for x in side]
    return torch.ops.lhattn.lsg_attn_fwd(q, k, v, kc, vc, sv, key_valid, pattern.block_size,
                                         pattern.sparse_block_size, pattern.sparsity_factor, windows,
                                         pattern.num_global_tokens, pattern.block_offset, pattern.causal, scale,
                                         float(dropout_p), dropout_state)


impl = lsg_attention
"""Dispatch entry point: ``register_triton_backend(LSG, lsg.impl, lsg.reason)``."""
reason = lsg_unsupported_reason
