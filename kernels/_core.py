"""Shared online-softmax pieces for every lhattn kernel family.

Everything here is pattern-agnostic: a kernel family (sliding window, segments, LSG)
decides *which* key blocks a query block visits and *whether* a block needs the
per-element mask; these helpers do the arithmetic.

Conventions
-----------
* Tokens are addressed by *index* ``t`` in a (possibly strided) subsequence and by
  *position* ``pos = pos_offset + t * pos_step`` in the tensor.  A dilated sliding
  window is ``d`` plain windows over the residue classes ``t ↦ r + t·d``; plain
  patterns use ``pos_offset = 0, pos_step = 1``.
* Visibility inside a block is an *interval per query row*: row ``i`` sees key ``j``
  iff ``i - before <= j <= i + after`` (inclusive) and ``k_begin <= j < k_end``.  A
  dense pass uses ``before = after = n_q + n_k`` (always true).
* Scores are kept in "exp units": with ``USE_EXP2`` the scale passed in is
  ``scale * log2(e)`` and every exponential is ``exp2`` (one multiply saved per
  score, as in Triton's tutorial 06); float64 uses ``exp`` and the plain scale so
  gradcheck sees an exactly consistent function.  ``lse`` is always stored in
  natural-log units.
* float64 scales are split into two float32 halves (``hi + lo``): compiled Triton
  passes Python floats as float32, which would round an fp64 scale.
* Accumulation dtype: float32, or float64 for float64 inputs.
* A row that sees no key has ``l == 0``: its output is 0 and its lse ``-inf``.  In the
  backward its lse is read as ``+inf`` so that ``p = exp(s - lse) = 0`` everywhere.
* Attention dropout (``DROPOUT`` constexpr; the rule is :mod:`lhattn._dropout`'s, bit for
  bit): the caller loads ``(seed, T)`` with :func:`dropout_load` and hands each helper the
  32-bit *row keys* ``b_rk = dropout_row_keys(dropout_head_key(seed, b·H + h), row_pos)``;
  the helpers hash each score's key *column* ``col_offset + key_pos`` into a keep bit.
  Dropout acts on the probabilities only: ``l`` and ``lse`` are those of the undropped
  softmax, the accumulated ``P V`` sees ``P ∘ keep``, and ``1 / (1 - p)`` is applied once
  in :func:`attn_fwd_finalize`.  The backward uses ``dP' = keep ∘ dP / (1 - p)`` in
  ``dS = P ∘ (dP' − delta)`` and ``dV += (P ∘ keep / (1 - p))ᵀ dO``; ``delta = rowsum(dO ∘ O)``
  still holds for the dropped ``O``.  With ``DROPOUT`` False the extra arguments are unused
  and the compiled code is unchanged.

The jit helpers take already-offset base pointers (batch/head offsets applied in
int64 by the caller) and the strides of the token and feature axes.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

__all__ = [
    "HEAD_DIMS", "INTERPRET", "LOG2E", "LN2", "acc_dtype", "split_scale", "next_power_of_2", "limit_tuning",
    "limit_autotuners",
    "cast_to", "block_range", "online_softmax_update", "attn_fwd_range", "attn_fwd_list", "attn_fwd_finalize",
    "attn_bwd_load_rows", "attn_bwd_dq_range", "attn_bwd_dq_list", "attn_bwd_dkdv_heads", "attn_bwd_dkdv_range",
    "attn_fwd_band", "attn_bwd_dq_band", "attn_bwd_dkdv_band",
    "bwd_preprocess", "merge_partials", "sum_partial_rows",
    "mix32", "dropout_load", "dropout_head_key", "dropout_row_keys", "dropout_keep", "dropout_scale",
]

HEAD_DIMS = (16, 32, 64, 128, 256)
"""Head dims every kernel family compiles for (a block's feature axis is exactly ``D``)."""

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
"""True when Triton runs in its CPU interpreter (fixed small block sizes, no autotune)."""

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


# --------------------------------------------------------------------------------------
# host-side helpers
# --------------------------------------------------------------------------------------


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / lse dtype for an input dtype: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def split_scale(scale: float, dtype: torch.dtype) -> tuple[float, float, bool, bool]:
    """Kernel scale arguments ``(qk_scale, qk_scale_lo, EXACT_SCALE, USE_EXP2)``.

    Low precision: ``(scale * log2 e, 0, False, True)``.  float64: ``scale`` split
    into float32-exact ``hi + lo`` so the product ``s*hi + s*lo`` is accurate to
    ~1e-15 even though Triton passes float arguments as float32.
    """
    if dtype == torch.float64:
        hi = float(torch.tensor(scale, dtype=torch.float32))
        return hi, float(torch.tensor(scale - hi, dtype=torch.float32)), True, False
    return scale * math.log2(math.e), 0.0, False, True


def next_power_of_2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


AUTOTUNE_ENV = "LHATTN_AUTOTUNE_CONFIGS"


def limit_tuning(kept: list) -> list:
    """The first ``$LHATTN_AUTOTUNE_CONFIGS`` of a pruner's kept configs (unset or 0: all of them).

    A short tuning set for time-boxed GPU runs (``bash bench/gpu_check.sh OUT quick``): each
    candidate costs a compile and a benchmark at every new autotune key.  The pruners order their
    candidates best-first, so ``1`` runs the first one untuned."""
    raw = os.environ.get(AUTOTUNE_ENV, "").strip()
    if not raw:
        return kept
    try:
        limit = int(raw)
    except ValueError:
        raise ValueError(f"{AUTOTUNE_ENV} must be an integer >= 0 (0 = every config), got {raw!r}") from None
    if limit < 0:
        raise ValueError(f"{AUTOTUNE_ENV} must be an integer >= 0 (0 = every config), got {raw!r}")
    return kept[:limit] if limit else kept


def limit_autotuners(module) -> None:
    """Make every autotuned kernel of ``module`` apply :func:`limit_tuning` after its own pruner
    (called once per family module by :mod:`kernels`; a no-op under the interpreter)."""
    from triton.runtime.autotuner import Autotuner

    for obj in vars(module).values():
        if isinstance(obj, Autotuner) and not getattr(obj, "_lhattn_limited", False):
            prune = obj.early_config_prune

            def limited(configs, named_args, _prune=prune, **kwargs):
                return limit_tuning(_prune(configs, named_args, **kwargs) if _prune else list(configs))
            obj.early_config_prune = limited
            obj._lhattn_limited = True


# --------------------------------------------------------------------------------------
# jit helpers: block ranges and elementwise pieces
# --------------------------------------------------------------------------------------


@triton.jit
def block_range(start, before, after, k_begin, k_end, BLOCK_SELF: tl.constexpr, BLOCK_OTHER: tl.constexpr):
    """Blocks of the *other* axis that rows ``[start, start + BLOCK_SELF)`` may see.

    Row ``i`` sees ``j`` iff ``i - before <= j <= i + after`` and ``k_begin <= j < k_end``.
    Returns ``(lo, full_lo, full_hi, hi)``: visit ``[lo, full_lo)`` and ``[full_hi, hi)``
    in steps of ``BLOCK_OTHER`` with the element mask, ``[full_lo, full_hi)`` without
    it (every row of the block sees every element there, all inside ``[k_begin, k_end)``).
    Block starts are multiples of ``BLOCK_OTHER``; blocks outside the band are skipped.
    """
    lo = tl.maximum(start - before, k_begin) // BLOCK_OTHER * BLOCK_OTHER
    hi = tl.maximum(tl.minimum(start + BLOCK_SELF + after, k_end), lo)
    hi_up = tl.cdiv(hi, BLOCK_OTHER) * BLOCK_OTHER
    # first j seen by the *last* row, last j seen by the *first* row
    full_lo = tl.cdiv(tl.maximum(start + BLOCK_SELF - 1 - before, k_begin), BLOCK_OTHER) * BLOCK_OTHER
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi_up)
    full_hi = tl.minimum(start + after + 1, k_end) // BLOCK_OTHER * BLOCK_OTHER
    full_hi = tl.maximum(full_hi, full_lo)
    return lo, full_lo, full_hi, hi


# Interpreter-only corrections (constexpr False when compiled, so the GPU code is untouched):
# Triton's CPU interpreter multiplies bf16 operands as raw uint16 and truncates fp32 -> bf16
# instead of rounding to nearest even as the GPU does.
_UPCAST_BF16_DOT: tl.constexpr = tl.constexpr(INTERPRET)
_ROUND_BF16: tl.constexpr = tl.constexpr(INTERPRET)


@triton.jit
def cast_to(x, dtype: tl.constexpr):
    """``x.to(dtype)`` with round-to-nearest-even for fp32 -> bf16 everywhere (the GPU's
    rounding; the interpreter would truncate)."""
    if _ROUND_BF16:
        if dtype == tl.bfloat16:
            if x.dtype == tl.float32:
                b_bits = x.to(tl.uint32, bitcast=True)
                b_bits = (b_bits + 0x7FFF + ((b_bits >> 16) & 1)) >> 16 << 16
                x = b_bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _mm(a, b, acc):
    """``tl.dot(a, b, acc)`` (``acc`` may be None).  The CPU interpreter multiplies
    bfloat16 operands as their raw uint16 storage (a Triton interpreter bug), so there
    -- and only there -- bf16 operands are widened to fp32 first; bf16 products are
    exact in fp32, so this is the same arithmetic as a GPU's bf16 MMA."""
    if _UPCAST_BF16_DOT:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
        if b.dtype == tl.bfloat16:
            b = b.to(tl.float32)
    return tl.dot(a, b, acc)


@triton.jit
def _scale(x, hi, lo, EXACT: tl.constexpr):
    if EXACT:
        return x * hi + x * lo
    else:
        return x * hi


@triton.jit
def _exp(x, USE_EXP2: tl.constexpr):
    if USE_EXP2:
        return tl.math.exp2(x)
    else:
        return tl.exp(x)


@triton.jit
def _row_interval(o_i, before, after, c_begin, c_end):
    """``(lo [R, 1] int32, span [R, 1] uint32)``: row ``o_i [R]`` sees the columns ``j`` with
    ``0 <= j - lo <= span`` -- its band ``[i - before, i + after]`` (``before``/``after`` scalars or
    ``[R, 1]``) clipped to ``[c_begin, c_end)``, ``c_begin >= 0``; an empty interval is
    ``lo = -1, span = 0`` (column indices are >= 0).  Loop-invariant: a masked tile then costs one
    subtract, one unsigned 32-bit compare and one select per element."""
    lo = tl.maximum(o_i[:, None] - before, c_begin)
    hi = tl.minimum(o_i[:, None] + after, c_end - 1)
    empty = hi < lo
    span = tl.where(empty, 0, hi - lo).to(tl.uint32, bitcast=True)
    return tl.where(empty, -1, lo), span


@triton.jit
def _in_interval(o_j, lo, span):
    """``[R, C]`` bool: column ``o_j [C]`` is inside each row's interval (:func:`_row_interval`)."""
    return (o_j[None, :] - lo).to(tl.uint32, bitcast=True) <= span


@triton.jit
def _row_bound(o_i, before, after, c_begin, c_end, SIDE: tl.constexpr):
    """``[R, 1]`` int32, one bound of each row's interval (:func:`_row_interval`) for a one-sided edge
    tile: ``SIDE == 1`` the first column row ``o_i [R]`` sees, ``max(i - before, c_begin)``;
    ``SIDE == 2`` the last one, ``min(i + after, c_end - 1)``."""
    if SIDE == 1:
        return tl.maximum(o_i[:, None] - before, c_begin)
    else:
        return tl.minimum(o_i[:, None] + after, c_end - 1)


@triton.jit
def _in_side(o_j, lo, span, SIDE: tl.constexpr):
    """``[R, C]`` bool: column ``o_j [C]`` passes the band test of a tile: ``SIDE == 0`` inside each row's
    interval (``lo, span`` of :func:`_row_interval`: subtract, unsigned compare, select per element);
    ``SIDE == 1`` at or after the row's first column ``lo``, ``SIDE == 2`` at or before its last column
    ``lo`` (:func:`_row_bound`; one compare per element, ``span`` unused); ``SIDE`` 3 / 4 (a dense pass's
    left / right edge: every row's interval is the key range) inside the scalar interval ``lo, span``, a
    ``[1, C]`` column test."""
    if SIDE == 1:
        return o_j[None, :] >= lo
    elif SIDE == 2:
        return o_j[None, :] <= lo
    else:  # SIDE 3, 4: scalar lo, span (a dense pass): a [1, C] test per column, broadcast over the rows
        return _in_interval(o_j, lo, span)


