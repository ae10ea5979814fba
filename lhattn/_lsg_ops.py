"""Fused LSG selection ops: ``torch.ops.lhattn.lsg_norm_select``.

The op is defined in ``csrc/lsg_select.cpp`` (schema + CPU kernel) and
``csrc/cuda/lsg_select*.{cu,cpp}`` (CUDA kernel). Importing this module loads the compiled
extension (through :mod:`lhattn._ops`, which also registers ``gather_rows`` / ``scatter_add_rows``)
and registers the op's fake kernel (``torch.compile`` / FakeTensor) and autograd formula: the
gradient of ``k_sel`` / ``v_sel`` is :func:`lhattn._ops.scatter_add_rows` of the output gradient
over the returned ``index``, so double backward works too. ``index`` is an int64 output without
gradient; the selection itself is piecewise constant in ``k``.

:func:`lsg_norm_select` is the public wrapper: it checks its inputs and raises ``TypeError`` /
``ValueError`` naming the argument; the raw ``torch.ops`` call checks only in C++.
The plain-torch computation of the same function is ``lhattn.selection`` with ``impl="torch"``
(``sparsity_type="norm"``); tests check that the two agree exactly.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _ops  # noqa: F401  (loads lhattn._C, which defines torch.ops.lhattn.*)

__all__ = ["lsg_norm_select", "MAX_CHUNK"]

MAX_CHUNK = 1024  # the largest chunk the op accepts (one chunk per CUDA thread block)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---- fake kernel --------------------------------------------------------------------------------


@torch.library.register_fake("lhattn::lsg_norm_select")
def _lsg_norm_select_fake(k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], chunk: int, keep: int,
                          num_chunks: int) -> Tuple[Tensor, Tensor, Tensor]:
    b, h, _, d = k.shape
    m = num_chunks * keep
    return (k.new_empty((b, h, m, d)), v.new_empty((b, h, m, v.shape[3])),
            k.new_empty((b, h, m), dtype=torch.int64))


# ---- autograd -----------------------------------------------------------------------------------


def _lsg_norm_select_setup_context(ctx, inputs, output) -> None:
    k = inputs[0]
    index = output[2]
    ctx.mark_non_differentiable(index)
    ctx.save_for_backward(index)
    ctx.n = k.shape[2]


def _lsg_norm_select_backward(ctx, grad_k_sel: Tensor, grad_v_sel: Tensor, grad_index):
    (index,) = ctx.saved_tensors
    grad_k = grad_v = None
    if ctx.needs_input_grad[0]:
        grad_k = torch.ops.lhattn.scatter_add_rows(grad_k_sel, index, ctx.n)
    if ctx.needs_input_grad[1]:
        grad_v = torch.ops.lhattn.scatter_add_rows(grad_v_sel, index, ctx.n)
    return grad_k, grad_v, None, None, None, None


torch.library.register_autograd("lhattn::lsg_norm_select", _lsg_norm_select_backward,
                                setup_context=_lsg_norm_select_setup_context)


# ---- public API ---------------------------------------------------------------------------------


def _check_int(name: str, value: object, low: int, high: Optional[int] = None, what: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"lsg_norm_select: {name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"lsg_norm_select: {name} must be {allowed}{what}, got {value}")


def _validate(k: object, v: object, key_padding_mask: object) -> None:
    for name, x, layout in (("k", k, "[B, H, T, D]"), ("v", v, "[B, H, T, Dv]")):
        if not isinstance(x, Tensor):
            raise TypeError(f"lsg_norm_select: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"lsg_norm_select: {name} must be 4-D {layout}, got shape {tuple(x.shape)}")
        if x.dtype not in _DTYPES:
            raise TypeError(f"lsg_norm_select: {name}.dtype must be float16, bfloat16, float32 or float64, "
                            f"got {x.dtype}")
    if v.dtype != k.dtype:
        raise TypeError(f"lsg_norm_select: v.dtype must equal k.dtype ({k.dtype}), got {v.dtype}")
    if v.device != k.device:
        raise ValueError(f"lsg_norm_select: v must be on k's device ({k.device}), got {v.device}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"lsg_norm_select: v must be [B, H, T, Dv] with k's B, H, T {tuple(k.shape[:3])}, "
                         f"got {tuple(v.shape)}")
    if key_padding_mask is None:
        return
    if not isinstance(key_padding_mask, Tensor):
        raise TypeError(f"lsg_norm_select: key_padding_mask must be a torch.Tensor or None, "
                        f"got {type(key_padding_mask).__name__}")
    if key_padding_mask.dtype != torch.bool:
        raise TypeError(f"lsg_norm_select: key_padding_mask must be bool (True = not selectable), "
                        f"got {key_padding_mask.dtype}")
    if tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2]):
        raise ValueError(f"lsg_norm_select: key_padding_mask must be [B, T] = {(k.shape[0], k.shape[2])}, "
                         f"got {tuple(key_padding_mask.shape)}")
    if key_padding_mask.device != k.device:
        raise ValueError(f"lsg_norm_select: key_padding_mask must be on k's device ({k.device}), "
                         f"got {key_padding_mask.device}")


def lsg_norm_select(k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None, *, chunk: int, keep: int,
                    num_chunks: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """LSG's ``norm`` selection, fused: per chunk, the ``keep`` keys of largest norm, and their rows.

    Positions ``[0, num_chunks · chunk)`` are cut into chunks of ``chunk`` (positions ``>= T`` are
    end padding).  Each position ``p`` scores ``s(p) = Σ_d k[b, h, p, d]²``, summed left to right
    over ``d`` in fp32 (fp64 for fp64 inputs) with every product and sum rounded separately, or
    ``-1`` if ``key_padding_mask[b, p]`` or ``p >= T``.  Positions rank by score descending, NaN
    first, ties by the lower position first (deterministic, unlike ``torch.topk``); the ``keep``
    best of chunk ``c`` fill slots ``[c·keep, (c+1)·keep)`` in *ascending* score order (LSG's order:
    ``topk(...).flip``).  Masked positions rank last but still fill a chunk that has fewer than
    ``keep`` usable ones: the caller masks them (``index`` says which they are).

    Args:
        k: ``[B, H, T, D]``, float16 / bfloat16 / float32 / float64, any strides.
        v: ``[B, H, T, Dv]``, k's dtype and device, any strides.
        key_padding_mask: ``[B, T]`` bool, True = not to be selected first (padding, global tokens).
        chunk: ``1 <= chunk <= 1024``.
        keep: ``1 <= keep <= chunk``.
        num_chunks: ``>= ceil(T / chunk)`` (default exactly that); extra chunks are all end padding.

    Returns:
        ``(k_sel [B, H, M, D], v_sel [B, H, M, Dv], index [B, H, M] int64)`` with
        ``M = num_chunks · keep``, contiguous: ``index`` holds the selected positions (-1 past
        ``T``), ``k_sel`` / ``v_sel`` the rows there (zero rows for -1).  Differentiable in k and v
        (gradient: :func:`lhattn._ops.scatter_add_rows` over ``index``).
    """
    _validate(k, v, key_padding_mask)
    _check_int("chunk", chunk, 1, MAX_CHUNK)
    _check_int("keep", keep, 1, chunk, " (chunk)")
    t = k.shape[2]
    need = -(-t // chunk)
    if num_chunks is None:
        num_chunks = need
    _check_int("num_chunks", num_chunks, need, None, f" (= ceil(T / chunk), T = {t}, chunk = {chunk})")
    return torch.ops.lhattn.lsg_norm_select(k, v, key_padding_mask, chunk, keep, num_chunks)
