"""Oracle for segment-local + global-token attention (HAT semantics)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..patterns import Segments
from .sliding_window import with_globals

__all__ = ["segment_attention", "segment_ids_of"]


def segment_ids_of(pattern: Segments, segment_ids: Optional[Tensor], b: int, n: int, device) -> Tensor:
    """``[B, N]`` segment ids: the given ones, or ``i // segment_size``."""
    if segment_ids is not None:
        return segment_ids
    return (torch.arange(n, device=device) // pattern.segment_size).expand(b, n)


def segment_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: Segments,
    *,
    segment_ids: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    global_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    dropout_state: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Reference: query i sees key j iff ``seg[i] == seg[j]`` (plus globals). Returns ``(out, lse)``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    b, _, n, _ = q.shape
    seg = segment_ids_of(pattern, segment_ids, b, n, q.device)
    same = seg[:, :, None] == seg[:, None, :]
    return with_globals(q, k, v, same, key_padding_mask=key_padding_mask, global_mask=global_mask,
                        global_qkv=None, scale=scale, dropout_p=dropout_p, dropout_state=dropout_state)