@triton.jit
def _masked_scores(b_qk, o_j, lo, span, qk_scale, qk_scale_lo, EXACT_SCALE: tl.constexpr, SIDE: tl.constexpr = 0):
    """Scaled scores of a masked tile: ``-inf`` outside each row's interval (:func:`_row_interval`), or
    with ``SIDE`` 1 / 2 before its first / after its last column (:func:`_in_side`).
    The select comes before the scale, so the scale still fuses into the exponent's FMA; with the
    float64 split scale (``x*hi + x*lo``, ``lo`` possibly 0: ``-inf * 0``) it comes after."""
    return _mask_scores(b_qk, _in_side(o_j, lo, span, SIDE), qk_scale, qk_scale_lo, EXACT_SCALE)


@triton.jit
def _bwd_probs(b_s, b_lse, m_s, USE_EXP2: tl.constexpr):
    """A backward tile's probabilities ``exp(s - lse)``, 0 where ``m_s`` (broadcast to the tile) is False.

    The backward may select after the exponential: ``lse`` is final (no running max to keep finite), a
    row that saw nothing has ``lse = +inf`` (:func:`attn_bwd_load_rows`) and every other row's ``lse`` is
    at least each score it saw, so an entry that was seen is ``exp`` of at most 0 and one that was not
    (any value, ``inf`` included) is replaced.  The same select before the exponential makes ptxas
    evaluate the two-sided row test (:func:`_in_side`, ``SIDE == 0``) while the tile's MMA is in flight
    and keep its predicates packed in registers: on sm_90 (Triton 3.9, bf16) the two-sided dq tile at
    D = 64 took 450 instructions and 167 registers that way, 382 and 160 this way (dk/dv 553 -> 488), at
    the same count of selects.  Not for the float64 split scale (``EXACT_SCALE``), whose scores are
    scaled in two products: there the select stays before them."""
    return tl.where(m_s, _exp(b_s - b_lse, USE_EXP2), 0.0)


@triton.jit
def _mask_scores(b_qk, m_s, qk_scale, qk_scale_lo, EXACT_SCALE: tl.constexpr):
    """Scaled scores ``b_qk``, ``-inf`` where ``m_s`` (broadcast to the tile) is False, in the order of
    :func:`_masked_scores`."""
    if EXACT_SCALE:
        return tl.where(m_s, _scale(b_qk, qk_scale, qk_scale_lo, EXACT_SCALE), float("-inf"))
    else:
        return _scale(tl.where(m_s, b_qk, float("-inf")), qk_scale, qk_scale_lo, EXACT_SCALE)


# --------------------------------------------------------------------------------------
# attention dropout (lhattn._dropout's rule; all arithmetic on uint32, modulo 2**32)
# --------------------------------------------------------------------------------------

_MIX_MUL1: tl.constexpr = tl.constexpr(0x7FEB352D)
_MIX_MUL2: tl.constexpr = tl.constexpr(0x846CA68B)


def dropout_scale(p: float, dtype: torch.dtype) -> tuple[float, float]:
    """``1 / (1 - p)`` as kernel arguments ``(hi, lo)`` (see :func:`split_scale`: exact for
    float64 via a float32 pair, plain float32 otherwise)."""
    inv = 1.0 / (1.0 - p)
    if dtype == torch.float64:
        hi = float(torch.tensor(inv, dtype=torch.float32))
        return hi, float(torch.tensor(inv - hi, dtype=torch.float32))
    return inv, 0.0


