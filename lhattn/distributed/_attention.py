"""Context-parallel attention: each rank holds a contiguous shard of the sequence (module docstring of
:mod:`lhattn.distributed`)."""

from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _dropout, _ops
from .. import _validation as V
from .._index import global_indices, segment_bounds, visible_tokens, write_global_rows
from ..fallback._globals import global_key_block
from ..fallback.engine import Dropout, KeyBlock, QueryBlock, _backward, _forward, blocked_attention
from ..fallback.sliding_window import _WindowPlan
from ..patterns import LSG, Pattern, Segments, SlidingWindow
from . import _comm as C
from . import _local

__all__ = ["context_parallel_attention"]

SEGMENT_BLOCK_ROWS = 128
GLOBAL_ROW_BLOCK = 128


# ---- the shared call description ------------------------------------------------------------------

# Per rank: [N_r, has key_padding_mask, has global_mask, has segment_ids, B, H, H_kv, D, dtype, G_r]
_AGREE = ("key_padding_mask given", "global_mask given", "segment_ids given", "batch size B", "query heads H",
          "key/value heads H_kv", "head dim D", "dtype")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _describe(q, k, key_padding_mask, global_mask, segment_ids, glob) -> List[int]:
    b, h, n, d = q.shape
    g = int(glob.sum(dim=1).max()) if glob is not None and glob.numel() else 0
    return [n, key_padding_mask is not None, global_mask is not None, segment_ids is not None, b, h, k.shape[1], d,
            _DTYPES.index(q.dtype), g]


def _agree(rows: List[List[int]]) -> None:
    """Every rank must make the same kind of call (one collective answers for all)."""
    for j, what in enumerate(_AGREE, start=1):
        vals = [r[j] for r in rows]
        if len(set(vals)) > 1:
            raise ValueError(f"context_parallel_attention: every rank must pass the same {what}; "
                             f"got {vals} over ranks 0..{len(rows) - 1}")


def _shared_state(dropout_p: float, dropout_seed, device, group) -> Optional[Tensor]:
    """The dropout state of :mod:`lhattn._dropout`, rank 0's on every rank (a seed drawn from each
    rank's generator, or passed differently, would drop different entries on different ranks)."""
    state = _dropout.make_state(dropout_p, dropout_seed, device)
    return None if state is None else C.broadcast(state.contiguous(), group)


# ---- global tokens ---------------------------------------------------------------------------------


class _Globals:
    """Every rank's global tokens: ``slots`` of ``g_max`` per rank, all-gathered in rank order.

    own: ``[B, g_max]`` local row of each of this rank's globals (-1 = empty slot);
    pos: ``[B, W·g_max]`` token position of every slot (-1 = empty); q, k, v: their rows.
    """

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, glob: Optional[Tensor], g_max: int, lay: C.Layout):
        b, h, n, _ = q.shape
        own = global_indices(glob) if glob is not None else None
        if own is None:
            own = torch.full((b, 0), -1, dtype=torch.int64, device=q.device)
        pad = own.new_full((b, g_max - own.shape[1]), -1)
        self.own = torch.cat([own, pad], dim=1)
        pos = torch.where(self.own >= 0, self.own + lay.start, self.own)
        self.pos = C.all_gather_cat(pos, lay.group, dim=1)
        rows = self.own[:, None, :]
        mine = torch.cat([_ops.gather_rows(x, rows) for x in (q, k, v)], dim=1)  # [B, H + 2 H_kv, g_max, D]
        self.q, self.k, self.v = C.all_gather_rows(mine, lay.group, dim=2).split([h, k.shape[1], k.shape[1]], dim=1)
        self.slots = torch.where(self.pos >= 0, torch.arange(self.pos.shape[1], device=q.device), -1)
        self.lay, self.g_max = lay, g_max

    def mine(self, x: Tensor) -> Tensor:
        """This rank's slots of a ``[B, H, W·g_max, ...]`` tensor."""
        return x.narrow(2, self.lay.rank * self.g_max, self.g_max)


