"""Row gather / scatter-add: the C++/CUDA ops of sparse key selection.

``torch.ops.lhattn.gather_rows`` and ``torch.ops.lhattn.scatter_add_rows`` are defined in
``csrc/ops.cpp`` (CPU) and ``csrc/cuda/gather_scatter*.{cu,cpp}`` (CUDA). Importing this module
loads the compiled extension ``lhattn._C`` and registers, for both ops, the fake kernels
(``torch.compile`` / FakeTensor) and the autograd formulas: each op's backward is the other op,
so double backward works as well. ``index`` never gets a gradient.

The public wrappers :func:`gather_rows` and :func:`scatter_add_rows` check their inputs and raise
``TypeError`` / ``ValueError`` naming the argument; the raw ``torch.ops`` calls check only in C++.
"""

from typing import Union

import torch
from torch import Tensor

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.lhattn.*)
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        f"lhattn._C, the compiled gather/scatter extension, could not be loaded ({exc}). "
        "Build it by running `pip install --no-build-isolation -e .` in the repo root "
        "(or `python setup.py build_ext --inplace`)."
    ) from exc

__all__ = ["gather_rows", "scatter_add_rows", "dropout_keep"]

_ROW_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---- fake kernels -------------------------------------------------------------------------------


@torch.library.register_fake("lhattn::gather_rows")
def _gather_rows_fake(x: Tensor, index: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], x.shape[1], index.shape[2], x.shape[3]))


@torch.library.register_fake("lhattn::scatter_add_rows")
def _scatter_add_rows_fake(src: Tensor, index: Tensor, n: int) -> Tensor:
    return src.new_empty((src.shape[0], src.shape[1], n, src.shape[3]))


@torch.library.register_fake("lhattn::dropout_keep")
def _dropout_keep_fake(row_keys: Tensor, cols: Tensor, state: Tensor) -> Tensor:
    return row_keys.new_empty((row_keys.shape[0], row_keys.shape[1], cols.shape[1]), dtype=torch.bool)


# ---- autograd -----------------------------------------------------------------------------------


def _gather_rows_setup_context(ctx, inputs, output) -> None:
    x, index = inputs
    ctx.save_for_backward(index)
    ctx.n = x.shape[2]


def _gather_rows_backward(ctx, grad_out: Tensor):
    (index,) = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.lhattn.scatter_add_rows(grad_out, index, ctx.n)
    return grad_x, None


def _scatter_add_rows_setup_context(ctx, inputs, output) -> None:
    _, index, _ = inputs
    ctx.save_for_backward(index)


def _scatter_add_rows_backward(ctx, grad_out: Tensor):
    (index,) = ctx.saved_tensors
    grad_src = None
    if ctx.needs_input_grad[0]:
        grad_src = torch.ops.lhattn.gather_rows(grad_out, index)
    return grad_src, None, None


torch.library.register_autograd(
    "lhattn::gather_rows", _gather_rows_backward, setup_context=_gather_rows_setup_context
)
torch.library.register_autograd(
    "lhattn::scatter_add_rows",
    _scatter_add_rows_backward,
    setup_context=_scatter_add_rows_setup_context,
)


# ---- input checks -------------------------------------------------------------------------------


def _validate_rows(op: str, name: str, rows: object, layout: str) -> None:
    if not isinstance(rows, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(rows).__name__}")
    if rows.dim() != 4:
        raise ValueError(
            f"{op}: {name} must be 4-D {layout}, got {rows.dim()}-D with shape {tuple(rows.shape)}"
        )
    if rows.dtype not in _ROW_DTYPES:
        raise TypeError(
            f"{op}: {name}.dtype must be float16, bfloat16, float32 or float64, got {rows.dtype}"
        )


