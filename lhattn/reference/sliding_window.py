"""Oracle for sliding-window + global-token attention (Longformer semantics)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import _dropout
from .._index import visible_tokens
from ..patterns import SlidingWindow
from .core import masked_attention

__all__ = ["sliding_window_attention", "band_mask"]


def band_mask(n: int, pattern: SlidingWindow, device=None) -> Tensor:
    """``[n, n]`` bool: key j is in query i's window, ``j = i + m·dilation``, ``-left <= m <= right``."""
    i = torch.arange(n, device=device)[:, None]
    rel = torch.arange(n, device=device)[None, :] - i
    d = pattern.dilation
    return (rel % d == 0) & (rel >= -pattern.left * d) & (rel <= pattern.right * d)


def with_globals(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    local_keys: Tensor,
    *,
    key_padding_mask: Optional[Tensor],
    global_mask: Optional[Tensor],
    global_qkv: Optional[Sequence[Tensor]],
    scale: float,
    dropout_p: float = 0.0,
    dropout_state: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Attention where local rows see ``local_keys`` (``[B|1, N, N]`` bool) plus every
    global key, and global rows see every key (through ``global_qkv`` if given).
    ``dropout_state``: see :mod:`lhattn._dropout` (rows and columns are token positions)."""
    b, h, n, _ = q.shape
    keep = None
    if dropout_p > 0.0:
        pos = torch.arange(n, device=q.device)
        keep = _dropout.keep_mask(dropout_state, b, h, pos, pos)
    valid, glob, local = visible_tokens(key_padding_mask, global_mask)
    ones = torch.ones(b, n, dtype=torch.bool, device=q.device)
    valid = ones if valid is None else valid
    local = ones if local is None else local
    glob = ~ones if glob is None else glob
    seen = (local_keys & local[:, None, :]) | glob[:, None, :]
    out, lse = masked_attention(q, k, v, (seen & local[:, :, None])[:, None], scale, dropout_p, keep)
    if glob.any():
        qg, kg, vg = global_qkv if global_qkv is not None else (q, k, v)
        out_g, lse_g = masked_attention(qg, kg, vg, (glob[:, :, None] & valid[:, None, :])[:, None], scale,
                                        dropout_p, keep)
        out = torch.where(glob[:, None, :, None], out_g, out)
        lse = torch.where(glob[:, None, :], lse_g, lse)
    return out, lse


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
) -> tuple[Tensor, Tensor]:
    """Reference: the explicit ``[B, N, N]`` mask of :class:`SlidingWindow`. Returns ``(out, lse)``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    band = band_mask(q.shape[2], pattern, q.device)[None]
    return with_globals(q, k, v, band, key_padding_mask=key_padding_mask, global_mask=global_mask,
                        global_qkv=global_qkv, scale=scale, dropout_p=dropout_p, dropout_state=dropout_state)
