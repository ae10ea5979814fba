"""LSG attention (local + sparse + global): Triton kernels and plain launchers.

Semantics: :mod:`lhattn.reference.lsg`.  Notation: ``b`` = block_size, ``sb`` = sparse_block_size,
``f`` = sparsity_factor, ``s = b / f``, ``g`` = num_global_tokens, ``o`` = block offset (0 inline,
``g`` prepended), ``Tc`` = rows of the compressed sequence.  The compressed keys/values are built
beforehand by the sparse selection (:mod:`lhattn.selection`, differentiable PyTorch); the kernels
only attend to them and return their gradients.

The kernels follow the plan of ``lhattn/fallback/lsg.py``: a non-global query row of LSG block
``t`` (rows ``[o + t·b, o + (t+1)·b)``) sees four key *sources*, each one contiguous interval of
key indices that is the same for every row of the block and is computed from ``t`` alone -- no
mask tensor is ever built:

* local: ``k, v`` rows ``[max(o + (t-1)·b, g), min(o + (t+2)·b, N))``; causal: up to
  ``o + (t+1)·b`` and ``j <= i``; padding keys masked;
* sparse left: compressed rows ``[t·s + left_lo, t·s + left_hi)`` clipped to ``[0, Tc)``, masked by
  the selection's validity (the offsets of :meth:`lhattn.LSG.sparse_windows`; regular geometry:
  ``[(t-1)·s - sb, (t-1)·s)``);
* sparse right (non-causal only): ``[t·s + right_lo, t·s + right_hi)`` (regular:
  ``[(t+2)·s, (t+2)·s + sb)``), idem.  A compressed key in both windows counts twice;
* global: ``k, v`` rows ``[0, g)``, padding keys masked.

One program visits the four sources in turn with one online softmax (:func:`_lsg_fwd_loop` /
:func:`_lsg_dq_loop` on the :mod:`._core` pieces): the local source's interior key tiles without a
test, its edge tiles with only the test that can fail there (:func:`_tile_scores`: every row of a
program sees the same interval of each source, so a column end -- or, causal, ``j <= i``); when
``BLOCK_N`` divides ``b`` and ``o`` (``BLOCK_ALIGN``) the band starts on a tile boundary (in the first
blocks its first tile takes the global keys above the boundary below ``g``: :func:`_local_band`), so
there is no leading edge tile; the compressed windows (at most ``sb`` keys, masked by validity
anyway; whole tiles untested, :func:`_window_part`) and the few global keys with the column test.
Global rows (``i < g``) and short sequences (``N - o <= 2·b``) see every key (``j <= i`` when
causal).  Non-causal global rows (``g <=`` :data:`GLOBAL_ROWS_MAX`) have their own kernels with a
``max(16, next_power_of_2(g))``-row tile (``_lsg_global_rows_*``: forward and dq split over key
chunks and merged / summed, dk/dv one program per key tile); causal ones, more global rows and short
sequences go through the dense path of :mod:`.sliding_window`.  ``python -m bench.tiles`` counts the
useful share of the tiles all this executes.

Kernels
-------
* ``_lsg_fwd_kernel`` / ``_lsg_bwd_dq_kernel``: grid ``(n_blocks · ceil(b / BLOCK_M), H, B)``;
  a program owns ``BLOCK_M`` rows of one LSG block (tiles never straddle two blocks, so the
  source intervals are per program).
* ``_lsg_bwd_dkdv_local_kernel``: grid ``(n_blocks · ceil(b / BLOCK_N), H_kv, B)``; ``BLOCK_N``
  non-global keys of block ``u`` against the rows of blocks ``u-1 .. u+1`` (``u, u+1`` and
  ``i >= j`` when causal), summed over the query heads of the kv head (GQA; head and row tile
  carried, :func:`_lsg_dkdv_loop`): a row outside the blocks reads ``lse = +inf`` (its ``p`` is 0),
  so the edge row tiles need no per-element test but the causal ``j <= i`` on the diagonal ones.
  The global rows' share (dense path) is added in the same store.
* ``_lsg_bwd_dkdv_sparse_kernel``: grid ``(ceil(Tc / BLOCK_N), Hc, B)``; ``BLOCK_N`` compressed
  keys against the rows of the query blocks whose left (right) window reaches them -- two
  contiguous ranges of ``t`` derived from the tile's bounds, made disjoint and visited once each
  with a per-element window multiplicity (a row tile may straddle blocks); the rows of the blocks
  whose window holds the whole tile (and whose other window misses it) without the window test.
  ``WIN_ALIGN`` (``BLOCK_N`` divides ``s`` and the window offsets, and a block's two windows are
  disjoint: the regular geometry): every window holds a whole tile or none of it, and the partial
  row steps need only their row mask, no window test either.
  ``BLOCK_N`` is pruned to at most ``max(16, s)``, so that regular windows hold whole tiles.
* global keys: :func:`.sliding_window.add_global_key_grads` (shared by the families with global
  tokens; its key tile no wider than the key list) on the rows ``[g, N)``: split into row chunks
  whose partial sums are added deterministically (no atomics).

Attention dropout (``DROPOUT`` constexpr; the rule of :mod:`lhattn._dropout` through the
:mod:`._core` helpers): a row's keys come from ``b·H + h`` (``H`` = query heads) and its token
position; a token key's column (local, global) is its position, compressed key ``p``'s is ``N + p``
-- also for ``bos_pooling``'s per-query-head compressed keys.  The dense path and the global-key
gradient get the same state (the rows ``[g, N)`` of the latter by their positions, ``drop_rows``).
The backward regenerates the keep bits; nothing is stored.

Memory: ``out``, ``lse`` and, in the backward, ``delta [B, H, N]``, ``[S, B, H_kv, g, D]``
partials of the global keys, ``[S, B, H, g, D]`` partials of the global rows (forward, dq) and
(non-causal, ``g > 0``) the global rows' ``dk, dv [B, H_kv, N, D]``, read once by the local dk/dv
kernel; nothing of size ``N × window``, no mask tensor.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._core import (HEAD_DIMS, INTERPRET, _exp, _mm, _scale, acc_dtype, attn_bwd_dkdv_heads, attn_bwd_dq_range,
                    attn_bwd_load_rows, attn_fwd_finalize, attn_fwd_range, block_range, bwd_preprocess, cast_to,
                    dropout_head_key, dropout_keep, dropout_load, dropout_row_keys, mix32, next_power_of_2,
                    online_softmax_update, split_scale, LN2)
# launch plumbing shared by the families; LSG's tuning (kernels/_launch.py) under the names the kernels use
from ._launch import (INTERPRET_BLOCKS, INTERPRET_SPLIT_CHUNK,
                      _LSG_CAUSAL_LOCAL_DKDV_BUDGET as _CAUSAL_LOCAL_DKDV_BUDGET, _LSG_DKDV_SHAPES as _DKDV_SHAPES, _LSG_FWD_SHAPES as _FWD_SHAPES, _lsg_tuned as _tuned,
                      _key_mask_i32, _mask_u8, _meta_for, _split_for, _strides,
                      _token_dropout_args as _dropout_args)
# whole passes of the sliding-window family (its public launchers): the dense path, the global-key gradient
from .sliding_window import add_global_key_grads, sliding_window_bwd, sliding_window_fwd

__all__ = ["lsg_fwd", "lsg_bwd", "is_short", "HEAD_DIMS", "INTERPRET_BLOCKS", "INTERPRET_SPLIT_CHUNK"]

_meta = _meta_for(globals())  # block sizes under the interpreter: this module's INTERPRET_BLOCKS
_split = _split_for(globals())  # key chunks of the global rows' passes: this module's INTERPRET_SPLIT_CHUNK


def is_short(n: int, block_size: int, block_offset: int) -> bool:
    """LSG's rule: ``N - o <= 2·b`` means full attention."""
    return n - block_offset <= 2 * block_size


# --------------------------------------------------------------------------------------
# forward and dq: one program = BLOCK_M rows of one LSG block, four key sources
# --------------------------------------------------------------------------------------


@triton.jit
def _window(base, w_lo, w_hi, n_c):
    """``[c_begin, c_end)``: the compressed keys ``[base + w_lo, base + w_hi)`` clipped to ``[0, Tc)``
    (``c_end >= c_begin``; empty for an empty window)."""
    c_begin = tl.minimum(tl.maximum(base + w_lo, 0), n_c)
    c_end = tl.maximum(tl.minimum(base + w_hi, n_c), c_begin)
    return c_begin, c_end


