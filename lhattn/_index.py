"""Index bookkeeping shared by every backend: global-token lists and segment bounds.

These run once per call, outside the attention itself, and cost O(B·N).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["visible_tokens", "global_indices", "segment_bounds", "write_global_rows"]


def visible_tokens(key_padding_mask: Optional[Tensor], global_mask: Optional[Tensor]):
    """Split tokens into ``(valid, glob, local)`` boolean ``[B, N]`` masks (or None).

    valid: not padding; glob: global and not padding; local: valid and not global.
    None stands for "all True" (valid, local) or "all False" (glob).
    """
    valid = None if key_padding_mask is None else ~key_padding_mask
    glob = None
    if global_mask is not None:
        glob = global_mask if valid is None else global_mask & valid
    local = valid
    if glob is not None:
        local = ~glob if valid is None else valid & ~glob
    return valid, glob, local


def global_indices(glob: Optional[Tensor]) -> Optional[Tensor]:
    """Positions of the global tokens per batch row: ``[B, G]`` int64, ascending.

    ``G`` is the largest count over the batch; shorter rows are padded with -1
    (the "empty slot" of ``torch.ops.lhattn.gather_rows``).  Returns None when
    there is no global token at all.  One host synchronisation (for ``G``).
    While ``torch.compile`` traces, the same list comes from the custom op
    ``lhattn::global_indices`` (``G`` is then a data-dependent size and may be
    0, never None), so that a graph with ``global_mask`` needs no break.
    """
    if glob is None:
        return None
    if torch.compiler.is_compiling():
        return torch.ops.lhattn.global_indices(glob)
    idx = _global_indices(glob)
    return idx if idx.shape[1] > 0 else None


@torch.library.custom_op("lhattn::global_indices", mutates_args=())
def _global_indices_op(glob: Tensor) -> Tensor:
    return _global_indices(glob)


@_global_indices_op.register_fake
def _(glob: Tensor) -> Tensor:
    g = torch.library.get_ctx().new_dynamic_size(max=glob.shape[1])
    return glob.new_empty((glob.shape[0], g), dtype=torch.int64)


def _global_indices(glob: Tensor) -> Tensor:
    counts = glob.sum(dim=1)
    g = int(counts.max()) if glob.numel() else 0
    n = glob.shape[1]
    pos = torch.arange(n, device=glob.device).expand_as(glob)
    # Sort global positions first (keys 0..n-1), others after (n..2n-1), keep the first g.
    key = torch.where(glob, pos, pos + n)
    idx = key.sort(dim=1).values[:, :g]
    return torch.where(idx < n, idx, torch.full_like(idx, -1))


def write_global_rows(out: Tensor, lse: Tensor, gidx: Tensor, out_g: Tensor, lse_g: Tensor) -> tuple[Tensor, Tensor]:
    """Put the global rows' results ``out_g [B, H, G, D]``, ``lse_g [B, H, G]`` at rows ``gidx``
    of ``out`` / ``lse``, where the local pass left 0 / -inf.  Differentiable in ``out_g``."""
    from . import _ops  # lazily: needs the compiled lhattn._C

    n = out.shape[2]
    out = out + _ops.scatter_add_rows(out_g, gidx[:, None, :], n)
    # the -1 slots of gidx write to a spare column that is dropped
    safe = torch.where(gidx >= 0, gidx, torch.full_like(gidx, n))
    spare = torch.cat([lse, lse.new_full(lse.shape[:2] + (1,), float("-inf"))], dim=2)
    spare = spare.scatter(2, safe[:, None, :].expand(-1, lse.shape[1], -1), lse_g)
    return out, spare[:, :, :n]


def segment_bounds(segment_ids: Tensor) -> tuple[Tensor, Tensor]:
    """``(start, end)``, each ``[B, N]`` int64: token i's segment is ``[start[i], end[i])``."""
    b, n = segment_ids.shape
    pos = torch.arange(n, device=segment_ids.device).expand(b, n)
    first = torch.ones_like(segment_ids, dtype=torch.bool)
    first[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start = torch.where(first, pos, torch.zeros_like(pos)).cummax(dim=1).values
    last = torch.ones_like(first)
    last[:, :-1] = first[:, 1:]
    end_rev = torch.where(last, pos + 1, torch.full_like(pos, n)).flip(1).cummin(dim=1).values
    return start, end_rev.flip(1)
