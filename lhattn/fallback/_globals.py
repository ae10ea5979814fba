"""Global tokens for the blocked fallback: the extra key source and the global rows."""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence

import torch
from torch import Tensor

from .._index import write_global_rows
from .engine import Dropout, KeyBlock, QueryBlock, blocked_attention

__all__ = ["global_key_block", "attend_with_global_rows"]

ROW_BLOCK = 128  # global query rows per block (each block sees all N keys)


def global_key_block(gidx: Tensor, local_rows: Optional[Tensor]) -> KeyBlock:
    """Global keys (``gidx [B, G]``, -1 = none) as seen by query rows whose
    ``local_rows [B, Bq]`` is True (None = all rows)."""
    mask = (gidx >= 0)[:, None, None, :]
    if local_rows is not None:
        mask = mask & local_rows[:, None, :, None]
    return KeyBlock(index=gidx, mask=mask)


class _AllKeysPlan:
    """Rows of a gathered ``[B, H, G, D]`` query see every valid key."""

    def __init__(self, gidx: Tensor, valid: Optional[Tensor], n: int):
        self.gidx, self.valid, self.n = gidx, valid, n

    def blocks(self):
        g = self.gidx.shape[1]
        for s in range(0, g, ROW_BLOCK):
            rows = slice(s, min(g, s + ROW_BLOCK))
            mask = (self.gidx[:, rows] >= 0)[:, None, :, None]
            if self.valid is not None:
                mask = mask & self.valid[:, None, None, :]
            yield QueryBlock(rows=rows, keys=[KeyBlock(index=slice(0, self.n), mask=mask)])


def attend_with_global_rows(
    out: Tensor,
    lse: Tensor,
    gidx: Optional[Tensor],
    valid: Optional[Tensor],
    qkv: Sequence[Tensor],
    scale: float,
    dropout: Optional[Dropout] = None,
) -> tuple[Tensor, Tensor]:
    """Replace the rows ``gidx`` of ``(out, lse)`` -- which the local pass left at
    0 / -inf -- by full attention of those rows over every valid key.  ``dropout``: that of
    the local pass (token keys); the gathered rows keep their token positions ``gidx``."""
    if gidx is None:
        return out, lse
    from .. import _ops

    q, k, v = qkv
    n = q.shape[2]
    index = gidx[:, None, :]  # [B, 1, G]: the same rows for every head
    q_rows = _ops.gather_rows(q, index)
    rows_dropout = None if dropout is None else replace(dropout, row_pos=gidx)
    out_g, lse_g = blocked_attention(q_rows, [(k, v)], _AllKeysPlan(gidx, valid, n), scale, rows_dropout)
    return write_global_rows(out, lse, gidx, out_g, lse_g)