@triton.jit
def _window_part(base, left_lo, left_hi, right_lo, right_hi, n_c, side: tl.constexpr, part: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """The compressed-key walk of the forward and dq kernels, one ``(side, part)`` of it: the window
    ``[c_begin, c_end)`` of ``side`` (0: left, ``[ts + left_lo, ts + left_hi)``, regular ``[(t-1)s - sb,
    (t-1)s)``; 1: right, regular ``[(t+2)s, (t+2)s + sb)``; ``base = t·s``) and the keys ``[j_lo, j_hi)``
    of ``part`` (0: the whole ``BLOCK_N`` tiles from ``c_begin``, walked unmasked -- the validity mask
    stays; 1: the partial last tile, masked)."""
    if side == 0:
        c_begin, c_end = _window(base, left_lo, left_hi, n_c)
    else:
        c_begin, c_end = _window(base, right_lo, right_hi, n_c)
    c_full = c_begin + (c_end - c_begin) // BLOCK_N * BLOCK_N
    if part == 0:
        j_lo, j_hi = c_begin, c_full
    else:
        j_lo, j_hi = c_full, c_end
    return c_begin, c_end, j_lo, j_hi


@triton.jit
def _block_span(p_first, p_last, w_lo, w_hi, sparse_step, wrap, n_blocks):
    """``[t_lo, t_hi)``: the query blocks ``t`` whose window ``[t·s + w_lo, t·s + w_hi)`` meets the
    compressed keys ``[p_first, p_last]``: ``floor((p_first - w_hi) / s) + 1 <= t <=
    floor((p_last - w_lo) / s)``, clipped to ``[0, n_blocks)``; ``(0, 0)`` when empty.  ``wrap · s``
    keeps the floored numerators non-negative (integer ``//`` truncates)."""
    t_lo = tl.maximum((p_first - w_hi + wrap * sparse_step) // sparse_step - wrap + 1, 0)
    t_hi = tl.minimum((p_last - w_lo + wrap * sparse_step) // sparse_step - wrap + 1, n_blocks)
    empty = (t_hi <= t_lo) | (w_hi <= w_lo)
    return tl.where(empty, 0, t_lo), tl.where(empty, 0, t_hi)


# The masked tests of the forward / dq loops.  Every row of a program lies in one LSG block and every
# row of a block sees the same interval of each key source, so a masked tile only ever needs a test
# on its *columns* -- the interval's ends -- except for the causal local source, where the one 2-D
# test ``j <= i`` (one compare and one select per score) also stands in for the column end ``k_end``
# (a program's rows are below it; the rows past it are never stored).  Each loop tests only what can
# fail there (``TEST``):
_NO_TEST: tl.constexpr = tl.constexpr(0)  # whole tiles inside the interval (the key mask stays)
_COLS: tl.constexpr = tl.constexpr(1)  # k_begin <= j < k_end (a tile holding the interval's start)
_COLS_END: tl.constexpr = tl.constexpr(2)  # j < k_end (tiles from k_begin on: the interval's end)
_CAUSAL_DIAG: tl.constexpr = tl.constexpr(3)  # j <= i (causal, tiles from k_begin on)
_CAUSAL_START: tl.constexpr = tl.constexpr(4)  # k_begin <= j <= i (causal, a tile holding k_begin)
# (a column that fails a column test or the key mask gets index _COL_OUT in the causal compare: past every row)
_COL_OUT: tl.constexpr = tl.constexpr(1 << 29)


@triton.jit
def _tile_positions(o_c, j0, k_end, TEST: tl.constexpr):
    """``[BN]`` int64 key positions to load for the tile at ``j0`` (columns ``o_c = 0..BN-1``): clamped
    below ``k_end`` in a tested tile (in bounds; the columns past it fail the test)."""
    if TEST == _NO_TEST:
        return (j0 + o_c).to(tl.int64)
    else:
        return tl.minimum(j0 + o_c, k_end - 1).to(tl.int64)


@triton.jit
def _tile_scores(b_s, o_c, j0, o_i, o_pos, k_begin, k_end, p_km, stride_kmn, TEST: tl.constexpr,
                 HAS_KEY_MASK: tl.constexpr):
    """The ``[BM, BN]`` scores ``b_s`` of the tile at ``j0`` (rows ``o_i``, columns ``o_c = 0..BN-1`` at
    positions ``o_pos``) with ``-inf`` where ``TEST`` or the key mask fails: a column test and the key
    mask make one ``[BN]`` validity and one select per score; the causal tests fold it into the column
    index compared with each row's ``i - j0`` (one compare and one select per score)."""
    o_j = j0 + o_c
    if TEST == _COLS:
        m_c = (o_j - k_begin).to(tl.uint32, bitcast=True) < (k_end - k_begin).to(tl.uint32, bitcast=True)
    elif TEST == _COLS_END:
        m_c = o_j < k_end
    else:
        m_c = o_c >= 0  # (constant true)
    if HAS_KEY_MASK:
        m_c = m_c & (tl.load(p_km + o_pos * stride_kmn) != 0)
    if TEST == _CAUSAL_DIAG:  # j0 + c <= i
        if HAS_KEY_MASK:
            c = tl.where(m_c, o_c, _COL_OUT)
        else:
            c = o_c
        b_s = tl.where(c[None, :] <= (o_i - j0)[:, None], b_s, float("-inf"))
    elif TEST == _CAUSAL_START:  # 0 <= j - k_begin <= i - k_begin (unsigned; the rows kept are >= k_begin)
        c = (o_j - k_begin).to(tl.uint32, bitcast=True)
        if HAS_KEY_MASK:
            c = tl.where(m_c, c, _COL_OUT)
        b_s = tl.where(c[None, :] <= (o_i - k_begin).to(tl.uint32, bitcast=True)[:, None], b_s, float("-inf"))
    elif TEST != _NO_TEST or HAS_KEY_MASK:
        b_s = tl.where(m_c[None, :], b_s, float("-inf"))
    return b_s


@triton.jit
def _lsg_fwd_loop(
    acc, m_i, l_i, b_q, o_i, p_k, p_v, p_km, stride_kn, stride_vn, stride_kmn, o_kd, o_vd,
    j_lo, j_hi, k_begin, k_end, qk_scale, qk_scale_lo,
    BLOCK_N: tl.constexpr, TEST: tl.constexpr, HAS_KEY_MASK: tl.constexpr, EXACT_SCALE: tl.constexpr,
    USE_EXP2: tl.constexpr, b_rk, col_offset, drop_thresh, DROPOUT: tl.constexpr,
):
    """:func:`._core.attn_fwd_range` for the LSG forward: the keys ``[j_lo, j_hi)`` (``j_lo >= 0``) of a
    source whose keys ``[k_begin, k_end)`` every row of the block sees, ``BLOCK_N`` at a time, with only
    the test ``TEST`` (above); ``HAS_KEY_MASK``: ``p_km`` (uint8, nonzero = visible) on every tile;
    dropout columns ``col_offset + j``."""
    o_c = tl.arange(0, BLOCK_N)
    for j0 in range(j_lo, j_hi, BLOCK_N):
        o_pos = _tile_positions(o_c, j0, k_end, TEST)
        b_k = tl.load(p_k + o_pos[:, None] * stride_kn + o_kd[None, :])  # [BN, D], in bounds
        b_v = tl.load(p_v + o_pos[:, None] * stride_vn + o_vd[None, :])
        b_s = _mm(b_q, tl.trans(b_k), None)  # [BM, BN], unscaled unless the float64 split scale is on
        if EXACT_SCALE:  # before any -inf: the split scale's x*lo would make -inf * 0 = nan
            b_s = _scale(b_s, qk_scale, qk_scale_lo, EXACT_SCALE)
        b_s = _tile_scores(b_s, o_c, j0, o_i, o_pos, k_begin, k_end, p_km, stride_kmn, TEST, HAS_KEY_MASK)
        b_keep = None
        if DROPOUT:
            b_keep = dropout_keep(b_rk, col_offset + o_pos, drop_thresh)
        if EXACT_SCALE:
            acc, m_i, l_i = online_softmax_update(acc, m_i, l_i, b_s, b_v, USE_EXP2, b_keep, DROPOUT)
        else:
            acc, m_i, l_i = online_softmax_update(acc, m_i, l_i, b_s, b_v, USE_EXP2, b_keep, DROPOUT, qk_scale)
    return acc, m_i, l_i


@triton.jit
def _lsg_dq_loop(
    b_dq, b_q, b_do, b_lse, b_delta, o_i, p_k, p_v, p_km, stride_kn, stride_vn, stride_kmn, o_kd, o_vd,
    j_lo, j_hi, k_begin, k_end, qk_scale, qk_scale_lo,
    BLOCK_N: tl.constexpr, TEST: tl.constexpr, HAS_KEY_MASK: tl.constexpr, EXACT_SCALE: tl.constexpr,
    USE_EXP2: tl.constexpr, b_rk, col_offset, drop_thresh, drop_scale, drop_scale_lo, DROPOUT: tl.constexpr,
):
    """:func:`._core.attn_bwd_dq_range` for the LSG dq kernel (keys and tests as :func:`_lsg_fwd_loop`)."""
    o_c = tl.arange(0, BLOCK_N)
    for j0 in range(j_lo, j_hi, BLOCK_N):
        o_pos = _tile_positions(o_c, j0, k_end, TEST)
        b_k = tl.load(p_k + o_pos[:, None] * stride_kn + o_kd[None, :])  # [BN, D], in bounds
        b_v = tl.load(p_v + o_pos[:, None] * stride_vn + o_vd[None, :])
        b_s = _mm(b_q, tl.trans(b_k), None)  # [BM, BN]
        if EXACT_SCALE:  # scale before the -inf (x*lo)
            b_s = _scale(b_s, qk_scale, qk_scale_lo, EXACT_SCALE)
        b_s = _tile_scores(b_s, o_c, j0, o_i, o_pos, k_begin, k_end, p_km, stride_kmn, TEST, HAS_KEY_MASK)
        if not EXACT_SCALE:  # the select first: the scale fuses into the exponent's FMA
            b_s = _scale(b_s, qk_scale, qk_scale_lo, EXACT_SCALE)
        b_p = _exp(b_s - b_lse[:, None], USE_EXP2)  # [BM, BN]
        b_dp = _mm(b_do, tl.trans(b_v), None)  # [BM, BN]
        if DROPOUT:
            b_keep = dropout_keep(b_rk, col_offset + o_pos, drop_thresh)
            b_dp = tl.where(b_keep, _scale(b_dp, drop_scale, drop_scale_lo, EXACT_SCALE), 0.0)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq = _mm(cast_to(b_ds, b_k.dtype), b_k, b_dq)
    return b_dq


@triton.jit
def _local_band(t_start, block_size, n, n_global, big, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
                ALIGNED: tl.constexpr):
    """``(k_begin, k_end, after, g_end)`` of block ``t``'s rows (first row ``t_start``): the local keys
    ``[k_begin, k_end)`` (blocks ``t-1 .. t+1``; causal: ``t-1, t`` and ``j <= i``, ``after = 0``) and
    the global keys ``[0, g_end)`` walked apart.  Plainly ``k_begin = max(t_start - b, g)``, ``g_end =
    g``.  ``ALIGNED`` (``BLOCK_N`` divides ``b`` and ``o``): ``t_start - b`` is a tile boundary, and a
    band that would start at ``g`` starts at the tile boundary below it instead, its first tile taking
    the global keys ``[g_end, g)`` (every non-global row sees them, and they are before its position):
    the band then has no tile holding ``k_begin``, i.e. no leading masked tile."""
    k_begin = tl.maximum(t_start - block_size, n_global)
    g_end = n_global + 0 * t_start
    if ALIGNED:
        g_end = tl.where(t_start - block_size < n_global, n_global // BLOCK_N * BLOCK_N, n_global)
        k_begin = tl.maximum(t_start - block_size, g_end)
    if CAUSAL:
        k_end = tl.maximum(tl.minimum(t_start + block_size, n), k_begin)
        after = 0
    else:
        k_end = tl.maximum(tl.minimum(t_start + 2 * block_size, n), k_begin)
        after = big
    return k_begin, k_end, after, g_end


@_tuned(_FWD_SHAPES, key=["HEAD_DIM", "block_size", "CAUSAL", "HAS_SPARSE", "DROPOUT"], kind="fwd",
        tile="BLOCK_M", bound="block_size")
@triton.jit
def _lsg_fwd_kernel(
    Q, K, V, KC, VC, SV, KM, O, LSE, DROP,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_kcb, stride_kch, stride_kcn, stride_kcd,
    stride_vcb, stride_vch, stride_vcn, stride_vcd,
    stride_svb, stride_svh, stride_svn,
    stride_kmb, stride_kmn,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_lb, stride_lh, stride_ln,
    n, n_c, n_global, block_offset, block_size, sparse_step, left_lo, left_hi, right_lo, right_hi, sparse_wrap,
    heads_per_kv, heads_per_c, big,
    qk_scale, qk_scale_lo, drop_scale, drop_scale_lo,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_SPARSE: tl.constexpr, HAS_KMASK: tl.constexpr,
    EXACT_SCALE: tl.constexpr, USE_EXP2: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_ALIGN: tl.constexpr,
):
    # program -> (LSG block i_t, sub-tile of BLOCK_M rows); heads; batch
    i_blk, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_sub = tl.cdiv(block_size, BLOCK_M)
    i_t = i_blk // n_sub
    t_start = block_offset + i_t * block_size  # first row of the block
    start = t_start + (i_blk % n_sub) * BLOCK_M
    r_begin = tl.maximum(t_start, n_global)  # global rows go through the dense path
    r_end = tl.minimum(t_start + block_size, n)
    if (start >= r_end) | (start + BLOCK_M <= r_begin):
        return
    i_hk = i_h // heads_per_kv
    ACC = LSE.dtype.element_ty

    p_q = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    p_k = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    p_v = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
    p_km = KM + i_b.to(tl.int64) * stride_kmb

    o_m = start + tl.arange(0, BLOCK_M)  # [BM] query positions
    m_m = (o_m >= r_begin) & (o_m < r_end)
    o_d = tl.arange(0, HEAD_DIM)
    b_q = tl.load(p_q + o_m[:, None].to(tl.int64) * stride_qn + o_d[None, :] * stride_qd, mask=m_m[:, None],
                  other=0.0)  # [BM, D]
    b_rk = 0
    drop_thresh = 0
    if DROPOUT:  # row keys of (b·H + h, token position); H = the grid's head axis
        drop_seed, drop_thresh = dropout_load(DROP)
        b_rk = dropout_row_keys(dropout_head_key(drop_seed, i_b * tl.num_programs(1) + i_h), o_m)

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=ACC)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)

    # local: blocks t-1 .. t+1 (t-1, t and j <= i when causal), global keys [0, g_end) apart
    ALIGNED: tl.constexpr = BLOCK_ALIGN >= BLOCK_N
    k_begin, k_end, after, g_end = _local_band(t_start, block_size, n, n_global, big, CAUSAL, BLOCK_N, ALIGNED)
    lo, full_lo, full_hi, hi = block_range(start, big, after, k_begin, k_end, BLOCK_M, BLOCK_N)
    # the tile holding k_begin (none when ALIGNED), the whole tiles, the tiles from the last whole one on
    # (the tests: _tile_scores)
    if not ALIGNED:
        acc, m_i, l_i = _lsg_fwd_loop(
            acc, m_i, l_i, b_q, o_m, p_k, p_v, p_km, stride_kn, stride_vn, stride_kmn, o_d * stride_kd,
            o_d * stride_vd, lo, full_lo, k_begin, k_end, qk_scale, qk_scale_lo, BLOCK_N,
            _CAUSAL_START if CAUSAL else _COLS, HAS_KMASK, EXACT_SCALE, USE_EXP2, b_rk, 0, drop_thresh, DROPOUT)
    acc, m_i, l_i = _lsg_fwd_loop(
        acc, m_i, l_i, b_q, o_m, p_k, p_v, p_km, stride_kn, stride_vn, stride_kmn, o_d * stride_kd, o_d * stride_vd,
        full_lo, full_hi, k_begin, k_end, qk_scale, qk_scale_lo, BLOCK_N, _NO_TEST,
        HAS_KMASK, EXACT_SCALE, USE_EXP2, b_rk, 0, drop_thresh, DROPOUT)
    acc, m_i, l_i = _lsg_fwd_loop(
        acc, m_i, l_i, b_q, o_m, p_k, p_v, p_km, stride_kn, stride_vn, stride_kmn, o_d * stride_kd, o_d * stride_vd,
        full_hi, hi, k_begin, k_end, qk_scale, qk_scale_lo, BLOCK_N, _CAUSAL_DIAG if CAUSAL else _COLS_END,
        HAS_KMASK, EXACT_SCALE, USE_EXP2, b_rk, 0, drop_thresh, DROPOUT)

    if HAS_SPARSE:
        # compressed keys: every row of the block sees the same interval of at most sb keys, masked
        # by the selection's validity anyway; tiles start at c_begin (no alignment needed), the
        # whole ones take the unmasked path (the validity mask only), the last partial one the masked
        i_hc = i_h // heads_per_c
        p_kc = KC + i_b.to(tl.int64) * stride_kcb + i_hc.to(tl.int64) * stride_kch
        p_vc = VC + i_b.to(tl.int64) * stride_vcb + i_hc.to(tl.int64) * stride_vch
        p_sv = SV + i_b.to(tl.int64) * stride_svb + i_hc.to(tl.int64) * stride_svh
        for side in tl.static_range(1 if CAUSAL else 2):
            for part in tl.static_range(2):  # whole tiles unmasked (the validity mask stays), then the rest
                c_begin, c_end, j_lo, j_hi = _window_part(i_t * sparse_step, left_lo, left_hi, right_lo, right_hi,
                                                          n_c, side, part, BLOCK_N)
                acc, m_i, l_i = _lsg_fwd_loop(
                    acc, m_i, l_i, b_q, o_m, p_kc, p_vc, p_sv, stride_kcn, stride_vcn, stride_svn, o_d * stride_kcd,
                    o_d * stride_vcd, j_lo, j_hi, c_begin, c_end, qk_scale, qk_scale_lo, BLOCK_N,
                    _COLS_END if part == 1 else _NO_TEST, True, EXACT_SCALE, USE_EXP2,
                    b_rk, n, drop_thresh, DROPOUT)  # columns N + p

    # global keys [0, g): few, always edge-masked (a 16- or 32-key tile here took 2-32 more SASS
    # instructions in the band walk's masked tile or up to 25 more registers on sm_90 -- padding,
    # dropout, D = 128 -- so they keep BLOCK_N)
    acc, m_i, l_i = _lsg_fwd_loop(
        acc, m_i, l_i, b_q, o_m, p_k, p_v, p_km, stride_kn, stride_vn, stride_kmn, o_d * stride_kd, o_d * stride_vd,
        0, g_end, 0, g_end, qk_scale, qk_scale_lo, BLOCK_N, _COLS_END,
        HAS_KMASK, EXACT_SCALE, USE_EXP2, b_rk, 0, drop_thresh, DROPOUT)

    m_row = m_m
    if HAS_KMASK:  # padding rows output 0, lse -inf
        m_row = m_row & (tl.load(p_km + o_m.to(tl.int64) * stride_kmn, mask=m_m, other=0) != 0)
    b_o, b_lse = attn_fwd_finalize(acc, m_i, l_i, m_row, USE_EXP2, drop_scale, drop_scale_lo, EXACT_SCALE, DROPOUT)
    p_o = O + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh
    tl.store(p_o + o_m[:, None].to(tl.int64) * stride_on + o_d[None, :] * stride_od, cast_to(b_o, O.dtype.element_ty),
             mask=m_m[:, None])
    p_l = LSE + i_b.to(tl.int64) * stride_lb + i_h.to(tl.int64) * stride_lh
    tl.store(p_l + o_m.to(tl.int64) * stride_ln, b_lse.to(LSE.dtype.element_ty), mask=m_m)


@_tuned(_FWD_SHAPES, key=["HEAD_DIM", "block_size", "CAUSAL", "HAS_SPARSE", "DROPOUT"], kind="dq",
        tile="BLOCK_M", bound="block_size")
@triton.jit
def _lsg_bwd_dq_kernel(
    Q, K, V, KC, VC, SV, KM, DO, LSE, DELTA, DQ, DROP,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_kcb, stride_kch, stride_kcn, stride_kcd,
    stride_vcb, stride_vch, stride_vcn, stride_vcd,
    stride_svb, stride_svh, stride_svn,
    stride_kmb, stride_kmn,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_lb, stride_lh, stride_ln,
    stride_deb, stride_deh, stride_den,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    n, n_c, n_global, block_offset, block_size, sparse_step, left_lo, left_hi, right_lo, right_hi, sparse_wrap,
    heads_per_kv, heads_per_c, big,
    qk_scale, qk_scale_lo, sm_scale, sm_scale_lo, drop_scale, drop_scale_lo,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_SPARSE: tl.constexpr, HAS_KMASK: tl.constexpr,
    EXACT_SCALE: tl.constexpr, USE_EXP2: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_ALIGN: tl.constexpr,
):
    # the forward's program layout and source loop; dS = P ∘ (dP' − delta), dq += dS k
    i_blk, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_sub = tl.cdiv(block_size, BLOCK_M)
    i_t = i_blk // n_sub
    t_start = block_offset + i_t * block_size
    start = t_start + (i_blk % n_sub) * BLOCK_M
    r_begin = tl.maximum(t_start, n_global)
    r_end = tl.minimum(t_start + block_size, n)
    if (start >= r_end) | (start + BLOCK_M <= r_begin):
        return
    i_hk = i_h // heads_per_kv
    ACC = DELTA.dtype.element_ty

    p_q = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    p_do = DO + i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh
    p_k = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    p_v = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
    p_km = KM + i_b.to(tl.int64) * stride_kmb
    p_lse = LSE + i_b.to(tl.int64) * stride_lb + i_h.to(tl.int64) * stride_lh
    p_delta = DELTA + i_b.to(tl.int64) * stride_deb + i_h.to(tl.int64) * stride_deh

    o_m = start + tl.arange(0, BLOCK_M)
    m_m = (o_m >= r_begin) & (o_m < r_end)
    o_pq = o_m.to(tl.int64)
    o_d = tl.arange(0, HEAD_DIM)
    b_q = tl.load(p_q + o_pq[:, None] * stride_qn + o_d[None, :] * stride_qd, mask=m_m[:, None], other=0.0)
    b_do = tl.load(p_do + o_pq[:, None] * stride_don + o_d[None, :] * stride_dod, mask=m_m[:, None], other=0.0)
    b_lse, b_delta = attn_bwd_load_rows(p_lse, p_delta, o_pq, stride_ln, stride_den, m_m, True, USE_EXP2)
    b_dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=ACC)
    b_rk = 0
    drop_thresh = 0
    if DROPOUT:  # the forward's row keys
        drop_seed, drop_thresh = dropout_load(DROP)
        b_rk = dropout_row_keys(dropout_head_key(drop_seed, i_b * tl.num_programs(1) + i_h), o_m)

    ALIGNED: tl.constexpr = BLOCK_ALIGN >= BLOCK_N
    k_begin, k_end, after, g_end = _local_band(t_start, block_size, n, n_global, big, CAUSAL, BLOCK_N, ALIGNED)
    lo, full_lo, full_hi, hi = block_range(start, big, after, k_begin, k_end, BLOCK_M, BLOCK_N)
    if not ALIGNED:
        b_dq = _lsg_dq_loop(
            b_dq, b_q, b_do, b_lse, b_delta, o_m, p_k, p_v, p_km, stride_kn, stride_vn, stride_kmn, o_d * stride_kd,
            o_d * stride_vd, lo, full_lo, k_begin, k_end, qk_scale, qk_scale_lo, BLOCK_N,
            _CAUSAL_START if CAUSAL else _COLS, HAS_KMASK, EXACT_SCALE, USE_EXP2,
            b_rk, 0, drop_thresh, drop_scale, drop_scale_lo, DROPOUT)
    b_dq = _lsg_dq_loop(
        b_dq, b_q, b_do, b_lse, b_delta, o_m, p_k, p_v, p_km, stride_kn, stride_vn, stride_kmn, o_d * stride_kd,
        o_d * stride_vd, full_lo, full_hi, k_begin, k_end, qk_scale, qk_scale_lo, BLOCK_N,
        _NO_TEST, HAS_KMASK, EXACT_SCALE, USE_EXP2,
        b_rk, 0, drop_thresh, drop_scale, drop_scale_lo, DROPOUT)
    b_dq = _lsg_dq_loop(
        b_dq, b_q, b_do, b_lse, b_delta, o_m, p_k, p_v, p_km, stride_kn, stride_vn, stride_kmn, o_d * stride_kd,
        o_d * stride_vd, full_hi, hi, k_begin, k_end, qk_scale, qk_scale_lo, BLOCK_N,
        _CAUSAL_DIAG if CAUSAL else _COLS_END, HAS_KMASK, EXACT_SCALE, USE_EXP2,
        b_rk, 0, drop_thresh, drop_scale, drop_scale_lo, DROPOUT)

    if HAS_SPARSE:
        i_hc = i_h // heads_per_c
        p_kc = KC + i_b.to(tl.int64) * stride_kcb + i_hc.to(tl.int64) * stride_kch
        p_vc = VC + i_b.to(tl.int64) * stride_vcb + i_hc.to(tl.int64) * stride_vch
        p_sv = SV + i_b.to(tl.int64) * stride_svb + i_hc.to(tl.int64) * stride_svh
        for side in tl.static_range(1 if CAUSAL else 2):  # the forward's compressed-key walk
            for part in tl.static_range(2):
                c_begin, c_end, j_lo, j_hi = _window_part(i_t * sparse_step, left_lo, left_hi, right_lo, right_hi,
                                                          n_c, side, part, BLOCK_N)
                b_dq = _lsg_dq_loop(
                    b_dq, b_q, b_do, b_lse, b_delta, o_m, p_kc, p_vc, p_sv, stride_kcn, stride_vcn, stride_svn,
                    o_d * stride_kcd, o_d * stride_vcd, j_lo, j_hi, c_begin, c_end, qk_scale, qk_scale_lo, BLOCK_N,
                    _COLS_END if part == 1 else _NO_TEST, True, EXACT_SCALE, USE_EXP2,
                    b_rk, n, drop_thresh, drop_scale, drop_scale_lo, DROPOUT)

    b_dq = _lsg_dq_loop(
        b_dq, b_q, b_do, b_lse, b_delta, o_m, p_k, p_v, p_km, stride_kn, stride_vn, stride_kmn, o_d * stride_kd,
        o_d * stride_vd, 0, g_end, 0, g_end, qk_scale, qk_scale_lo, BLOCK_N, _COLS_END,
        HAS_KMASK, EXACT_SCALE, USE_EXP2, b_rk, 0, drop_thresh, drop_scale, drop_scale_lo, DROPOUT)
    b_dq = _scale(b_dq, sm_scale, sm_scale_lo, EXACT_SCALE)

    p_dq = DQ + i_b.to(tl.int64) * stride_dqb + i_h.to(tl.int64) * stride_dqh
    tl.store(p_dq + o_pq[:, None] * stride_dqn + o_d[None, :] * stride_dqd, cast_to(b_dq, DQ.dtype.element_ty),
             mask=m_m[:, None])


# --------------------------------------------------------------------------------------
# dk, dv
# --------------------------------------------------------------------------------------


# The masked tests of the local dk/dv loops: every row of the blocks u-1 .. u+1 (u, u+1 when causal)
# sees every key of block u (causal: the keys j <= i), so a row tile only needs its rows' range
# [r_begin, r_end) -- a row outside it reads lse = +inf, hence p = 0, without a per-element test --
# and, causal, the 2-D test j <= i on the diagonal tiles (which also stands in for r_begin there:
# every key of the block is >= r_begin).
_ROWS: tl.constexpr = tl.constexpr(1)  # r_begin <= i < r_end, through lse
_ROWS_CAUSAL: tl.constexpr = tl.constexpr(2)  # i < r_end through lse, j <= i per element
_ROWS_END: tl.constexpr = tl.constexpr(3)  # i < r_end through lse (row tiles from r_begin and the diagonal on)


@triton.jit
def _lsg_dkdv_loop(
    b_dk, b_dv, b_k, b_v, o_j,
    p_q, p_do, p_lse, p_delta, i_h0, n_heads, stride_qh, stride_doh, stride_lh, stride_dh,
    stride_qn, stride_don, stride_ln, stride_dn, o_qd, o_dod,
    i_lo, i_hi, r_begin, r_end, qk_scale, qk_scale_lo,
    BLOCK_M: tl.constexpr, TEST: tl.constexpr, EXACT_SCALE: tl.constexpr, USE_EXP2: tl.constexpr,
    b_kcol, drop_seed, drop_bh0, drop_thresh, drop_scale, drop_scale_lo, DROPOUT: tl.constexpr,
):
    """:func:`._core.attn_bwd_dkdv_heads` for the LSG local dk/dv kernel: ``dv += Pᵀ dO``, ``dk += dSᵀ q``
    for the keys ``o_j [BN]`` (``b_k, b_v [BN, D]``) over the rows ``[i_lo, i_hi)`` (``i_lo >= 0``),
    ``BLOCK_M`` at a time, summed over the ``n_heads`` query heads ``i_h0, ...`` (one flat loop, the head
    and the row tile carried, no divide), transposed ``[BN, BM]`` tiles, with only the test ``TEST``
    (``_NO_TEST``: every row in ``[r_begin, r_end)`` and past every key; ``_ROWS``, ``_ROWS_CAUSAL``,
    ``_ROWS_END``);
    the keys' dropout columns ``b_kcol [BN]``, query head ``h``'s ``b·H + h = drop_bh0 + h``."""
    o_r = tl.arange(0, BLOCK_M)  # [BM] row offsets inside a tile
    n_blk = tl.cdiv(tl.maximum(i_hi - i_lo, 0), BLOCK_M)
    i_h = i_lo * 0  # int32 scalar: the head, carried
    i0 = i_lo  # the row tile, carried
    for _ in range(0, n_blk * n_heads):
        i_hq = tl.cast(i_h0 + i_h, tl.int64)
        o_i = i0 + o_r  # [BM]
        if TEST == _NO_TEST:
            o_pos = o_i.to(tl.int64)
            m_i = None
        else:  # rows clamped below r_end: loads in bounds; lse masked to +inf outside [r_begin, r_end)
            if TEST == _ROWS and BLOCK_M >= 32 and b_k.shape[0] < 64:
                # the row clamped into [r_begin, r_end) and compared: on sm_90 (bench.sm90, D = 64) the
                # 32x32/4w tiles then fit 128 registers without spilling (the unsigned test spilled 24 B);
                # elsewhere the unsigned test takes fewer instructions and registers (64x128/8w: 440 vs 522
                # per masked tile; 16x16/2w: 96 vs 120 registers)
                o_cl = tl.minimum(tl.maximum(o_i, r_begin), r_end - 1)
                m_i = o_cl == o_i
                o_pos = o_cl.to(tl.int64)
            else:
                o_pos = tl.minimum(o_i, r_end - 1).to(tl.int64)
                if TEST == _ROWS:
                    m_i = (o_i - r_begin).to(tl.uint32, bitcast=True) < (r_end - r_begin).to(tl.uint32,
                                                                                                bitcast=True)
                else:
                    m_i = o_i < r_end
        b_q = tl.load(p_q + i_hq * stride_qh + o_pos[:, None] * stride_qn + o_qd[None, :])  # [BM, D]
        b_do = tl.load(p_do + i_hq * stride_doh + o_pos[:, None] * stride_don + o_dod[None, :])  # [BM, D]
        b_lse, b_delta = attn_bwd_load_rows(p_lse + i_hq * stride_lh, p_delta + i_hq * stride_dh, o_pos, stride_ln,
                                            stride_dn, m_i, TEST != _NO_TEST, USE_EXP2)
        b_st = _mm(b_k, tl.trans(b_q), None)  # [BN, BM], unscaled unless the float64 split scale is on
        if EXACT_SCALE:
            b_st = _scale(b_st, qk_scale, qk_scale_lo, EXACT_SCALE)
            if TEST == _ROWS_CAUSAL:
                b_st = tl.where(o_r[None, :] >= (o_j - i0)[:, None], b_st, float("-inf"))
            b_pt = _exp(b_st - b_lse[None, :], USE_EXP2)  # [BN, BM]
        else:
            if TEST == _ROWS_CAUSAL:
                b_st = tl.where(o_r[None, :] >= (o_j - i0)[:, None], b_st, float("-inf"))
            b_pt = _exp(b_st * qk_scale - b_lse[None, :], USE_EXP2)  # [BN, BM]
        b_dpt = _mm(b_v, tl.trans(b_do), None)  # [BN, BM]
        if DROPOUT:
            b_rk = dropout_row_keys(dropout_head_key(drop_seed, drop_bh0 + i_hq), o_pos)  # [BM]
            b_keep_t = mix32(b_kcol.to(tl.uint32)[:, None] ^ b_rk[None, :]) >= drop_thresh  # [BN, BM]
            b_pd = tl.where(b_keep_t, _scale(b_pt, drop_scale, drop_scale_lo, EXACT_SCALE), 0.0)
            b_dv = _mm(cast_to(b_pd, b_do.dtype), b_do, b_dv)
            b_dpt = tl.where(b_keep_t, _scale(b_dpt, drop_scale, drop_scale_lo, EXACT_SCALE), 0.0)
        else:
            b_dv = _mm(cast_to(b_pt, b_do.dtype), b_do, b_dv)
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dk = _mm(cast_to(b_dst, b_q.dtype), b_q, b_dk)
        # next head; after the last one, the next row tile
        i_h += 1
        wrap = i_h == n_heads
        i_h = tl.where(wrap, 0, i_h)
        i0 = tl.where(wrap, i0 + BLOCK_M, i0)
    return b_dk, b_dv


@_tuned(_DKDV_SHAPES, key=["HEAD_DIM", "block_size", "CAUSAL", "DROPOUT"], kind="dkdv", tile="BLOCK_N",
        bound="block_size", causal_budget=_CAUSAL_LOCAL_DKDV_BUDGET)
@triton.jit
def _lsg_bwd_dkdv_local_kernel(
    Q, K, V, DO, LSE, DELTA, KM, DKI, DVI, DK, DV, DROP,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_kmb, stride_kmn,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_lb, stride_lh, stride_ln,
    stride_deb, stride_deh, stride_den,
    stride_dkib, stride_dkih, stride_dkin, stride_dkid,
    stride_dvib, stride_dvih, stride_dvin, stride_dvid,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    n, n_global, block_offset, block_size, heads_per_kv, big,
    qk_scale, qk_scale_lo, sm_scale, sm_scale_lo, drop_scale, drop_scale_lo,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr, HAS_DK_IN: tl.constexpr,
    EXACT_SCALE: tl.constexpr, USE_EXP2: tl.constexpr, DROPOUT: tl.constexpr,
):
    # one program = BLOCK_N non-global keys of LSG block i_u, one kv head, summed over its query heads
    i_blk, i_hk, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_sub = tl.cdiv(block_size, BLOCK_N)
    i_u = i_blk // n_sub
    u_start = block_offset + i_u * block_size
    start = u_start + (i_blk % n_sub) * BLOCK_N
    c_begin = tl.maximum(u_start, n_global)  # global keys: add_global_key_grads
    c_end = tl.minimum(u_start + block_size, n)
    if (start >= c_end) | (start + BLOCK_N <= c_begin):
        return
    ACC = DELTA.dtype.element_ty

    o_n = start + tl.arange(0, BLOCK_N)  # [BN] key positions
    m_n = (o_n >= c_begin) & (o_n < c_end)
    o_pk = o_n.to(tl.int64)
    o_d = tl.arange(0, HEAD_DIM)
    p_k = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    p_v = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
    b_k = tl.load(p_k + o_pk[:, None] * stride_kn + o_d[None, :] * stride_kd, mask=m_n[:, None], other=0.0)
    b_v = tl.load(p_v + o_pk[:, None] * stride_vn + o_d[None, :] * stride_vd, mask=m_n[:, None], other=0.0)
    b_dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=ACC)
    b_dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=ACC)

    # non-global rows of blocks u-1 .. u+1 (u, u+1 with i >= j when causal)
    if CAUSAL:
        r_begin = tl.maximum(u_start, n_global)
        after = 0
    else:
        r_begin = tl.maximum(u_start - block_size, n_global)
        after = big
    r_end = tl.minimum(u_start + 2 * block_size, n)
    # rows i that see key j: j - after <= i <= j + big
    lo, full_lo, full_hi, hi = block_range(start, after, big, r_begin, r_end, BLOCK_N, BLOCK_M)
    # the query heads of this kv head and the row blocks share one flat loop (core helper)
    i_h0 = i_hk * heads_per_kv
    p_q = Q + i_b.to(tl.int64) * stride_qb
    p_do = DO + i_b.to(tl.int64) * stride_dob
    p_lse = LSE + i_b.to(tl.int64) * stride_lb
    p_delta = DELTA + i_b.to(tl.int64) * stride_deb
    drop_seed = 0
    drop_thresh = 0
    if DROPOUT:
        drop_seed, drop_thresh = dropout_load(DROP)
    drop_bh0 = i_b * heads_per_kv * tl.num_programs(1)  # b·H (query heads); the keys' columns are o_n
    # the row tiles holding r_begin (causal: the diagonal ones), the whole ones, the ones holding r_end
    b_dk, b_dv = _lsg_dkdv_loop(
        b_dk, b_dv, b_k, b_v, o_n, p_q, p_do, p_lse, p_delta, i_h0, heads_per_kv, stride_qh, stride_doh,
        stride_lh, stride_deh, stride_qn, stride_don, stride_ln, stride_den, o_d * stride_qd, o_d * stride_dod,
        lo, full_lo, r_begin, r_end, qk_scale, qk_scale_lo, BLOCK_M, _ROWS_CAUSAL if CAUSAL else _ROWS, EXACT_SCALE,
        USE_EXP2, o_n, drop_seed, drop_bh0, drop_thresh, drop_scale, drop_scale_lo, DROPOUT)
    b_dk, b_dv = _lsg_dkdv_loop(
        b_dk, b_dv, b_k, b_v, o_n, p_q, p_do, p_lse, p_delta, i_h0, heads_per_kv, stride_qh, stride_doh,
        stride_lh, stride_deh, stride_qn, stride_don, stride_ln, stride_den, o_d * stride_qd, o_d * stride_dod,
        full_lo, full_hi, r_begin, r_end, qk_scale, qk_scale_lo, BLOCK_M, _NO_TEST, EXACT_SCALE,
        USE_EXP2, o_n, drop_seed, drop_bh0, drop_thresh, drop_scale, drop_scale_lo, DROPOUT)
    b_dk, b_dv = _lsg_dkdv_loop(
        b_dk, b_dv, b_k, b_v, o_n, p_q, p_do, p_lse, p_delta, i_h0, heads_per_kv, stride_qh, stride_doh,
        stride_lh, stride_deh, stride_qn, stride_don, stride_ln, stride_den, o_d * stride_qd, o_d * stride_dod,
        full_hi, hi, r_begin, r_end, qk_scale, qk_scale_lo, BLOCK_M, _ROWS_END, EXACT_SCALE,
        USE_EXP2, o_n, drop_seed, drop_bh0, drop_thresh, drop_scale, drop_scale_lo, DROPOUT)

    m_key = m_n
    if HAS_KMASK:  # padding keys were never seen
        m_key = m_key & (tl.load(KM + i_b.to(tl.int64) * stride_kmb + o_pk * stride_kmn, mask=m_n, other=0) != 0)
    # dk then dv, each with the global rows' share (dense path) added before its one rounding
    p_dk = DK + i_b.to(tl.int64) * stride_dkb + i_hk.to(tl.int64) * stride_dkh
    b_dk = tl.where(m_key[:, None], _scale(b_dk, sm_scale, sm_scale_lo, EXACT_SCALE), 0.0)
    if HAS_DK_IN:
        p_dki = DKI + i_b.to(tl.int64) * stride_dkib + i_hk.to(tl.int64) * stride_dkih
        b_dk += tl.load(p_dki + o_pk[:, None] * stride_dkin + o_d[None, :] * stride_dkid, mask=m_n[:, None],
                        other=0.0).to(ACC)
    tl.store(p_dk + o_pk[:, None] * stride_dkn + o_d[None, :] * stride_dkd, cast_to(b_dk, DK.dtype.element_ty),
             mask=m_n[:, None])
    p_dv = DV + i_b.to(tl.int64) * stride_dvb + i_hk.to(tl.int64) * stride_dvh
    b_dv = tl.where(m_key[:, None], b_dv, 0.0)
    if HAS_DK_IN:
        p_dvi = DVI + i_b.to(tl.int64) * stride_dvib + i_hk.to(tl.int64) * stride_dvih
        b_dv += tl.load(p_dvi + o_pk[:, None] * stride_dvin + o_d[None, :] * stride_dvid, mask=m_n[:, None],
                        other=0.0).to(ACC)
    tl.store(p_dv + o_pk[:, None] * stride_dvn + o_d[None, :] * stride_dvd, cast_to(b_dv, DV.dtype.element_ty),
             mask=m_n[:, None])


