"""Blocked attention in plain PyTorch: the engine behind every fallback pattern.

A pattern is described to the engine by a *plan*: an object whose ``blocks()``
yields, for each block of consecutive query rows, which keys of each *key
source* the block may look at and a boolean mask over them.  The engine runs
one block at a time with an exact softmax over the union of the block's keys,
so memory is ``O(Bq · L)`` per block and ``O(N · D)`` overall -- never ``N × N``.

The backward pass recomputes the scores block by block from the saved
log-sum-exp (the FlashAttention recipe: ``dS = P ∘ (dP − rowsum(dO ∘ O))``),
so nothing of size ``N × window`` is kept between forward and backward.

Arithmetic: every product runs in float32 (float64 for float64 inputs) on operands upcast one block
at a time -- the scores, ``P V``, ``dP``, and the dq/dk/dv products, each accumulated in that type
across blocks and rounded to the input dtype once at the end.  A half-precision matmul would round
its output, i.e. the scores before the softmax and ``dP`` before ``dP − δ`` (where exact
cancellation is common: a row that sees one key has ``dS = 0``) and every block's dq/dk/dv
contribution: about twice the error of the Triton kernels, which keep all of these in float32.

Shapes: ``q [B, H, N, D]``; each source ``k, v [B, H_kv, N_s, D]`` with
``H % H_kv == 0`` (grouped-query attention: query head ``h`` reads key head
``h // (H // H_kv)``).  Outputs ``out [B, H, N, D]`` in q's dtype and
``lse [B, H, N]`` in float32 (float64 for float64 inputs); a row that sees no
key gets ``out = 0`` and ``lse = -inf``.

Attention dropout (the rule of :mod:`lhattn._dropout`) is switched on by passing a
:class:`Dropout`.  The rule needs each entry's query token position and key column: row ``r``
of q is token ``r`` unless ``Dropout.row_pos`` says otherwise (gathered rows, such as the
global rows), and key ``j`` of source ``s`` -- its row index in that source -- has column
``Dropout.col_offsets[s] + j`` (0 for token keys, ``N`` for LSG's compressed keys).  The keep
bits are built one query block at a time (``[B, H, Bq, L]``, never ``N × w``): the forward
zeroes the dropped probabilities before ``P V`` and scales each output row by ``1 / (1 - p)``
once, while ``l`` and ``lse`` stay those of the undropped scores; the backward regenerates the
same bits (``dV += (P∘keep)ᵀ dO / (1-p)``, ``dP' = keep∘(dO Vᵀ) / (1-p)``,
``dS = P∘(dP' − rowsum(dO∘O))`` with the dropped ``O``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Protocol, Sequence, Union

import torch
from torch import Tensor

from .. import _dropout

__all__ = ["KeyBlock", "QueryBlock", "Plan", "Dropout", "make_dropout", "blocked_attention"]


@dataclass
class KeyBlock:
    """The keys of one source that a query block may see.

    index: a ``slice`` of the source's rows (the same for every batch row), or
        an int64 tensor ``[B, L]`` of row indices per batch row.  Indices that
        are negative or ``>= N_s`` are padding slots: they must be masked out.
    mask: bool, broadcastable to ``[B, H, Bq, L]``; True = the key is visible.
    """

    index: Union[slice, Tensor]
    mask: Tensor


@dataclass
class QueryBlock:
    """Rows ``rows`` of q and, per key source, the keys they see (None = none)."""

    rows: slice
    keys: Sequence[Optional[KeyBlock]]


class Plan(Protocol):
    def blocks(self) -> Iterator[QueryBlock]:
        """Yield the query blocks; called once in forward and once in backward."""
        ...


@dataclass
class Dropout:
    """Attention dropout for :func:`blocked_attention` (the rule: :mod:`lhattn._dropout`).

    p: the drop probability, in ``(0, 1)``.
    state: the dropout state, int64 ``[2] = (seed, T)`` on q's device.
    row_pos: int64 ``[B, N]``, the token position of each row of q (rows that see no key may
        hold anything, e.g. the -1 of an empty global slot); None = row ``r`` is token ``r``.
    col_offsets: one int per key source, the column of its row 0 (key ``j`` of source ``s`` has
        column ``col_offsets[s] + j``); None = 0 for every source.
    col_pos: per key source, None or an int64 ``[B, N_s]`` giving the column of each of its rows
        (then ``col_offsets`` is ignored for it): keys gathered from scattered token positions,
        e.g. the global keys all-gathered by :mod:`lhattn.distributed`.
    """

    p: float
    state: Tensor
    row_pos: Optional[Tensor] = None
    col_offsets: Optional[Sequence[int]] = None
    col_pos: Optional[Sequence[Optional[Tensor]]] = None


def make_dropout(p: float, state: Optional[Tensor], col_offsets: Optional[Sequence[int]] = None) -> Optional[Dropout]:
    """The :class:`Dropout` of a pattern's ``dropout_p, dropout_state`` arguments; None when ``p == 0``."""
    if p == 0.0:
        return None
    if state is None:
        raise ValueError(f"dropout_p = {p} needs a dropout_state (lhattn._dropout.make_state), got None")
    return Dropout(float(p), state, None, col_offsets)


