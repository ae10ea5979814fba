"""Segment-local + global-token attention, blocked pure PyTorch (O(N·S) time, O(N·D) memory)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._index import global_indices, segment_bounds, visible_tokens
from ..patterns import Segments
from ._globals import attend_with_global_rows, global_key_block
from .engine import KeyBlock, QueryBlock, blocked_attention, make_dropout

__all__ = ["segment_attention"]

BLOCK_ROWS = 128


class _FixedPlan:
    """Segments ``[s·S, (s+1)·S)``: a query block sees the contiguous segments it touches."""

    def __init__(self, size: int, n: int, local: Optional[Tensor], gidx: Optional[Tensor], device):
        self.size, self.n, self.local, self.gidx, self.device = size, n, local, gidx, device
        self.bq = min(BLOCK_ROWS, size) if size >= 64 else size * max(1, BLOCK_ROWS // size)

    def blocks(self):
        s, n = self.size, self.n
        for qs in range(0, n, self.bq):
            qe = min(n, qs + self.bq)
            ks, ke = qs // s * s, min(n, ((qe - 1) // s + 1) * s)
            seg_q = torch.arange(qs, qe, device=self.device) // s
            seg_k = torch.arange(ks, ke, device=self.device) // s
            mask = (seg_q[:, None] == seg_k[None, :])[None, None]
            rows = None
            if self.local is not None:
                rows = self.local[:, qs:qe]
                mask = mask & rows[:, None, :, None] & self.local[:, None, None, ks:ke]
            keys = [KeyBlock(index=slice(ks, ke), mask=mask)]
            if self.gidx is not None:
                keys.append(global_key_block(self.gidx, rows))
            yield QueryBlock(rows=slice(qs, qe), keys=keys)


class _RaggedPlan:
    """Variable segments from ``segment_ids``: per batch row, a query block sees
    ``[start of its first query's segment, end of its last query's segment)``."""

    def __init__(self, segment_ids: Tensor, local: Optional[Tensor], gidx: Optional[Tensor]):
        self.ids, self.local, self.gidx = segment_ids, local, gidx
        self.start, self.end = segment_bounds(segment_ids)
        n = segment_ids.shape[1]
        self.bq = BLOCK_ROWS
        firsts = torch.arange(0, n, self.bq, device=segment_ids.device)
        lasts = (firsts + self.bq).clamp(max=n) - 1
        spans = self.end[:, lasts] - self.start[:, firsts]  # [B, nblocks]
        self.spans = spans.max(dim=0).values.tolist()  # one host sync for the whole plan

    def blocks(self):
        n = self.ids.shape[1]
        dev = self.ids.device
        for blk, qs in enumerate(range(0, n, self.bq)):
            qe = min(n, qs + self.bq)
            index = self.start[:, qs:qs + 1] + torch.arange(self.spans[blk], device=dev)[None, :]  # [B, L]
            in_range = index < n
            safe = index.clamp(max=n - 1)
            seg_k = self.ids.gather(1, safe)
            mask = (self.ids[:, qs:qe, None] == seg_k[:, None, :]) & in_range[:, None, :]
            rows = None
            if self.local is not None:
                rows = self.local[:, qs:qe]
                mask = mask & rows[:, :, None] & self.local.gather(1, safe)[:, None, :]
            keys = [KeyBlock(index=torch.where(in_range, index, -1), mask=mask[:, None])]
            if self.gidx is not None:
                keys.append(global_key_block(self.gidx, rows))
            yield QueryBlock(rows=slice(qs, qe), keys=keys)


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
    """Same contract as :func:`lhattn.reference.segment_attention`; returns ``(out, lse)``.
    ``dropout_state``: see :mod:`lhattn._dropout` (needed when ``dropout_p > 0``)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    valid, glob, local = visible_tokens(key_padding_mask, global_mask)
    gidx = global_indices(glob)
    if segment_ids is None:
        plan = _FixedPlan(pattern.segment_size, q.shape[2], local, gidx, q.device)
    else:
        plan = _RaggedPlan(segment_ids, local, gidx)
    sources = [(k, v)] if gidx is None else [(k, v), (k, v)]
    dropout = make_dropout(dropout_p, dropout_state)
    out, lse = blocked_attention(q, sources, plan, scale, dropout)
    return attend_with_global_rows(out, lse, gidx, valid, (q, k, v), scale, dropout)