@triton.jit
def _sparse_dkdv_heads(
    b_dk, b_dv, b_k, b_v, o_c,
    p_q, p_do, p_lse, p_delta, i_h0, n_heads, stride_qh, stride_doh, stride_lh, stride_dh,
    stride_qn, stride_don, stride_ln, stride_dn, o_qd, o_dod,
    row_lo, row_hi, block_offset, block_size, sparse_step, left_lo, left_hi, right_lo, right_hi, qk_scale,
    qk_scale_lo, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, EXACT_SCALE: tl.constexpr, USE_EXP2: tl.constexpr,
    b_kcol, drop_seed, drop_bh0, drop_thresh, drop_scale, drop_scale_lo, DROPOUT: tl.constexpr,
    MASKED: tl.constexpr, WHOLE_TILES: tl.constexpr = False,
):
    """``dv += Pᵀ dO``, ``dk += dSᵀ q`` for the compressed keys ``o_c [BN]`` (``b_k, b_v [BN, D]``)
    over the non-global rows ``[row_lo, row_hi)`` (``row_lo >= max(g, o)``), ``BLOCK_M`` at a time,
    summed over the ``n_heads`` query heads ``i_h0, i_h0 + 1, ...`` of this compressed head;
    ``p_q, p_do, p_lse, p_delta`` point at head 0 of the batch row.  Row ``i`` of LSG block
    ``t = (i - o) // b`` sees ``p`` once per window of it that holds ``p``: ``[ts + left_lo,
    ts + left_hi)`` and (non-causal) ``[ts + right_lo, ts + right_hi)``; a row tile may straddle
    blocks, so the windows are applied per element, as a multiplicity (0, 1 or 2) of ``P``.
    Otherwise :func:`._core.attn_bwd_dkdv_heads` (one flat loop
    over heads and row blocks, transposed ``[BN, BM]`` tiles; the caller applies the scale and
    zeroes the keys the forward never saw).  ``DROPOUT``: as there; the keys' columns are
    ``b_kcol [BN]`` (uint32 ``N + p``) and query head ``h`` has ``b·H + h = drop_bh0 + h``.
    ``MASKED = False``: the caller guarantees that every row's block holds every key of the tile in
    exactly one of its windows and that ``row_hi - row_lo`` is a multiple of ``BLOCK_M``; no window
    test.  ``WHOLE_TILES`` (with ``MASKED``): the caller guarantees that each window of a block holds
    all of the tile or none of it (``BN`` divides ``s`` and the window offsets) and that no block's
    two windows meet, and walks ``[row_lo, row_hi)`` over blocks whose window holds the tile (the
    blocks of one window's span, :func:`_block_span`): every row below ``row_hi`` sees each key of
    the tile once, and the walk needs only its row mask, no window test."""
    n_blk = tl.cdiv(tl.maximum(row_hi - row_lo, 0), BLOCK_M)
    WINDOW_TEST: tl.constexpr = MASKED and not WHOLE_TILES
    # Loop-carried, so that the loop holds no integer divide: the head ``i_h``, the tile's first row
    # ``i0`` and, with the window test, per row of the tile its LSG block ``b_t`` and offset ``b_r`` in
    # it.  The tile advances by ``BLOCK_M = q_step·b + r_step`` rows once every ``n_heads`` steps; these
    # divides are done once, here.
    o_r = tl.arange(0, BLOCK_M)  # [BM]
    i0 = row_lo
    i_h = row_lo * 0  # int32 scalar
    if WINDOW_TEST:
        b_t = (row_lo + o_r - block_offset) // block_size  # [BM], rows >= block_offset
        b_r = (row_lo + o_r - block_offset) - b_t * block_size
        q_step = BLOCK_M // block_size
        r_step = BLOCK_M - q_step * block_size
    # key p is in its row's window [t·s + lo, t·s + hi) iff (p - lo) - t·s, as uint32, < hi - lo:
    # one subtract and one compare per element and window
    l_span = tl.maximum(left_hi - left_lo, 0).to(tl.uint32)
    r_span = tl.maximum(right_hi - right_lo, 0).to(tl.uint32)
    o_cl = (o_c - left_lo)[:, None]  # [BN, 1]
    o_cr = (o_c - right_lo)[:, None]
    for _ in range(0, n_blk * n_heads):
        i_hq = tl.cast(i_h0 + i_h, tl.int64)
        o_i = i0 + o_r
        o_pos = o_i.to(tl.int64)
        if MASKED:  # rows past row_hi: q = 0 and lse = +inf, so their p is 0 without a per-element row mask
            m_i = o_i < row_hi
            b_q = tl.load(p_q + i_hq * stride_qh + o_pos[:, None] * stride_qn + o_qd[None, :], mask=m_i[:, None],
                          other=0.0)  # [BM, D]
            b_do = tl.load(p_do + i_hq * stride_doh + o_pos[:, None] * stride_don + o_dod[None, :],
                           mask=m_i[:, None], other=0.0)
        else:  # whole steps: every row below row_hi
            m_i = o_i < row_hi  # unused
            b_q = tl.load(p_q + i_hq * stride_qh + o_pos[:, None] * stride_qn + o_qd[None, :])  # [BM, D]
            b_do = tl.load(p_do + i_hq * stride_doh + o_pos[:, None] * stride_don + o_dod[None, :])
        b_lse, b_delta = attn_bwd_load_rows(p_lse + i_hq * stride_lh, p_delta + i_hq * stride_dh, o_pos, stride_ln,
                                            stride_dn, m_i, MASKED, USE_EXP2)
        b_st = _mm(b_k, tl.trans(b_q), None)  # [BN, BM], unscaled unless the float64 split scale is on
        if EXACT_SCALE:
            b_e = _exp(_scale(b_st, qk_scale, qk_scale_lo, EXACT_SCALE) - b_lse[None, :], USE_EXP2)
        else:
            b_e = _exp(b_st * qk_scale - b_lse[None, :], USE_EXP2)
        # P once per window of the row's block that holds the key (a key in both counts twice, as in
        # the forward); selects, not a multiply, so that an overflowed exp of an unseen key stays out
        if WINDOW_TEST:
            b_base = (b_t * sparse_step)[None, :]  # [1, BM]: t·s of each row
            b_pt = tl.where((o_cl - b_base).to(tl.uint32, bitcast=True) < l_span, b_e, 0.0)
            if not CAUSAL:
                b_pt += tl.where((o_cr - b_base).to(tl.uint32, bitcast=True) < r_span, b_e, 0.0)
        else:  # every row's block (below row_hi) holds every key of the tile in exactly one window
            b_pt = b_e
        if DROPOUT:
            b_rk = dropout_row_keys(dropout_head_key(drop_seed, drop_bh0 + i_hq), o_pos)  # [BM]
            b_keep_t = dropout_keep(b_kcol, b_rk, drop_thresh)  # [BN, BM]: the hash's xor is symmetric
            b_pd = tl.where(b_keep_t, _scale(b_pt, drop_scale, drop_scale_lo, EXACT_SCALE), 0.0)
            b_dv = _mm(cast_to(b_pd, b_do.dtype), b_do, b_dv)
        else:
            b_dv = _mm(cast_to(b_pt, b_do.dtype), b_do, b_dv)
        b_dpt = _mm(b_v, tl.trans(b_do), None)  # [BN, BM]
        if DROPOUT:
            b_dpt = tl.where(b_keep_t, _scale(b_dpt, drop_scale, drop_scale_lo, EXACT_SCALE), 0.0)
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dk = _mm(cast_to(b_dst, b_q.dtype), b_q, b_dk)
        # next head; after the last one, the next row tile
        i_h += 1
        wrap = i_h == n_heads
        i_h = tl.where(wrap, 0, i_h)
        i0 = tl.where(wrap, i0 + BLOCK_M, i0)
        if WINDOW_TEST:
            b_r_next = b_r + r_step
            carry = b_r_next >= block_size
            b_r = tl.where(wrap, tl.where(carry, b_r_next - block_size, b_r_next), b_r)
            b_t = tl.where(wrap, b_t + q_step + carry.to(tl.int32), b_t)
    return b_dk, b_dv


