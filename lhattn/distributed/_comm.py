"""The traffic of context parallelism: the shard layout, halo exchange and all-gather as autograd
Functions, and a byte count of everything sent.

Every message of :mod:`lhattn.distributed` goes through this module, so :func:`count_bytes` sees
all of it.  Bytes are counted per rank as the data a rank puts on the wire:

* point-to-point (``isend``): the tensor's size;
* ``all_gather``: the rank's own piece, once per other rank (``(W - 1) · piece``);
* ``all_reduce``: ``2 · (W - 1) / W`` times the tensor (a ring all-reduce);
* ``broadcast``: the tensor, once per other rank, on the source rank.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, List, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Traffic", "count_bytes", "Layout", "halo", "halo_exchange", "all_gather_rows", "all_gather_cat",
           "all_reduce", "broadcast", "gather_ints", "reduce_max_int"]


@dataclass
class Traffic:
    """Bytes this rank sent, by kind: ``halo`` (point-to-point) and ``collective``; and the
    point-to-point bytes it received (``halo_received``)."""

    halo: int = 0
    collective: int = 0
    halo_received: int = 0

    @property
    def total(self) -> int:
        return self.halo + self.collective


_COUNTERS: List[Traffic] = []


@contextlib.contextmanager
def count_bytes() -> Iterator[Traffic]:
    """Count the bytes this rank sends inside the ``with`` block (forward and backward passes)."""
    t = Traffic()
    _COUNTERS.append(t)
    try:
        yield t
    finally:
        _COUNTERS.remove(t)


def _tally(kind: str, nbytes: float) -> None:
    for t in _COUNTERS:
        setattr(t, kind, getattr(t, kind) + int(nbytes))


def _nbytes(x: Tensor) -> int:
    return x.numel() * x.element_size()


def all_reduce(x: Tensor, group, op=dist.ReduceOp.SUM) -> Tensor:
    """In-place all-reduce of a contiguous tensor (counted)."""
    w = dist.get_world_size(group)
    _tally("collective", 2 * (w - 1) / w * _nbytes(x))
    dist.all_reduce(x, op=op, group=group)
    return x


def broadcast(x: Tensor, group) -> Tensor:
    """In-place broadcast from the group's rank 0 (counted on that rank)."""
    if dist.get_rank(group) == 0:
        _tally("collective", (dist.get_world_size(group) - 1) * _nbytes(x))
    dist.broadcast(x, src=_global_rank(group, 0), group=group)
    return x


