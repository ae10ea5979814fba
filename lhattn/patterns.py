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

__all__ = ["SlidingWindow", "LSG", "Segments", "Pattern", "SPARSITY_TYPES"]

SPARSITY_TYPES = ("none", "norm", "pooling", "stride", "block_stride", "bos_pooling", "lsh")


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
    itself when causal), ``sparse_block_size`` *compressed* keys on each side
    beyond them (left side only when causal), and the global keys.  The
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

    @property
    def has_sparse_keys(self) -> bool:
        """False for ``sparsity_type="none"`` or ``sparse_block_size=0``."""
        return self.sparsity_type != "none" and self.sparse_block_size > 0

    @property
    def block_offset(self) -> int:
        """``o``: the first token of block 0 (0 inline, ``num_global_tokens`` prepended)."""
        return self.num_global_tokens if self.global_layout == "prepended" else 0


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