@triton.jit
def _block_full(p_first, p_last, w_lo, w_hi, sparse_step, wrap, n_blocks):
    """``[t_lo, t_hi)``: the query blocks ``t`` whose window ``[t·s + w_lo, t·s + w_hi)`` holds all of
    ``[p_first, p_last]``: ``floor((p_last - w_hi) / s) + 1 <= t <= floor((p_first - w_lo) / s)``,
    clipped to ``[0, n_blocks)`` (``t_hi <= t_lo`` when empty); ``wrap`` as in :func:`_block_span`."""
    t_lo = tl.maximum((p_last - w_hi + wrap * sparse_step) // sparse_step - wrap + 1, 0)
    t_hi = tl.minimum((p_first - w_lo + wrap * sparse_step) // sparse_step - wrap + 1, n_blocks)
    return t_lo, t_hi


@triton.jit
def _unmasked_rows(row_lo, row_hi, f_lo, f_hi, block_offset, block_size, BLOCK_M: tl.constexpr):
    """``[u_lo, u_hi)``: the rows of the blocks ``[f_lo, f_hi)`` inside ``[row_lo, row_hi)``, shrunk to
    whole ``BLOCK_M`` steps of a walk that starts at ``row_lo``; ``(row_hi, row_hi)`` when empty."""
    f_lo_r = tl.maximum(block_offset + f_lo * block_size, row_lo)
    f_hi_r = tl.minimum(block_offset + f_hi * block_size, row_hi)
    u_lo = row_lo + tl.cdiv(f_lo_r - row_lo, BLOCK_M) * BLOCK_M
    u_hi = row_lo + tl.maximum(f_hi_r - row_lo, 0) // BLOCK_M * BLOCK_M
    empty = (u_hi <= u_lo) | (f_hi <= f_lo)
    return tl.where(empty, row_hi, u_lo), tl.where(empty, row_hi, u_hi)


@_tuned(_DKDV_SHAPES, key=["HEAD_DIM", "block_size", "sparse_step", "CAUSAL", "DROPOUT"], kind="dkdv",
        tile="BLOCK_N", bound="sparse_step")
@triton.jit
def _lsg_bwd_dkdv_sparse_kernel(
    Q, KC, VC, SV, DO, LSE, DELTA, DKC, DVC, DROP,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kcb, stride_kch, stride_kcn, stride_kcd,
    stride_vcb, stride_vch, stride_vcn, stride_vcd,
    stride_svb, stride_svh, stride_svn,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_lb, stride_lh, stride_ln,
    stride_deb, stride_deh, stride_den,
    stride_dkcb, stride_dkch, stride_dkcn, stride_dkcd,
    stride_dvcb, stride_dvch, stride_dvcn, stride_dvcd,
    n, n_c, n_global, block_offset, block_size, sparse_step, left_lo, left_hi, right_lo, right_hi, sparse_wrap,
    heads_per_c, big,
    qk_scale, qk_scale_lo, sm_scale, sm_scale_lo, drop_scale, drop_scale_lo,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, EXACT_SCALE: tl.constexpr, USE_EXP2: tl.constexpr, DROPOUT: tl.constexpr,
    WIN_ALIGN: tl.constexpr,
):
    # one program = BLOCK_N compressed keys of one compressed head, summed over its query heads;
    # WIN_ALIGN (:func:`_window_align`: a power of two dividing s and the window offsets, 0 when a block's
    # windows meet): when BLOCK_N divides it, each window of a block holds all of a tile or none of it, and
    # the masked row steps need no window test (_sparse_dkdv_heads' WHOLE_TILES)
    i_n, i_hc, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ACC = DELTA.dtype.element_ty
    p_first = i_n * BLOCK_N
    o_c = p_first + tl.arange(0, BLOCK_N)  # [BN] compressed positions
    m_c = o_c < n_c
    p_last = tl.minimum(p_first + BLOCK_N, n_c) - 1
    o_pc = o_c.to(tl.int64)
    o_d = tl.arange(0, HEAD_DIM)
    p_kc = KC + i_b.to(tl.int64) * stride_kcb + i_hc.to(tl.int64) * stride_kch
    p_vc = VC + i_b.to(tl.int64) * stride_vcb + i_hc.to(tl.int64) * stride_vch
    b_k = tl.load(p_kc + o_pc[:, None] * stride_kcn + o_d[None, :] * stride_kcd, mask=m_c[:, None], other=0.0)
    b_v = tl.load(p_vc + o_pc[:, None] * stride_vcn + o_d[None, :] * stride_vcd, mask=m_c[:, None], other=0.0)
    b_dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=ACC)
    b_dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=ACC)

    # The query blocks whose windows reach [p_first, p_last] form two ranges of t (one per window),
    # hence two row ranges; the later one is cut to start after the earlier one, so that no row is
    # visited twice (each visit applies both windows per element) and rows of a gap see none.
    n_blocks = tl.cdiv(n - block_offset, block_size)
    ta_lo, ta_hi = _block_span(p_first, p_last, left_lo, left_hi, sparse_step, sparse_wrap, n_blocks)
    if CAUSAL:
        tb_lo = ta_lo
        tb_hi = ta_lo
    else:
        tb_lo, tb_hi = _block_span(p_first, p_last, right_lo, right_hi, sparse_step, sparse_wrap, n_blocks)
    swap = tb_lo < ta_lo
    t1_lo = tl.where(swap, tb_lo, ta_lo)
    t1_hi = tl.where(swap, tb_hi, ta_hi)
    t2_lo = tl.where(swap, ta_lo, tb_lo)
    t2_hi = tl.where(swap, ta_hi, tb_hi)
    t2_lo = tl.maximum(t2_lo, t1_hi)
    t2_hi = tl.maximum(t2_hi, t2_lo)
    rows_1_lo = tl.maximum(block_offset + t1_lo * block_size, n_global)
    rows_1_hi = tl.maximum(tl.minimum(block_offset + t1_hi * block_size, n), rows_1_lo)
    rows_2_lo = tl.maximum(block_offset + t2_lo * block_size, n_global)
    rows_2_hi = tl.maximum(tl.minimum(block_offset + t2_hi * block_size, n), rows_2_lo)
    i_h0 = i_hc * heads_per_c
    p_q = Q + i_b.to(tl.int64) * stride_qb
    p_do = DO + i_b.to(tl.int64) * stride_dob
    p_lse = LSE + i_b.to(tl.int64) * stride_lb
    p_delta = DELTA + i_b.to(tl.int64) * stride_deb
    drop_seed = 0
    drop_thresh = 0
    if DROPOUT:
        drop_seed, drop_thresh = dropout_load(DROP)
    drop_bh0 = i_b * heads_per_c * tl.num_programs(1)  # b·H (query heads)
    # The blocks whose window holds the whole tile, and whose other window misses it, see each of its
    # keys exactly once: their rows (whole BLOCK_M steps) take the walk without the window test.
    fa_lo, fa_hi = _block_full(p_first, p_last, left_lo, left_hi, sparse_step, sparse_wrap, n_blocks)
    if CAUSAL:
        fb_lo = fa_lo
        fb_hi = fa_lo
    else:
        fb_lo, fb_hi = _block_full(p_first, p_last, right_lo, right_hi, sparse_step, sparse_wrap, n_blocks)
        # a block in the other window's span would count some keys twice: no unmasked rows then
        fa_hi = tl.where(tl.maximum(fa_lo, tb_lo) < tl.minimum(fa_hi, tb_hi), fa_lo, fa_hi)
        fb_hi = tl.where(tl.maximum(fb_lo, ta_lo) < tl.minimum(fb_hi, ta_hi), fb_lo, fb_hi)
    for side in tl.static_range(1 if CAUSAL else 2):
        if side == 0:
            row_lo, row_hi = rows_1_lo, rows_1_hi
            f_lo = tl.where(swap, fb_lo, fa_lo)
            f_hi = tl.where(swap, fb_hi, fa_hi)
        else:
            row_lo, row_hi = rows_2_lo, rows_2_hi
            f_lo = tl.where(swap, fa_lo, fb_lo)
            f_hi = tl.where(swap, fa_hi, fb_hi)
        u_lo, u_hi = _unmasked_rows(row_lo, row_hi, f_lo, f_hi, block_offset, block_size, BLOCK_M)
        for part in tl.static_range(3):  # masked head, unmasked middle, masked tail
            if part == 0:
                w_lo, w_hi = row_lo, u_lo
            elif part == 1:
                w_lo, w_hi = u_lo, u_hi
            else:
                w_lo, w_hi = u_hi, row_hi
            b_dk, b_dv = _sparse_dkdv_heads(
                b_dk, b_dv, b_k, b_v, o_c, p_q, p_do, p_lse, p_delta, i_h0, heads_per_c, stride_qh, stride_doh,
                stride_lh, stride_deh, stride_qn, stride_don, stride_ln, stride_den, o_d * stride_qd,
                o_d * stride_dod, w_lo, w_hi, block_offset, block_size, sparse_step, left_lo, left_hi, right_lo,
                right_hi, qk_scale, qk_scale_lo, BLOCK_M, CAUSAL, EXACT_SCALE, USE_EXP2,
                (n + o_c).to(tl.uint32), drop_seed, drop_bh0, drop_thresh, drop_scale, drop_scale_lo, DROPOUT,
                part != 1, WIN_ALIGN >= BLOCK_N)

    m_key = m_c & (tl.load(SV + i_b.to(tl.int64) * stride_svb + i_hc.to(tl.int64) * stride_svh + o_pc * stride_svn,
                           mask=m_c, other=0) != 0)  # invalid compressed keys were never seen
    b_dk = tl.where(m_key[:, None], _scale(b_dk, sm_scale, sm_scale_lo, EXACT_SCALE), 0.0)
    b_dv = tl.where(m_key[:, None], b_dv, 0.0)
    p_dk = DKC + i_b.to(tl.int64) * stride_dkcb + i_hc.to(tl.int64) * stride_dkch
    p_dv = DVC + i_b.to(tl.int64) * stride_dvcb + i_hc.to(tl.int64) * stride_dvch
    tl.store(p_dk + o_pc[:, None] * stride_dkcn + o_d[None, :] * stride_dkcd, cast_to(b_dk, DKC.dtype.element_ty),
             mask=m_c[:, None])
    tl.store(p_dv + o_pc[:, None] * stride_dvcn + o_d[None, :] * stride_dvcd, cast_to(b_dv, DVC.dtype.element_ty),
             mask=m_c[:, None])