class _KeepBits:
    """The keep bits of one query block in the engine's layout ``[B, H_kv, g, Bq, ΣL]`` (bool),
    built afresh for each block: query head ``h = kv_head · g + i`` has the head key ``K[b, h]``."""

    def __init__(self, drop: Dropout, q: Tensor, sources):
        b, h = q.shape[:2]
        self.drop, self.h_kv = drop, sources[0][0].shape[1]
        self.k_bh = _dropout.head_keys(drop.state, b, h)  # [B, H]
        self.lengths = [k.shape[2] for k, _ in sources]
        self.offsets = drop.col_offsets if drop.col_offsets is not None else (0,) * len(sources)
        from .. import _ops  # lazily: the compiled lhattn._C (its CPU kernel of the rule)

        self.keep = _ops.dropout_keep

    def __call__(self, rows: slice, used) -> Tensor:
        dev, pos = self.k_bh.device, self.drop.row_pos
        pos = torch.arange(rows.start, rows.stop, device=dev) if pos is None else pos[:, rows]
        r = _dropout.row_keys(self.k_bh, pos)  # [B, H, Bq]
        parts = []
        for i, kb in used:
            idx = kb.index
            cols = torch.arange(*idx.indices(self.lengths[i]), device=dev) if isinstance(idx, slice) else idx
            col_pos = None if self.drop.col_pos is None else self.drop.col_pos[i]
            if col_pos is not None:  # [B, N_s] -> [B, L]; padding slots read row 0 (masked anyway)
                if isinstance(idx, slice):
                    cols = col_pos[:, idx]
                else:
                    cols = col_pos.gather(1, idx.clamp(0, self.lengths[i] - 1))
                cols = cols.clamp(min=0)
            else:
                cols = cols + self.offsets[i]
            parts.append(self.keep(r, cols, self.drop.state))  # [B, H, Bq, L]
        keep = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        b, h, bq, width = keep.shape
        return keep.view(b, self.h_kv, h // self.h_kv, bq, width)


def _select(x: Tensor, index: Union[slice, Tensor]) -> Tensor:
    """Rows of ``x [B, Hkv, N, D]`` picked by a KeyBlock index -> ``[B, Hkv, L, D]``."""
    if isinstance(index, slice):
        return x[:, :, index]
    safe = index.clamp(0, x.shape[2] - 1)
    return torch.gather(x, 2, safe[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))


def _add_rows(dst: Tensor, index: Union[slice, Tensor], src: Tensor) -> None:
    """``dst[rows picked by index] += src`` (padding slots carry zero gradient)."""
    if isinstance(index, slice):
        dst[:, :, index] += src
    else:
        safe = index.clamp(0, dst.shape[2] - 1)
        dst.scatter_add_(2, safe[:, None, :, None].expand(-1, dst.shape[1], -1, dst.shape[3]), src)


def _group(x: Tensor, h_kv: int) -> Tensor:
    """``[B, H, R, C] -> [B, H_kv, (H / H_kv) * R, C]`` (query heads of one kv head side by side)."""
    b, h, r, c = x.shape
    return x.reshape(b, h_kv, (h // h_kv) * r, c)


def _mask5(mask: Tensor, h: int, h_kv: int) -> Tensor:
    """View a mask broadcastable to ``[B, H, Bq, L]`` as one broadcastable to ``[B, H_kv, g, Bq, L]``."""
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    if m.shape[1] == 1:
        return m[:, :, None]
    return m.reshape(m.shape[0], h_kv, h // h_kv, m.shape[2], m.shape[3])


class _Hidden:
    """``~mask`` in the engine's 5-d layout, remembered for the last mask object of each source
    (plans hand out the same cached mask for every interior block)."""

    def __init__(self, h: int, h_kv: int):
        self.h, self.h_kv, self.last = h, h_kv, {}

    def __call__(self, source: int, mask: Tensor) -> Tensor:
        seen = self.last.get(source)
        if seen is None or seen[0] is not mask:
            seen = (mask, ~_mask5(mask, self.h, self.h_kv))
            self.last[source] = seen
        return seen[1]


def _scores(qb: Tensor, ks: Sequence[Tensor], hidden: Sequence[Tensor], scale: float, h_kv: int):
    """Masked scores of a query block against its keys -> ``[B, H_kv, g, Bq, ΣL]`` (fp32+)."""
    b, h, bq, _ = qb.shape
    g = h // h_kv
    acc = torch.float64 if qb.dtype == torch.float64 else torch.float32
    qg = _group(qb, h_kv).to(acc)
    parts = []
    for kb, m in zip(ks, hidden):
        s = torch.matmul(qg, kb.to(acc).transpose(-1, -2)).mul_(scale)
        parts.append(s.view(b, h_kv, g, bq, kb.shape[2]).masked_fill_(m, float("-inf")))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def _forward(q: Tensor, sources, plan: Plan, scale: float, dropout: Optional[Dropout]):
    b, h, n, d = q.shape
    h_kv = sources[0][0].shape[1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros_like(q, memory_format=torch.contiguous_format)
    lse = torch.full((b, h, n), float("-inf"), dtype=acc, device=q.device)
    hidden = _Hidden(h, h_kv)
    keep_bits = None if dropout is None else _KeepBits(dropout, q, sources)
    for blk in plan.blocks():
        used = [(i, kb) for i, kb in enumerate(blk.keys) if kb is not None]
        if not used:
            continue
        qb = q[:, :, blk.rows]
        bq = qb.shape[2]
        ks = [_select(sources[i][0], kb.index) for i, kb in used]
        vs = [_select(sources[i][1], kb.index).to(acc) for i, kb in used]
        s = _scores(qb, ks, [hidden(i, kb.mask) for i, kb in used], scale, h_kv)  # [B, Hkv, g, Bq, L]
        m = s.amax(dim=-1, keepdim=True)
        m = m.masked_fill_(torch.isinf(m), 0.0)  # rows that see nothing: keep exp() finite
        p = s.sub_(m).exp_()  # in place: s is not needed any more
        l = p.sum(dim=-1, keepdim=True)  # [B, Hkv, g, Bq, 1]; 0 for rows that see nothing
        if keep_bits is not None:
            p = p.mul_(keep_bits(blk.rows, used))  # dropped entries -> 0; l stays undropped
        o = None
        start = 0
        for vb in vs:
            stop = start + vb.shape[2]
            pv = p[..., start:stop].reshape(b, h_kv, -1, stop - start)
            ov = torch.matmul(pv, vb)
            o = ov if o is None else o.add_(ov)
            start = stop
        o = o.view(b, h_kv, h // h_kv, bq, d).div_(l.clamp(min=torch.finfo(acc).tiny))
        if dropout is not None:
            o = o.mul_(1.0 / (1.0 - dropout.p))
        m = m.add_(torch.log(l))  # log-sum-exp; -inf where l == 0
        out[:, :, blk.rows] = o.view(b, h, bq, d).to(q.dtype)
        lse[:, :, blk.rows] = m.reshape(b, h, bq)
    return out, lse


def _backward(q, sources, plan, scale, dropout, out, lse, dout):
    b, h, n, d = q.shape
    h_kv = sources[0][0].shape[1]
    g = h // h_kv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = torch.zeros(b, h, n, d, dtype=acc, device=q.device)
    dkv = [(torch.zeros(k.shape, dtype=acc, device=k.device), torch.zeros(v.shape, dtype=acc, device=v.device))
           for k, v in sources]
    delta = (dout.to(acc) * out.to(acc)).sum(-1)  # [B, H, N]; out is the dropped output
    hidden = _Hidden(h, h_kv)
    keep_bits = None if dropout is None else _KeepBits(dropout, q, sources)
    for blk in plan.blocks():
        used = [(i, kb) for i, kb in enumerate(blk.keys) if kb is not None]
        if not used:
            continue
        qb = q[:, :, blk.rows].to(acc)  # every product in acc (module docstring): upcast once
        bq = qb.shape[2]
        ks = [_select(sources[i][0], kb.index).to(acc) for i, kb in used]
        vs = [_select(sources[i][1], kb.index).to(acc) for i, kb in used]
        s = _scores(qb, ks, [hidden(i, kb.mask) for i, kb in used], scale, h_kv)
        lb = lse[:, :, blk.rows].reshape(b, h_kv, g, bq)
        p = s.sub_(torch.where(torch.isinf(lb), 0.0, lb)[..., None]).exp_()  # [B, Hkv, g, Bq, L]
        dob = _group(dout[:, :, blk.rows], h_kv).to(acc)  # [B, Hkv, g*Bq, D]
        db = delta[:, :, blk.rows].reshape(b, h_kv, g, bq, 1)
        qg = _group(qb, h_kv)
        # dropout: 0 where dropped, 1 / (1 - p) where kept
        weight = None if keep_bits is None else keep_bits(blk.rows, used).to(acc).mul_(1.0 / (1.0 - dropout.p))
        dqb = None
        start = 0
        for (i, kb), kk, vv in zip(used, ks, vs):
            stop = start + kk.shape[2]
            pb = p[..., start:stop]
            pv = pb  # the weights that multiplied v
            dp = torch.matmul(dob, vv.transpose(-1, -2)).view(b, h_kv, g, bq, -1)
            if weight is not None:
                w = weight[..., start:stop]
                pv = pb * w
                dp = dp.mul_(w)  # dP' = keep ∘ dP / (1 - p)
            ds = dp.sub_(db).mul_(pb).mul_(scale).reshape(b, h_kv, g * bq, -1)  # dS = P ∘ (dP' − δ)
            pv = pv.reshape(b, h_kv, g * bq, -1)
            _add_rows(dkv[i][1], kb.index, torch.matmul(pv.transpose(-1, -2), dob))
            _add_rows(dkv[i][0], kb.index, torch.matmul(ds.transpose(-1, -2), qg))
            dqk = torch.matmul(ds, kk)
            dqb = dqk if dqb is None else dqb.add_(dqk)
            start = stop
        dq[:, :, blk.rows] = dqb.view(b, h, bq, d)
    grads = [dq.to(q.dtype)]
    for (k, v), (dk, dv) in zip(sources, dkv):
        grads += [dk.to(k.dtype), dv.to(v.dtype)]
    return grads


class _BlockedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan, scale, dropout, q, *kv):
        sources = list(zip(kv[0::2], kv[1::2]))
        out, lse = _forward(q, sources, plan, scale, dropout)
        ctx.save_for_backward(q, out, lse, *kv)
        ctx.plan, ctx.scale, ctx.dropout = plan, scale, dropout
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, out, lse, *kv = ctx.saved_tensors
        sources = list(zip(kv[0::2], kv[1::2]))
        if dout is None:
            dout = torch.zeros_like(out)
        grads = _backward(q, sources, ctx.plan, ctx.scale, ctx.dropout, out, lse, dout)
        return (None, None, None, *grads)


def blocked_attention(q: Tensor, sources: Sequence[tuple], plan: Plan, scale: float,
                      dropout: Optional[Dropout] = None) -> tuple[Tensor, Tensor]:
    """Attention of ``q`` over the key sources, restricted to what ``plan`` allows.

    q: ``[B, H, N, D]``; sources: ``[(k, v), ...]``, each ``[B, H_kv, N_s, D]``; dropout:
    attention dropout (:class:`Dropout`) or None.
    Differentiable in q and every k, v (first order).  Returns ``(out, lse)``.
    """
    flat = [t for kv in sources for t in kv]
    return _BlockedAttention.apply(plan, float(scale), dropout, q, *flat)
