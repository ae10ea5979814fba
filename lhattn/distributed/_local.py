"""Which engine computes a rank's local attention, and the Triton form of it.

One switch, :data:`ENGINE`, decides how each rank computes its part once the halo and the global
tokens have arrived (the traffic is the same either way); a call's ``backend`` other than ``"auto"``
(:func:`~lhattn.distributed.context_parallel_attention`, or an ``lhattn.nn`` module's ``backend``)
overrides it for that call:

* ``"auto"`` (default): the Triton kernels for CUDA tensors when :func:`triton_reason` is None,
  else the blocked fallback engine (:mod:`lhattn.fallback.engine`); on CUDA a
  :class:`lhattn.FallbackWarning` (once per reason) says why;
* ``"triton"``: the Triton kernels, or ``NotImplementedError`` with the reason (tests force this
  on CPU under ``TRITON_INTERPRET=1``);
* ``"fallback"``: always the blocked engine.

The Triton form reuses the single-process kernels through their launchers
(:mod:`lhattn.kernels.sliding_window`, :mod:`lhattn.kernels.segment`):

* **local rows** -- the kernels need as many query rows as key rows, so the shard's queries are
  placed at their rows of the halo-extended key sequence ``[lo, hi)`` with zero rows around them
  (``query_mask`` False there: out 0, lse -inf, no gradient), and every rank's global keys are
  appended after ``hi`` as the kernel's global-key list (``key_mask`` False for them, so no band
  sees them as neighbours).  The extra work is the halo rows plus the ``W·g_max`` appended rows,
  each costing one band: ``(halo + W·g_max) / N_r`` of the band pass, e.g. 512 / 65536 = 0.8 %
  for window (256, 256) on 64k tokens per rank.  Memory: one copy of q and of the extended k/v,
  O(N_r·D).  The shard's rows of (out, lse) are kept (:class:`TritonBand`).
* **global rows** -- the partial ``(out, lse)`` of the gathered global rows over this rank's keys is
  the kernels' dense pass (``window=None``); its backward is the dense backward run against the
  *merged* ``(out, lse)`` (:class:`TritonGlobalRows`).

Attention dropout drops the entries of the single-process call with the same seed: the dropout rule
(:mod:`lhattn._dropout`) is a function of token positions, and the kernels number a row / key by its
index in the tensors they get, so the launchers get the positions of this rank's range -- row ``m``
and key ``j`` of the extended range are tokens ``lo + m`` and ``lo + j`` (``drop_row_offset``,
``drop_col_offset``), the appended global keys' columns are their token positions (``drop_cols``),
and the gathered global rows keep their token positions (``drop_rows``) over keys that start at
this shard's first token.

Not on the Triton kernels (the fallback engine runs them, ``"auto"`` says why): LSG, and what the
single-process Triton path refuses (:func:`lhattn.triton_unavailable_reason`).  Head dims other than
the compiled ones run at the next one on zero-padded q, k, v, as in :mod:`lhattn.functional`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..patterns import LSG, Pattern, Segments

__all__ = ["ENGINE", "choose", "triton_reason", "triton_band", "TritonBand", "TritonGlobalRows", "CALLS"]

ENGINE = "auto"
"""``"auto"``, ``"triton"`` or ``"fallback"`` (module docstring)."""

CALLS = {"triton_band": 0, "triton_global_rows": 0}
"""How many times each Triton path ran in this process (tests check that the switch took effect)."""

_ENGINES = ("auto", "triton", "fallback")


def triton_reason(q: Tensor, pattern: Pattern, dropout_p: float) -> Optional[str]:
    """None if a rank's local attention can run on the Triton kernels, else a sentence why not."""
    if isinstance(pattern, LSG):
        return "context-parallel LSG runs in the blocked fallback engine (no Triton form yet)"
    from ..functional import triton_unavailable_reason

    return triton_unavailable_reason(q, pattern)


def _on_cuda(q: Tensor) -> bool:
    return q.device.type == "cuda"


def check_backend(backend) -> None:
    if backend not in _ENGINES:
        raise ValueError(f"backend must be one of {_ENGINES} for context-parallel attention, got {backend!r}")