class _GlobalRowsPlan:
    """Gathered global rows ``[B, H, R, D]`` (token positions ``pos [B, R]``, -1 = empty slot) over this
    rank's keys ``[start, start + n)``: every valid key (every earlier one when ``causal``)."""

    def __init__(self, pos: Tensor, valid: Optional[Tensor], n: int, start: int, causal: bool = False):
        self.pos, self.valid, self.n, self.start, self.causal = pos, valid, n, start, causal

    def blocks(self):
        r = self.pos.shape[1]
        keys = torch.arange(self.start, self.start + self.n, device=self.pos.device)
        for a in range(0, r, GLOBAL_ROW_BLOCK):
            rows = slice(a, min(r, a + GLOBAL_ROW_BLOCK))
            pos = self.pos[:, rows]
            mask = (pos >= 0)[:, None, :, None]
            if self.valid is not None:
                mask = mask & self.valid[:, None, None, :]
            if self.causal:
                mask = mask & (keys[None, None, None, :] <= pos[:, None, :, None])
            yield QueryBlock(rows=rows, keys=[KeyBlock(index=slice(0, self.n), mask=mask)])


def _merge(out: Tensor, lse: Tensor, group) -> Tuple[Tensor, Tensor]:
    """Merge every rank's partial ``(out, lse)`` of the same rows by log-sum-exp (two all-reduces)."""
    m = C.all_reduce(lse.clone(), group, dist.ReduceOp.MAX)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w = torch.exp(lse - m)[..., None]  # 0 where this rank saw nothing
    num = C.all_reduce(torch.cat([out.to(lse.dtype) * w, w], dim=-1).contiguous(), group)
    den = num[..., -1:]
    merged = (num[..., :-1] / den.clamp(min=torch.finfo(lse.dtype).tiny)).to(out.dtype)
    return merged, m + torch.log(den[..., 0])


class _GlobalRows(torch.autograd.Function):
    """Global rows over every rank's keys: a partial pass over this rank's keys, merged by all-reduce.
    The backward reruns each partial against the *merged* ``(out, lse)``, which gives the exact
    gradients of the merged rows (the FlashAttention backward only needs the final lse and out)."""

    @staticmethod
    def forward(ctx, q_g, k, v, plan, scale, dropout, group):
        out, lse = _forward(q_g, [(k, v)], plan, scale, dropout)
        out, lse = _merge(out, lse, group)
        ctx.save_for_backward(q_g, k, v, out, lse)
        ctx.plan, ctx.scale, ctx.dropout, ctx.group = plan, scale, dropout, group
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q_g, k, v, out, lse = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout
        dout = C.all_reduce(dout.contiguous(), ctx.group)  # every rank holds the merged rows
        dq, dk, dv = _backward(q_g, [(k, v)], ctx.plan, ctx.scale, ctx.dropout, out, lse, dout)
        return dq, dk, dv, None, None, None, None


# ---- local rows: plans over the halo-extended keys --------------------------------------------------


class _HaloWindowPlan(_WindowPlan):
    """The window plan of the fallback with queries (this shard) and keys (shard plus halo) in
    different coordinates: query row ``i`` is key row ``i + shift``."""

    def __init__(self, pattern: SlidingWindow, n: int, shift: int, n_ext: int, local_q, local_k, gslots, device):
        super().__init__(pattern, n, None, gslots, device)
        self.shift, self.n_ext, self.local_q, self.local_k = shift, n_ext, local_q, local_k

    def blocks(self):
        lo, hi = self.p.left * self.p.dilation, self.p.right * self.p.dilation
        for qs in range(0, self.n, self.bq):
            qe = min(self.n, qs + self.bq)
            a, b = qs + self.shift, qe + self.shift
            ks, ke = max(0, a - lo), min(self.n_ext, b + hi)
            yield _query_block(qs, qe, ks, ke, self._band(a, b, ks, ke), self.local_q, self.local_k, self.gidx)