def _validate_index(op: str, index: object, rows: Tensor, name: str, m: Union[int, None]) -> None:
    """index: [B, Hi, M] int64 with B = rows.shape[0], Hi in {1, H}, and M = m if m is given."""
    if not isinstance(index, Tensor):
        raise TypeError(f"{op}: index must be a torch.Tensor, got {type(index).__name__}")
    if index.dtype != torch.int64:
        raise TypeError(f"{op}: index.dtype must be torch.int64, got {index.dtype}")
    if index.dim() != 3:
        raise ValueError(
            f"{op}: index must be 3-D [B, Hi, M], got {index.dim()}-D with shape "
            f"{tuple(index.shape)}"
        )
    if index.device != rows.device:
        raise ValueError(
            f"{op}: index is on {index.device} but {name} is on {rows.device}; "
            "both must be on the same device"
        )
    B, H = rows.shape[0], rows.shape[1]
    if index.shape[0] != B:
        raise ValueError(
            f"{op}: index.shape[0] (B) must equal {name}.shape[0] = {B}, got {index.shape[0]}"
        )
    if index.shape[1] != 1 and index.shape[1] != H:
        raise ValueError(
            f"{op}: index.shape[1] (Hi) must be 1 (shared by all heads) or {name}.shape[1] = {H}, "
            f"got {index.shape[1]}"
        )
    if m is not None and index.shape[2] != m:
        raise ValueError(
            f"{op}: index.shape[2] (M) must equal {name}.shape[2] = {m}, got {index.shape[2]}"
        )


# ---- public API ---------------------------------------------------------------------------------


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """Gather rows of ``x`` along the sequence dim: ``out[b, h, m] = x[b, h, index[b, hi, m]]``.

    Args:
        x: ``[B, H, N, D]``, float16 / bfloat16 / float32 / float64, any strides.
        index: ``[B, Hi, M]`` int64 with ``Hi == 1`` (one list shared by every head, ``hi = 0``)
            or ``Hi == H`` (``hi = h``). A negative entry (by convention -1) is an empty slot and
            gives a zero row. Entries must be ``< N``: on CPU a larger one raises IndexError; on
            CUDA it is not checked (no host sync) and gives a zero row like -1.

    Returns:
        ``[B, H, M, D]``, contiguous, dtype of ``x``. Differentiable in ``x``; the gradient is
        :func:`scatter_add_rows` of the output gradient.
    """
    _validate_rows("gather_rows", "x", x, "[B, H, N, D]")
    _validate_index("gather_rows", index, x, "x", m=None)
    return torch.ops.lhattn.gather_rows(x, index)


def scatter_add_rows(src: Tensor, index: Tensor, n: Union[int, torch.SymInt]) -> Tensor:
    """Scatter-add rows of ``src`` into ``n`` rows: ``out[b, h, index[b, hi, m]] += src[b, h, m]``.

    The adjoint of :func:`gather_rows`. Rows whose index is negative (-1: empty slot) are dropped;
    duplicate indices accumulate. On CPU the sum is deterministic (fp16 / bf16 accumulate in fp32);
    on CUDA it uses atomics in the dtype of ``src``, so duplicates sum in no fixed order.

    Args:
        src: ``[B, H, M, D]``, float16 / bfloat16 / float32 / float64, any strides.
        index: ``[B, Hi, M]`` int64, ``Hi`` in ``{1, H}`` as in :func:`gather_rows`. Entries must be
            ``< n``: on CPU a larger one raises IndexError; on CUDA it is dropped like -1.
        n: number of output rows, ``>= 0``.

    Returns:
        ``[B, H, n, D]``, contiguous, dtype of ``src``: zeros plus the scattered rows.
        Differentiable in ``src``; the gradient is :func:`gather_rows` of the output gradient.
    """
    _validate_rows("scatter_add_rows", "src", src, "[B, H, M, D]")
    _validate_index("scatter_add_rows", index, src, "src", m=src.shape[2])
    if isinstance(n, bool) or not isinstance(n, (int, torch.SymInt)):
        raise TypeError(f"scatter_add_rows: n must be an int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"scatter_add_rows: n (number of output rows) must be >= 0, got {n}")
    return torch.ops.lhattn.scatter_add_rows(src, index, n)


def dropout_keep(r: Tensor, cols: Tensor, state: Tensor) -> Tensor:
    """:func:`lhattn._dropout.keep` -- row keys ``r [B, H, Nq]``, key columns ``cols`` (``[L]`` or
    ``[B, L]``) -> bool ``[B, H, Nq, L]`` -- through ``torch.ops.lhattn.dropout_keep`` on the CPU (one
    32-bit pass instead of ~20 int64 tensor passes; csrc/dropout.cpp), the plain torch rule elsewhere.
    Bit-identical either way."""
    if r.device.type != "cpu":
        from . import _dropout

        return _dropout.keep(r, cols, state)
    b, h, nq = r.shape
    cols2 = cols.reshape(1 if cols.dim() == 1 else b, -1).to(torch.int64)
    return torch.ops.lhattn.dropout_keep(r.reshape(b, h * nq), cols2, state).view(b, h, nq, cols2.shape[1])