def choose(q: Tensor, pattern: Pattern, dropout_p: float, backend: str = "auto") -> str:
    """``"triton"`` or ``"fallback"`` for this call: ``backend``, or :data:`ENGINE` when it is "auto"."""
    check_backend(backend)
    mode = ENGINE if backend == "auto" else backend
    if mode not in _ENGINES:
        raise ValueError(f"lhattn.distributed._local.ENGINE must be one of {_ENGINES}, got {ENGINE!r}")
    if mode == "fallback":
        return "fallback"
    if mode == "auto" and not _on_cuda(q):
        return "fallback"
    why = triton_reason(q, pattern, dropout_p)
    if why is None:
        return "triton"
    if mode == "triton":
        raise NotImplementedError(f"context-parallel attention on the Triton kernels (backend/ENGINE 'triton'): {why}")
    _warn_once(why)
    return "fallback"


_WARNED = set()


def _warn_once(why: str) -> None:
    """One :class:`lhattn.FallbackWarning` per distinct reason, for the life of the process."""
    if why in _WARNED:
        return
    _WARNED.add(why)
    import warnings

    from ..functional import FallbackWarning

    warnings.warn(f"lhattn.distributed: this rank's attention runs in the blocked fallback engine instead of the "
                  f"Triton kernels: {why}", FallbackWarning, stacklevel=4)


def _run_dim(d: int) -> int:
    from ..autograd._common import triton_head_dim

    return triton_head_dim(d)


def _pad(x: Tensor, d_run: int) -> Tensor:
    return x if x.shape[-1] == d_run else F.pad(x, (0, d_run - x.shape[-1]))


def triton_band(q: Tensor, k_ext: Tensor, v_ext: Tensor, pattern: Pattern, shift: int,
                local: Optional[Tensor], local_k: Optional[Tensor], glb, scale: float,
                ids: Optional[Tensor] = None, dropout_p: float = 0.0, state: Optional[Tensor] = None,
                lo: int = 0) -> Tuple[Tensor, Tensor]:
    """The local rows of this shard on the Triton kernels (module docstring).

    q: the shard ``[B, H, N_r, D]``; k_ext, v_ext: the halo-extended keys ``[B, H_kv, n_ext, D]``, in
    which query row ``i`` is key row ``i + shift``; local / local_k: the shard's / extended range's
    "valid and not global" masks (None = all); glb: the gathered global tokens
    (:class:`lhattn.distributed._attention._Globals`) or None; ids: for Segments, the segment ids
    ``[B, n_ext]`` of the extended range; dropout_p, state: attention dropout (:mod:`lhattn._dropout`);
    lo: the token position of the extended range's first row.  Returns the shard's ``(out, lse)``;
    differentiable in q and the extended / gathered k, v.
    """
    CALLS["triton_band"] += 1
    b, h, n, d = q.shape
    n_ext = k_ext.shape[2]
    d_run = _run_dim(d)
    ks, vs = [k_ext], [v_ext]
    g = 0
    gidx = None
    if glb is not None:
        g = glb.k.shape[2]
        ks.append(glb.k)
        vs.append(glb.v)
        gidx = torch.where(glb.slots >= 0, glb.slots + n_ext, glb.slots)
    nk = n_ext + g
    k_all = _pad(torch.cat(ks, dim=2) if g else k_ext, d_run)
    v_all = _pad(torch.cat(vs, dim=2) if g else v_ext, d_run)
    zeros = q.new_zeros((b, h, shift, d_run)), q.new_zeros((b, h, nk - shift - n, d_run))
    q_all = torch.cat([zeros[0], _pad(q, d_run), zeros[1]], dim=2)
    qmask = torch.zeros((b, nk), dtype=torch.bool, device=q.device)
    qmask[:, shift:shift + n] = True if local is None else local
    kmask = None
    if local_k is not None or g:
        kmask = torch.zeros((b, nk), dtype=torch.bool, device=q.device)
        kmask[:, :n_ext] = True if local_k is None else local_k
    if isinstance(pattern, Segments):
        from .._index import segment_bounds

        if g:  # the appended global slots: one more segment after the last (masked out anyway)
            ids = torch.cat([ids, (ids[:, -1:] + 1).expand(-1, g)], dim=1)
        geometry = dict(segment_bounds=segment_bounds(ids))
    else:
        geometry = dict(window=(min(pattern.left, nk), min(pattern.right, nk)), dilation=pattern.dilation)
    gcols = None if glb is None or state is None else glb.pos  # an appended global key's column: its token position
    out, lse = TritonBand.apply(q_all, k_all, v_all, qmask, kmask, gidx, geometry, scale, float(dropout_p), state, lo,
                                gcols)
    return out[:, :, shift:shift + n, :d], lse[:, :, shift:shift + n]