# --------------------------------------------------------------------------------------
# global rows: few rows against every key, split over key chunks (non-causal)
# --------------------------------------------------------------------------------------


@triton.jit
def _lsg_global_rows_fwd_kernel(
    Q, K, V, KM, O, LSE, DROP,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_kmb, stride_kmn,
    stride_os, stride_ob, stride_oh, stride_on, stride_od,
    stride_ls, stride_lb, stride_lh, stride_ln,
    n, n_global, heads_per_kv, chunk, big,
    qk_scale, qk_scale_lo, drop_scale, drop_scale_lo,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_KMASK: tl.constexpr,
    EXACT_SCALE: tl.constexpr, USE_EXP2: tl.constexpr, DROPOUT: tl.constexpr,
):
    # one program = the global rows [0, g) (BLOCK_M >= g) x one chunk of keys; partial out / lse
    i_s, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_hk = i_h // heads_per_kv
    ACC = LSE.dtype.element_ty
    k_begin = i_s * chunk
    k_end = tl.minimum(n, k_begin + chunk)
    k_full = k_begin + (k_end - k_begin) // BLOCK_N * BLOCK_N
    p_q = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    p_k = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    p_v = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
    p_km = KM + i_b.to(tl.int64) * stride_kmb
    o_m = tl.arange(0, BLOCK_M)  # [BM] the global rows' positions
    m_m = o_m < n_global
    o_d = tl.arange(0, HEAD_DIM)
    b_q = tl.load(p_q + o_m[:, None].to(tl.int64) * stride_qn + o_d[None, :] * stride_qd, mask=m_m[:, None],
                  other=0.0)
    b_rk = 0
    drop_thresh = 0
    if DROPOUT:  # the LSG forward's row keys (token positions); this chunk's output dropped with its columns
        drop_seed, drop_thresh = dropout_load(DROP)
        b_rk = dropout_row_keys(dropout_head_key(drop_seed, i_b * tl.num_programs(1) + i_h), o_m)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=ACC)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    for part in tl.static_range(2):  # whole key tiles, then the partial last one
        if part == 0:
            j_lo, j_hi = k_begin, k_full
        else:
            j_lo, j_hi = k_full, k_end
        acc, m_i, l_i = attn_fwd_range(
            acc, m_i, l_i, b_q, o_m, p_k, p_v, p_km, stride_kn, stride_vn, stride_kmn, o_d * stride_kd,
            o_d * stride_vd, j_lo, j_hi, k_begin, k_end, 0, 1, big, big, qk_scale, qk_scale_lo,
            BLOCK_N, part == 1, HAS_KMASK, EXACT_SCALE, USE_EXP2,
            b_rk=b_rk, drop_thresh=drop_thresh, DROPOUT=DROPOUT, DENSE=True)
    m_row = m_m
    if HAS_KMASK:  # padding rows output 0, lse -inf
        m_row = m_row & (tl.load(p_km + o_m.to(tl.int64) * stride_kmn, mask=m_m, other=0) != 0)
    b_o, b_lse = attn_fwd_finalize(acc, m_i, l_i, m_row, USE_EXP2, drop_scale, drop_scale_lo, EXACT_SCALE, DROPOUT)
    p_o = O + i_s.to(tl.int64) * stride_os + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh
    tl.store(p_o + o_m[:, None].to(tl.int64) * stride_on + o_d[None, :] * stride_od,
             cast_to(b_o, O.dtype.element_ty), mask=m_m[:, None])
    p_l = LSE + i_s.to(tl.int64) * stride_ls + i_b.to(tl.int64) * stride_lb + i_h.to(tl.int64) * stride_lh
    tl.store(p_l + o_m.to(tl.int64) * stride_ln, b_lse.to(LSE.dtype.element_ty), mask=m_m)


