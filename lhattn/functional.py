"""Public functions and backend dispatch.

``backend``:
  * ``"auto"``      -- Triton kernels for CUDA tensors (when they can run the call), else the fallback;
  * ``"triton"``    -- the Triton kernels; CPU tensors only under ``TRITON_INTERPRET=1``;
  * ``"fallback"``  -- blocked pure PyTorch, O(N·w) memory, any device;
  * ``"reference"`` -- the dense-mask oracle, O(N²) memory: for testing only.

Every backend computes the same function (the contract in ``lhattn.patterns``);
``auto`` never changes the semantics, only the speed.  When ``auto`` has a CUDA tensor but
the Triton kernels cannot run the call, it runs the fallback and says so once per reason with a
:class:`FallbackWarning` naming :func:`triton_unavailable_reason`'s answer.

Head dims: the Triton kernels are compiled for ``16, 32, 64, 128, 256``; a call with another head
dim up to 256 (e.g. 8 or 48) runs them at the next one, on q, k, v (and ``global_qkv``)
zero-padded to it.  Zero columns add nothing to any score and give zero output columns, which
are cut off; the softmax scale stays ``D ** -0.5`` of the caller's ``D``.  Nothing of this shows
outside: output, lse and gradients have the caller's shapes.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import warnings
from typing import Callable, Dict, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _dropout
from . import _validation as V
from .patterns import LSG, Pattern, Segments, SlidingWindow

__all__ = ["attention", "sliding_window_attention", "lsg_attention", "segment_attention",
           "register_triton_backend", "triton_unavailable_reason", "BACKENDS", "FallbackWarning"]

BACKENDS = ("auto", "triton", "fallback", "reference")

# pattern type -> (implementation, reason_fn); filled by lhattn.autograd when Triton is importable.
# reason_fn(q, pattern) returns None when the kernel can run this call, else a sentence saying why not.
_TRITON: Dict[type, Tuple[Callable, Callable]] = {}
_triton_import_error: Optional[str] = None
_warned_reasons: Set[str] = set()  # auto's fallback reasons already warned about


class FallbackWarning(UserWarning):
    """``backend="auto"`` got CUDA tensors but ran the fallback (the message says why)."""


def register_triton_backend(pattern_type: type, impl: Callable, reason: Callable) -> None:
    """Called by the Triton autograd modules to plug a kernel family into dispatch."""
    _TRITON[pattern_type] = (impl, reason)


def _load_triton() -> None:
    global _triton_import_error
    if _TRITON or _triton_import_error is not None:
        return
    try:
        importlib.import_module("lhattn.autograd")
    except ImportError as e:  # triton missing, or the kernels are not there yet
        _triton_import_error = f"{type(e).__name__}: {e}"


def triton_unavailable_reason(q: Tensor, pattern: Pattern) -> Optional[str]:
    """None if the Triton backend can run ``pattern`` on ``q``, else why it cannot."""
    _load_triton()
    if type(pattern) not in _TRITON:
        if _triton_import_error is not None:
            return f"the Triton kernels could not be imported ({_triton_import_error})"
        return f"no Triton kernel is implemented yet for {type(pattern).__name__}"
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return (f"Triton kernels need CUDA tensors (got {q.device.type}); on CPU set TRITON_INTERPRET=1 "
                "before importing lhattn to run them in Triton's interpreter")
    d, d_run = q.shape[-1], _triton_head_dim(q.shape[-1])
    if d_run is not None and d_run != d and isinstance(pattern, LSG) and pattern.sparsity_type == "lsh":
        return (f"LSG's lsh selection draws projections of the head dim, so a head dim the Triton kernels "
                f"would pad (D={d} -> {d_run}) cannot run them; use a head dim in (16, 32, 64, 128, 256)")
    return _TRITON[type(pattern)][1](q, pattern)


def _triton_head_dim(d: int) -> Optional[int]:
    """The head dim the Triton kernels run head dim ``d`` at (``lhattn.autograd._common``)."""
    from .autograd._common import triton_head_dim
    return triton_head_dim(d)


def _padded_call(impl: Callable, d_run: int, q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, *,
                 scale: Optional[float] = None, **kwargs) -> Tuple[Tensor, Tensor]:
    """``impl`` run at head dim ``d_run > D`` (module docstring): q, k, v and ``global_qkv`` get
    zero columns, the scale stays ``D ** -0.5``, the output is cut back to ``D`` columns."""
    d = q.shape[-1]

    def pad(t: Tensor) -> Tensor:
        return F.pad(t, (0, d_run - d))

    if kwargs.get("global_qkv") is not None:
        kwargs["global_qkv"] = tuple(pad(t) for t in kwargs["global_qkv"])
    out, lse = impl(pad(q), pad(k), pad(v), pattern, scale=d ** -0.5 if scale is None else scale, **kwargs)
    return out[..., :d].contiguous(), lse


def _triton_impl(q: Tensor, pattern: Pattern) -> Callable:
    """The Triton implementation for ``pattern``, zero-padding the head dim where the kernels need it."""
    impl = _TRITON[type(pattern)][0]
    d_run = _triton_head_dim(q.shape[-1])
    return impl if d_run == q.shape[-1] else functools.partial(_padded_call, impl, d_run)


def _auto_tries_triton(q: Tensor) -> bool:
    """Whether ``backend="auto"`` looks for a Triton kernel for ``q`` (CUDA tensors)."""
    return q.device.type == "cuda"


def _warn_fallback(why: str) -> None:
    """One :class:`FallbackWarning` per distinct reason, for the life of the process (eager calls
    only: a graph being traced by ``torch.compile`` stays free of Python side effects)."""
    if why in _warned_reasons or torch.compiler.is_compiling():
        return
    _warned_reasons.add(why)
    warnings.warn(f"lhattn: backend='auto' runs the fallback instead of the Triton kernels: {why} "
                  "(lhattn.triton_unavailable_reason(q, pattern) tells in advance; backend='fallback' "
                  "asks for the fallback explicitly)", FallbackWarning, stacklevel=_outside_lhattn(2))


def _outside_lhattn(level: int) -> int:
    """The ``stacklevel`` of the first frame, from ``level`` up, whose code is not in lhattn: a
    warning then points at the user's line whichever lhattn function it went through."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame = sys._getframe(level)
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def _reference(pattern: Pattern) -> Callable:
    from . import reference
    return {SlidingWindow: reference.sliding_window_attention, LSG: reference.lsg_attention,
            Segments: reference.segment_attention}[type(pattern)]


