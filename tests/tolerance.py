"""The accuracy rule of docs/ARCHITECTURE.md ("Testing rules"), in one place for every test file.

``err(backend) <= 2 * err(reference run in the input dtype) + floor``, both
errors measured against the reference run in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Absolute floor per dtype: covers the case where the low-precision reference is
# (by luck) almost exact on a tiny input.
FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def max_err(a: Tensor, b: Tensor) -> float:
    """Largest absolute difference, treating equal infinities (e.g. lse = -inf) as equal."""
    a, b = a.detach().double(), b.detach().double()
    same_inf = torch.isinf(a) & torch.isinf(b) & (a == b)
    if bool((torch.isinf(a) ^ torch.isinf(b)).any()):
        return float("inf")
    if bool(torch.isnan(a).any() or torch.isnan(b).any()):
        return float("nan")
    return float((a - b).masked_fill(same_inf, 0.0).abs().max()) if a.numel() else 0.0


def assert_close_to_oracle(name: str, got: Tensor, ref_lowp: Tensor, ref_fp64: Tensor, floor: float = None):
    """Check ``got`` against the fp64 oracle, relative to the oracle's own error in got's dtype."""
    assert got.shape == ref_fp64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref_fp64.shape)}"
    floor = FLOOR[got.dtype] if floor is None else floor
    err = max_err(got, ref_fp64)
    ref_err = max_err(ref_lowp, ref_fp64)
    assert err == err, f"{name}: NaN in the result"
    assert err <= 2 * ref_err + floor, (
        f"{name}: max error {err:.3e} vs fp64 oracle exceeds 2 x reference error {ref_err:.3e} + {floor:.0e}")