@triton.jit
def _lsg_global_rows_dq_kernel(
    Q, K, V, KM, DO, LSE, DELTA, DQ, DROP,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_kmb, stride_kmn,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_lb, stride_lh, stride_ln,
    stride_deb, stride_deh, stride_den,
    stride_dqs, stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    n, n_global, heads_per_kv, chunk, big,
    qk_scale, qk_scale_lo, sm_scale, sm_scale_lo, drop_scale, drop_scale_lo,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_KMASK: tl.constexpr,
    EXACT_SCALE: tl.constexpr, USE_EXP2: tl.constexpr, DROPOUT: tl.constexpr,
):
    # the forward's layout; partial dq of one key chunk (summed by the launcher)
    i_s, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_hk = i_h // heads_per_kv
    ACC = DELTA.dtype.element_ty
    k_begin = i_s * chunk
    k_end = tl.minimum(n, k_begin + chunk)
    k_full = k_begin + (k_end - k_begin) // BLOCK_N * BLOCK_N
    p_k = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    p_v = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
    p_km = KM + i_b.to(tl.int64) * stride_kmb
    o_m = tl.arange(0, BLOCK_M)
    m_m = o_m < n_global
    o_pq = o_m.to(tl.int64)
    o_d = tl.arange(0, HEAD_DIM)
    p_q = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    p_do = DO + i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh
    b_q = tl.load(p_q + o_pq[:, None] * stride_qn + o_d[None, :] * stride_qd, mask=m_m[:, None], other=0.0)
    b_do = tl.load(p_do + o_pq[:, None] * stride_don + o_d[None, :] * stride_dod, mask=m_m[:, None], other=0.0)
    b_lse, b_delta = attn_bwd_load_rows(LSE + i_b.to(tl.int64) * stride_lb + i_h.to(tl.int64) * stride_lh,
                                        DELTA + i_b.to(tl.int64) * stride_deb + i_h.to(tl.int64) * stride_deh,
                                        o_pq, stride_ln, stride_den, m_m, True, USE_EXP2)
    b_rk = 0
    drop_thresh = 0
    if DROPOUT:
        drop_seed, drop_thresh = dropout_load(DROP)
        b_rk = dropout_row_keys(dropout_head_key(drop_seed, i_b * tl.num_programs(1) + i_h), o_m)
    b_dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=ACC)
    for part in tl.static_range(2):
        if part == 0:
            j_lo, j_hi = k_begin, k_full
        else:
            j_lo, j_hi = k_full, k_end
        b_dq = attn_bwd_dq_range(
            b_dq, b_q, b_do, b_lse, b_delta, o_m, p_k, p_v, p_km, stride_kn, stride_vn, stride_kmn,
            o_d * stride_kd, o_d * stride_vd, j_lo, j_hi, k_begin, k_end, 0, 1, big, big, qk_scale, qk_scale_lo,
            BLOCK_N, part == 1, HAS_KMASK, EXACT_SCALE, USE_EXP2, b_rk=b_rk, drop_thresh=drop_thresh,
            drop_scale=drop_scale, drop_scale_lo=drop_scale_lo, DROPOUT=DROPOUT, DENSE=True)
    b_dq = _scale(b_dq, sm_scale, sm_scale_lo, EXACT_SCALE)
    p_dq = DQ + i_s.to(tl.int64) * stride_dqs + i_b.to(tl.int64) * stride_dqb + i_h.to(tl.int64) * stride_dqh
    tl.store(p_dq + o_pq[:, None] * stride_dqn + o_d[None, :] * stride_dqd, cast_to(b_dq, DQ.dtype.element_ty),
             mask=m_m[:, None])


@triton.jit
def _lsg_global_rows_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, KM, DK, DV, DROP,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_kmb, stride_kmn,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_lb, stride_lh, stride_ln,
    stride_deb, stride_deh, stride_den,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    n, n_global, heads_per_kv, big,
    qk_scale, qk_scale_lo, sm_scale, sm_scale_lo, drop_scale, drop_scale_lo,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_KMASK: tl.constexpr,
    EXACT_SCALE: tl.constexpr, USE_EXP2: tl.constexpr, DROPOUT: tl.constexpr,
):
    # one program = BLOCK_N keys x the global rows [0, g) (one BLOCK_M step per query head of the kv head)
    i_n, i_hk, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ACC = DELTA.dtype.element_ty
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < n
    o_pk = o_n.to(tl.int64)
    o_d = tl.arange(0, HEAD_DIM)
    p_k = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    p_v = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
    b_k = tl.load(p_k + o_pk[:, None] * stride_kn + o_d[None, :] * stride_kd, mask=m_n[:, None], other=0.0)
    b_v = tl.load(p_v + o_pk[:, None] * stride_vn + o_d[None, :] * stride_vd, mask=m_n[:, None], other=0.0)
    b_dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=ACC)
    b_dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=ACC)
    drop_seed = 0
    drop_thresh = 0
    if DROPOUT:
        drop_seed, drop_thresh = dropout_load(DROP)
    drop_bh0 = i_b * heads_per_kv * tl.num_programs(1)  # b·H (query heads); the keys' columns are o_n
    b_dk, b_dv = attn_bwd_dkdv_heads(
        b_dk, b_dv, b_k, b_v, o_n, Q + i_b.to(tl.int64) * stride_qb, DO + i_b.to(tl.int64) * stride_dob,
        LSE + i_b.to(tl.int64) * stride_lb, DELTA + i_b.to(tl.int64) * stride_deb, i_hk * heads_per_kv,
        heads_per_kv, stride_qh, stride_doh, stride_lh, stride_deh, stride_qn, stride_don, stride_ln, stride_den,
        o_d * stride_qd, o_d * stride_dod, 0, n_global, 0, n_global, 0, 1, big, big, qk_scale, qk_scale_lo,
        BLOCK_M, True, EXACT_SCALE, USE_EXP2, b_kcol=o_n, drop_seed=drop_seed, drop_bh0=drop_bh0,
        drop_thresh=drop_thresh, drop_scale=drop_scale, drop_scale_lo=drop_scale_lo, DROPOUT=DROPOUT)
    m_key = m_n
    if HAS_KMASK:  # padding keys were never seen
        m_key = m_key & (tl.load(KM + i_b.to(tl.int64) * stride_kmb + o_pk * stride_kmn, mask=m_n, other=0) != 0)
    b_dk = tl.where(m_key[:, None], _scale(b_dk, sm_scale, sm_scale_lo, EXACT_SCALE), 0.0)
    b_dv = tl.where(m_key[:, None], b_dv, 0.0)
    p_dk = DK + i_b.to(tl.int64) * stride_dkb + i_hk.to(tl.int64) * stride_dkh
    p_dv = DV + i_b.to(tl.int64) * stride_dvb + i_hk.to(tl.int64) * stride_dvh
    tl.store(p_dk + o_pk[:, None] * stride_dkn + o_d[None, :] * stride_dkd, cast_to(b_dk, DK.dtype.element_ty),
             mask=m_n[:, None])
    tl.store(p_dv + o_pk[:, None] * stride_dvn + o_d[None, :] * stride_dvd, cast_to(b_dv, DV.dtype.element_ty),
             mask=m_n[:, None])


GLOBAL_ROWS_MAX = 64
"""Up to this many global rows, the non-causal global rows' forward and dq run on the kernels above
with a ``max(16, next_power_of_2(g))``-row tile (``BLOCK_N`` 64, 4 warps; the interpreter's block
otherwise); more go through the sliding window's dense path.  (The one global row of LSG's default
filled 1 row of a 128-row tile there: ``python -m bench.tiles``.)"""