class _HaloSegmentPlan:
    """Segments over the halo-extended keys: ``ids [B, n_ext]`` of the extended range, which holds
    every segment that touches this shard whole."""

    def __init__(self, ids: Tensor, n: int, shift: int, local_q, local_k, gslots):
        self.ids, self.n, self.shift, self.local_q, self.local_k, self.gslots = ids, n, shift, local_q, local_k, gslots
        start, end = segment_bounds(ids)
        firsts = torch.arange(0, n, SEGMENT_BLOCK_ROWS, device=ids.device)
        lasts = (firsts + SEGMENT_BLOCK_ROWS).clamp(max=n) - 1
        self.ks = start[:, firsts + shift].min(dim=0).values.tolist()  # one host sync for the plan
        self.ke = end[:, lasts + shift].max(dim=0).values.tolist()

    def blocks(self):
        for j, qs in enumerate(range(0, self.n, SEGMENT_BLOCK_ROWS)):
            qe = min(self.n, qs + SEGMENT_BLOCK_ROWS)
            ks, ke = self.ks[j], self.ke[j]
            a, b = qs + self.shift, qe + self.shift
            same = (self.ids[:, a:b, None] == self.ids[:, None, ks:ke])[:, None]
            yield _query_block(qs, qe, ks, ke, same, self.local_q, self.local_k, self.gslots)


def _query_block(qs, qe, ks, ke, mask, local_q, local_k, gslots) -> QueryBlock:
    rows = None
    if local_q is not None:
        rows = local_q[:, qs:qe]
        mask = mask & rows[:, None, :, None] & local_k[:, None, None, ks:ke]
    keys = [KeyBlock(index=slice(ks, ke), mask=mask)]
    if gslots is not None:
        keys.append(global_key_block(gslots, rows))
    return QueryBlock(rows=slice(qs, qe), keys=keys)


# ---- halo ranges -----------------------------------------------------------------------------------


def _window_ranges(pattern: SlidingWindow, lay: C.Layout) -> List[Tuple[int, int]]:
    lo, hi = pattern.left * pattern.dilation, pattern.right * pattern.dilation
    return [(max(0, s - lo), min(lay.n, s + n + hi)) for s, n in zip(lay.starts, lay.sizes)]


