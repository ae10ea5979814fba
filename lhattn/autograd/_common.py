"""What every Triton kernel family checks before it takes a call."""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from ..kernels._core import HEAD_DIMS

__all__ = ["kernel_unsupported_reason", "triton_head_dim"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_head_dim(d: int) -> Optional[int]:
    """The head dim at which the Triton kernels run a call of head dim ``d``: ``d`` itself when it
    is one of ``HEAD_DIMS``, else the smallest larger one (``lhattn.functional`` then zero-pads q,
    k, v to it and cuts the output back to ``d``), None above the largest."""
    return next((h for h in HEAD_DIMS if h >= d), None)


def kernel_unsupported_reason(q: Tensor, family: str, max_tokens: int = 2 ** 31) -> Optional[str]:
    """None if the ``family`` kernels can run on ``q``'s head dim, dtype and length, else why not.

    Head dims: up to ``max(HEAD_DIMS)`` (others than ``HEAD_DIMS`` zero-padded by the dispatch,
    :func:`triton_head_dim`); dtypes fp16/bf16/fp32, and fp64 only under ``TRITON_INTERPRET=1``
    (for gradcheck); ``N < max_tokens`` (the kernels index tokens in int32).
    """
    d = q.shape[-1]
    if triton_head_dim(d) is None:
        return (f"the Triton {family} kernels support head dims up to {HEAD_DIMS[-1]} (they run at {HEAD_DIMS}; "
                f"smaller ones are zero-padded), got D={d}; use backend='fallback' for larger head dims")
    if q.dtype == torch.float64 and os.environ.get("TRITON_INTERPRET") != "1":
        return ("float64 runs on the Triton kernels only under TRITON_INTERPRET=1 (for gradcheck); "
                "use backend='fallback' for float64 on CUDA")
    if q.dtype not in _DTYPES + (torch.float64,):
        return f"the Triton kernels support float16, bfloat16, float32 (float64 interpreted), got {q.dtype}"
    if q.shape[2] >= max_tokens:
        return f"sequence length {q.shape[2]} is too long for 32-bit token indices"
    return None
