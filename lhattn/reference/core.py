"""Dense masked attention: the one primitive every reference pattern is built on.

Obviously correct and O(N²) in memory; use it to check, never to run.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["masked_attention", "repeat_kv"]


def repeat_kv(x: Tensor, heads: int) -> Tensor:
    """``[B, H_kv, N, D] -> [B, H, N, D]``: query head ``h`` reads kv head ``h // (H / H_kv)``."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float,
                     dropout_p: float = 0.0, keep: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``softmax(q kᵀ · scale, masked) v`` with an explicit boolean mask.

    q: ``[B, H, Nq, D]``; k, v: ``[B, H_kv, Nk, D]``; mask: bool, broadcastable
    to ``[B, H, Nq, Nk]``, True = visible.  Products run in the input dtype,
    the softmax in float32 (float64 for float64 inputs), as a kernel would.
    Returns ``out [B, H, Nq, D]`` (input dtype; rows with no visible key are
    exactly 0) and ``lse [B, H, Nq]`` (float32/float64; ``-inf`` for such rows).
    ``keep`` (bool, broadcastable like ``mask``; with ``dropout_p > 0``): attention dropout --
    probabilities where ``keep`` is False become 0, the others are scaled by ``1 / (1 - p)``;
    ``lse`` stays that of the undropped softmax (see :mod:`lhattn._dropout`).
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    h = q.shape[1]
    k, v = repeat_kv(k, h), repeat_kv(v, h)
    s = torch.matmul(q, k.transpose(-1, -2)).to(acc) * scale
    s = s.masked_fill(~mask, float("-inf"))
    empty = ~mask.expand(s.shape).any(dim=-1, keepdim=True)  # rows that see no key
    s = s.masked_fill(empty, 0.0)  # keep softmax and its gradient finite there
    p = torch.softmax(s, dim=-1).masked_fill(empty, 0.0)
    if dropout_p > 0.0:
        p = p.masked_fill(~keep, 0.0) * (1.0 / (1.0 - dropout_p))
    lse = torch.logsumexp(s.detach(), dim=-1).masked_fill(empty[..., 0], float("-inf"))
    out = torch.matmul(p.to(q.dtype), v)
    return out, lse