def all_gather_cat(x: Tensor, group, dim: int = 0) -> Tensor:
    """Every rank's ``x`` (same shape everywhere), concatenated in rank order along ``dim``; no grad."""
    x = x.contiguous()
    w = dist.get_world_size(group)
    _tally("collective", (w - 1) * _nbytes(x))
    parts = [torch.empty_like(x) for _ in range(w)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def _global_rank(group, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


@dataclass(frozen=True)
class Layout:
    """Where each rank's shard sits: rank ``t`` holds tokens ``[starts[t], starts[t] + sizes[t])``."""

    group: object
    rank: int
    sizes: Tuple[int, ...]

    @property
    def world(self) -> int:
        return len(self.sizes)

    @property
    def starts(self) -> Tuple[int, ...]:
        out, s = [], 0
        for n in self.sizes:
            out.append(s)
            s += n
        return tuple(out)

    @property
    def n(self) -> int:
        return sum(self.sizes)

    @property
    def start(self) -> int:
        return self.starts[self.rank]

    @property
    def end(self) -> int:
        return self.start + self.sizes[self.rank]

    def shard(self, t: int) -> Tuple[int, int]:
        return self.starts[t], self.starts[t] + self.sizes[t]


def _transfers(lay: Layout, ranges: Sequence[Tuple[int, int]]):
    """For the halo ranges ``[lo_t, hi_t)`` of every rank: ``(t, recv, send)`` per other rank ``t``,
    ``recv`` = my range ∩ t's shard and ``send`` = t's range ∩ my shard (global ``(a, b)``, maybe empty)."""
    me_lo, me_hi = ranges[lay.rank]
    s, e = lay.shard(lay.rank)
    for t in range(lay.world):
        if t == lay.rank:
            continue
        ts, te = lay.shard(t)
        recv = (max(me_lo, ts), min(me_hi, te))
        send = (max(ranges[t][0], s), min(ranges[t][1], e))
        yield t, recv, send


def _exchange(lay: Layout, outgoing, incoming) -> None:
    """Post every ``isend`` (``(t, tensor)``) and ``irecv`` (``(t, buffer)``), then wait for all."""
    reqs = []
    for t, buf in incoming:
        _tally("halo_received", _nbytes(buf))
        reqs.append(dist.irecv(buf, src=_global_rank(lay.group, t), group=lay.group))
    for t, x in outgoing:
        _tally("halo", _nbytes(x))
        reqs.append(dist.isend(x, dst=_global_rank(lay.group, t), group=lay.group))
    for r in reqs:
        r.wait()


def halo_exchange(x: Tensor, lay: Layout, ranges: Sequence[Tuple[int, int]], dim: int) -> Tensor:
    """Tokens ``[lo, hi)`` (this rank's entry of ``ranges``, which must contain its shard) of the
    sequence sharded along ``dim``: this rank's ``x`` plus the pieces its neighbours send.  No grad."""
    lo, hi = ranges[lay.rank]
    s, e = lay.shard(lay.rank)
    shape = list(x.shape)
    shape[dim] = hi - lo
    out = x.new_empty(shape)
    out.narrow(dim, s - lo, e - s).copy_(x)
    outgoing, incoming, places = [], [], []
    for t, (ra, rb), (sa, sb) in _transfers(lay, ranges):
        if rb > ra:
            shape[dim] = rb - ra
            buf = x.new_empty(shape)
            incoming.append((t, buf))
            places.append((ra - lo, buf))
        if sb > sa:
            outgoing.append((t, x.narrow(dim, sa - s, sb - sa).contiguous()))
    _exchange(lay, outgoing, incoming)
    for at, buf in places:
        out.narrow(dim, at, buf.shape[dim]).copy_(buf)
    return out


def _halo_return(g: Tensor, lay: Layout, ranges: Sequence[Tuple[int, int]], dim: int) -> Tensor:
    """The adjoint of :func:`halo_exchange`: the gradient of the extended tensor, sent back to the
    ranks that own each halo piece and summed there."""
    lo, _ = ranges[lay.rank]
    s, e = lay.shard(lay.rank)
    dx = g.narrow(dim, s - lo, e - s).clone(memory_format=torch.contiguous_format)
    outgoing, incoming = [], []
    shape = list(g.shape)
    for t, (ra, rb), (sa, sb) in _transfers(lay, ranges):
        if rb > ra:
            outgoing.append((t, g.narrow(dim, ra - lo, rb - ra).contiguous()))
        if sb > sa:
            shape[dim] = sb - sa
            incoming.append((t, (sa - s, g.new_empty(shape))))
    _exchange(lay, outgoing, [(t, buf) for t, (_, buf) in incoming])
    for _, (at, buf) in incoming:
        dx.narrow(dim, at, buf.shape[dim]).add_(buf)
    return dx


class _Halo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, lay: Layout, ranges, dim: int) -> Tensor:
        ctx.lay, ctx.ranges, ctx.dim = lay, ranges, dim
        return halo_exchange(x, lay, ranges, dim)

    @staticmethod
    def backward(ctx, g: Tensor):
        return _halo_return(g.contiguous(), ctx.lay, ctx.ranges, ctx.dim), None, None, None


def halo(x: Tensor, lay: Layout, ranges: Sequence[Tuple[int, int]], dim: int = 2) -> Tensor:
    """Differentiable :func:`halo_exchange`: the backward sends the halo's gradient back to its owners."""
    return _Halo.apply(x, lay, tuple(ranges), dim)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group, dim: int) -> Tensor:
        ctx.group, ctx.dim, ctx.size = group, dim, x.shape[dim]
        return all_gather_cat(x, group, dim)

    @staticmethod
    def backward(ctx, g: Tensor):
        # every rank used the gathered tensor: the gradient of my piece is the sum over ranks
        g = all_reduce(g.contiguous(), ctx.group)
        rank = dist.get_rank(ctx.group)
        return g.narrow(ctx.dim, rank * ctx.size, ctx.size), None, None


def all_gather_rows(x: Tensor, group, dim: int = 2) -> Tensor:
    """Differentiable all-gather (same shape on every rank), concatenated in rank order along ``dim``."""
    return _AllGather.apply(x, group, dim)


def gather_ints(values: Sequence[int], group, device) -> List[List[int]]:
    """Every rank's list of ints (same length everywhere), in rank order; one small all-gather."""
    x = torch.tensor(list(values), dtype=torch.int64, device=device)
    return all_gather_cat(x[None], group, 0).tolist()


def reduce_max_int(value: int, group, device) -> int:
    """The largest ``value`` over the group."""
    x = torch.tensor([value], dtype=torch.int64, device=device)
    return int(all_reduce(x, group, dist.ReduceOp.MAX))

