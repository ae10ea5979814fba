"""Sliding-window + global-token attention, blocked pure PyTorch (O(N·w) time, O(N·D) memory)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .._index import global_indices, visible_tokens
from ..patterns import SlidingWindow
from ._globals import attend_with_global_rows, global_key_block
from .engine import KeyBlock, QueryBlock, blocked_attention, make_dropout

__all__ = ["sliding_window_attention"]


def _block_rows(pattern: SlidingWindow, n: int) -> int:
    """Query rows per block: about the window width (work overhead ~(Bq + w) / w), 64..256."""
    span = pattern.left + pattern.right + 1
    return max(64, min(256, 1 << (span - 1).bit_length()))


class _WindowPlan:
    def __init__(self, pattern: SlidingWindow, n: int, local: Optional[Tensor], gidx: Optional[Tensor], device):
        self.p, self.n, self.local, self.gidx, self.device = pattern, n, local, gidx, device
        self.bq = _block_rows(pattern, n)
        self._bands = {}

    def _band(self, qs: int, qe: int, ks: int, ke: int) -> Tensor:
        """``[1, 1, Bq, L]`` window mask; interior blocks share one geometry, so it is cached."""
        key = (qs - ks, qe - qs, ke - ks)
        if key not in self._bands:
            d, lo, hi = self.p.dilation, self.p.left * self.p.dilation, self.p.right * self.p.dilation
            rel = (torch.arange(ke - ks, device=self.device)[None, :]
                   - torch.arange(qs - ks, qe - ks, device=self.device)[:, None])
            self._bands[key] = ((rel >= -lo) & (rel <= hi) & (rel % d == 0))[None, None]
        return self._bands[key]

    def blocks(self):
        lo, hi, n = self.p.left * self.p.dilation, self.p.right * self.p.dilation, self.n
        for qs in range(0, n, self.bq):
            qe = min(n, qs + self.bq)
            ks, ke = max(0, qs - lo), min(n, qe + hi)
            mask = self._band(qs, qe, ks, ke)
            rows = None
            if self.local is not None:
                rows = self.local[:, qs:qe]
                mask = mask & rows[:, None, :, None] & self.local[:, None, None, ks:ke]
            keys = [KeyBlock(index=slice(ks, ke), mask=mask)]
            if self.gidx is not None:
                keys.append(global_key_block(self.gidx, rows))
            yield QueryBlock(rows=slice(qs, qe), keys=keys)


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
    """Same contract as :func:`lhattn.reference.sliding_window_attention`; returns ``(out, lse)``.
    ``dropout_state``: see :mod:`lhattn._dropout` (needed when ``dropout_p > 0``)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    valid, glob, local = visible_tokens(key_padding_mask, global_mask)
    gidx = global_indices(glob)
    plan = _WindowPlan(pattern, q.shape[2], local, gidx, q.device)
    sources = [(k, v)] if gidx is None else [(k, v), (k, v)]
    dropout = make_dropout(dropout_p, dropout_state)
    out, lse = blocked_attention(q, sources, plan, scale, dropout)
    return attend_with_global_rows(out, lse, gidx, valid, global_qkv or (q, k, v), scale, dropout)