class TritonBand(torch.autograd.Function):
    """The band pass of :func:`triton_band` on the sliding-window (``geometry``: ``window``,
    ``dilation``) or segment (``segment_bounds``) launchers, with the dropout positions of this
    rank's range: row ``m`` / key ``j`` are tokens ``lo + m`` / ``lo + j``; ``gcols [B, G]``, the
    token positions of the ``gidx`` slots (their dropout columns), or None without dropout."""

    @staticmethod
    def forward(ctx, q, k, v, qmask, kmask, gidx, geometry, scale, dropout_p, state, lo, gcols):
        from ..kernels.segment import segment_bwd, segment_fwd
        from ..kernels.sliding_window import sliding_window_bwd, sliding_window_fwd

        fwd, ctx.bwd = ((segment_fwd, segment_bwd) if "segment_bounds" in geometry
                        else (sliding_window_fwd, sliding_window_bwd))
        ctx.kw = dict(geometry, scale=scale, key_mask=kmask, global_keys=gidx, dropout_p=dropout_p,
                      dropout_state=state, drop_row_offset=lo, drop_col_offset=lo, drop_cols=gcols)
        out, lse = fwd(q, k, v, query_mask=qmask, **ctx.kw)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout
        dq, dk, dv = ctx.bwd(dout, q, k, v, out, lse, **ctx.kw)
        return (dq, dk, dv) + (None,) * 9


class TritonGlobalRows(torch.autograd.Function):
    """:class:`lhattn.distributed._attention._GlobalRows` on the Triton kernels: the partial
    ``(out, lse)`` of the gathered global rows ``q_g [B, H, R, D]`` (token positions ``pos [B, R]``,
    -1 = empty slot) over this rank's keys (``valid [B, N_r]``, None = all; the first one is token
    ``start``) by the dense pass, merged over the group; the backward is the dense backward against the
    merged ``(out, lse)``, with the incoming gradient summed over ranks first (every rank holds the
    merged rows).  Dropout (``dropout_p``, ``state``): rows at their token positions, keys at theirs."""

    @staticmethod
    def forward(ctx, q_g, k, v, pos, valid, scale, group, dropout_p=0.0, state=None, start=0):
        from ..kernels.sliding_window import sliding_window_fwd
        from ._attention import _merge

        CALLS["triton_global_rows"] += 1
        d = q_g.shape[-1]
        d_run = _run_dim(d)
        qp, kp, vp = (_pad(x, d_run).contiguous() for x in (q_g, k, v))
        ctx.drop = dict(dropout_p=float(dropout_p), dropout_state=state, drop_col_offset=start,
                        drop_rows=pos if state is not None else None)
        out, lse = sliding_window_fwd(qp, kp, vp, window=None, scale=scale, query_mask=pos >= 0, key_mask=valid,
                                      **ctx.drop)
        out, lse = _merge(out, lse, group)
        ctx.save_for_backward(qp, kp, vp, out, lse, valid)
        ctx.scale, ctx.group, ctx.d = scale, group, d
        ctx.mark_non_differentiable(lse)
        return out[..., :d], lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        from ..kernels.sliding_window import sliding_window_bwd
        from . import _comm as C

        qp, kp, vp, out, lse, valid = ctx.saved_tensors
        d = ctx.d
        dout = torch.zeros_like(out) if dout is None else _pad(dout, out.shape[-1])
        dout = C.all_reduce(dout.contiguous(), ctx.group)
        dq, dk, dv = sliding_window_bwd(dout, qp, kp, vp, out, lse, window=None, scale=ctx.scale, key_mask=valid,
                                        **ctx.drop)
        return dq[..., :d], dk[..., :d], dv[..., :d], None, None, None, None, None, None, None
