"""Input checks shared by every public entry point.

Each check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError``
(wrong value or shape) naming the argument, what was given and what is allowed.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["check_qkv", "check_token_mask", "check_global_qkv", "check_segment_ids", "check_scale",
           "FLOAT_DTYPES"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _tensor(name: str, x) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    """q ``[B, H, N, D]``; k, v ``[B, H_kv, N, D]`` with ``H % H_kv == 0``; one dtype and device."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _tensor(name, x)
        if x.dim() != 4:
            raise ValueError(f"{name} must have 4 dims [B, H, N, D], got shape {tuple(x.shape)}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name}.dtype must equal q.dtype ({q.dtype}), got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on q's device ({q.device}), got {x.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    b, h, n, d = q.shape
    if k.shape[0] != b or k.shape[2] != n or k.shape[3] != d:
        raise ValueError(
            f"k/v must be [B={b}, H_kv, N={n}, D={d}] to match q {tuple(q.shape)} "
            f"(self-attention patterns), got {tuple(k.shape)}")
    if k.shape[1] == 0 or h % k.shape[1] != 0:
        raise ValueError(f"q's heads ({h}) must be a multiple of k/v's heads, got H_kv={k.shape[1]}")
    if n == 0 or d == 0 or b == 0 or h == 0:
        raise ValueError(f"q must have non-empty B, H, N and D, got shape {tuple(q.shape)}")


def check_token_mask(name: str, mask: Optional[Tensor], q: Tensor) -> None:
    """A ``[B, N]`` bool mask on q's device (None allowed)."""
    if mask is None:
        return
    _tensor(name, mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = {'padding' if 'padding' in name else 'set'}), "
                        f"got {mask.dtype}")
    b, _, n, _ = q.shape
    if tuple(mask.shape) != (b, n):
        raise ValueError(f"{name} must have shape [B, N] = {(b, n)}, got {tuple(mask.shape)}")
    if mask.device != q.device:
        raise ValueError(f"{name} must be on q's device ({q.device}), got {mask.device}")


def check_global_qkv(global_qkv: Optional[Sequence[Tensor]], q: Tensor, k: Tensor) -> None:
    """``(q_global, k_global, v_global)`` shaped like ``(q, k, k)``."""
    if global_qkv is None:
        return
    if not isinstance(global_qkv, (tuple, list)) or len(global_qkv) != 3:
        raise TypeError(f"global_qkv must be a (q_global, k_global, v_global) tuple, got {type(global_qkv).__name__}")
    for name, x, like in zip(("q_global", "k_global", "v_global"), global_qkv, (q, k, k)):
        _tensor(f"global_qkv {name}", x)
        if x.shape != like.shape:
            raise ValueError(f"global_qkv {name} must have shape {tuple(like.shape)}, got {tuple(x.shape)}")
        if x.dtype != q.dtype:
            raise TypeError(f"global_qkv {name} must have dtype {q.dtype}, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"global_qkv {name} must be on {q.device}, got {x.device}")


def check_segments_call(segment_size: Optional[int], segment_ids: Optional[Tensor], q: Tensor) -> None:
    """A Segments call: exactly one of the pattern's ``segment_size`` and the call's ``segment_ids``,
    and valid ids when given."""
    if (segment_ids is None) == (segment_size is None):
        raise ValueError("Segments needs exactly one of segment_size (in the pattern) and segment_ids (per call); "
                         f"got segment_size={segment_size} and "
                         f"segment_ids={'given' if segment_ids is not None else None}")
    if segment_ids is not None:
        check_segment_ids(segment_ids, q)


def check_segment_ids(segment_ids: Tensor, q: Tensor) -> None:
    """``[B, N]`` integer ids, non-decreasing along N (so every segment is contiguous)."""
    _tensor("segment_ids", segment_ids)
    if segment_ids.dtype.is_floating_point or segment_ids.dtype == torch.bool or segment_ids.is_complex():
        raise TypeError(f"segment_ids must be an integer tensor, got {segment_ids.dtype}")
    b, _, n, _ = q.shape
    if tuple(segment_ids.shape) != (b, n):
        raise ValueError(f"segment_ids must have shape [B, N] = {(b, n)}, got {tuple(segment_ids.shape)}")
    if segment_ids.device != q.device:
        raise ValueError(f"segment_ids must be on q's device ({q.device}), got {segment_ids.device}")
    # A data-dependent check: skipped while torch.compile traces (it would break the graph).
    if n > 1 and not torch.compiler.is_compiling() and bool((segment_ids[:, 1:] < segment_ids[:, :-1]).any()):
        bad = (segment_ids[:, 1:] < segment_ids[:, :-1]).nonzero()[0].tolist()
        raise ValueError(
            "segment_ids must be non-decreasing along the sequence (contiguous segments), but "
            f"segment_ids[{bad[0]}, {bad[1] + 1}] < segment_ids[{bad[0]}, {bad[1]}]")


def check_scale(scale: Optional[float]) -> None:
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not (scale > 0 and scale != float("inf")):
        raise ValueError(f"scale must be a finite positive number, got {scale}")