@triton.jit
def mix32(x):
    """The 32-bit finaliser of :func:`lhattn._dropout.mix32` on a uint32 tensor."""
    x = x ^ (x >> 16)
    x = x * tl.cast(_MIX_MUL1, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.cast(_MIX_MUL2, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def dropout_load(p_drop):
    """``(seed, T)`` as uint32 scalars from the dropout state (int64 ``[2]``)."""
    return tl.load(p_drop).to(tl.uint32), tl.load(p_drop + 1).to(tl.uint32)


@triton.jit
def dropout_head_key(seed, i_bh):
    """``K = mix32(mix32(b·H + h) ^ seed)`` for ``i_bh = b·H + h`` (query heads)."""
    return mix32(mix32(i_bh.to(tl.uint32)) ^ seed)


@triton.jit
def dropout_row_keys(k_bh, o_pos):
    """``R = mix32(K ^ i)`` for the query token positions ``o_pos [BM]``."""
    return mix32(k_bh ^ o_pos.to(tl.uint32))


@triton.jit
def dropout_keep(b_rk, o_col, thresh):
    """``[BM, BN]`` bool: entry (row with key ``b_rk [BM]``, key column ``o_col [BN]``) is kept."""
    return mix32(b_rk[:, None] ^ o_col.to(tl.uint32)[None, :]) >= thresh


@triton.jit
def _list_columns(o_pos, o_g, m_g, col_offset, p_col, stride_col, LIST_COLS: tl.constexpr):
    """Dropout columns of listed keys at positions ``o_pos [BN]`` (slots ``o_g``, ``m_g`` = occupied):
    ``col_offset + o_pos``, or with ``LIST_COLS`` the int64 ``p_col[o_g · stride_col]``."""
    if LIST_COLS:
        o_col = tl.load(p_col + o_g * stride_col, mask=m_g, other=0)
    else:
        o_col = col_offset + o_pos
    return o_col


# --------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------


@triton.jit
def online_softmax_update(acc, m_i, l_i, b_s, b_v, USE_EXP2: tl.constexpr, b_keep=None,
                          DROPOUT: tl.constexpr = False, qk_scale=None):
    """One online-softmax step: fold scores ``b_s [BM, BN]`` (exp units, masked = -inf)
    and values ``b_v [BN, D]`` into ``acc [BM, D]``, ``m_i [BM]``, ``l_i [BM]``.
    ``DROPOUT``: only the entries where ``b_keep`` is True reach ``acc`` (``l_i`` counts all).
    ``qk_scale`` (a scale > 0, or None): ``b_s`` are the unscaled scores and the scale is applied
    here, to the row max after the reduction and inside the exponent's FMA (tutorial 06's order:
    one multiply per row instead of one per score)."""
    if qk_scale is None:
        m_new = tl.maximum(m_i, tl.max(b_s, 1))  # [BM]
    else:
        m_new = tl.maximum(m_i, tl.max(b_s, 1) * qk_scale)  # [BM]
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing stays finite
    if qk_scale is None:
        b_p = _exp(b_s - m_use[:, None], USE_EXP2)  # [BM, BN]
    else:
        b_p = _exp(b_s * qk_scale - m_use[:, None], USE_EXP2)  # [BM, BN]
    alpha = _exp(m_i - m_use, USE_EXP2)  # [BM]
    l_i = l_i * alpha + tl.sum(b_p, 1)
    if DROPOUT:
        b_p = tl.where(b_keep, b_p, 0.0)
    acc = _mm(cast_to(b_p, b_v.dtype), b_v, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def attn_fwd_range(
    acc, m_i, l_i, b_q, o_i,
    p_k, p_v, p_km, stride_kn, stride_vn, stride_kmn, o_kd, o_vd,
    j_lo, j_hi, k_begin, k_end, pos_offset, pos_step, before, after,
    qk_scale, qk_scale_lo,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    EXACT_SCALE: tl.constexpr, USE_EXP2: tl.constexpr,
    b_rk=0, col_offset=0, drop_thresh=0, DROPOUT: tl.constexpr = False, DENSE: tl.constexpr = False,
):
    """Attend query block ``b_q [BM, D]`` (indices ``o_i [BM]``) to the key indices
    ``[j_lo, j_hi)``, ``BLOCK_N`` at a time.  Key index ``j`` lives at position
    ``pos_offset + j * pos_step``.  ``MASKED``: apply the band and ``[k_begin, k_end)``
    masks (edge blocks); otherwise every key of every visited block is in range and
    in the band.  ``HAS_KEY_MASK``: ``p_km`` (int32 or uint8, position-indexed, nonzero =
    visible) masks keys on every block.  ``DROPOUT``: row keys ``b_rk [BM]``, key column
    ``col_offset + position``.  ``DENSE``: ``before`` and ``after`` reach every key of ``[k_begin, k_end)``
    (LSG's global rows), so a masked tile tests its columns only (the key mask's predicated load does it
    when there is one).  Returns the updated ``(acc, m_i, l_i)``."""
    if MASKED and not DENSE:
        r_lo, r_span = _row_interval(o_i, before, after, k_begin, k_end)
    for j0 in range(j_lo, j_hi, BLOCK_N):
        o_j = j0 + tl.arange(0, BLOCK_N)  # [BN]
        o_pos = (pos_offset + o_j * pos_step).to(tl.int64)
        if MASKED:
            m_j = (o_j >= k_begin) & (o_j < k_end)  # [BN]
            b_k = tl.load(p_k + o_pos[:, None] * stride_kn + o_kd[None, :], mask=m_j[:, None], other=0.0)
            b_v = tl.load(p_v + o_pos[:, None] * stride_vn + o_vd[None, :], mask=m_j[:, None], other=0.0)
        else:
            b_k = tl.load(p_k + o_pos[:, None] * stride_kn + o_kd[None, :])  # [BN, D]
            b_v = tl.load(p_v + o_pos[:, None] * stride_vn + o_vd[None, :])  # [BN, D]
        # [BM, BN] scores: unscaled (the update scales them) unless the float64 split scale is on
        b_s = _mm(b_q, tl.trans(b_k), None)
        if EXACT_SCALE:  # before any -inf: the split scale's x*lo would make -inf * 0 = nan
            b_s = _scale(b_s, qk_scale, qk_scale_lo, EXACT_SCALE)
        if MASKED and not DENSE:
            b_s = tl.where(_in_interval(o_j, r_lo, r_span), b_s, float("-inf"))
        elif MASKED and not HAS_KEY_MASK:
            b_s = tl.where(m_j[None, :], b_s, float("-inf"))
        if HAS_KEY_MASK:
            if MASKED:
                m_k = tl.load(p_km + o_pos * stride_kmn, mask=m_j, other=0) != 0
            else:
                m_k = tl.load(p_km + o_pos * stride_kmn) != 0
            b_s = tl.where(m_k[None, :], b_s, float("-inf"))
        b_keep = None
        if DROPOUT:
            b_keep = dropout_keep(b_rk, col_offset + o_pos, drop_thresh)
        if EXACT_SCALE:
            acc, m_i, l_i = online_softmax_update(acc, m_i, l_i, b_s, b_v, USE_EXP2, b_keep, DROPOUT)
        else:
            acc, m_i, l_i = online_softmax_update(acc, m_i, l_i, b_s, b_v, USE_EXP2, b_keep, DROPOUT, qk_scale)
    return acc, m_i, l_i


@triton.jit
def attn_fwd_list(
    acc, m_i, l_i, b_q,
    p_idx, stride_idx, n_idx, p_k, p_v, stride_kn, stride_vn, o_kd, o_vd,
    qk_scale, qk_scale_lo,
    BLOCK_N: tl.constexpr, EXACT_SCALE: tl.constexpr, USE_EXP2: tl.constexpr,
    b_rk=0, col_offset=0, drop_thresh=0, DROPOUT: tl.constexpr = False,
    p_col=0, stride_col=0, LIST_COLS: tl.constexpr = False,
):
    """Attend ``b_q [BM, D]`` to the keys at the positions listed in ``p_idx[:n_idx]``
    (int64, negative = empty slot); every row sees every listed key.  ``DROPOUT``: as
    :func:`attn_fwd_range` (key column ``col_offset + listed position``; with ``LIST_COLS`` the
    int64 ``p_col[slot · stride_col]`` instead: listed keys whose columns are not their positions,
    e.g. the global keys gathered on a context-parallel rank)."""
    for g0 in range(0, n_idx, BLOCK_N):
        o_g = g0 + tl.arange(0, BLOCK_N)  # [BN]
        b_idx = tl.load(p_idx + o_g * stride_idx, mask=o_g < n_idx, other=-1)
        m_g = b_idx >= 0
        o_pos = tl.where(m_g, b_idx, 0).to(tl.int64)
        b_k = tl.load(p_k + o_pos[:, None] * stride_kn + o_kd[None, :], mask=m_g[:, None], other=0.0)
        b_v = tl.load(p_v + o_pos[:, None] * stride_vn + o_vd[None, :], mask=m_g[:, None], other=0.0)
        b_s = _mm(b_q, tl.trans(b_k), None)  # [BM, BN], unscaled unless the float64 split scale is on
        if EXACT_SCALE:
            b_s = _scale(b_s, qk_scale, qk_scale_lo, EXACT_SCALE)
        b_s = tl.where(m_g[None, :], b_s, float("-inf"))
        b_keep = None
        if DROPOUT:
            b_keep = dropout_keep(b_rk, _list_columns(o_pos, o_g, m_g, col_offset, p_col, stride_col, LIST_COLS),
                                  drop_thresh)
        if EXACT_SCALE:
            acc, m_i, l_i = online_softmax_update(acc, m_i, l_i, b_s, b_v, USE_EXP2, b_keep, DROPOUT)
        else:
            acc, m_i, l_i = online_softmax_update(acc, m_i, l_i, b_s, b_v, USE_EXP2, b_keep, DROPOUT, qk_scale)
    return acc, m_i, l_i


@triton.jit
def attn_fwd_finalize(acc, m_i, l_i, m_row, USE_EXP2: tl.constexpr, drop_scale=1.0, drop_scale_lo=0.0,
                      EXACT_SCALE: tl.constexpr = False, DROPOUT: tl.constexpr = False):
    """``(out [BM, D], lse [BM])`` from the running state; rows with ``m_row`` False
    or no key seen get ``out = 0`` and ``lse = -inf``.  lse in natural-log units.
    ``DROPOUT``: ``out`` is scaled by ``1 / (1 - p) = drop_scale (+ drop_scale_lo)``."""
    m_ok = m_row & (l_i > 0)
    l_safe = tl.where(m_ok, l_i, 1.0)
    b_o = acc / l_safe[:, None]
    if DROPOUT:
        b_o = _scale(b_o, drop_scale, drop_scale_lo, EXACT_SCALE)
    b_o = tl.where(m_ok[:, None], b_o, 0.0)
    if USE_EXP2:
        b_lse = (m_i + tl.math.log2(l_safe)) * LN2
    else:
        b_lse = m_i + tl.log(l_safe)
    b_lse = tl.where(m_ok, b_lse, float("-inf"))
    return b_o, b_lse


# --------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------


@triton.jit
def attn_bwd_load_rows(p_lse, p_delta, o_pos, stride_ln, stride_dn, m_rows, MASKED: tl.constexpr,
                       USE_EXP2: tl.constexpr):
    """Load ``lse`` (in exp units; ``-inf`` and out-of-range rows become ``+inf`` so that
    every p of the row is 0) and ``delta = rowsum(dO * O)`` for rows ``o_pos``."""
    if MASKED:
        b_lse = tl.load(p_lse + o_pos * stride_ln, mask=m_rows, other=float("inf"))
        b_delta = tl.load(p_delta + o_pos * stride_dn, mask=m_rows, other=0.0)
    else:
        b_lse = tl.load(p_lse + o_pos * stride_ln)
        b_delta = tl.load(p_delta + o_pos * stride_dn)
    b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse)
    if USE_EXP2:
        b_lse = b_lse * LOG2E
    return b_lse, b_delta


@triton.jit
def attn_bwd_dq_range(
    b_dq, b_q, b_do, b_lse, b_delta, o_i,
    p_k, p_v, p_km, stride_kn, stride_vn, stride_kmn, o_kd, o_vd,
    j_lo, j_hi, k_begin, k_end, pos_offset, pos_step, before, after,
    qk_scale, qk_scale_lo,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    EXACT_SCALE: tl.constexpr, USE_EXP2: tl.constexpr,
    b_rk=0, col_offset=0, drop_thresh=0, drop_scale=1.0, drop_scale_lo=0.0, DROPOUT: tl.constexpr = False,
    DENSE: tl.constexpr = False,
):
    """``dq += dS k`` over key indices ``[j_lo, j_hi)`` (same addressing, masks and ``DENSE`` as
    :func:`attn_fwd_range`); ``dS = P ∘ (dP − delta)``, the softmax scale is applied by
    the caller once at the end.  ``DROPOUT``: ``dP`` becomes ``keep ∘ dP / (1 - p)``."""
    if MASKED and not DENSE:
        r_lo, r_span = _row_interval(o_i, before, after, k_begin, k_end)
    for j0 in range(j_lo, j_hi, BLOCK_N):
        o_j = j0 + tl.arange(0, BLOCK_N)
        o_pos = (pos_offset + o_j * pos_step).to(tl.int64)
        if MASKED:
            m_j = (o_j >= k_begin) & (o_j < k_end)
            b_k = tl.load(p_k + o_pos[:, None] * stride_kn + o_kd[None, :], mask=m_j[:, None], other=0.0)
            b_v = tl.load(p_v + o_pos[:, None] * stride_vn + o_vd[None, :], mask=m_j[:, None], other=0.0)
        else:
            b_k = tl.load(p_k + o_pos[:, None] * stride_kn + o_kd[None, :])
            b_v = tl.load(p_v + o_pos[:, None] * stride_vn + o_vd[None, :])
        if MASKED and not DENSE:
            b_s = _masked_scores(_mm(b_q, tl.trans(b_k), None), o_j, r_lo, r_span, qk_scale, qk_scale_lo,
                                 EXACT_SCALE)  # [BM, BN]
        elif MASKED and not HAS_KEY_MASK:  # DENSE: the columns only
            b_s = _mask_scores(_mm(b_q, tl.trans(b_k), None), m_j[None, :], qk_scale, qk_scale_lo, EXACT_SCALE)
        else:
            b_s = _scale(_mm(b_q, tl.trans(b_k), None), qk_scale, qk_scale_lo, EXACT_SCALE)  # [BM, BN]
        if HAS_KEY_MASK:  # DENSE: its predicated load also tests the columns
            if MASKED:
                m_k = tl.load(p_km + o_pos * stride_kmn, mask=m_j, other=0) != 0
            else:
                m_k = tl.load(p_km + o_pos * stride_kmn) != 0
            b_s = tl.where(m_k[None, :], b_s, float("-inf"))
        b_p = _exp(b_s - b_lse[:, None], USE_EXP2)  # [BM, BN]
        b_dp = _mm(b_do, tl.trans(b_v), None)  # [BM, BN]
        if DROPOUT:
            b_keep = dropout_keep(b_rk, col_offset + o_pos, drop_thresh)
            b_dp = tl.where(b_keep, _scale(b_dp, drop_scale, drop_scale_lo, EXACT_SCALE), 0.0)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq = _mm(cast_to(b_ds, b_k.dtype), b_k, b_dq)
    return b_dq


@triton.jit
def attn_bwd_dq_list(
    b_dq, b_q, b_do, b_lse, b_delta,
    p_idx, stride_idx, n_idx, p_k, p_v, stride_kn, stride_vn, o_kd, o_vd,
    qk_scale, qk_scale_lo,
    BLOCK_N: tl.constexpr, EXACT_SCALE: tl.constexpr, USE_EXP2: tl.constexpr,
    b_rk=0, col_offset=0, drop_thresh=0, drop_scale=1.0, drop_scale_lo=0.0, DROPOUT: tl.constexpr = False,
    p_col=0, stride_col=0, LIST_COLS: tl.constexpr = False,
):
    """``dq += dS k`` over the listed keys (see :func:`attn_fwd_list`, also for ``LIST_COLS``;
    dropout as :func:`attn_bwd_dq_range`)."""
    for g0 in range(0, n_idx, BLOCK_N):
        o_g = g0 + tl.arange(0, BLOCK_N)
        b_idx = tl.load(p_idx + o_g * stride_idx, mask=o_g < n_idx, other=-1)
        m_g = b_idx >= 0
        o_pos = tl.where(m_g, b_idx, 0).to(tl.int64)
        b_k = tl.load(p_k + o_pos[:, None] * stride_kn + o_kd[None, :], mask=m_g[:, None], other=0.0)
        b_v = tl.load(p_v + o_pos[:, None] * stride_vn + o_vd[None, :], mask=m_g[:, None], other=0.0)
        b_s = _scale(_mm(b_q, tl.trans(b_k), None), qk_scale, qk_scale_lo, EXACT_SCALE)
        b_s = tl.where(m_g[None, :], b_s, float("-inf"))
        b_p = _exp(b_s - b_lse[:, None], USE_EXP2)
        b_dp = _mm(b_do, tl.trans(b_v), None)
        if DROPOUT:
            b_keep = dropout_keep(b_rk, _list_columns(o_pos, o_g, m_g, col_offset, p_col, stride_col, LIST_COLS),
                                  drop_thresh)
            b_dp = tl.where(b_keep, _scale(b_dp, drop_scale, drop_scale_lo, EXACT_SCALE), 0.0)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq = _mm(cast_to(b_ds, b_k.dtype), b_k, b_dq)
    return b_dq


@triton.jit
def attn_bwd_dkdv_heads(
    b_dk, b_dv, b_k, b_v, o_j,
    p_q, p_do, p_lse, p_delta, i_h0, n_heads, stride_qh, stride_doh, stride_lh, stride_dh,
    stride_qn, stride_don, stride_ln, stride_dn, o_qd, o_dod,
    i_lo, i_hi, r_begin, r_end, pos_offset, pos_step, before, after,
    qk_scale, qk_scale_lo,
    BLOCK_M: tl.constexpr, MASKED: tl.constexpr, EXACT_SCALE: tl.constexpr, USE_EXP2: tl.constexpr,
    b_kcol=0, drop_seed=0, drop_bh0=0, drop_thresh=0, drop_scale=1.0, drop_scale_lo=0.0,
    DROPOUT: tl.constexpr = False, p_drow=0, DROP_ROWS: tl.constexpr = False, drop_row_off=0,
    BAND: tl.constexpr = True,
):
    """``dv += Pᵀ dO`` and ``dk += dSᵀ q`` for the key block ``b_k, b_v [BN, D]``
    (key indices ``o_j [BN]``) over the query indices ``[i_lo, i_hi)``, ``BLOCK_M`` at a
    time, summed over the ``n_heads`` query heads ``i_h0, i_h0 + 1, ...`` that share
    these keys (GQA).  ``p_q, p_do, p_lse, p_delta`` point at head 0 of the batch row;
    query index ``i`` lives at position ``pos_offset + i * pos_step``.
    ``MASKED``: apply the band (row ``i`` sees ``j`` iff ``i - before <= j <= i + after``)
    and ``[r_begin, r_end)``.  Keys the forward did not see must be zeroed by the caller
    (each key's rows of dk/dv depend on that key's column only).  Works transposed
    (``[BN, BM]`` tiles) so no transpose of the accumulators is needed.  Heads and row
    blocks share one flat loop: a nested head loop costs registers (spills at D=128).
    ``DROPOUT``: the keys' columns are ``b_kcol [BN]``; query head ``h`` of this batch row has
    ``b·H + h = drop_bh0 + h`` (row keys are rebuilt per head from ``drop_seed``);
    ``dv += (P ∘ keep / (1 - p))ᵀ dO`` and ``dP' = keep ∘ dP / (1 - p)``.  A query's token
    position is its position ``pos_offset + i * pos_step``, or with ``DROP_ROWS`` the int64
    ``p_drow[i]`` (rows gathered from the sequence, e.g. global rows), plus ``drop_row_off`` (a call
    on part of a sequence, e.g. a context-parallel rank's).  ``BAND`` False: the band holds every row
    (``before``, ``after`` unused); a masked tile then tests no score: its rows outside
    ``[r_begin, r_end)`` load ``lse = +inf`` (``p = 0``), ``q = dO = delta = 0``, and drop out."""
    n_blk = tl.cdiv(tl.maximum(i_hi - i_lo, 0), BLOCK_M)
    if MASKED and BAND:  # key j is seen by the rows j - after <= i <= j + before inside [r_begin, r_end)
        c_lo, c_span = _row_interval(o_j, after, before, r_begin, r_end)
    for it in range(0, n_blk * n_heads):
        i_h = tl.cast(i_h0 + it % n_heads, tl.int64)
        i0 = i_lo + (it // n_heads) * BLOCK_M
        o_i = i0 + tl.arange(0, BLOCK_M)  # [BM]
        o_pos = (pos_offset + o_i * pos_step).to(tl.int64)
        p_qh = p_q + i_h * stride_qh
        p_doh = p_do + i_h * stride_doh
        if MASKED:
            m_i = (o_i >= r_begin) & (o_i < r_end)
            b_q = tl.load(p_qh + o_pos[:, None] * stride_qn + o_qd[None, :], mask=m_i[:, None], other=0.0)
            b_do = tl.load(p_doh + o_pos[:, None] * stride_don + o_dod[None, :], mask=m_i[:, None], other=0.0)
        else:
            m_i = o_i >= r_begin  # unused
            b_q = tl.load(p_qh + o_pos[:, None] * stride_qn + o_qd[None, :])  # [BM, D]
            b_do = tl.load(p_doh + o_pos[:, None] * stride_don + o_dod[None, :])  # [BM, D]
        b_lse, b_delta = attn_bwd_load_rows(p_lse + i_h * stride_lh, p_delta + i_h * stride_dh, o_pos, stride_ln,
                                            stride_dn, m_i, MASKED, USE_EXP2)
        if MASKED and BAND:
            b_st = _masked_scores(_mm(b_k, tl.trans(b_q), None), o_i, c_lo, c_span, qk_scale, qk_scale_lo,
                                  EXACT_SCALE)  # [BN, BM]
        else:
            b_st = _scale(_mm(b_k, tl.trans(b_q), None), qk_scale, qk_scale_lo, EXACT_SCALE)  # [BN, BM]
        b_pt = _exp(b_st - b_lse[None, :], USE_EXP2)  # [BN, BM]
        b_dpt = _mm(b_v, tl.trans(b_do), None)  # [BN, BM]
        if DROPOUT:
            if DROP_ROWS:
                o_tok = tl.load(p_drow + o_i, mask=(o_i >= r_begin) & (o_i < r_end), other=0)
            else:
                o_tok = o_pos
            b_rk = dropout_row_keys(dropout_head_key(drop_seed, drop_bh0 + i_h), o_tok + drop_row_off)  # [BM]
            b_keep_t = mix32(b_kcol.to(tl.uint32)[:, None] ^ b_rk[None, :]) >= drop_thresh  # [BN, BM]
            b_pd = tl.where(b_keep_t, _scale(b_pt, drop_scale, drop_scale_lo, EXACT_SCALE), 0.0)
            b_dv = _mm(cast_to(b_pd, b_do.dtype), b_do, b_dv)
            b_dpt = tl.where(b_keep_t, _scale(b_dpt, drop_scale, drop_scale_lo, EXACT_SCALE), 0.0)
        else:
            b_dv = _mm(cast_to(b_pt, b_do.dtype), b_do, b_dv)
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dk = _mm(cast_to(b_dst, b_q.dtype), b_q, b_dk)
    return b_dk, b_dv


@triton.jit
def attn_bwd_dkdv_range(
    b_dk, b_dv, b_k, b_v, o_j,
    p_q, p_do, p_lse, p_delta, stride_qn, stride_don, stride_ln, stride_dn, o_qd, o_dod,
    i_lo, i_hi, r_begin, r_end, pos_offset, pos_step, before, after,
    qk_scale, qk_scale_lo,
    BLOCK_M: tl.constexpr, MASKED: tl.constexpr, EXACT_SCALE: tl.constexpr, USE_EXP2: tl.constexpr,
    b_kcol=0, drop_seed=0, drop_bh=0, drop_thresh=0, drop_scale=1.0, drop_scale_lo=0.0,
    DROPOUT: tl.constexpr = False, p_drow=0, DROP_ROWS: tl.constexpr = False, drop_row_off=0,
):
    """:func:`attn_bwd_dkdv_heads` for one query head (``p_q, p_do, p_lse, p_delta``
    already point at it; ``drop_bh = b·H + h`` of that head).  Prefer the multi-head form
    over a loop of heads around this: a nested head loop spills registers at D = 128."""
    return attn_bwd_dkdv_heads(
        b_dk, b_dv, b_k, b_v, o_j, p_q, p_do, p_lse, p_delta, 0, 1, 0, 0, 0, 0,
        stride_qn, stride_don, stride_ln, stride_dn, o_qd, o_dod,
        i_lo, i_hi, r_begin, r_end, pos_offset, pos_step, before, after, qk_scale, qk_scale_lo,
        BLOCK_M, MASKED, EXACT_SCALE, USE_EXP2,
        b_kcol, drop_seed, drop_bh, drop_thresh, drop_scale, drop_scale_lo, DROPOUT, p_drow, DROP_ROWS,
        drop_row_off)


# --------------------------------------------------------------------------------------
# the band walk: masked edge, unmasked middle, masked edge -- one helper per pass
# --------------------------------------------------------------------------------------
#
# The sliding-window and segment kernels walk a band of key (or query) tiles as three loops:
# ``[lo, full_lo)`` with the per-element mask, ``[full_lo, full_hi)`` without it, ``[full_hi, hi)``
# with it (see :func:`block_range`).  :func:`attn_fwd_band`, :func:`attn_bwd_dq_band` and
# :func:`attn_bwd_dkdv_band` do the whole walk; their tile loops differ from the ``*_range``
# helpers (which the LSG kernels keep using) in two ways:
#
# * masked tiles load at *clamped* indices (``min(max(j, k_begin), k_end - 1)``), always in
#   bounds, so the loads need no predicate; the columns outside ``[k_begin, k_end)`` are already
#   outside every row's interval (:func:`_row_interval` clips to it), so they get ``-inf`` and
#   their (finite) loaded values never reach a result.  The interval test compares the tile's
#   column offsets ``0..BLOCK-1`` (loop-invariant) against ``lo - j0`` (one per row and tile)
#   instead of rebuilding the absolute column index of every element (except the forward at
#   D < 128, where that costs registers: 152 instead of 127 at 128x64/8w, D = 64, on sm_90).
# * unmasked forward / dq tiles advance their k/v pointers by one tile per step instead of
#   recomputing ``pos_offset + j * pos_step`` in int64 every tile (as Triton's tutorial 06 does).
#
# Where the ``*_range`` loops compile better on sm_90 (``python -m bench.sm90``) the band helpers walk
# with them instead: with dropout (every pass: the dk/dv pass spilled 24 B with the band tiles), the
# forward with a key mask or at D > 128, and when the caller asks (``RANGE_LOOPS``: the segment
# forward with per-token bounds, the segment dq at D = 256).
#
# One-sided edges (``ONE_SIDED``, a launch constexpr; issue 11).  A masked tile costs, per score, a
# subtract, an unsigned compare and a select for the two-sided interval test.  In a band wider than a
# tile pair, the left edge ``[lo, full_lo)`` can only cut through the rows' *first* columns
# (``max(i - before, k_begin)``) and the right edge ``[full_hi, hi)`` only through their *last* ones
# (``min(i + after, k_end - 1)``): each then tests one bound, a compare and a select per score against
# a per-row bound minus ``j0`` (:func:`_row_bound`, :func:`_in_side`).
#
# * The right edge needs no condition: it starts at or after ``full_lo``, past the first column of
#   every row of the block (:func:`block_range`, the segment ranges).  Its loads advance one tile per
#   step and are predicated at ``k_end`` (a predicate per loaded row, not per score).
# * The left edge lies at or before the first row's last column when
#   ``ceil((s + BLOCK_SELF - 1 - before) / BLOCK_OTHER) * BLOCK_OTHER <= s + after + 1`` for every block
#   start ``s`` (decided on the host, for every tile shape the autotuner may pick:
#   ``kernels/_launch.py``, ``_left_edge_one_sided``), and lies inside ``[0, k_end)``, so its loads are
#   neither clamped nor predicated and advance one tile per step (an index ``j0`` in the addresses would
#   widen the loop counter, and with it the row test, to 64 bits).  Near the end of a short sequence the
#   left edge can reach the tile holding ``k_end``: every pass moves that tile (and any after it) to the
#   right edge (:func:`_one_sided_split`; its rows' first columns are then at or before the tile's start
#   when ``before >= BLOCK_OTHER - 2`` -- or, in dk/dv, when ``before`` reaches every query row -- and the
#   key chunks start on tile boundaries), dk/dv only then (``SPLIT_END``: a causal window's keys see their
#   own row first, so there the lower bound cuts through that tile): otherwise dk/dv keeps it on the left
#   edge and drops the query rows past ``r_end`` through their lse (``+inf``, ``p = 0``), a clamp and a
#   predicated load per row (25-51 more SASS instructions per left-edge tile at D = 64 on sm_90, 64x128/8w:
#   457 instead of 482, dilated 459 instead of 510).
# * Fixed segments that are a multiple of the crossed tile and at least as long as the owned one are
#   one-sided too: a block spans at most two segments and their boundary is a tile boundary.
#
# Narrow bands, per-token segment bounds and unaligned chunks keep the two-sided test.  The walk is
# checked tile by tile in ``tests/test_triton_one_sided.py``.
#
# Dense edges (``DENSE``, a launch constexpr of the sliding window's forward and dq): in a dense pass every
# row's interval is the key chunk ``[k_begin, k_end)``, so a masked tile tests its columns only, against two
# scalars (``SIDE`` 3 / 4 of :func:`_in_side`: one compare per column, a select per score).  As with
# ``ONE_SIDED`` the tile holding ``k_end`` moves to the right edge (:func:`_one_sided_split`), so that the
# left edge's loads lie inside ``[0, k_end)`` and only the right edge's need a predicate.


@triton.jit
def _i64(x):
    """``x`` (a scalar tensor or a constexpr) as an int64 scalar tensor."""
    return x + tl.zeros([], dtype=tl.int64)


@triton.jit
def _clamp_index(o_j, k_begin, k_end):
    """``o_j`` clamped into ``[k_begin, k_end - 1]`` (the caller never visits an empty range)."""
    return tl.minimum(tl.maximum(o_j, k_begin), k_end - 1)


@triton.jit
def _edge_index(o_j, k_begin, k_end, SIDE: tl.constexpr):
    """Indices to load for the columns ``o_j`` of a masked tile, always in bounds: both-sided tiles clamp
    into ``[k_begin, k_end - 1]``; a left-edge tile (``SIDE == 1``) lies inside ``[0, k_end)`` (no clamp;
    columns under ``k_begin`` are loaded but fail the row test); a right-edge tile (``SIDE == 2``) starts
    at or after ``k_begin`` and clamps into ``k_end - 1`` only."""
    if SIDE == 1:
        return o_j
    elif SIDE == 2:
        return tl.minimum(o_j, k_end - 1)
    else:
        return _clamp_index(o_j, k_begin, k_end)


@triton.jit
def _edge_bounds(o_i, before, after, k_begin, k_end, SIDE: tl.constexpr):
    """``(lo, span)`` of a masked loop's row test (:func:`_in_side`): the interval of
    :func:`_row_interval` (``SIDE == 0``), the one bound of :func:`_row_bound` (``SIDE`` 1, 2; ``span`` 0,
    unused), or the key range ``[k_begin, k_end)`` itself as scalars (``SIDE`` 3, 4: a dense pass)."""
    if SIDE == 0:
        r_lo, r_span = _row_interval(o_i, before, after, k_begin, k_end)
    elif SIDE >= 3:
        r_lo = k_begin
        r_span = (k_end - 1 - k_begin).to(tl.uint32, bitcast=True)
    else:
        r_lo = _row_bound(o_i, before, after, k_begin, k_end, SIDE)
        r_span = 0
    return r_lo, r_span


@triton.jit
def _one_sided_split(lo, full_lo, full_hi, k_end, BLOCK: tl.constexpr):
    """``(full_lo, full_hi)`` of a one-sided walk (forward, dq): when the left edge reaches the tile that holds
    ``k_end`` (a short sequence, its last blocks), that tile and every one after it go to the right edge,
    whose test bounds ``k_end``; the walk's tiles and the unmasked ones are otherwise unchanged."""
    e = k_end // BLOCK * BLOCK
    cut = tl.minimum(full_lo, tl.maximum(e, lo))
    return cut, tl.maximum(tl.minimum(full_hi, e), cut)


@triton.jit
def _fwd_masked_tile(
    acc, m_i, l_i, b_q, j0, o_c, r_lo, r_span, p_kt, p_vt, p_kmt, o_col, qk_scale, qk_scale_lo,
    HAS_KEY_MASK: tl.constexpr, EXACT_SCALE: tl.constexpr, USE_EXP2: tl.constexpr, b_rk, drop_thresh,
    DROPOUT: tl.constexpr, SIDE: tl.constexpr, m_ld=None,
):
    """One masked key tile ``[j0, j0 + BLOCK_N)`` of :func:`_fwd_tiles`: k, v and key-mask pointers
    ``p_kt, p_vt [BN, D]``, ``p_kmt [BN]`` (in bounds, or where ``m_ld [BN]`` holds), dropout columns
    ``o_col [BN]``, row test ``r_lo, r_span`` of :func:`_edge_bounds`."""
    if m_ld is None:
        b_k = tl.load(p_kt)  # [BN, D]
        b_v = tl.load(p_vt)
    else:
        b_k = tl.load(p_kt, mask=m_ld[:, None], other=0.0)
        b_v = tl.load(p_vt, mask=m_ld[:, None], other=0.0)
    b_s = _mm(b_q, tl.trans(b_k), None)
    if EXACT_SCALE:  # before any -inf: the split scale's x*lo would make -inf * 0 = nan
        b_s = _scale(b_s, qk_scale, qk_scale_lo, EXACT_SCALE)
    # the row test: column offsets against lo - j0 (fewer instructions) on one-sided edges and two-sided at
    # D >= 128; absolute columns elsewhere (fewer registers at D = 64, under the 128 of 16 warps/SM at 8 warps:
    # two-sided 127 instead of 152, the dense pass's column test 126 instead of 139)
    if SIDE == 1 or SIDE == 2 or (SIDE == 0 and b_q.shape[1] >= 128):
        b_s = tl.where(_in_side(o_c, r_lo - j0, r_span, SIDE), b_s, float("-inf"))
    else:
        b_s = tl.where(_in_interval(j0 + o_c, r_lo, r_span), b_s, float("-inf"))
    if HAS_KEY_MASK:
        if m_ld is None:
            b_s = tl.where((tl.load(p_kmt) != 0)[None, :], b_s, float("-inf"))
        else:
            b_s = tl.where((tl.load(p_kmt, mask=m_ld, other=0) != 0)[None, :], b_s, float("-inf"))
    b_keep = None
    if DROPOUT:
        b_keep = dropout_keep(b_rk, o_col, drop_thresh)
    if EXACT_SCALE:
        acc, m_i, l_i = online_softmax_update(acc, m_i, l_i, b_s, b_v, USE_EXP2, b_keep, DROPOUT)
    else:
        acc, m_i, l_i = online_softmax_update(acc, m_i, l_i, b_s, b_v, USE_EXP2, b_keep, DROPOUT, qk_scale)
    return acc, m_i, l_i


@triton.jit
def _fwd_tiles(
    acc, m_i, l_i, b_q, o_i, p_k, p_v, p_km, stride_kn, stride_vn, stride_kmn, o_kd, o_vd,
    j_lo, j_hi, k_begin, k_end, pos_offset, pos_step, before, after, qk_scale, qk_scale_lo,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    EXACT_SCALE: tl.constexpr, USE_EXP2: tl.constexpr, b_rk, col_offset, drop_thresh, DROPOUT: tl.constexpr,
    SIDE: tl.constexpr = 0,
):
    """One loop of :func:`attn_fwd_band` over the key tiles ``[j_lo, j_hi)``.  ``MASKED``: the row test
    of ``SIDE`` (:func:`_in_side`)."""
    o_c = tl.arange(0, BLOCK_N)  # [BN] column offsets inside a tile
    if MASKED and SIDE != 0:
        # one-sided edges advance their pointers one tile per step, as unmasked tiles do (an index j0 in the
        # addresses would widen the loop counter, and the row test, to 64 bits); a left edge lies inside
        # [0, k_end) (columns before k_begin are loaded and fail the test), a right edge loads with a
        # predicate past k_end
        r_lo, r_span = _edge_bounds(o_i, before, after, k_begin, k_end, SIDE)
        o_pos = (pos_offset + (j_lo + o_c) * pos_step).to(tl.int64)
        p_kt = p_k + o_pos[:, None] * stride_kn + o_kd[None, :]  # [BN, D]
        p_vt = p_v + o_pos[:, None] * stride_vn + o_vd[None, :]
        p_kmt = p_km + o_pos * stride_kmn
        step = _i64(BLOCK_N * pos_step)
        for j0 in range(j_lo, j_hi, BLOCK_N):
            m_ld = None
            if SIDE == 2 or SIDE == 4:
                m_ld = o_c < k_end - j0
            acc, m_i, l_i = _fwd_masked_tile(
                acc, m_i, l_i, b_q, j0, o_c, r_lo, r_span, p_kt, p_vt, p_kmt,
                col_offset + pos_offset + (j0 + o_c) * pos_step, qk_scale, qk_scale_lo, HAS_KEY_MASK, EXACT_SCALE,
                USE_EXP2, b_rk, drop_thresh, DROPOUT, SIDE, m_ld)
            p_kt += step * stride_kn
            p_vt += step * stride_vn
            p_kmt += step * stride_kmn
    elif MASKED:
        r_lo, r_span = _edge_bounds(o_i, before, after, k_begin, k_end, SIDE)  # per loop: fewer live registers
        for j0 in range(j_lo, j_hi, BLOCK_N):
            o_pos = (pos_offset + _edge_index(j0 + o_c, k_begin, k_end, SIDE) * pos_step).to(tl.int64)
            acc, m_i, l_i = _fwd_masked_tile(
                acc, m_i, l_i, b_q, j0, o_c, r_lo, r_span, p_k + o_pos[:, None] * stride_kn + o_kd[None, :],
                p_v + o_pos[:, None] * stride_vn + o_vd[None, :], p_km + o_pos * stride_kmn, col_offset + o_pos,
                qk_scale, qk_scale_lo, HAS_KEY_MASK, EXACT_SCALE, USE_EXP2, b_rk, drop_thresh, DROPOUT, SIDE)
    else:
        o_pos = (pos_offset + (j_lo + o_c) * pos_step).to(tl.int64)  # [BN] positions of the first tile
        p_kt = p_k + o_pos[:, None] * stride_kn + o_kd[None, :]  # [BN, D]
        p_vt = p_v + o_pos[:, None] * stride_vn + o_vd[None, :]
        p_kmt = p_km + o_pos * stride_kmn
        step = _i64(BLOCK_N * pos_step)  # positions per tile
        for j0 in range(j_lo, j_hi, BLOCK_N):
            b_k = tl.load(p_kt)
            b_v = tl.load(p_vt)
            b_s = _mm(b_q, tl.trans(b_k), None)
            if EXACT_SCALE:
                b_s = _scale(b_s, qk_scale, qk_scale_lo, EXACT_SCALE)
            if HAS_KEY_MASK:
                b_s = tl.where((tl.load(p_kmt) != 0)[None, :], b_s, float("-inf"))
            b_keep = None
            if DROPOUT:
                b_keep = dropout_keep(b_rk, col_offset + pos_offset + (j0 + o_c) * pos_step, drop_thresh)
            if EXACT_SCALE:
                acc, m_i, l_i = online_softmax_update(acc, m_i, l_i, b_s, b_v, USE_EXP2, b_keep, DROPOUT)
            else:
                acc, m_i, l_i = online_softmax_update(acc, m_i, l_i, b_s, b_v, USE_EXP2, b_keep, DROPOUT, qk_scale)
            p_kt += step * stride_kn
            p_vt += step * stride_vn
            p_kmt += step * stride_kmn
    return acc, m_i, l_i


@triton.jit
def attn_fwd_band(
    acc, m_i, l_i, b_q, o_i,
    p_k, p_v, p_km, stride_kn, stride_vn, stride_kmn, o_kd, o_vd,
    lo, full_lo, full_hi, hi, k_begin, k_end, pos_offset, pos_step, before, after,
    qk_scale, qk_scale_lo,
    BLOCK_N: tl.constexpr, HAS_KEY_MASK: tl.constexpr, EXACT_SCALE: tl.constexpr, USE_EXP2: tl.constexpr,
    b_rk=0, col_offset=0, drop_thresh=0, DROPOUT: tl.constexpr = False, RANGE_LOOPS: tl.constexpr = False,
    ONE_SIDED: tl.constexpr = False, DENSE: tl.constexpr = False,
):
    """The whole forward band walk of query block ``b_q [BM, D]`` (indices ``o_i [BM]``): key
    tiles ``[lo, full_lo)`` masked, ``[full_lo, full_hi)`` unmasked, ``[full_hi, hi)`` masked (the
    four bounds of :func:`block_range` or an equivalent).  Row ``i`` sees key ``j`` iff
    ``i - before <= j <= i + after`` and ``k_begin <= j < k_end``; ``before``/``after`` are scalars
    or ``[BM, 1]``.  Addressing, key mask and dropout as :func:`attn_fwd_range`.  ``RANGE_LOOPS``: walk
    with the :func:`attn_fwd_range` loops (as with a key mask on a two-sided walk, or D > 128), for a caller
    that compiles better with them.  ``ONE_SIDED``: the caller guarantees the one-sided left edge (see "one-sided
    edges" above :func:`_i64`); ignored on the ``*_range`` loops.  ``DENSE``: the caller's ``before`` and
    ``after`` reach every key of ``[k_begin, k_end)`` (a dense pass): the masked edges test the key range
    only, per column (``SIDE`` 3 / 4 of :func:`_in_side`; the tile holding ``k_end`` moves to the right edge as
    with ``ONE_SIDED``, so that only the right edge's loads need a predicate); ignored on the ``*_range``
    loops."""
    if (HAS_KEY_MASK and not ONE_SIDED) or RANGE_LOOPS or b_q.shape[1] > 128:
        # the *_range loops: fewer registers / instructions there on sm_90 (bench.sm90: the key-padding
        # variants of the two-sided walk at D = 64, and D = 256)
        acc, m_i, l_i = attn_fwd_range(
            acc, m_i, l_i, b_q, o_i, p_k, p_v, p_km, stride_kn, stride_vn, stride_kmn, o_kd, o_vd, lo, full_lo,
            k_begin, k_end, pos_offset, pos_step, before, after, qk_scale, qk_scale_lo, BLOCK_N, True, HAS_KEY_MASK,
            EXACT_SCALE, USE_EXP2, b_rk, col_offset, drop_thresh, DROPOUT)
        if HAS_KEY_MASK or b_q.shape[1] > 128:
            acc, m_i, l_i = attn_fwd_range(
                acc, m_i, l_i, b_q, o_i, p_k, p_v, p_km, stride_kn, stride_vn, stride_kmn, o_kd, o_vd, full_lo,
                full_hi, k_begin, k_end, pos_offset, pos_step, before, after, qk_scale, qk_scale_lo, BLOCK_N, False,
                HAS_KEY_MASK, EXACT_SCALE, USE_EXP2, b_rk, col_offset, drop_thresh, DROPOUT)
        else:  # the unmasked tiles advance their pointers (bench.sm90: dropout, per-token segment bounds)
            acc, m_i, l_i = _fwd_tiles(
                acc, m_i, l_i, b_q, o_i, p_k, p_v, p_km, stride_kn, stride_vn, stride_kmn, o_kd, o_vd, full_lo,
                full_hi, k_begin, k_end, pos_offset, pos_step, before, after, qk_scale, qk_scale_lo, BLOCK_N, False,
                HAS_KEY_MASK, EXACT_SCALE, USE_EXP2, b_rk, col_offset, drop_thresh, DROPOUT)
        acc, m_i, l_i = attn_fwd_range(
            acc, m_i, l_i, b_q, o_i, p_k, p_v, p_km, stride_kn, stride_vn, stride_kmn, o_kd, o_vd, full_hi, hi,
            k_begin, k_end, pos_offset, pos_step, before, after, qk_scale, qk_scale_lo, BLOCK_N, True, HAS_KEY_MASK,
            EXACT_SCALE, USE_EXP2, b_rk, col_offset, drop_thresh, DROPOUT)
    else:
        if ONE_SIDED or DENSE:  # the tile holding k_end moves from the left edge to the right one
            full_lo, full_hi = _one_sided_split(lo, full_lo, full_hi, k_end, BLOCK_N)
        acc, m_i, l_i = _fwd_tiles(
            acc, m_i, l_i, b_q, o_i, p_k, p_v, p_km, stride_kn, stride_vn, stride_kmn, o_kd, o_vd, lo, full_lo,
            k_begin, k_end, pos_offset, pos_step, before, after, qk_scale, qk_scale_lo, BLOCK_N, True,
            HAS_KEY_MASK, EXACT_SCALE, USE_EXP2, b_rk, col_offset, drop_thresh, DROPOUT,
            3 if DENSE else (1 if ONE_SIDED else 0))
        acc, m_i, l_i = _fwd_tiles(
            acc, m_i, l_i, b_q, o_i, p_k, p_v, p_km, stride_kn, stride_vn, stride_kmn, o_kd, o_vd, full_lo, full_hi,
            k_begin, k_end, pos_offset, pos_step, before, after, qk_scale, qk_scale_lo, BLOCK_N, False, HAS_KEY_MASK,
            EXACT_SCALE, USE_EXP2, b_rk, col_offset, drop_thresh, DROPOUT)
        acc, m_i, l_i = _fwd_tiles(
            acc, m_i, l_i, b_q, o_i, p_k, p_v, p_km, stride_kn, stride_vn, stride_kmn, o_kd, o_vd, full_hi, hi, k_begin,
            k_end, pos_offset, pos_step, before, after, qk_scale, qk_scale_lo, BLOCK_N, True, HAS_KEY_MASK, EXACT_SCALE,
            USE_EXP2, b_rk, col_offset, drop_thresh, DROPOUT, 4 if DENSE else (2 if ONE_SIDED else 0))
    return acc, m_i, l_i


@triton.jit
def _dq_masked_tile(
    b_dq, b_q, b_do, b_lse, b_delta, j0, o_c, r_lo, r_span, p_kt, p_vt, p_kmt, o_col, qk_scale, qk_scale_lo,
    HAS_KEY_MASK: tl.constexpr, EXACT_SCALE: tl.constexpr, USE_EXP2: tl.constexpr,
    b_rk, drop_thresh, drop_scale, drop_scale_lo, DROPOUT: tl.constexpr, SIDE: tl.constexpr, m_ld=None,
):
    """One masked key tile ``[j0, j0 + BLOCK_N)`` of :func:`_dq_tiles` (pointers, load mask, dropout columns
    and row test as :func:`_fwd_masked_tile`)."""
    if m_ld is None:
        b_k = tl.load(p_kt)  # in bounds
        b_v = tl.load(p_vt)
    else:
        b_k = tl.load(p_kt, mask=m_ld[:, None], other=0.0)
        b_v = tl.load(p_vt, mask=m_ld[:, None], other=0.0)
    if SIDE == 0 and not EXACT_SCALE:
        # two-sided: select the probabilities, after the exponential (see _bwd_probs)
        m_s = _in_side(o_c, r_lo - j0, r_span, SIDE)
        if HAS_KEY_MASK:
            if m_ld is None:
                m_s = m_s & (tl.load(p_kmt) != 0)[None, :]
            else:
                m_s = m_s & (tl.load(p_kmt, mask=m_ld, other=0) != 0)[None, :]
        b_s = _scale(_mm(b_q, tl.trans(b_k), None), qk_scale, qk_scale_lo, EXACT_SCALE)
        b_p = _bwd_probs(b_s, b_lse[:, None], m_s, USE_EXP2)  # [BM, BN]
    else:
        b_s = _masked_scores(_mm(b_q, tl.trans(b_k), None), o_c, r_lo - j0, r_span, qk_scale, qk_scale_lo,
                             EXACT_SCALE, SIDE)  # [BM, BN]
        if HAS_KEY_MASK:
            if m_ld is None:
                b_s = tl.where((tl.load(p_kmt) != 0)[None, :], b_s, float("-inf"))
            else:
                b_s = tl.where((tl.load(p_kmt, mask=m_ld, other=0) != 0)[None, :], b_s, float("-inf"))
        b_p = _exp(b_s - b_lse[:, None], USE_EXP2)  # [BM, BN]
    b_dp = _mm(b_do, tl.trans(b_v), None)  # [BM, BN]
    if DROPOUT:
        b_keep = dropout_keep(b_rk, o_col, drop_thresh)
        b_dp = tl.where(b_keep, _scale(b_dp, drop_scale, drop_scale_lo, EXACT_SCALE), 0.0)
    b_ds = b_p * (b_dp - b_delta[:, None])
    return _mm(cast_to(b_ds, b_k.dtype), b_k, b_dq)


@triton.jit
def _dq_tiles(
    b_dq, b_q, b_do, b_lse, b_delta, o_i, p_k, p_v, p_km, stride_kn, stride_vn, stride_kmn, o_kd, o_vd,
    j_lo, j_hi, k_begin, k_end, pos_offset, pos_step, before, after, qk_scale, qk_scale_lo,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    EXACT_SCALE: tl.constexpr, USE_EXP2: tl.constexpr,
    b_rk, col_offset, drop_thresh, drop_scale, drop_scale_lo, DROPOUT: tl.constexpr,
    SIDE: tl.constexpr = 0,
):
    """One loop of :func:`attn_bwd_dq_band` over the key tiles ``[j_lo, j_hi)`` (``SIDE`` and the left edge's
    addressing as :func:`_fwd_tiles`)."""
    o_c = tl.arange(0, BLOCK_N)
    if MASKED and SIDE != 0:
        r_lo, r_span = _edge_bounds(o_i, before, after, k_begin, k_end, SIDE)
        o_pos = (pos_offset + (j_lo + o_c) * pos_step).to(tl.int64)
        p_kt = p_k + o_pos[:, None] * stride_kn + o_kd[None, :]  # advanced one tile per step
        p_vt = p_v + o_pos[:, None] * stride_vn + o_vd[None, :]
        p_kmt = p_km + o_pos * stride_kmn
        step = _i64(BLOCK_N * pos_step)
        for j0 in range(j_lo, j_hi, BLOCK_N):
            m_ld = None
            if SIDE == 2 or SIDE == 4:
                m_ld = o_c < k_end - j0
            b_dq = _dq_masked_tile(
                b_dq, b_q, b_do, b_lse, b_delta, j0, o_c, r_lo, r_span, p_kt, p_vt, p_kmt,
                col_offset + pos_offset + (j0 + o_c) * pos_step, qk_scale, qk_scale_lo, HAS_KEY_MASK, EXACT_SCALE,
                USE_EXP2, b_rk, drop_thresh, drop_scale, drop_scale_lo, DROPOUT, SIDE, m_ld)
            p_kt += step * stride_kn
            p_vt += step * stride_vn
            p_kmt += step * stride_kmn
    elif MASKED:
        r_lo, r_span = _edge_bounds(o_i, before, after, k_begin, k_end, SIDE)  # per loop: fewer live registers
        for j0 in range(j_lo, j_hi, BLOCK_N):
            o_cur = (pos_offset + _edge_index(j0 + o_c, k_begin, k_end, SIDE) * pos_step).to(tl.int64)
            b_dq = _dq_masked_tile(
                b_dq, b_q, b_do, b_lse, b_delta, j0, o_c, r_lo, r_span,
                p_k + o_cur[:, None] * stride_kn + o_kd[None, :], p_v + o_cur[:, None] * stride_vn + o_vd[None, :],
                p_km + o_cur * stride_kmn, col_offset + o_cur, qk_scale, qk_scale_lo, HAS_KEY_MASK, EXACT_SCALE,
                USE_EXP2, b_rk, drop_thresh, drop_scale, drop_scale_lo, DROPOUT, SIDE)
    else:
        o_pos = (pos_offset + (j_lo + o_c) * pos_step).to(tl.int64)
        p_kt = p_k + o_pos[:, None] * stride_kn + o_kd[None, :]  # advanced one tile per step
        p_vt = p_v + o_pos[:, None] * stride_vn + o_vd[None, :]
        p_kmt = p_km + o_pos * stride_kmn
        step = _i64(BLOCK_N * pos_step)
        for j0 in range(j_lo, j_hi, BLOCK_N):
            b_k = tl.load(p_kt)
            b_v = tl.load(p_vt)
            b_s = _scale(_mm(b_q, tl.trans(b_k), None), qk_scale, qk_scale_lo, EXACT_SCALE)
            if HAS_KEY_MASK:
                b_s = tl.where((tl.load(p_kmt) != 0)[None, :], b_s, float("-inf"))
            o_cur = pos_offset + (j0 + o_c) * pos_step  # dropout columns only
            b_p = _exp(b_s - b_lse[:, None], USE_EXP2)  # [BM, BN]
            b_dp = _mm(b_do, tl.trans(b_v), None)  # [BM, BN]
            if DROPOUT:
                b_keep = dropout_keep(b_rk, col_offset + o_cur, drop_thresh)
                b_dp = tl.where(b_keep, _scale(b_dp, drop_scale, drop_scale_lo, EXACT_SCALE), 0.0)
            b_ds = b_p * (b_dp - b_delta[:, None])
            b_dq = _mm(cast_to(b_ds, b_k.dtype), b_k, b_dq)
            p_kt += step * stride_kn
            p_vt += step * stride_vn
            p_kmt += step * stride_kmn
    return b_dq


@triton.jit
def attn_bwd_dq_band(
    b_dq, b_q, b_do, b_lse, b_delta, o_i,
    p_k, p_v, p_km, stride_kn, stride_vn, stride_kmn, o_kd, o_vd,
    lo, full_lo, full_hi, hi, k_begin, k_end, pos_offset, pos_step, before, after,
    qk_scale, qk_scale_lo,
    BLOCK_N: tl.constexpr, HAS_KEY_MASK: tl.constexpr, EXACT_SCALE: tl.constexpr, USE_EXP2: tl.constexpr,
    b_rk=0, col_offset=0, drop_thresh=0, drop_scale=1.0, drop_scale_lo=0.0, DROPOUT: tl.constexpr = False,
    RANGE_LOOPS: tl.constexpr = False, ONE_SIDED: tl.constexpr = False, DENSE: tl.constexpr = False,
):
    """``dq += dS k`` over the whole band walk (bounds and visibility as :func:`attn_fwd_band`;
    arithmetic, key mask and dropout as :func:`attn_bwd_dq_range`).  ``RANGE_LOOPS``: walk with the
    :func:`attn_bwd_dq_range` loops (as with dropout at D > 128), for a caller that compiles better with
    them.
    ``ONE_SIDED``, ``DENSE``: as :func:`attn_fwd_band`."""
    if RANGE_LOOPS or (DROPOUT and b_q.shape[1] > 128):  # the *_range loops (D = 256 with dropout: 254
        # registers; 255 with the band tiles)
        b_dq = attn_bwd_dq_range(
            b_dq, b_q, b_do, b_lse, b_delta, o_i, p_k, p_v, p_km, stride_kn, stride_vn, stride_kmn, o_kd, o_vd, lo,
            full_lo, k_begin, k_end, pos_offset, pos_step, before, after, qk_scale, qk_scale_lo, BLOCK_N, True,
            HAS_KEY_MASK, EXACT_SCALE, USE_EXP2, b_rk, col_offset, drop_thresh, drop_scale, drop_scale_lo, DROPOUT)
        b_dq = _dq_tiles(
            b_dq, b_q, b_do, b_lse, b_delta, o_i, p_k, p_v, p_km, stride_kn, stride_vn, stride_kmn, o_kd, o_vd,
            full_lo, full_hi, k_begin, k_end, pos_offset, pos_step, before, after, qk_scale, qk_scale_lo, BLOCK_N,
            False, HAS_KEY_MASK, EXACT_SCALE, USE_EXP2, b_rk, col_offset, drop_thresh, drop_scale, drop_scale_lo,
            DROPOUT)
        b_dq = attn_bwd_dq_range(
            b_dq, b_q, b_do, b_lse, b_delta, o_i, p_k, p_v, p_km, stride_kn, stride_vn, stride_kmn, o_kd, o_vd,
            full_hi, hi, k_begin, k_end, pos_offset, pos_step, before, after, qk_scale, qk_scale_lo, BLOCK_N, True,
            HAS_KEY_MASK, EXACT_SCALE, USE_EXP2, b_rk, col_offset, drop_thresh, drop_scale, drop_scale_lo, DROPOUT)
    else:
        if ONE_SIDED or DENSE:  # as attn_fwd_band
            full_lo, full_hi = _one_sided_split(lo, full_lo, full_hi, k_end, BLOCK_N)
        b_dq = _dq_tiles(
            b_dq, b_q, b_do, b_lse, b_delta, o_i, p_k, p_v, p_km, stride_kn, stride_vn, stride_kmn, o_kd, o_vd, lo,
            full_lo, k_begin, k_end, pos_offset, pos_step, before, after, qk_scale, qk_scale_lo, BLOCK_N, True,
            HAS_KEY_MASK, EXACT_SCALE, USE_EXP2, b_rk, col_offset, drop_thresh, drop_scale, drop_scale_lo, DROPOUT,
            3 if DENSE else (1 if ONE_SIDED else 0))
        b_dq = _dq_tiles(
            b_dq, b_q, b_do, b_lse, b_delta, o_i, p_k, p_v, p_km, stride_kn, stride_vn, stride_kmn, o_kd, o_vd, full_lo,
            full_hi, k_begin, k_end, pos_offset, pos_step, before, after, qk_scale, qk_scale_lo, BLOCK_N, False,
            HAS_KEY_MASK, EXACT_SCALE, USE_EXP2, b_rk, col_offset, drop_thresh, drop_scale, drop_scale_lo, DROPOUT)
        b_dq = _dq_tiles(
            b_dq, b_q, b_do, b_lse, b_delta, o_i, p_k, p_v, p_km, stride_kn, stride_vn, stride_kmn, o_kd, o_vd, full_hi,
            hi, k_begin, k_end, pos_offset, pos_step, before, after, qk_scale, qk_scale_lo, BLOCK_N, True, HAS_KEY_MASK,
            EXACT_SCALE, USE_EXP2, b_rk, col_offset, drop_thresh, drop_scale, drop_scale_lo, DROPOUT,
            4 if DENSE else (2 if ONE_SIDED else 0))
    return b_dq


@triton.jit
def _dkdv_tiles(
    b_dk, b_dv, b_k, b_v, p_q, p_do, p_lse, p_delta, i_h0, n_heads, stride_qh, stride_doh, stride_lh, stride_dh,
    stride_qn, stride_don, stride_ln, stride_dn, o_qd, o_dod,
    i_lo, i_hi, r_begin, r_end, pos_offset, pos_step, o_j, before, after, qk_scale, qk_scale_lo,
    BLOCK_M: tl.constexpr, MASKED: tl.constexpr, EXACT_SCALE: tl.constexpr, USE_EXP2: tl.constexpr,
    b_kcol, drop_seed, drop_bh0, drop_thresh, drop_scale, drop_scale_lo,
    DROPOUT: tl.constexpr, p_drow, DROP_ROWS: tl.constexpr, drop_row_off, SIDE: tl.constexpr = 0,
    SPLIT_END: tl.constexpr = False,
):
    """One loop of :func:`attn_bwd_dkdv_band` over the query tiles ``[i_lo, i_hi)`` of ``n_heads``
    heads (one flat loop, as :func:`attn_bwd_dkdv_heads`).  ``MASKED``: the row test of ``SIDE``
    (:func:`_in_side`, on the query columns of the transposed tile).  A left-edge loop (``SIDE == 1``)
    lies at or after row 0; with ``SPLIT_END`` also before ``r_end`` (:func:`attn_bwd_dkdv_band` moved the
    tile holding ``r_end`` to the right edge): its loads are neither clamped nor predicated; without it,
    it drops the query rows at or after ``r_end`` through their lse (loaded as ``+inf``: ``p = 0``, and
    ``delta`` as 0), a clamp and a predicate per row."""
    o_r = tl.arange(0, BLOCK_M)  # [BM] row offsets inside a tile
    if MASKED:  # key j is seen by the rows j - after <= i <= j + before inside [r_begin, r_end)
        c_lo, c_span = _edge_bounds(o_j, after, before, r_begin, r_end, SIDE)
    n_blk = tl.cdiv(tl.maximum(i_hi - i_lo, 0), BLOCK_M)
    for it in range(0, n_blk * n_heads):
        i_h = tl.cast(i_h0 + it % n_heads, tl.int64)
        i0 = i_lo + (it // n_heads) * BLOCK_M
        if MASKED and SIDE == 1 and not SPLIT_END:  # the tile lies at or after 0; rows past r_end: lse = +inf
            o_pos = (pos_offset + tl.minimum(i0 + o_r, r_end - 1) * pos_step).to(tl.int64)
        elif MASKED and SIDE != 1:  # clamped rows: loads in bounds; rows outside [r_begin, r_end) fail the test
            o_pos = (pos_offset + _edge_index(i0 + o_r, r_begin, r_end, SIDE) * pos_step).to(tl.int64)
        else:
            o_pos = (pos_offset + (i0 + o_r) * pos_step).to(tl.int64)
        b_q = tl.load(p_q + i_h * stride_qh + o_pos[:, None] * stride_qn + o_qd[None, :])  # [BM, D]
        b_do = tl.load(p_do + i_h * stride_doh + o_pos[:, None] * stride_don + o_dod[None, :])  # [BM, D]
        if MASKED and SIDE == 1 and not SPLIT_END:
            b_lse, b_delta = attn_bwd_load_rows(p_lse + i_h * stride_lh, p_delta + i_h * stride_dh, o_pos,
                                                stride_ln, stride_dn, i0 + o_r < r_end, True, USE_EXP2)
        else:
            b_lse, b_delta = attn_bwd_load_rows(p_lse + i_h * stride_lh, p_delta + i_h * stride_dh, o_pos,
                                                stride_ln, stride_dn, o_r >= 0, False, USE_EXP2)
        if MASKED and SIDE == 0 and not EXACT_SCALE and b_k.shape[1] <= 128:  # two-sided: as _dq_masked_tile
            # (not at D = 256, mma.sync tiles: there the per-token segment bounds' tile spilled 24 B)
            b_st = _scale(_mm(b_k, tl.trans(b_q), None), qk_scale, qk_scale_lo, EXACT_SCALE)  # [BN, BM]
            b_pt = _bwd_probs(b_st, b_lse[None, :], _in_side(o_r, c_lo - i0, c_span, SIDE), USE_EXP2)
        else:
            if MASKED:
                b_st = _masked_scores(_mm(b_k, tl.trans(b_q), None), o_r, c_lo - i0, c_span, qk_scale,
                                      qk_scale_lo, EXACT_SCALE, SIDE)  # [BN, BM]
            else:
                b_st = _scale(_mm(b_k, tl.trans(b_q), None), qk_scale, qk_scale_lo, EXACT_SCALE)  # [BN, BM]
            b_pt = _exp(b_st - b_lse[None, :], USE_EXP2)  # [BN, BM]
        b_dpt = _mm(b_v, tl.trans(b_do), None)  # [BN, BM]
        if DROPOUT:
            o_i = i0 + o_r
            if DROP_ROWS:
                o_tok = tl.load(p_drow + o_i, mask=(o_i >= r_begin) & (o_i < r_end), other=0)
            else:
                o_tok = pos_offset + o_i * pos_step
            b_rk = dropout_row_keys(dropout_head_key(drop_seed, drop_bh0 + i_h), o_tok + drop_row_off)  # [BM]
            b_keep_t = mix32(b_kcol.to(tl.uint32)[:, None] ^ b_rk[None, :]) >= drop_thresh  # [BN, BM]
            b_pd = tl.where(b_keep_t, _scale(b_pt, drop_scale, drop_scale_lo, EXACT_SCALE), 0.0)
            b_dv = _mm(cast_to(b_pd, b_do.dtype), b_do, b_dv)
            b_dpt = tl.where(b_keep_t, _scale(b_dpt, drop_scale, drop_scale_lo, EXACT_SCALE), 0.0)
        else:
            b_dv = _mm(cast_to(b_pt, b_do.dtype), b_do, b_dv)
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dk = _mm(cast_to(b_dst, b_q.dtype), b_q, b_dk)
    return b_dk, b_dv


@triton.jit
def attn_bwd_dkdv_band(
    b_dk, b_dv, b_k, b_v, o_j,
    p_q, p_do, p_lse, p_delta, i_h0, n_heads, stride_qh, stride_doh, stride_lh, stride_dh,
    stride_qn, stride_don, stride_ln, stride_dn, o_qd, o_dod,
    lo, full_lo, full_hi, hi, r_begin, r_end, pos_offset, pos_step, before, after,
    qk_scale, qk_scale_lo,
    BLOCK_M: tl.constexpr, EXACT_SCALE: tl.constexpr, USE_EXP2: tl.constexpr,
    b_kcol=0, drop_seed=0, drop_bh0=0, drop_thresh=0, drop_scale=1.0, drop_scale_lo=0.0,
    DROPOUT: tl.constexpr = False, p_drow=0, DROP_ROWS: tl.constexpr = False, drop_row_off=0,
    ONE_SIDED: tl.constexpr = False, SPLIT_END: tl.constexpr = False,
):
    """``dv += Pᵀ dO``, ``dk += dSᵀ q`` for the key block ``b_k, b_v [BN, D]`` (indices ``o_j``)
    over the whole band walk of query tiles ``[lo, full_lo)`` masked, ``[full_lo, full_hi)``
    unmasked, ``[full_hi, hi)`` masked, summed over ``n_heads`` query heads (arguments, masks and
    dropout as :func:`attn_bwd_dkdv_heads`; ``before``/``after`` scalars or ``[BN, 1]``).
    ``ONE_SIDED``: the caller guarantees the one-sided left edge (see "one-sided edges" above
    :func:`_i64`: the query rows past ``r_end`` drop out through their lse, so no tile of the left edge needs
    both bounds); ignored with dropout at D > 128.  ``SPLIT_END`` (with ``ONE_SIDED``): the caller guarantees
    that the lower bound cannot cut through the query tile holding ``r_end``; that tile moves to the right
    edge (:func:`_one_sided_split`), and the left edge's loads need no clamp and no predicate."""
    if DROPOUT and b_k.shape[1] > 128:  # attn_bwd_dkdv_heads (D = 256: 253 registers, 255 with the band tiles)
        b_dk, b_dv = attn_bwd_dkdv_heads(
            b_dk, b_dv, b_k, b_v, o_j, p_q, p_do, p_lse, p_delta, i_h0, n_heads, stride_qh, stride_doh, stride_lh,
            stride_dh, stride_qn, stride_don, stride_ln, stride_dn, o_qd, o_dod, lo, full_lo, r_begin, r_end,
            pos_offset, pos_step, before, after, qk_scale, qk_scale_lo, BLOCK_M, True, EXACT_SCALE, USE_EXP2,
            b_kcol, drop_seed, drop_bh0, drop_thresh, drop_scale, drop_scale_lo, DROPOUT, p_drow, DROP_ROWS,
            drop_row_off)
        b_dk, b_dv = attn_bwd_dkdv_heads(
            b_dk, b_dv, b_k, b_v, o_j, p_q, p_do, p_lse, p_delta, i_h0, n_heads, stride_qh, stride_doh, stride_lh,
            stride_dh, stride_qn, stride_don, stride_ln, stride_dn, o_qd, o_dod, full_lo, full_hi, r_begin, r_end,
            pos_offset, pos_step, before, after, qk_scale, qk_scale_lo, BLOCK_M, False, EXACT_SCALE, USE_EXP2,
            b_kcol, drop_seed, drop_bh0, drop_thresh, drop_scale, drop_scale_lo, DROPOUT, p_drow, DROP_ROWS,
            drop_row_off)
        b_dk, b_dv = attn_bwd_dkdv_heads(
            b_dk, b_dv, b_k, b_v, o_j, p_q, p_do, p_lse, p_delta, i_h0, n_heads, stride_qh, stride_doh, stride_lh,
            stride_dh, stride_qn, stride_don, stride_ln, stride_dn, o_qd, o_dod, full_hi, hi, r_begin, r_end,
            pos_offset, pos_step, before, after, qk_scale, qk_scale_lo, BLOCK_M, True, EXACT_SCALE, USE_EXP2,
            b_kcol, drop_seed, drop_bh0, drop_thresh, drop_scale, drop_scale_lo, DROPOUT, p_drow, DROP_ROWS,
            drop_row_off)
    else:
        if ONE_SIDED and SPLIT_END:
            full_lo, full_hi = _one_sided_split(lo, full_lo, full_hi, r_end, BLOCK_M)
        b_dk, b_dv = _dkdv_tiles(
            b_dk, b_dv, b_k, b_v, p_q, p_do, p_lse, p_delta, i_h0, n_heads, stride_qh, stride_doh, stride_lh,
            stride_dh, stride_qn, stride_don, stride_ln, stride_dn, o_qd, o_dod, lo, full_lo, r_begin, r_end,
            pos_offset, pos_step, o_j, before, after, qk_scale, qk_scale_lo, BLOCK_M, True, EXACT_SCALE, USE_EXP2,
            b_kcol, drop_seed, drop_bh0, drop_thresh, drop_scale, drop_scale_lo, DROPOUT, p_drow, DROP_ROWS,
            drop_row_off, 1 if ONE_SIDED else 0, SPLIT_END)
        b_dk, b_dv = _dkdv_tiles(
            b_dk, b_dv, b_k, b_v, p_q, p_do, p_lse, p_delta, i_h0, n_heads, stride_qh, stride_doh, stride_lh,
            stride_dh, stride_qn, stride_don, stride_ln, stride_dn, o_qd, o_dod, full_lo, full_hi, r_begin, r_end,
            pos_offset, pos_step, o_j, before, after, qk_scale, qk_scale_lo, BLOCK_M, False, EXACT_SCALE, USE_EXP2,
            b_kcol, drop_seed, drop_bh0, drop_thresh, drop_scale, drop_scale_lo, DROPOUT, p_drow, DROP_ROWS,
            drop_row_off)
        b_dk, b_dv = _dkdv_tiles(
            b_dk, b_dv, b_k, b_v, p_q, p_do, p_lse, p_delta, i_h0, n_heads, stride_qh, stride_doh, stride_lh,
            stride_dh, stride_qn, stride_don, stride_ln, stride_dn, o_qd, o_dod, full_hi, hi, r_begin, r_end,
            pos_offset, pos_step, o_j, before, after, qk_scale, qk_scale_lo, BLOCK_M, True, EXACT_SCALE, USE_EXP2,
            b_kcol, drop_seed, drop_bh0, drop_thresh, drop_scale, drop_scale_lo, DROPOUT, p_drow, DROP_ROWS,
            drop_row_off, 2 if ONE_SIDED else 0)
    return b_dk, b_dv


# --------------------------------------------------------------------------------------
# small standalone kernels: delta, split merge, partial sums
# --------------------------------------------------------------------------------------


@triton.jit
def _bwd_preprocess_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_db, stride_dh, stride_dn,
    n_rows,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """``delta[b, h, i] = sum_d O[b, h, i, d] * dO[b, h, i, d]`` in the accumulation dtype."""
    i_m, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < n_rows
    o_d = tl.arange(0, HEAD_DIM)
    p_o = O + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh
    p_do = DO + i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh
    b_o = tl.load(p_o + o_m[:, None].to(tl.int64) * stride_on + o_d[None, :] * stride_od, mask=m_m[:, None], other=0.0)
    b_do = tl.load(p_do + o_m[:, None].to(tl.int64) * stride_don + o_d[None, :] * stride_dod, mask=m_m[:, None],
                   other=0.0)
    p_delta = DELTA + i_b.to(tl.int64) * stride_db + i_h.to(tl.int64) * stride_dh + o_m * stride_dn
    b_delta = tl.sum(b_o.to(DELTA.dtype.element_ty) * b_do.to(DELTA.dtype.element_ty), 1)
    tl.store(p_delta, b_delta, mask=m_m)


def bwd_preprocess(out: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    """``delta = rowsum(dO ∘ O)``: ``[B, H, N]`` in the accumulation dtype."""
    b, h, n, d = out.shape
    delta = torch.empty((b, h, n), dtype=acc_dtype(out.dtype), device=out.device)
    block_m = 16 if INTERPRET else 64
    _bwd_preprocess_kernel[(triton.cdiv(n, block_m), h, b)](
        O=out, DO=dout, DELTA=delta,
        stride_ob=out.stride(0), stride_oh=out.stride(1), stride_on=out.stride(2), stride_od=out.stride(3),
        stride_dob=dout.stride(0), stride_doh=dout.stride(1), stride_don=dout.stride(2), stride_dod=dout.stride(3),
        stride_db=delta.stride(0), stride_dh=delta.stride(1), stride_dn=delta.stride(2),
        n_rows=n, HEAD_DIM=d, BLOCK_M=block_m,
    )
    return delta


@triton.jit
def _merge_partials_kernel(
    OP, LP, O, LSE,
    stride_ops, stride_opb, stride_oph, stride_opn, stride_opd,
    stride_lps, stride_lpb, stride_lph, stride_lpn,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_lb, stride_lh, stride_ln,
    n_split, n_rows,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Merge ``n_split`` normalised partial results (each over a disjoint key subset)
    by their log-sum-exp: ``lse = log Σ_s exp(lse_s)``, ``out = Σ_s exp(lse_s − lse) out_s``."""
    i_m, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    m_m = o_m < n_rows
    o_d = tl.arange(0, HEAD_DIM)
    p_op = OP + i_b.to(tl.int64) * stride_opb + i_h.to(tl.int64) * stride_oph
    p_lp = LP + i_b.to(tl.int64) * stride_lpb + i_h.to(tl.int64) * stride_lph
    m_run = tl.full([BLOCK_M], float("-inf"), dtype=LP.dtype.element_ty)
    l_run = tl.zeros([BLOCK_M], dtype=LP.dtype.element_ty)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=OP.dtype.element_ty)
    for i_s in range(0, n_split):
        b_l = tl.load(p_lp + i_s * stride_lps + o_m * stride_lpn, mask=m_m, other=float("-inf"))  # [BM]
        b_o = tl.load(p_op + i_s * stride_ops + o_m[:, None] * stride_opn + o_d[None, :] * stride_opd,
                      mask=m_m[:, None], other=0.0)  # [BM, D]
        m_new = tl.maximum(m_run, b_l)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_run - m_use)
        w = tl.exp(b_l - m_use)
        l_run = l_run * alpha + w
        acc = acc * alpha[:, None] + b_o * w[:, None]
        m_run = m_new
    m_ok = l_run > 0
    l_safe = tl.where(m_ok, l_run, 1.0)
    b_o = tl.where(m_ok[:, None], acc / l_safe[:, None], 0.0)
    b_lse = tl.where(m_ok, m_run + tl.log(l_safe), float("-inf"))
    p_o = O + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh
    tl.store(p_o + o_m[:, None].to(tl.int64) * stride_on + o_d[None, :] * stride_od,
             cast_to(b_o, O.dtype.element_ty), mask=m_m[:, None])
    p_l = LSE + i_b.to(tl.int64) * stride_lb + i_h.to(tl.int64) * stride_lh
    tl.store(p_l + o_m * stride_ln, b_lse.to(LSE.dtype.element_ty), mask=m_m)


def merge_partials(out_parts: torch.Tensor, lse_parts: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Write into ``out [B, H, M, D]`` and ``lse [B, H, M]`` the log-sum-exp merge of
    ``out_parts [S, B, H, M, D]`` / ``lse_parts [S, B, H, M]`` (each part normalised
    over its own keys, ``-inf`` where it saw none)."""
    s, b, h, m, d = out_parts.shape
    # 4096 accumulator elements per program (64 rows at D = 64): at most 80 registers on sm_90 at every head
    # dim; 64 rows took 128 at D = 128 (8 B spilled on Triton 3.6) and 255 at D = 256 (bench.sm90)
    block_m = 16 if INTERPRET else min(64, max(16, 4096 // d))
    _merge_partials_kernel[(triton.cdiv(m, block_m), h, b)](
        OP=out_parts, LP=lse_parts, O=out, LSE=lse,
        stride_ops=out_parts.stride(0), stride_opb=out_parts.stride(1), stride_oph=out_parts.stride(2),
        stride_opn=out_parts.stride(3), stride_opd=out_parts.stride(4),
        stride_lps=lse_parts.stride(0), stride_lpb=lse_parts.stride(1), stride_lph=lse_parts.stride(2),
        stride_lpn=lse_parts.stride(3),
        stride_ob=out.stride(0), stride_oh=out.stride(1), stride_on=out.stride(2), stride_od=out.stride(3),
        stride_lb=lse.stride(0), stride_lh=lse.stride(1), stride_ln=lse.stride(2),
        n_split=s, n_rows=m, HEAD_DIM=d, BLOCK_M=block_m,
    )


@triton.jit
def _sum_partial_rows_kernel(
    P, DST, IDX,
    stride_ps, stride_pb, stride_ph, stride_pm, stride_pd,
    stride_db, stride_dh, stride_dn, stride_dd,
    stride_ib, stride_im,
    n_split, n_rows,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, HAS_INDEX: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    """``DST[b, h, row(m)] (+)= Σ_s P[s, b, h, m]`` with ``row(m) = IDX[b, m]`` (skipped
    when negative) or ``m``.  Deterministic: each destination row has one writer."""
    i_m, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < n_rows
    o_d = tl.arange(0, HEAD_DIM)
    if HAS_INDEX:
        b_row = tl.load(IDX + i_b.to(tl.int64) * stride_ib + o_m * stride_im, mask=m_m, other=-1)
        m_m = m_m & (b_row >= 0)
        o_row = tl.where(m_m, b_row, 0).to(tl.int64)
    else:
        o_row = o_m.to(tl.int64)
    p_p = P + i_b.to(tl.int64) * stride_pb + i_h.to(tl.int64) * stride_ph + o_m[:, None] * stride_pm \
        + o_d[None, :] * stride_pd
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=P.dtype.element_ty)
    for i_s in range(0, n_split):
        acc += tl.load(p_p + i_s * stride_ps, mask=m_m[:, None], other=0.0)
    p_dst = DST + i_b.to(tl.int64) * stride_db + i_h.to(tl.int64) * stride_dh + o_row[:, None] * stride_dn \
        + o_d[None, :] * stride_dd
    if ACCUMULATE:
        acc += tl.load(p_dst, mask=m_m[:, None], other=0.0).to(acc.dtype)
    tl.store(p_dst, cast_to(acc, DST.dtype.element_ty), mask=m_m[:, None])


def sum_partial_rows(parts: torch.Tensor, dst: torch.Tensor, index: torch.Tensor | None = None,
                     accumulate: bool = False) -> None:
    """``dst[b, h, index[b, m]] (+)= parts[:, b, h, m].sum(0)``.

    parts: ``[S, B, H, M, D]`` (accumulation dtype); dst: ``[B, H, N, D]`` (any dtype,
    any strides); index: ``[B, M]`` int64 of *distinct* rows (negative = skip), or None
    for ``row = m``.  ``accumulate`` adds to what ``dst`` holds instead of overwriting.
    """
    s, b, h, m, d = parts.shape
    block_m = 16 if INTERPRET else 32
    idx = index if index is not None else parts.new_empty((1, 1), dtype=torch.int64)
    _sum_partial_rows_kernel[(triton.cdiv(m, block_m), h, b)](
        P=parts, DST=dst, IDX=idx,
        stride_ps=parts.stride(0), stride_pb=parts.stride(1), stride_ph=parts.stride(2), stride_pm=parts.stride(3),
        stride_pd=parts.stride(4),
        stride_db=dst.stride(0), stride_dh=dst.stride(1), stride_dn=dst.stride(2), stride_dd=dst.stride(3),
        stride_ib=idx.stride(0), stride_im=idx.stride(1),
        n_split=s, n_rows=m, HEAD_DIM=d, BLOCK_M=block_m, HAS_INDEX=index is not None, ACCUMULATE=accumulate,
    )
