"""HAT's cross-segment step on a sharded sequence: the representatives of every rank, in sequence order.

The representatives (:mod:`lhattn.nn.hat`: each segment's first token plus the global tokens, minus
padding) are found per shard -- a ragged segment's first token needs the previous rank's last
segment id, one token of halo -- then all-gathered (O(R·E) per rank, ``R`` = representatives) and
compacted into the single-process order, so that every rank runs the cross-segment encoder on the
same ``[B, R, E]`` rows (the segment position embeddings included) and keeps its own.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _ops
from .._index import global_indices
from . import _comm as C

__all__ = ["ShardedRepresentatives"]


class ShardedRepresentatives:
    """This rank's representatives and the map between its slots and the whole sequence's.

    is_rep: ``[B, N_r]`` bool; index: ``[B, r]`` local rows of this rank's representatives (-1 =
    empty slot), ``r`` the same on every rank; width: ``R``, the slots of the gathered rows.
    """

    def __init__(self, b: int, n: int, segment_ids: Optional[Tensor], segment_size: Optional[int],
                 key_padding_mask: Optional[Tensor], global_mask: Optional[Tensor], device, group):
        self.group = group
        sizes = [r[0] for r in C.gather_ints([n], group, device)]
        lay = C.Layout(group, dist.get_rank(group), tuple(sizes))
        pos = lay.start + torch.arange(n, device=device)
        if segment_ids is not None:  # first of its segment: its id differs from the previous token's
            ranges = [(max(0, s - 1), s + m) for s, m in zip(lay.starts, lay.sizes)]
            ext = C.halo_exchange(segment_ids, lay, ranges, dim=1)  # one token more on the left
            prev = ext[:, :-1] if lay.start > 0 else torch.cat([ext[:, :1] - 1, ext[:, :-1]], dim=1)
            is_rep = segment_ids != prev
        else:
            is_rep = (pos % segment_size == 0).expand(b, n)
        self.first, self.pos, self.segment_size, self.rank = is_rep, pos, segment_size, lay.rank
        if global_mask is not None:
            is_rep = is_rep | global_mask
        if key_padding_mask is not None:
            is_rep = is_rep & ~key_padding_mask
        counts = is_rep.sum(dim=1)  # [B]
        every = C.all_gather_cat(counts[None], group, 0)  # [W, B]
        r = int(every.max())
        idx = global_indices(is_rep)
        idx = torch.full((b, 0), -1, dtype=torch.long, device=device) if idx is None else idx
        self.is_rep = is_rep
        self.index = torch.cat([idx, idx.new_full((b, r - idx.shape[1]), -1)], dim=1)
        first = every.cumsum(dim=0) - every  # [W, B]: where each rank's representatives start
        total = every.sum(dim=0)  # [B]
        self.width = int(total.max())
        # slot j of the sequence's representatives is slot j - first[t] of rank t (rank order)
        slot = torch.arange(self.width, device=device)[None, :]  # [1, R]
        owner = (slot[None] >= first[:, :, None]).sum(dim=0) - 1  # [B, R]: last rank starting at or before j
        local = slot - first.T.gather(1, owner.clamp(min=0))
        self.compact = torch.where(slot < total[:, None], owner * r + local, torch.full_like(local, -1))
        mine = first[lay.rank][:, None] + torch.arange(r, device=device)[None, :]  # [B, r]
        self.mine_slots = torch.where(self.index >= 0, mine, torch.full_like(mine, -1))
        self.valid = self.compact >= 0  # [B, R]

    def segment_numbers(self):
        """``(ordinal [B, N_r], count)``: each local token's 0-based segment number in the whole sequence
        (padded segments counted, as :func:`lhattn.nn.hat.segment_ordinal`) and the most segments of a
        batch row (the same on every rank)."""
        if self.segment_size is not None:
            ordinal = (self.pos // self.segment_size).expand_as(self.first)
        else:
            every = C.all_gather_cat(self.first.sum(dim=1)[None], self.group, 0)  # [W, B] segment starts
            before = (every.cumsum(dim=0) - every)[self.rank]
            ordinal = self.first.long().cumsum(dim=1) - 1 + before[:, None]
        last = int(ordinal[:, -1].max()) + 1
        return ordinal, C.reduce_max_int(last, self.group, ordinal.device)

    def gather(self, h: Tensor) -> Tensor:
        """``h [B, r, E]`` (this rank's slots) -> ``[B, R, E]``, every rank's, in sequence order."""
        every = C.all_gather_rows(h, self.group, dim=1)  # [B, W·r, E]
        return _ops.gather_rows(every[:, None], self.compact[:, None])[:, 0]

    def mine(self, h: Tensor) -> Tensor:
        """``[B, R, E]`` -> this rank's slots ``[B, r, E]``."""
        return _ops.gather_rows(h[:, None], self.mine_slots[:, None])[:, 0]