def _fixed_segment_ranges(size: int, lay: C.Layout) -> List[Tuple[int, int]]:
    return [(s // size * size, min(lay.n, -(-(s + n) // size) * size)) for s, n in zip(lay.starts, lay.sizes)]


def _ragged_segment_ranges(segment_ids: Tensor, lay: C.Layout) -> List[Tuple[int, int]]:
    """Each rank's range ``[lo, hi)`` covering the segments that touch its shard whole, from every
    rank's first/last segment id and run lengths (one all-gather of ``4·B`` ints per rank)."""
    ids = segment_ids
    b = ids.shape[0]
    first, last = ids[:, 0], ids[:, -1]
    first_run = (ids == first[:, None]).sum(dim=1)
    last_run = (ids == last[:, None]).sum(dim=1)
    info = C.all_gather_cat(torch.stack([first, last, first_run, last_run])[None], lay.group, 0).tolist()
    for t in range(1, lay.world):  # [rank][field][batch]
        bad = [j for j in range(b) if info[t][0][j] < info[t - 1][1][j]]
        if bad:
            raise ValueError(f"segment_ids must be non-decreasing along the whole sequence; batch row {bad[0]} "
                             f"goes from {info[t - 1][1][bad[0]]} (end of rank {t - 1}) to {info[t][0][bad[0]]} "
                             f"(start of rank {t})")
    ranges = []
    for r in range(lay.world):
        s, e = lay.shard(r)
        lo, hi = s, e
        for j in range(b):
            a, t = s, r - 1
            while t >= 0 and info[t][1][j] == info[r][0][j]:
                a -= info[t][3][j]
                if info[t][3][j] < lay.sizes[t]:
                    break
                t -= 1
            z, t = e, r + 1
            while t < lay.world and info[t][0][j] == info[r][1][j]:
                z += info[t][2][j]
                if info[t][2][j] < lay.sizes[t]:
                    break
                t += 1
            lo, hi = min(lo, a), max(hi, z)
        ranges.append((lo, hi))
    return ranges


# ---- the entry point -------------------------------------------------------------------------------


def _check(q, k, v, pattern, global_mask, key_padding_mask, dropout_p, dropout_seed, segment_ids, scale,
           backend) -> None:
    V.check_qkv(q, k, v)
    _local.check_backend(backend)
    if not isinstance(pattern, (SlidingWindow, Segments, LSG)):
        raise TypeError(f"pattern must be SlidingWindow, Segments or LSG, got {type(pattern).__name__}")
    if isinstance(pattern, LSG):
        from ._lsg import check_lsg

        check_lsg(pattern, global_mask, segment_ids)
    V.check_token_mask("key_padding_mask", key_padding_mask, q)
    V.check_token_mask("global_mask", global_mask, q)
    V.check_scale(scale)
    _dropout.check_dropout(dropout_p, dropout_seed)
    if isinstance(pattern, (SlidingWindow, LSG)):
        if segment_ids is not None:
            raise ValueError("segment_ids is only meaningful for the Segments pattern, "
                             f"got it with {type(pattern).__name__}")
    else:
        V.check_segments_call(pattern.segment_size, segment_ids, q)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context_parallel_attention needs torch.distributed initialised "
                           "(torch.distributed.init_process_group, e.g. under torchrun)")


def context_parallel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: Pattern,
    group=None,
    global_mask: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    dropout_seed: Union[None, int, Tensor] = None,
    *,
    segment_ids: Optional[Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """:func:`lhattn.attention` on a sequence split over the ranks of ``group`` (module docstring).

    Args:
        q: this rank's shard ``[B, H, N_r, D]``; shards follow rank order and may differ in length.
        k, v: ``[B, H_kv, N_r, D]`` (GQA as in :func:`lhattn.attention`).
        pattern: :class:`~lhattn.SlidingWindow`, :class:`~lhattn.Segments` or :class:`~lhattn.LSG`
            (not ``bos_pooling``).
        group: a ``torch.distributed`` process group; None = the default (world) group.
        global_mask, key_padding_mask: this rank's ``[B, N_r]`` shards (every rank passes them, or none).
        dropout_p, dropout_seed: as in :func:`lhattn.attention`; the entries dropped are those of the
            single-process call with the same seed.  Group rank 0's seed is used on every rank.
        segment_ids: this rank's ``[B, N_r]`` shard of the segment ids (Segments without segment_size).
        scale: softmax scale, default ``D ** -0.5``.
        return_lse: also return this shard's ``lse [B, H, N_r]``.
        backend: what computes this rank's part: ``"auto"`` (the Triton kernels for CUDA tensors where
            they can, else the blocked fallback engine; :mod:`lhattn.distributed._local`), ``"triton"``
            (NotImplementedError saying why where they cannot) or ``"fallback"``.  The traffic is the same.

    Returns:
        This rank's ``out [B, H, N_r, D]`` (or ``(out, lse)``), equal to the matching slice of the
        single-process call; differentiable in q, k, v (gradients: the matching slices too).
    """
    _check(q, k, v, pattern, global_mask, key_padding_mask, dropout_p, dropout_seed, segment_ids, scale, backend)
    b, h, n, d = q.shape
    valid, glob, local = visible_tokens(key_padding_mask, global_mask)
    rows = C.gather_ints(_describe(q, k, key_padding_mask, global_mask, segment_ids, glob), group, q.device)
    _agree(rows)
    lay = C.Layout(group, dist.get_rank(group), tuple(r[0] for r in rows))
    g_max = max(r[-1] for r in rows)
    scale = d ** -0.5 if scale is None else scale
    state = _shared_state(dropout_p, dropout_seed, q.device, group)
    engine = _local.choose(q, pattern, dropout_p, backend)  # the local computation (lhattn.distributed._local)

    if isinstance(pattern, LSG):
        from ._lsg import lsg_attention

        out, lse = lsg_attention(q, k, v, pattern, lay, key_padding_mask, scale, dropout_p, state)
        return (out, lse) if return_lse else out
    glb = _Globals(q, k, v, glob, g_max, lay) if g_max > 0 else None

    # the halo: keys [lo, hi) of the whole sequence, k and v in one exchange
    if isinstance(pattern, SlidingWindow):
        ranges = _window_ranges(pattern, lay)
    elif pattern.segment_size is not None:
        ranges = _fixed_segment_ranges(pattern.segment_size, lay)
    else:
        ranges = _ragged_segment_ranges(segment_ids, lay)
    lo, hi = ranges[lay.rank]
    kv = C.halo(torch.stack([k, v]), lay, ranges, dim=3)
    k_ext, v_ext = kv[0], kv[1]
    local_k = None if local is None else C.halo_exchange(local, lay, ranges, dim=1)
    shift = lay.start - lo
    ids = None
    if isinstance(pattern, Segments):
        if segment_ids is None:
            ids = (torch.arange(lo, hi, device=q.device) // pattern.segment_size).expand(b, -1)
        else:
            ids = C.halo_exchange(segment_ids, lay, ranges, dim=1)

    if engine == "triton":  # the same traffic; the kernels compute
        out, lse = _local.triton_band(q, k_ext, v_ext, pattern, shift, local, local_k, glb, scale, ids, dropout_p,
                                      state, lo)
        out, lse = _with_global_rows(out, lse, glb, k, v, valid, lay, scale, dropout_p, state, engine="triton")
        return (out, lse) if return_lse else out

    gslots = None if glb is None else glb.slots
    if isinstance(pattern, SlidingWindow):
        plan = _HaloWindowPlan(pattern, n, shift, hi - lo, local, local_k, gslots, q.device)
    else:
        plan = _HaloSegmentPlan(ids, n, shift, local, local_k, gslots)
    sources = [(k_ext, v_ext)] if glb is None else [(k_ext, v_ext), (glb.k, glb.v)]
    drop = None
    if state is not None:
        row_pos = (lay.start + torch.arange(n, device=q.device)).expand(b, -1)
        col_pos = None if glb is None else [None, glb.pos]
        drop = Dropout(float(dropout_p), state, row_pos, [lo, 0], col_pos)
    out, lse = blocked_attention(q, sources, plan, scale, drop)

    out, lse = _with_global_rows(out, lse, glb, k, v, valid, lay, scale, dropout_p, state)
    return (out, lse) if return_lse else out


def _with_global_rows(out, lse, glb: Optional[_Globals], k, v, valid, lay: C.Layout, scale, dropout_p, state,
                      causal: bool = False, engine: str = "fallback"):
    """Replace this rank's global rows of ``(out, lse)`` (left at 0 / -inf by the local pass) by their
    attention over every rank's keys; ``engine`` computes the partials (:mod:`lhattn.distributed._local`)."""
    if glb is None:
        return out, lse
    if engine == "triton":  # not causal (LSG stays on the fallback)
        out_g, lse_g = _local.TritonGlobalRows.apply(glb.q, k, v, glb.pos, valid, scale, lay.group, dropout_p, state,
                                                     lay.start)
        return write_global_rows(out, lse, glb.own, glb.mine(out_g), glb.mine(lse_g))
    plan = _GlobalRowsPlan(glb.pos, valid, k.shape[2], lay.start, causal)
    drop = None if state is None else Dropout(float(dropout_p), state, glb.pos, [lay.start])
    out_g, lse_g = _GlobalRows.apply(glb.q, k, v, plan, scale, drop, lay.group)
    return write_global_rows(out, lse, glb.own, glb.mine(out_g), glb.mine(lse_g))