def _fallback(pattern: Pattern) -> Callable:
    from . import fallback
    return {SlidingWindow: fallback.sliding_window_attention, LSG: fallback.lsg_attention,
            Segments: fallback.segment_attention}[type(pattern)]


def _choose(backend: str, q: Tensor, pattern: Pattern) -> Callable:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return _reference(pattern)
    if backend == "fallback":
        return _fallback(pattern)
    if backend == "triton":
        why = triton_unavailable_reason(q, pattern)
        if why is not None:
            raise NotImplementedError(f"backend='triton' cannot run this call: {why}")
        return _triton_impl(q, pattern)
    # auto
    if _auto_tries_triton(q):
        why = triton_unavailable_reason(q, pattern)
        if why is None:
            return _triton_impl(q, pattern)
        _warn_fallback(why)
    return _fallback(pattern)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: Pattern,
    *,
    key_padding_mask: Optional[Tensor] = None,
    global_mask: Optional[Tensor] = None,
    global_qkv: Optional[Sequence[Tensor]] = None,
    segment_ids: Optional[Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    dropout_seed: Union[None, int, Tensor] = None,
    backend: str = "auto",
    return_lse: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Attention restricted to ``pattern``.

    Args:
        q: ``[B, H, N, D]``; any strides.
        k, v: ``[B, H_kv, N, D]`` with ``H % H_kv == 0`` (GQA/MQA), same dtype/device as q.
        pattern: :class:`SlidingWindow`, :class:`LSG` or :class:`Segments` (see each for
            exactly which keys a query sees).
        key_padding_mask: ``[B, N]`` bool, True = padding: never seen as a key; a padding
            query's output is exactly 0 (and its gradients 0).
        global_mask: ``[B, N]`` bool, True = global token (SlidingWindow, Segments): every
            query sees it, and it sees every key. Counts may differ per batch row.
        global_qkv: ``(q_g, k_g, v_g)`` shaped like ``(q, k, v)``: separate projections used
            by the global rows (SlidingWindow only; HF Longformer's ``*_global``).
        segment_ids: ``[B, N]`` integer, non-decreasing (Segments without ``segment_size``).
        scale: softmax scale, default ``D ** -0.5``.
        dropout_p: attention dropout on the probabilities (after the softmax), in ``[0, 1)``;
            kept weights are scaled by ``1 / (1 - p)``.  Applied whenever it is > 0 (this
            function has no train/eval mode: pass ``p if module.training else 0.0``).
        dropout_seed: which entries are dropped is a pure function of this seed and the
            entry's (batch, head, query, key) -- the same in every backend, regenerated in the
            backward (:mod:`lhattn._dropout`).  An int in ``[0, 2**32)``, a one-element
            integer tensor, or None: drawn from torch's default generator.
        backend: ``"auto" | "triton" | "fallback" | "reference"`` (module docstring).
        return_lse: also return ``lse [B, H, N]`` (float32; float64 for float64 inputs;
            ``-inf`` on rows that see no key). lse carries no gradient.

    Returns:
        ``out [B, H, N, D]`` in q's dtype, or ``(out, lse)``.
    """
    V.check_qkv(q, k, v)
    if not isinstance(pattern, (SlidingWindow, LSG, Segments)):
        raise TypeError(f"pattern must be SlidingWindow, LSG or Segments, got {type(pattern).__name__}")
    V.check_token_mask("key_padding_mask", key_padding_mask, q)
    V.check_token_mask("global_mask", global_mask, q)
    V.check_scale(scale)
    _dropout.check_dropout(dropout_p, dropout_seed)
    kwargs = dict(key_padding_mask=key_padding_mask, scale=scale)
    if dropout_p > 0.0:
        kwargs.update(dropout_p=float(dropout_p), dropout_state=_dropout.make_state(dropout_p, dropout_seed, q.device))
    if isinstance(pattern, SlidingWindow):
        if segment_ids is not None:
            raise ValueError("segment_ids is only meaningful for the Segments pattern, got it with SlidingWindow")
        V.check_global_qkv(global_qkv, q, k)
        kwargs.update(global_mask=global_mask, global_qkv=global_qkv)
    elif isinstance(pattern, Segments):
        if global_qkv is not None:
            raise ValueError("global_qkv is only supported with SlidingWindow (Longformer), got it with Segments")
        V.check_segments_call(pattern.segment_size, segment_ids, q)
        kwargs.update(global_mask=global_mask, segment_ids=segment_ids)
    else:
        for name, val in (("global_mask", global_mask), ("global_qkv", global_qkv), ("segment_ids", segment_ids)):
            if val is not None:
                raise ValueError(f"{name} is not used by LSG (its global tokens are the first "
                                 f"num_global_tokens positions); got {name} with an LSG pattern")
    out, lse = _choose(backend, q, pattern)(q, k, v, pattern, **kwargs)
    return (out, lse) if return_lse else out


def sliding_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: Union[int, Tuple[int, int]],
    *,
    dilation: int = 1,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    global_mask: Optional[Tensor] = None,
    global_qkv: Optional[Sequence[Tensor]] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    dropout_seed: Union[None, int, Tensor] = None,
    backend: str = "auto",
    return_lse: bool = False,
):
    """Longformer attention: query i sees keys ``i + m·dilation`` for ``-left <= m <= right``
    (inclusive), plus global keys; global queries see every key.  See :func:`attention`."""
    return attention(q, k, v, SlidingWindow(window, dilation, causal), key_padding_mask=key_padding_mask,
                     global_mask=global_mask, global_qkv=global_qkv, scale=scale, dropout_p=dropout_p,
                     dropout_seed=dropout_seed, backend=backend, return_lse=return_lse)


def lsg_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    block_size: int = 128,
    sparse_block_size: Optional[int] = None,
    sparsity_factor: int = 2,
    sparsity_type: str = "norm",
    num_global_tokens: int = 1,
    causal: bool = False,
    lsh_num_pre_rounds: int = 1,
    seed: int = 0,
    global_layout: str = "inline",
    sparse_geometry: str = "reference",
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    dropout_seed: Union[None, int, Tensor] = None,
    backend: str = "auto",
    return_lse: bool = False,
):
    """LSG attention (local blocks + compressed sparse keys + first-``g`` global tokens).
    The keyword arguments are the fields of :class:`lhattn.patterns.LSG` (exact semantics
    there and in :mod:`lhattn.reference.lsg`); the rest as in :func:`attention`."""
    pattern = LSG(block_size=block_size, sparse_block_size=sparse_block_size, sparsity_factor=sparsity_factor,
                  sparsity_type=sparsity_type, num_global_tokens=num_global_tokens, causal=causal,
                  lsh_num_pre_rounds=lsh_num_pre_rounds, seed=seed, global_layout=global_layout,
                  sparse_geometry=sparse_geometry)
    return attention(q, k, v, pattern, key_padding_mask=key_padding_mask, scale=scale, dropout_p=dropout_p,
                     dropout_seed=dropout_seed, backend=backend, return_lse=return_lse)


def segment_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    segment_size: Optional[int] = None,
    segment_ids: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    global_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    dropout_seed: Union[None, int, Tensor] = None,
    backend: str = "auto",
    return_lse: bool = False,
):
    """HAT segment-local attention: query i sees the keys of its own segment (fixed
    ``segment_size`` or ``segment_ids [B, N]``) plus global keys.  See :func:`attention`."""
    return attention(q, k, v, Segments(segment_size), key_padding_mask=key_padding_mask, global_mask=global_mask,
                     segment_ids=segment_ids, scale=scale, dropout_p=dropout_p, dropout_seed=dropout_seed,
                     backend=backend, return_lse=return_lse)
