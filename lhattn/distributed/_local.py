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

The Triton form reuses the single-process kernels unchanged, through their autograd custom ops
(``lhattn::sliding_window_attn_fwd``, ``lhattn::segment_attn_fwd``) and launchers:

* **local rows** -- the kernels need as many query rows as key rows, so the shard's queries are
  placed at their rows of the halo-extended key sequence ``[lo, hi)`` with zero rows around them
  (``query_mask`` False there: out 0, lse -inf, no gradient), and every rank's global keys are
  appended after ``hi`` as the kernel's global-key list (``key_mask`` False for them, so no band
  sees them as neighbours).  The extra work is the halo rows plus the ``W·g_max`` appended rows,
  each costing one band: ``(halo + W·g_max) / N_r`` of the band pass, e.g. 512 / 65536 = 0.8 %
  for window (256, 256) on 64k tokens per rank.  Memory: one copy of q and of the extended k/v,
  O(N_r·D).  The shard's rows of (out, lse) are kept.
* **global rows** -- the partial ``(out, lse)`` of the gathered global rows over this rank's keys is
  the kernels' dense pass (``window=None``); its backward is the dense backward run against the
  *merged* ``(out, lse)`` (:class:`TritonGlobalRows`).

Not on the Triton kernels (the fallback engine runs them, ``"auto"`` says why): attention dropout
-- the kernels number a key's dropout column by its row in the key tensor they get, while a rank's
keys start at token ``lo`` -- LSG, and what the single-process Triton path refuses
(:func:`lhattn.triton_unavailable_reason`).  Head dims other than the compiled ones run at the next
one on zero-padded q, k, v, as in :mod:`lhattn.functional`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..patterns import LSG, Pattern, Segments

__all__ = ["ENGINE", "choose", "triton_reason", "triton_band", "TritonGlobalRows", "CALLS"]

ENGINE = "auto"
"""``"auto"``, ``"triton"`` or ``"fallback"`` (module docstring)."""

CALLS = {"triton_band": 0, "triton_global_rows": 0}
"""How many times each Triton path ran in this process (tests check that the switch took effect)."""

_ENGINES = ("auto", "triton", "fallback")


def triton_reason(q: Tensor, pattern: Pattern, dropout_p: float) -> Optional[str]:
    """None if a rank's local attention can run on the Triton kernels, else a sentence why not."""
    if isinstance(pattern, LSG):
        return "context-parallel LSG runs in the blocked fallback engine (no Triton form yet)"
    if dropout_p > 0.0:
        return ("context-parallel attention dropout runs in the blocked fallback engine: the Triton kernels "
                "number a key's dropout column by its row in the key tensor, and a rank's keys start at its "
                "halo's first token")
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
                ids: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The local rows of this shard on the Triton kernels (module docstring).

    q: the shard ``[B, H, N_r, D]``; k_ext, v_ext: the halo-extended keys ``[B, H_kv, n_ext, D]``, in
    which query row ``i`` is key row ``i + shift``; local / local_k: the shard's / extended range's
    "valid and not global" masks (None = all); glb: the gathered global tokens
    (:class:`lhattn.distributed._attention._Globals`) or None; ids: for Segments, the segment ids
    ``[B, n_ext]`` of the extended range.  Returns the shard's ``(out, lse)``; differentiable in q and
    the extended / gathered k, v.
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
        start, end = segment_bounds(ids)
        out, lse = torch.ops.lhattn.segment_attn_fwd(q_all, k_all, v_all, qmask, kmask, gidx, start, end, 0,
                                                     scale, 0.0, None)
    else:
        left, right = min(pattern.left, nk), min(pattern.right, nk)
        out, lse = torch.ops.lhattn.sliding_window_attn_fwd(q_all, k_all, v_all, qmask, kmask, gidx, left, right,
                                                            pattern.dilation, scale, 0.0, None)
    return out[:, :, shift:shift + n, :d], lse[:, :, shift:shift + n]


class TritonGlobalRows(torch.autograd.Function):
    """:class:`lhattn.distributed._attention._GlobalRows` on the Triton kernels: the partial
    ``(out, lse)`` of the gathered global rows ``q_g [B, H, R, D]`` (``rows [B, R]`` True for
    occupied slots) over this rank's keys (``valid [B, N_r]``, None = all) by the dense pass, merged
    over the group; the backward is the dense backward against the merged ``(out, lse)``, with the
    incoming gradient summed over ranks first (every rank holds the merged rows)."""

    @staticmethod
    def forward(ctx, q_g, k, v, rows, valid, scale, group):
        from ..kernels.sliding_window import sliding_window_fwd
        from ._attention import _merge

        CALLS["triton_global_rows"] += 1
        d = q_g.shape[-1]
        d_run = _run_dim(d)
        qp, kp, vp = (_pad(x, d_run).contiguous() for x in (q_g, k, v))
        out, lse = sliding_window_fwd(qp, kp, vp, window=None, scale=scale, query_mask=rows, key_mask=valid)
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
        dq, dk, dv = sliding_window_bwd(dout, qp, kp, vp, out, lse, window=None, scale=ctx.scale, key_mask=valid)
        return dq[..., :d], dk[..., :d], dv[..., :d], None, None, None, None
