"""Attention patterns: frozen, validated descriptions of which keys each query sees.

A pattern holds the *static* configuration of an attention layer.  Per-batch
data (``key_padding_mask``, ``global_mask``, ``segment_ids``) is passed with
each call, because it changes from batch to batch.

The exact semantics are the contract of every backend (reference, fallback,
Triton); see ``docs/ARCHITECTURE.md`` ("The pattern contract") and the docstrings below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Tuple, Union

__all__ = ["SlidingWindow", "LSG", "Segments", "Pattern", "SPARSITY_TYPES", "SPARSE_GEOMETRIES"]

SPARSITY_TYPES = ("none", "norm", "pooling", "stride", "block_stride", "bos_pooling", "lsh")
SPARSE_GEOMETRIES = ("reference", "regular")

_REFERENCES = {  # global_layout -> the lsg_converter code that sparse_geometry="reference" follows
    "inline": "lsg_converter's attention_layers.LSGSelfAttention",
    "prepended": "the LSGSelfAttention of lsg_converter's modeling_lsg_*.py",
}


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class SlidingWindow:
    """Banded attention (Longformer), optionally dilated, plus global tokens.

    A non-global, non-padding query ``i`` sees the keys ``i + m * dilation`` for
    every integer ``m`` in ``[-left, right]`` (both bounds **inclusive**) that
    are neither padding nor global, plus every global key (counted once).  A
    global query sees every non-padding key.  Padding queries see nothing.

    window: ``(left, right)``, or one int ``w`` meaning ``(w, w)`` -- or
        ``(w, 0)`` when ``causal=True``.  HF Longformer's
        ``attention_window=512`` is ``window=(256, 256)``.
    dilation: spacing between neighbours (Longformer/NATTEN meaning: the window
        counts neighbours, so the span is ``dilation`` times wider).
    causal: shorthand for ``right = 0``; a tuple window with ``right != 0``
        and ``causal=True`` is rejected.  Global queries still see every key.
    """

    window: Union[int, Tuple[int, int]]
    dilation: int = 1
    causal: bool = False

    def __post_init__(self):
        w = self.window
        if isinstance(w, int) and not isinstance(w, bool):
            _check_int("window", w, 0)
            w = (w, 0) if self.causal else (w, w)
        elif isinstance(w, (tuple, list)) and len(w) == 2:
            _check_int("window[0] (left)", w[0], 0)
            _check_int("window[1] (right)", w[1], 0)
            w = (int(w[0]), int(w[1]))
        else:
            raise TypeError(f"window must be an int or a (left, right) pair of ints, got {w!r}")
        if self.causal and w[1] != 0:
            raise ValueError(f"causal=True needs window right == 0, got window={w}")
        _check_int("dilation", self.dilation, 1)
        if not isinstance(self.causal, bool):
            raise TypeError(f"causal must be a bool, got {type(self.causal).__name__}")
        object.__setattr__(self, "window", w)

    @property
    def left(self) -> int:
        return self.window[0]

    @property
    def right(self) -> int:
        return self.window[1]


@dataclass(frozen=True)
class LSG:
    """Local + sparse + global attention (LSG, Condevaux & Harispe 2022).

    With ``o = 0`` (``global_layout="inline"``) or ``o = num_global_tokens``
    (``"prepended"``), the tokens ``[o, N)`` are cut into blocks of
    ``block_size`` (the last one padded and masked).  A non-global query of
    block ``t`` sees the keys of blocks ``t-1, t, t+1`` (``t-1`` and ``t`` up to
    itself when causal), up to ``sparse_block_size`` *compressed* keys in each of
    two windows, typically on each side beyond them (left side only when causal;
    where exactly: ``sparse_geometry``), and the global keys.  The
    compressed sequence (``sparsity_factor`` times shorter) is built by
    ``sparsity_type`` (see :mod:`lhattn.selection`).  The first
    ``num_global_tokens`` tokens are global: they see every key (every earlier
    one when causal), every query sees them, and they are masked out of the
    local and compressed keys.  Sequences with ``N - o <= 2 * block_size`` use
    full attention (LSG's rule).  Exact semantics: :mod:`lhattn.reference.lsg`.

    block_size: local block length ``b >= 1``.
    sparse_block_size: compressed keys per side ``sb >= 0`` (None = ``b``;
        0 = no sparse keys).
    sparsity_factor: ``f >= 1``, must divide ``b`` when there are sparse keys;
        ``f = 1`` keeps every key uncompressed.
    sparsity_type: one of :data:`SPARSITY_TYPES`; ``"none"`` = no sparse keys.
    num_global_tokens: ``g >= 0``.
    causal: causal LSG (local and sparse keys to the left only).
    lsh_num_pre_rounds: extra hashing rounds of ``"lsh"`` (LSG's parameter).
    seed: seeds the random projections of ``"lsh"`` (drawn afresh, from a
        generator seeded with ``seed``, on every call: reproducible).
    global_layout: ``"inline"`` -- the first ``g`` tokens of the sequence are
        global and sit in block 0 (``LSGSelfAttention`` of
        ``lsg_converter.attention_layers``, ``g = 1``); ``"prepended"`` -- the
        first ``g`` tokens were prepended to the sequence and blocks start at
        token ``g`` (the ``LSG*Model`` classes of ``lsg_converter``, whose
        embeddings prepend ``num_global_tokens`` learned tokens).
    sparse_geometry: ``"reference"`` (default) -- the compressed-key windows of the
        layout's reference exactly as its slicing computes them
        (``attention_layers`` inline, the model files prepended), including
        empty windows (inline ``f = 2``: none), one-sided ones (inline ``f = 3``)
        and shifted ones; configurations on which that reference fails raise
        ``ValueError``.  ``"regular"`` -- ``sparse_block_size`` compressed keys on
        each side just beyond the images of blocks ``t-1 .. t+1``, for every
        factor.  See :meth:`sparse_windows` and the README's LSG section.
    """

    block_size: int = 128
    sparse_block_size: Optional[int] = None
    sparsity_factor: int = 2
    sparsity_type: str = "norm"
    num_global_tokens: int = 1
    causal: bool = False
    lsh_num_pre_rounds: int = 1
    seed: int = 0
    global_layout: str = "inline"
    sparse_geometry: str = "reference"

    LAYOUTS: ClassVar[Tuple[str, ...]] = ("inline", "prepended")

    def __post_init__(self):
        _check_int("block_size", self.block_size, 1)
        if self.sparse_block_size is None:
            object.__setattr__(self, "sparse_block_size", self.block_size)
        _check_int("sparse_block_size", self.sparse_block_size, 0)
        _check_int("sparsity_factor", self.sparsity_factor, 1)
        _check_int("num_global_tokens", self.num_global_tokens, 0)
        _check_int("lsh_num_pre_rounds", self.lsh_num_pre_rounds, 0)
        _check_int("seed", self.seed, 0)
        if not isinstance(self.sparsity_type, str) or self.sparsity_type not in SPARSITY_TYPES:
            raise ValueError(f"sparsity_type must be one of {SPARSITY_TYPES}, got {self.sparsity_type!r}")
        if not isinstance(self.causal, bool):
            raise TypeError(f"causal must be a bool, got {type(self.causal).__name__}")
        if not isinstance(self.global_layout, str) or self.global_layout not in self.LAYOUTS:
            raise ValueError(f"global_layout must be one of {self.LAYOUTS}, got {self.global_layout!r}")
        if not isinstance(self.sparse_geometry, str) or self.sparse_geometry not in SPARSE_GEOMETRIES:
            raise ValueError(f"sparse_geometry must be one of {SPARSE_GEOMETRIES}, got {self.sparse_geometry!r}")
        if not self.has_sparse_keys:
            return
        b, sb, f = self.block_size, self.sparse_block_size, self.sparsity_factor
        if b % f:
            raise ValueError(f"sparsity_factor must divide block_size (LSG compresses each block of {b} "
                             f"tokens to block_size / sparsity_factor keys), got sparsity_factor={f}")
        if self.sparsity_type in ("norm", "lsh") and sb < b and (b % sb or sb % f):
            raise ValueError(
                f"with sparsity_type={self.sparsity_type!r} and sparse_block_size < block_size, "
                f"sparse_block_size must divide block_size ({b}) and be a multiple of sparsity_factor "
                f"({f}): keys are selected per chunk of sparse_block_size tokens; got sparse_block_size={sb}")
        if self.sparse_geometry == "reference" and _reference_windows(self) is None:
            if self.global_layout == "inline" and f == 1:
                why = "it cannot run sparsity_factor=1 with sparse keys"
            else:
                why = (f"block_size / sparsity_factor = {b // f} is odd"
                       f"{' and sparsity_factor is even' if self.global_layout == 'inline' else ' and > 1'}: its "
                       f"windows of compressed keys do not line up with the local blocks")
            raise ValueError(
                f"sparse_geometry='reference' follows {_REFERENCES[self.global_layout]}, which fails for "
                f"block_size={b}, sparsity_factor={f} ({why}); pass sparse_geometry='regular' for the regular "
                f"windows")

    def sparse_windows(self) -> Tuple[Tuple[int, int], Tuple[int, int]]:
        """``((left_lo, left_hi), (right_lo, right_hi))``: a non-global query of block ``t`` sees the
        compressed keys ``p`` with ``t·s + lo <= p < t·s + hi`` of each side (``s = b / f``; also
        ``0 <= p < T_c``); an empty side is ``(0, 0)``.  A key in both windows counts twice, as in
        LSG's concatenation.

        ``"regular"``: ``((-s - sb, -s), (2s, 2s + sb))``.  ``"reference"``: what the layout's
        reference slices out of its unfolded compressed sequence (:func:`_reference_windows`);
        causal: the left side only.  No sparse keys: both sides empty.
        """
        if not self.has_sparse_keys:
            return (0, 0), (0, 0)
        if self.sparse_geometry == "regular":
            s, sb = self.block_size // self.sparsity_factor, self.sparse_block_size
            left, right = (-s - sb, -s), (2 * s, 2 * s + sb)
        else:
            left, right = _reference_windows(self)
        return left, ((0, 0) if self.causal else right)

    @property
    def has_sparse_keys(self) -> bool:
        """False for ``sparsity_type="none"`` or ``sparse_block_size=0``."""
        return self.sparsity_type != "none" and self.sparse_block_size > 0

    @property
    def block_offset(self) -> int:
        """``o``: the first token of block 0 (0 inline, ``num_global_tokens`` prepended)."""
        return self.num_global_tokens if self.global_layout == "prepended" else 0


def _slice_span(length: int, start: int, stop: int) -> Optional[Tuple[int, int]]:
    """The positions ``[lo, hi)`` that Python's ``x[start:stop]`` takes from a length-``length``
    axis (negative bounds count from the end, a slice may be empty), or None if it takes none."""
    taken = range(length)[start:stop]
    return (taken.start, taken.stop) if len(taken) else None


def _reference_windows(p: LSG) -> Optional[Tuple[Tuple[int, int], Tuple[int, int]]]:
    """The compressed-key windows of ``p``'s reference (``sparse_geometry="reference"``), as
    :meth:`LSG.sparse_windows` offsets, or None where that reference fails.

    Both references pad the compressed sequence by ``P`` on each side, unfold it into windows of
    ``L`` keys with step ``s`` (window ``t`` starts at compressed position ``t·s - P``) and slice two
    runs out of each window at ``u = (L - 3s) // 2 + odd`` (``odd = s mod 2``): ``[u - w, u)`` (left)
    and ``[-(u + odd), -(u + odd) + w)`` (right), with Python's slice rules, so that a run may be
    empty.  ``attention_layers`` (inline): ``L = 3b``, ``P = (L - s) // 2``, ``w = b`` (it has no
    sparse_block_size: with ``sb != b`` we keep its runs' anchors -- the left run's end, the right
    run's start -- and make them ``sb`` long).  The model files (prepended): ``L = 6·sb``,
    ``P = (L - s) // 2 + odd``, ``w = sb``, and the last window dropped when ``s`` is odd.  The
    reference fails unless it makes exactly one window per block, and ``attention_layers`` fails
    for ``f = 1`` (its selection then returns one value too many).
    """
    b, sb, f = p.block_size, p.sparse_block_size, p.sparsity_factor
    s = b // f
    odd = s % 2
    if p.global_layout == "inline":
        if f == 1:
            return None
        length, w = 3 * b, b
        pad = (length - s) // 2
        extra = 0
    else:
        length, w = 6 * sb, sb
        pad = (length - s) // 2 + odd
        extra = odd  # the dropped last window
    if (2 * pad - length) // s + 1 - extra != 0:  # windows per block, beyond the nb of the local blocks
        return None
    u = (length - 3 * s) // 2 + odd
    left = _slice_span(length, u - w, u)
    right = _slice_span(length, -(u + odd), -(u + odd) + w)
    if left is not None:  # (the runs are w long or, in the model files, clipped by the slice)
        left = (left[0] - pad, left[1] - pad) if w == sb else (left[1] - sb - pad, left[1] - pad)
    if right is not None:
        right = (right[0] - pad, right[1] - pad) if w == sb else (right[0] - pad, right[0] + sb - pad)
    return left or (0, 0), right or (0, 0)


@dataclass(frozen=True)
class Segments:
    """Segment-local attention plus global tokens (HAT).

    A non-global, non-padding query sees the non-padding, non-global keys of its
    own segment plus every global key; a global query sees every non-padding
    key.  Segments are either fixed (``segment_size``: tokens
    ``[s*S, (s+1)*S)``, the last one possibly shorter) or given per call as
    ``segment_ids [B, N]`` (contiguous, non-decreasing; any lengths >= 1), in
    which case ``segment_size`` is None.
    """

    segment_size: Optional[int] = None

    def __post_init__(self):
        if self.segment_size is not None:
            _check_int("segment_size", self.segment_size, 1)


Pattern = Union[SlidingWindow, LSG, Segments]