def _global_rows_blocks(g: int, d: int):
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` of the global-row kernels.  64-key tiles from D = 32 to
    128; at D = 16 they spilled on sm_90 (Triton 3.9: the dq 8 B; before the masked tile's column test,
    ``DENSE``, the forward with dropout 56 B), 32-key tiles do not (``bench/results/sm90-static-20261203/s26/``)."""
    bm = max(16, next_power_of_2(g))
    if INTERPRET:
        return bm, INTERPRET_BLOCKS["fwd"][1], None, None
    return bm, 64 if 16 < d <= 128 else 32, 4, 2


def _global_rows_chunks(q, n: int):
    b, h = q.shape[:2]
    chunk = _split(b * h, n, q.device)
    return chunk, triton.cdiv(n, chunk)


def _launch_opts(warps, stages) -> dict:
    return {} if warps is None else dict(num_warps=warps, num_stages=stages)


def _global_rows_fwd(q, k, v, a, key_valid):
    """Out / lse of the global rows ``[0, g)`` (non-causal: every non-padding key), ``g <=``
    :data:`GLOBAL_ROWS_MAX`: split over key chunks, merged by log-sum-exp."""
    from ._core import merge_partials
    b, h, n, d = q.shape
    g = a.g
    bm, bn, warps, stages = _global_rows_blocks(g, d)
    chunk, n_split = _global_rows_chunks(q, n)
    acc = acc_dtype(q.dtype)
    o_dst = torch.empty((n_split, b, h, g, d), dtype=acc if n_split > 1 else q.dtype, device=q.device)
    l_dst = torch.empty((n_split, b, h, g), dtype=acc, device=q.device)
    km = _key_mask_i32(key_valid, q)[0]
    _lsg_global_rows_fwd_kernel[(n_split, h, b)](
        Q=q, K=k, V=v, KM=km, O=o_dst, LSE=l_dst, **a.drop, **_strides("q", q), **_strides("k", k),
        **_strides("v", v), **_strides("km", km, "bn"), **_strides("o", o_dst, "sbhnd"),
        **_strides("l", l_dst, "sbhn"), n=n, n_global=g, heads_per_kv=h // a.h_kv, chunk=chunk, big=a.big,
        qk_scale=a.qk_scale, qk_scale_lo=a.qk_scale_lo, HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn,
        HAS_KMASK=key_valid is not None, EXACT_SCALE=a.exact, USE_EXP2=a.use_exp2, **_launch_opts(warps, stages),
    )
    if n_split == 1:
        return o_dst[0], l_dst[0]
    out = torch.empty((b, h, g, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, g), dtype=acc, device=q.device)
    merge_partials(o_dst, l_dst, out, lse)
    return out, lse


def _global_rows_dq(a, t) -> None:
    """dq of the global rows ``[0, g)`` (non-causal, ``g <=`` :data:`GLOBAL_ROWS_MAX`) into ``t.dq``:
    per key chunk, the partials summed."""
    from ._core import sum_partial_rows
    q = t.q
    b, h, n, d = q.shape
    g = a.g
    bm, bn, warps, stages = _global_rows_blocks(g, d)
    chunk, n_split = _global_rows_chunks(q, n)
    dq_dst = torch.empty((n_split, b, h, g, d), dtype=acc_dtype(q.dtype), device=q.device)
    _lsg_global_rows_dq_kernel[(n_split, h, b)](
        Q=q, K=t.k, V=t.v, KM=t.km, DO=t.dout, LSE=t.lse, DELTA=t.delta, DQ=dq_dst, **a.drop,
        **_strides("q", q), **_strides("k", t.k), **_strides("v", t.v), **_strides("km", t.km, "bn"), **t.rows,
        **_strides("dq", dq_dst, "sbhnd"), n=n, n_global=g, heads_per_kv=h // a.h_kv, chunk=chunk, big=a.big,
        qk_scale=a.qk_scale, qk_scale_lo=a.qk_scale_lo, **t.scales, HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn,
        HAS_KMASK=t.key_valid is not None, EXACT_SCALE=a.exact, USE_EXP2=a.use_exp2, **_launch_opts(warps, stages),
    )
    sum_partial_rows(dq_dst, t.dq)


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------


def _check(q, k, v, k_sparse, v_sparse, sparse_valid, key_valid, block_size, sparse_block_size, sparsity_factor,
           num_global_tokens, block_offset) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"q must be [B, H, N, D] and k, v [B, H_kv, N, D]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    b, h, n, d = q.shape
    if k.shape[0] != b or k.shape[2] != n or k.shape[3] != d or h % k.shape[1] != 0:
        raise ValueError(f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)} "
                         "(need the same B, N and D, and H % H_kv == 0)")
    if d not in HEAD_DIMS:
        raise ValueError(f"head dim must be one of {HEAD_DIMS} for the Triton kernels, got {d}")
    for name, val, low in (("block_size", block_size, 1), ("sparse_block_size", sparse_block_size, 0),
                           ("sparsity_factor", sparsity_factor, 1), ("num_global_tokens", num_global_tokens, 0),
                           ("block_offset", block_offset, 0)):
        if val < low:
            raise ValueError(f"{name} must be >= {low}, got {val}")
    if key_valid is not None and (key_valid.shape != (b, n) or key_valid.dtype != torch.bool):
        raise ValueError(f"key_valid must be a [B, N] = {(b, n)} bool tensor, got {tuple(key_valid.shape)} "
                         f"{key_valid.dtype}")
    if (k_sparse is None) != (v_sparse is None) or (k_sparse is None) != (sparse_valid is None):
        raise ValueError("k_sparse, v_sparse and sparse_valid go together: give all three or none")
    if k_sparse is None:
        return
    if block_size % sparsity_factor:
        raise ValueError(f"sparsity_factor ({sparsity_factor}) must divide block_size ({block_size})")
    hc = k_sparse.shape[1]
    if (k_sparse.dim() != 4 or v_sparse.shape != k_sparse.shape or k_sparse.shape[0] != b
            or k_sparse.shape[3] != d or h % hc != 0):
        raise ValueError(f"k_sparse, v_sparse must be [B, Hc, Tc, D] with H % Hc == 0, got {tuple(k_sparse.shape)}, "
                         f"{tuple(v_sparse.shape)} for q {tuple(q.shape)}")
    if (sparse_valid.dim() != 3 or sparse_valid.dtype != torch.bool or sparse_valid.shape[0] != b
            or sparse_valid.shape[1] not in (1, hc) or sparse_valid.shape[2] != k_sparse.shape[2]):
        raise ValueError(f"sparse_valid must be a [B, 1 | Hc, Tc] bool tensor matching k_sparse "
                         f"{tuple(k_sparse.shape)}, got {tuple(sparse_valid.shape)} {sparse_valid.dtype}")


def _dense_fwd(q, k, v, rows: int, causal: bool, scale: float, key_valid, dropout: dict):
    """Rows ``[0, rows)`` see every key (``j <= i`` when causal): the sliding-window dense path.
    Its rows and key indices are token positions, so its dropout (``dropout``: ``dropout_p``,
    ``dropout_state``) is LSG's."""
    valid_rows = None if key_valid is None else key_valid[:, :rows]
    if causal:  # row i < rows sees keys [0, i]: a band over the first `rows` tokens
        return sliding_window_fwd(q[:, :, :rows], k[:, :, :rows], v[:, :, :rows], window=(rows, 0), scale=scale,
                                  query_mask=valid_rows, key_mask=valid_rows, **dropout)
    return sliding_window_fwd(q[:, :, :rows], k, v, window=None, scale=scale, query_mask=valid_rows,
                              key_mask=key_valid, **dropout)


def _dense_bwd(dout, q, k, v, out, lse, rows: int, causal: bool, scale: float, key_valid, dropout: dict):
    """Gradients of :func:`_dense_fwd`: ``dq [B, H, rows, D]``, ``dk, dv`` over the keys it saw
    (``[B, H_kv, rows, D]`` when causal, else ``[B, H_kv, N, D]``)."""
    sl = (slice(None), slice(None), slice(0, rows))
    if causal:
        return sliding_window_bwd(dout[sl], q[sl], k[sl], v[sl], out[sl], lse[sl], window=(rows, 0), scale=scale,
                                  key_mask=None if key_valid is None else key_valid[:, :rows], **dropout)
    return sliding_window_bwd(dout[sl], q[sl], k, v, out[sl], lse[sl], window=None, scale=scale, key_mask=key_valid,
                              **dropout)


class _Args:
    """Host-side arithmetic shared by the launchers."""

    def __init__(self, q, k, k_sparse, block_size, sparse_block_size, sparsity_factor, num_global_tokens,
                 block_offset, causal, scale, dropout_p, dropout_state, sparse_windows):
        b, h, n, d = q.shape
        self.scale = d ** -0.5 if scale is None else float(scale)
        self.qk_scale, self.qk_scale_lo, self.exact, self.use_exp2 = split_scale(self.scale, q.dtype)
        # dS -> dq/dk use the plain scale (split into float32 halves for float64, like qk_scale)
        self.sm_scale, self.sm_scale_lo = (self.qk_scale, self.qk_scale_lo) if self.exact else (self.scale, 0.0)
        self.n, self.h, self.h_kv = n, h, k.shape[1]
        self.g = min(num_global_tokens, n)
        self.o = block_offset
        self.bs = block_size
        self.causal = causal
        self.n_blocks = triton.cdiv(n - block_offset, block_size)
        self.has_sparse = k_sparse is not None and k_sparse.shape[2] > 0 and sparse_block_size > 0
        self.n_c = k_sparse.shape[2] if self.has_sparse else 0
        self.h_c = k_sparse.shape[1] if self.has_sparse else self.h_kv
        self.big = 2 * (n + self.n_c) + 1024  # "no band": wider than any index difference
        self.common = dict(
            n=n, n_global=self.g, block_offset=block_offset, block_size=block_size, big=self.big,
            qk_scale=self.qk_scale, qk_scale_lo=self.qk_scale_lo, HEAD_DIM=d, CAUSAL=causal,
            EXACT_SCALE=self.exact, USE_EXP2=self.use_exp2,
        )
        # without compressed keys the sparse arguments are unused, and the factor may exceed the block
        step = block_size // sparsity_factor if self.has_sparse else max(1, block_size // sparsity_factor)
        (l_lo, l_hi), (r_lo, r_hi) = _windows(sparse_windows, step, sparse_block_size, causal)
        wrap = (max(abs(l_lo), abs(l_hi), abs(r_lo), abs(r_hi)) + step) // step + 1
        self.sparse = dict(n_c=self.n_c, sparse_step=step, left_lo=l_lo, left_hi=l_hi, right_lo=r_lo, right_hi=r_hi,
                           sparse_wrap=wrap, heads_per_c=h // self.h_c)
        self.win_align = _window_align(step, (l_lo, l_hi), (r_lo, r_hi))
        self.block_align = _pow2_divisor(block_size, block_offset)  # the forward / dq kernels' BLOCK_ALIGN
        # attention dropout: the sliding-window launchers' keywords and the LSG kernels'
        self.dropout = dict(dropout_p=dropout_p, dropout_state=dropout_state)
        self.drop = _dropout_args(dropout_p, dropout_state, q)


def _windows(sparse_windows, step: int, sparse_block_size: int, causal: bool):
    """The ``((left_lo, left_hi), (right_lo, right_hi))`` offsets of :meth:`lhattn.LSG.sparse_windows`
    (None: the regular ones of ``sparse_block_size``); causal: the left one only."""
    if sparse_windows is None:
        sparse_windows = ((-step - sparse_block_size, -step), (2 * step, 2 * step + sparse_block_size))
    try:
        (l_lo, l_hi), (r_lo, r_hi) = sparse_windows
        ints = [int(x) for x in (l_lo, l_hi, r_lo, r_hi)]
    except (TypeError, ValueError):
        raise ValueError(f"sparse_windows must be ((left_lo, left_hi), (right_lo, right_hi)) ints, "
                         f"got {sparse_windows!r}") from None
    left, right = (ints[0], max(ints[1], ints[0])), (ints[2], max(ints[3], ints[2]))
    return left, ((0, 0) if causal else right)


WINDOW_ALIGN_MAX = 1024
"""Cap of :func:`_pow2_divisor` / :func:`_window_align` (above every kernel tile)."""


def _pow2_divisor(*values: int) -> int:
    """The largest power of two (at most :data:`WINDOW_ALIGN_MAX`) dividing every value (0 divides nothing:
    all zeros give the cap)."""
    g = 0
    for x in values:
        g = math.gcd(g, abs(int(x)))
    return WINDOW_ALIGN_MAX if g == 0 else min(g & -g, WINDOW_ALIGN_MAX)


def _window_align(step: int, left: Tuple[int, int], right: Tuple[int, int]) -> int:
    """The compressed-key dk/dv kernel's ``WIN_ALIGN``: the largest power of two (at most
    :data:`WINDOW_ALIGN_MAX`) dividing ``s`` and every window offset, so that a key tile of ``BLOCK_N``
    (a power of two) dividing it lies wholly inside or wholly outside each window of every block; 0
    when the two windows of a block meet (a key seen twice by one row: the kernel's window test)."""
    (l_lo, l_hi), (r_lo, r_hi) = left, right
    if l_lo < l_hi and r_lo < r_hi and max(l_lo, r_lo) < min(l_hi, r_hi):
        return 0
    return _pow2_divisor(step, l_lo, l_hi, r_lo, r_hi)


def _sparse_args(k_sparse, v_sparse, sparse_valid, like):
    if k_sparse is None or k_sparse.shape[2] == 0:
        dummy = like.new_zeros((1, 1, 1, 1))
        return dummy, dummy, like.new_zeros((1, 1, 1), dtype=torch.uint8), 0
    sv = _mask_u8(sparse_valid, like)
    return k_sparse, v_sparse, sv, (sv.stride(1) if sv.shape[1] > 1 else 0)


def lsg_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_sparse: Optional[torch.Tensor] = None,
    v_sparse: Optional[torch.Tensor] = None,
    sparse_valid: Optional[torch.Tensor] = None,
    *,
    block_size: int,
    sparse_block_size: int,
    sparsity_factor: int,
    num_global_tokens: int,
    block_offset: int = 0,
    causal: bool = False,
    scale: Optional[float] = None,
    key_valid: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    dropout_state: Optional[torch.Tensor] = None,
    sparse_windows: Optional[Tuple[Tuple[int, int], Tuple[int, int]]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """LSG attention forward over the given compressed keys.

    Args:
        q: ``[B, H, N, D]``; k, v: ``[B, H_kv, N, D]`` (``H % H_kv == 0``); any strides.
        k_sparse, v_sparse: ``[B, Hc, Tc, D]`` compressed keys/values (``H % Hc == 0``; ``Hc = H``
            for ``bos_pooling`` under GQA), or None (no sparse keys).
        sparse_valid: ``[B, 1 | Hc, Tc]`` bool, True = the compressed key may be attended to.
        block_size, sparse_block_size, sparsity_factor, num_global_tokens, causal: the fields of
            :class:`lhattn.LSG`; block_offset: ``o``, the first token of block 0.
        key_valid: ``[B, N]`` bool, False = padding (never seen; padding rows give 0 / -inf).
        scale: softmax scale (default ``D ** -0.5``).
        dropout_p, dropout_state: attention dropout (:mod:`lhattn._dropout`): ``p`` in ``[0, 1)``
            and, when ``p > 0``, the state ``int64 [2] = (seed, T)`` on q's device.  A token key's
            column is its position, compressed key ``p``'s is ``N + p``; ``lse`` is undropped.
        sparse_windows: ``((left_lo, left_hi), (right_lo, right_hi))``, the compressed keys
            ``[t·s + lo, t·s + hi)`` that block ``t`` sees per side (:meth:`lhattn.LSG.sparse_windows`;
            a key in both counts twice); None = the regular windows of ``sparse_block_size``.

    Returns:
        ``out [B, H, N, D]`` (q's dtype, contiguous) and ``lse [B, H, N]`` (float32; float64 for
        float64 inputs; ``-inf`` where a row sees no key).
    """
    _check(q, k, v, k_sparse, v_sparse, sparse_valid, key_valid, block_size, sparse_block_size, sparsity_factor,
           num_global_tokens, block_offset)
    a = _Args(q, k, k_sparse, block_size, sparse_block_size, sparsity_factor, num_global_tokens, block_offset,
              causal, scale, dropout_p, dropout_state, sparse_windows)
    if is_short(a.n, block_size, block_offset):
        return _dense_fwd(q, k, v, a.n, causal, a.scale, key_valid, a.dropout)
    b, h, n, d = q.shape
    out = torch.empty((b, h, n, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, n), dtype=acc_dtype(q.dtype), device=q.device)
    kc, vc, sv, s_svh = _sparse_args(k_sparse, v_sparse, sparse_valid, q)
    km = _key_mask_i32(key_valid, q)[0]

    def grid(meta):
        return (a.n_blocks * triton.cdiv(block_size, meta["BLOCK_M"]), h, b)

    _lsg_fwd_kernel[grid](
        Q=q, K=k, V=v, KC=kc, VC=vc, SV=sv, KM=km, O=out, LSE=lse, **a.drop,
        **_strides("q", q), **_strides("k", k), **_strides("v", v), **_strides("kc", kc), **_strides("vc", vc),
        stride_svb=sv.stride(0), stride_svh=s_svh, stride_svn=sv.stride(2), **_strides("km", km, "bn"),
        **_strides("o", out), **_strides("l", lse, "bhn"),
        heads_per_kv=h // a.h_kv, **a.sparse, **a.common,
        HAS_SPARSE=a.has_sparse, HAS_KMASK=key_valid is not None, BLOCK_ALIGN=a.block_align, **_meta("fwd"),
    )
    if a.g > 0:  # global rows: every key (j <= i when causal)
        if _global_rows_own(a):
            out_g, lse_g = _global_rows_fwd(q, k, v, a, key_valid)
        else:  # the sliding window's dense path
            out_g, lse_g = _dense_fwd(q, k, v, a.g, causal, a.scale, key_valid, a.dropout)
        out[:, :, :a.g] = out_g
        lse[:, :, :a.g] = lse_g
    return out, lse


def lsg_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    k_sparse: Optional[torch.Tensor] = None,
    v_sparse: Optional[torch.Tensor] = None,
    sparse_valid: Optional[torch.Tensor] = None,
    *,
    block_size: int,
    sparse_block_size: int,
    sparsity_factor: int,
    num_global_tokens: int,
    block_offset: int = 0,
    causal: bool = False,
    scale: Optional[float] = None,
    key_valid: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    dropout_state: Optional[torch.Tensor] = None,
    sparse_windows: Optional[Tuple[Tuple[int, int], Tuple[int, int]]] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of :func:`lsg_fwd` (same arguments, plus ``dout``, ``out``, ``lse``; the same
    ``dropout_state`` regenerates the forward's dropped entries).

    Returns ``dq [B, H, N, D]``, ``dk, dv [B, H_kv, N, D]`` (summed over the query heads of each
    kv head) and ``dk_sparse, dv_sparse [B, Hc, Tc, D]`` (None without compressed keys), all in
    the input dtype and contiguous.  Padding rows/keys and invalid compressed keys get 0.
    """
    _check(q, k, v, k_sparse, v_sparse, sparse_valid, key_valid, block_size, sparse_block_size, sparsity_factor,
           num_global_tokens, block_offset)
    a = _Args(q, k, k_sparse, block_size, sparse_block_size, sparsity_factor, num_global_tokens, block_offset,
              causal, scale, dropout_p, dropout_state, sparse_windows)
    if is_short(a.n, block_size, block_offset):
        dq, dk, dv = _dense_bwd(dout, q, k, v, out, lse, a.n, causal, a.scale, key_valid, a.dropout)
        return dq, dk, dv, None, None
    t = _BwdTensors(a, dout, q, k, v, out, lse, k_sparse, v_sparse, sparse_valid, key_valid)
    dk_in, dv_in = _bwd_global_rows(a, t)
    _bwd_dq(a, t)
    _bwd_dkdv_local(a, t, dk_in, dv_in)
    _bwd_global_keys(a, t)
    if not a.has_sparse:
        return t.dq, t.dk, t.dv, None, None
    dkc, dvc = _bwd_dkdv_sparse(a, t)
    return t.dq, t.dk, t.dv, dkc, dvc


class _BwdTensors:
    """The backward's inputs as the kernels take them, its outputs ``dq, dk, dv`` (allocated here,
    filled by the passes below) and the keyword groups shared by its launches."""

    def __init__(self, a: _Args, dout, q, k, v, out, lse, k_sparse, v_sparse, sparse_valid, key_valid):
        self.dout, self.q, self.k, self.v, self.lse, self.key_valid = dout, q, k, v, lse, key_valid
        self.kc, self.vc, self.sv, self.s_svh = _sparse_args(k_sparse, v_sparse, sparse_valid, q)
        self.km = _key_mask_i32(key_valid, q)[0]
        self.delta = bwd_preprocess(out, dout)  # [B, H, N]
        self.out = out
        self.scales = dict(sm_scale=a.sm_scale, sm_scale_lo=a.sm_scale_lo)
        self.rows = dict(**_strides("do", dout), **_strides("l", lse, "bhn"), **_strides("de", self.delta, "bhn"))
        self.dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        self.dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        self.dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)


_GLOBAL_ROWS_DKDV_BN_WIDE = 16
"""Keys per program of :func:`_global_rows_dkdv` at D > 128 (64 up to D = 128): ``dk, dv [BLOCK_N, D]``
stay in registers (sm_90, ``bench/results/sm90-static-20261203/d256``: 64 keys on 4 warps took 247
registers and spilled 1080 B at D = 256; 16 keys take 85-87 and spill nothing)."""


def _global_rows_dkdv(a, t):
    """The global rows' share of dk/dv over every key (non-causal, ``g <=`` :data:`GLOBAL_ROWS_MAX`):
    ``dk, dv [B, H_kv, N, D]`` in k's dtype, one program per ``BLOCK_N`` keys."""
    b, h, n, d = t.q.shape
    bm, _, warps, stages = _global_rows_blocks(a.g, d)
    bn = INTERPRET_BLOCKS["dkdv"][1] if INTERPRET else (64 if d <= 128 else _GLOBAL_ROWS_DKDV_BN_WIDE)
    dk = torch.empty(t.k.shape, dtype=t.k.dtype, device=t.k.device)
    dv = torch.empty(t.v.shape, dtype=t.v.dtype, device=t.v.device)
    _lsg_global_rows_dkdv_kernel[(triton.cdiv(n, bn), a.h_kv, b)](
        Q=t.q, K=t.k, V=t.v, DO=t.dout, LSE=t.lse, DELTA=t.delta, KM=t.km, DK=dk, DV=dv, **a.drop,
        **_strides("q", t.q), **_strides("k", t.k), **_strides("v", t.v), **_strides("km", t.km, "bn"), **t.rows,
        **_strides("dk", dk), **_strides("dv", dv), n=n, n_global=a.g, heads_per_kv=h // a.h_kv, big=a.big,
        qk_scale=a.qk_scale, qk_scale_lo=a.qk_scale_lo, **t.scales, HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn,
        HAS_KMASK=t.key_valid is not None, EXACT_SCALE=a.exact, USE_EXP2=a.use_exp2, **_launch_opts(warps, stages),
    )
    return dk, dv


def _global_rows_own(a: _Args) -> bool:
    """Whether the global rows go through :func:`_global_rows_fwd` / :func:`_global_rows_dq` (else
    the sliding window's dense path, which also gives their dk/dv share)."""
    return not a.causal and 0 < a.g <= GLOBAL_ROWS_MAX


def _bwd_global_rows(a: _Args, t: _BwdTensors):
    """Global rows (their own kernels or the dense path): their dq and the global keys' share of dk/dv;
    returns their ``dk, dv [B, H_kv, N, D]`` over every key (non-causal: the global rows see the non-global
    keys too, their share is added by the local dk/dv kernel), else ``(None, None)``."""
    if a.g == 0:
        return None, None
    g = a.g
    if _global_rows_own(a):  # the global-row kernels above
        _global_rows_dq(a, t)
        dk_g, dv_g = _global_rows_dkdv(a, t)
        t.dk[:, :, :g] = dk_g[:, :, :g]
        t.dv[:, :, :g] = dv_g[:, :, :g]
        return dk_g, dv_g
    dq_g, dk_g, dv_g = _dense_bwd(t.dout, t.q, t.k, t.v, t.out, t.lse, g, a.causal, a.scale, t.key_valid, a.dropout)
    t.dq[:, :, :g] = dq_g
    t.dk[:, :, :g] = dk_g[:, :, :g]
    t.dv[:, :, :g] = dv_g[:, :, :g]
    return (None, None) if a.causal else (dk_g, dv_g)


def _bwd_dq(a: _Args, t: _BwdTensors) -> None:
    """dq of the non-global rows: one program per ``BLOCK_M`` rows of an LSG block."""
    b, h = t.q.shape[:2]

    def grid(meta):
        return (a.n_blocks * triton.cdiv(a.bs, meta["BLOCK_M"]), h, b)

    _lsg_bwd_dq_kernel[grid](
        Q=t.q, K=t.k, V=t.v, KC=t.kc, VC=t.vc, SV=t.sv, KM=t.km, DO=t.dout, LSE=t.lse, DELTA=t.delta, DQ=t.dq,
        **a.drop, **_strides("q", t.q), **_strides("k", t.k), **_strides("v", t.v), **_strides("kc", t.kc),
        **_strides("vc", t.vc), stride_svb=t.sv.stride(0), stride_svh=t.s_svh, stride_svn=t.sv.stride(2),
        **_strides("km", t.km, "bn"), **t.rows, **_strides("dq", t.dq), heads_per_kv=h // a.h_kv, **a.sparse,
        **a.common, **t.scales, HAS_SPARSE=a.has_sparse, HAS_KMASK=t.key_valid is not None,
        BLOCK_ALIGN=a.block_align, **_meta("dq"),
    )


def _bwd_dkdv_local(a: _Args, t: _BwdTensors, dk_in, dv_in) -> None:
    """dk/dv of the non-global keys from the local rows (one program per key tile of an LSG block),
    plus ``dk_in, dv_in`` (the global rows' share) when given."""
    b, h = t.q.shape[:2]
    dki = dk_in if dk_in is not None else t.dk
    dvi = dv_in if dv_in is not None else t.dv

    def grid(meta):
        return (a.n_blocks * triton.cdiv(a.bs, meta["BLOCK_N"]), a.h_kv, b)

    _lsg_bwd_dkdv_local_kernel[grid](
        Q=t.q, K=t.k, V=t.v, DO=t.dout, LSE=t.lse, DELTA=t.delta, KM=t.km, DKI=dki, DVI=dvi, DK=t.dk, DV=t.dv,
        **a.drop, **_strides("q", t.q), **_strides("k", t.k), **_strides("v", t.v), **_strides("km", t.km, "bn"),
        **t.rows, **_strides("dki", dki), **_strides("dvi", dvi), **_strides("dk", t.dk), **_strides("dv", t.dv),
        heads_per_kv=h // a.h_kv, **t.scales, **a.common,
        HAS_KMASK=t.key_valid is not None, HAS_DK_IN=dk_in is not None, **_meta("dkdv"),
    )


def _bwd_global_keys(a: _Args, t: _BwdTensors) -> None:
    """dk/dv of the global keys from the non-global rows ``[g, N)`` (every one of them sees them;
    padding keys excluded): the shared helper of the families with global tokens (rows split into
    chunks, partials summed), added to the dense path's share already in ``dk, dv``."""
    n, g = a.n, a.g
    if not 0 < g < n:
        return
    b, _, _, d = t.q.shape
    q, k, v, dout, lse, delta = t.q, t.k, t.v, t.dout, t.lse, t.delta
    sl = (slice(None), slice(None), slice(g, None))
    gidx = torch.arange(g, device=q.device).expand(b, g)
    if t.key_valid is not None:
        gidx = torch.where(t.key_valid[:, :g], gidx, torch.full_like(gidx, -1))
    rows_g = dict(**_strides("q", q[sl]), **_strides("k", k), **_strides("v", v), **_strides("do", dout[sl]),
                  **_strides("l", lse[sl], "bhn"), **_strides("de", delta[sl], "bhn"),
                  qk_scale=a.qk_scale, qk_scale_lo=a.qk_scale_lo, HEAD_DIM=d, EXACT_SCALE=a.exact,
                  USE_EXP2=a.use_exp2, **t.scales)
    # dropout: row m of this call is token g + m
    drop_rows = torch.arange(g, n, device=q.device).expand(b, n - g) if a.dropout["dropout_p"] > 0.0 else None
    add_global_key_grads(dout[sl], q[sl], k, v, lse[sl], delta[sl], gidx.contiguous(), t.dk, t.dv, rows_g,
                         **a.dropout, drop_rows=drop_rows)


def _bwd_dkdv_sparse(a: _Args, t: _BwdTensors):
    """``dk_sparse, dv_sparse``: one program per tile of compressed keys."""
    b = t.q.shape[0]
    dkc = torch.empty(t.kc.shape, dtype=t.kc.dtype, device=t.kc.device)
    dvc = torch.empty(t.vc.shape, dtype=t.vc.dtype, device=t.vc.device)

    def grid(meta):
        return (triton.cdiv(a.n_c, meta["BLOCK_N"]), a.h_c, b)

    _lsg_bwd_dkdv_sparse_kernel[grid](
        Q=t.q, KC=t.kc, VC=t.vc, SV=t.sv, DO=t.dout, LSE=t.lse, DELTA=t.delta, DKC=dkc, DVC=dvc, **a.drop,
        **_strides("q", t.q), **_strides("kc", t.kc), **_strides("vc", t.vc),
        stride_svb=t.sv.stride(0), stride_svh=t.s_svh, stride_svn=t.sv.stride(2), **t.rows,
        **_strides("dkc", dkc), **_strides("dvc", dvc), **a.sparse, **t.scales, **a.common, **_meta("dkdv"),
        WIN_ALIGN=a.win_align,
    )
    return dkc, dvc
