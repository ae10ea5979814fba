"""Segment-local (HAT) attention: Triton kernels and plain launchers.

The **segment pass** of :class:`lhattn.Segments`: query row ``i`` sees the key rows of
its own segment ``[start_i, end_i)`` (filtered by ``key_mask``), plus an optional list of
extra keys (the global tokens) that every row sees.  Segments are either fixed
(``segment_size S``: ``[s·S, (s+1)·S)``, the last one possibly shorter; computed from
positions, nothing is loaded) or given per batch row as ``segment_bounds = (start, end)``
(``[B, N]`` each, from :func:`lhattn._index.segment_bounds`; any lengths, including 1).
The global rows (every key) are a dense pass of :mod:`kernels.sliding_window`, composed
by ``lhattn.autograd.segment``.

Block ranges.  Segments are contiguous, so the keys seen by *some* row of the query block
``[r0, r1]`` are ``[start_{r0}, end_{r1})`` and those seen by *every* row are
``[start_{r1}, end_{r0})`` (empty when the block spans several segments).  A program
visits only key blocks meeting the first interval; blocks inside the second one skip the
segment mask (Triton tutorial 06's split of masked edge blocks and unmasked full blocks).
The element mask is the per-row interval ``start_i <= j < end_i`` -- the band test of
:mod:`kernels._core` with per-row bounds -- never a comparison of ids.  The dk/dv pass is
the same with rows and keys swapped (a segment is symmetric: key ``j`` is seen by the
rows ``[start_j, end_j)``).

Launchers (no autograd here):

* :func:`segment_fwd` ``-> (out [B, H, N, D], lse [B, H, N])``
* :func:`segment_bwd` ``-> (dq, dk, dv)``

Attention dropout (``dropout_p > 0``, :mod:`lhattn._dropout`'s rule, ``DROPOUT`` constexpr):
rows and key columns are token positions (shifted by ``drop_row_offset`` / ``drop_col_offset``,
listed keys' columns given as ``drop_cols``, for a call on part of a sequence); every kernel
regenerates the keep bits of the scores it visits from the dropout state, as in
:mod:`kernels.sliding_window`.

Memory: ``out``, ``lse`` and, in the backward, ``delta [B, H, N]``; global-key gradients
add ``[S, B, H_kv, G, D]`` partials (``G`` global tokens).  Nothing of size ``N × S``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._core import (HEAD_DIMS, INTERPRET, acc_dtype, attn_bwd_dkdv_band, attn_bwd_dq_band, attn_bwd_dq_list,
                    attn_bwd_load_rows, attn_fwd_band, attn_fwd_finalize, attn_fwd_list, bwd_preprocess,
                    dropout_head_key, dropout_load, dropout_row_keys, next_power_of_2, _scale)
from ._launch import (INTERPRET_BLOCKS, _bwd_common, _check_qkv, _dkdv_configs, _drop_cols_arg, _drop_offset_args,
                      _fwd_configs, _global_keys_arg, _mask_arg, _meta_for, _scale_args, _segment_one_sided_for,
                      _strides, _token_dropout_args, _tuned)
# The gradient of the keys every row sees is a whole pass of the sliding-window family (public).
from .sliding_window import add_global_key_grads

__all__ = ["segment_fwd", "segment_bwd", "HEAD_DIMS", "INTERPRET_BLOCKS"]

_meta = _meta_for(globals())  # block sizes under the interpreter: this module's INTERPRET_BLOCKS
_one_sided = _segment_one_sided_for(globals())  # the band walk's one-sided edges (fixed, tile-aligned segments)


# --------------------------------------------------------------------------------------
# jit helpers: segments and block ranges
# --------------------------------------------------------------------------------------


@triton.jit
def _segments(o_t, m_t, n, p_start, p_end, stride_sn, stride_en, seg_size, FIXED: tl.constexpr):
    """``(start, end)`` (int32) of the segments of tokens ``o_t`` (a block or a scalar):
    token ``t`` is in ``[start, end)``.  ``FIXED``: ``[t // S · S, min(n, that + S))``,
    else loaded from the bounds; tokens with ``m_t`` False get the empty ``[0, 0)``."""
    if FIXED:
        b_start = o_t // seg_size * seg_size
        b_end = tl.minimum(b_start + seg_size, n)
    else:
        b_start = tl.load(p_start + o_t * stride_sn, mask=m_t, other=0).to(tl.int32)
        b_end = tl.load(p_end + o_t * stride_en, mask=m_t, other=0).to(tl.int32)
    return b_start, b_end


@triton.jit
def _segment_block_range(start_first, end_first, start_last, end_last, BLOCK_OTHER: tl.constexpr):
    """Blocks of the other axis for a block whose first token's segment is
    ``[start_first, end_first)`` and last token's ``[start_last, end_last)``.

    Returns ``(lo, full_lo, full_hi, hi)``: visit ``[lo, full_lo)`` and ``[full_hi, hi)``
    in steps of ``BLOCK_OTHER`` with the element mask and ``[full_lo, full_hi)`` without
    (those are inside ``[start_last, end_first)``: in every token's segment).
    """
    lo = start_first // BLOCK_OTHER * BLOCK_OTHER
    hi = end_last
    hi_up = tl.cdiv(hi, BLOCK_OTHER) * BLOCK_OTHER
    full_lo = tl.minimum(tl.maximum(tl.cdiv(start_last, BLOCK_OTHER) * BLOCK_OTHER, lo), hi_up)
    full_hi = tl.maximum(end_first // BLOCK_OTHER * BLOCK_OTHER, full_lo)
    return lo, full_lo, full_hi, hi


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------


@_tuned(_fwd_configs(), key=["HEAD_DIM", "SEG", "HAS_GLOBAL", "DROPOUT", "ONE_SIDED"], kind="fwd", cap_d64=True)
@triton.jit
def _seg_fwd_kernel(
    Q, K, V, O, LSE, QM, KM, GIDX, SEG_START, SEG_END, DROP, DCOL,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_lb, stride_lh, stride_ln,
    stride_qmb, stride_qmn, stride_kmb, stride_kmn, stride_gb, stride_gn, stride_dcb, stride_dcn,
    stride_ssb, stride_ssn, stride_seb, stride_sen,
    n, n_glob, heads_per_kv, seg_size,
    qk_scale, qk_scale_lo, drop_scale, drop_scale_lo, drop_row_off, drop_col_off, SEG,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FIXED: tl.constexpr,
    HAS_QMASK: tl.constexpr, HAS_KMASK: tl.constexpr, HAS_GLOBAL: tl.constexpr,
    EXACT_SCALE: tl.constexpr, USE_EXP2: tl.constexpr, DROPOUT: tl.constexpr, DROP_COLS: tl.constexpr,
    ONE_SIDED: tl.constexpr,
):
    # program -> query block i_m; head; batch row
    i_m, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_hk = i_h // heads_per_kv
    ACC = LSE.dtype.element_ty

    p_q = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    p_k = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    p_v = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
    p_km = KM + i_b.to(tl.int64) * stride_kmb
    p_ss = SEG_START + i_b.to(tl.int64) * stride_ssb
    p_se = SEG_END + i_b.to(tl.int64) * stride_seb

    i_first = i_m * BLOCK_M
    i_last = tl.minimum(n, i_first + BLOCK_M) - 1
    o_m = i_first + tl.arange(0, BLOCK_M)  # [BM]
    m_m = o_m < n
    o_d = tl.arange(0, HEAD_DIM)
    b_q = tl.load(p_q + o_m[:, None].to(tl.int64) * stride_qn + o_d[None, :] * stride_qd, mask=m_m[:, None],
                  other=0.0)  # [BM, D]
    drop_thresh, b_rk = 0, 0
    if DROPOUT:  # rows and key columns are token positions (+ drop_row_off / drop_col_off)
        drop_seed, drop_thresh = dropout_load(DROP)
        b_rk = dropout_row_keys(dropout_head_key(drop_seed, i_b * tl.num_programs(1) + i_h), o_m + drop_row_off)

    # row i sees key j iff start_i <= j < end_i, i.e. i - before <= j <= i + after
    b_start, b_end = _segments(o_m, m_m, n, p_ss, p_se, stride_ssn, stride_sen, seg_size, FIXED)  # [BM]
    before = (o_m - b_start)[:, None]  # [BM, 1]
    after = (b_end - 1 - o_m)[:, None]  # [BM, 1]
    s_first, e_first = _segments(i_first, i_first < n, n, p_ss, p_se, stride_ssn, stride_sen, seg_size, FIXED)
    s_last, e_last = _segments(i_last, i_last < n, n, p_ss, p_se, stride_ssn, stride_sen, seg_size, FIXED)
    lo, full_lo, full_hi, hi = _segment_block_range(s_first, e_first, s_last, e_last, BLOCK_N)

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=ACC)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    # segment-edge blocks (masked), blocks inside every row's segment (unmasked), edge again
    acc, m_i, l_i = attn_fwd_band(
        acc, m_i, l_i, b_q, o_m, p_k, p_v, p_km, stride_kn, stride_vn, stride_kmn, o_d * stride_kd,
        o_d * stride_vd, lo, full_lo, full_hi, hi, s_first, e_last, 0, 1, before, after, qk_scale, qk_scale_lo,
        BLOCK_N, HAS_KMASK, EXACT_SCALE, USE_EXP2, b_rk=b_rk, col_offset=drop_col_off, drop_thresh=drop_thresh,
        DROPOUT=DROPOUT,
        # per-token bounds: 128 registers (16 warps/SM at 8 warps) instead of 160; a key mask: 125 instead of
        # 163 on the one-sided band tiles (sm_90, D = 64)
        RANGE_LOOPS=not FIXED or HAS_KMASK, ONE_SIDED=ONE_SIDED)
    if HAS_GLOBAL:
        acc, m_i, l_i = attn_fwd_list(
            acc, m_i, l_i, b_q, GIDX + i_b.to(tl.int64) * stride_gb, stride_gn, n_glob, p_k, p_v,
            stride_kn, stride_vn, o_d * stride_kd, o_d * stride_vd, qk_scale, qk_scale_lo,
            BLOCK_N, EXACT_SCALE, USE_EXP2, b_rk=b_rk, col_offset=drop_col_off, drop_thresh=drop_thresh,
            DROPOUT=DROPOUT, p_col=DCOL + i_b.to(tl.int64) * stride_dcb, stride_col=stride_dcn, LIST_COLS=DROP_COLS)

    m_row = m_m
    if HAS_QMASK:
        m_row = m_row & (tl.load(QM + i_b.to(tl.int64) * stride_qmb + o_m * stride_qmn, mask=m_m, other=0) != 0)
    b_o, b_lse = attn_fwd_finalize(acc, m_i, l_i, m_row, USE_EXP2, drop_scale, drop_scale_lo, EXACT_SCALE, DROPOUT)

    p_o = O + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh
    tl.store(p_o + o_m[:, None].to(tl.int64) * stride_on + o_d[None, :] * stride_od, b_o.to(O.dtype.element_ty),
             mask=m_m[:, None])
    p_l = LSE + i_b.to(tl.int64) * stride_lb + i_h.to(tl.int64) * stride_lh
    tl.store(p_l + o_m * stride_ln, b_lse.to(LSE.dtype.element_ty), mask=m_m)


@_tuned(_fwd_configs(), key=["HEAD_DIM", "SEG", "HAS_GLOBAL", "DROPOUT", "ONE_SIDED"], kind="dq")
@triton.jit
def _seg_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KM, GIDX, SEG_START, SEG_END, DROP, DCOL,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_lb, stride_lh, stride_ln,
    stride_deb, stride_deh, stride_den,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    stride_kmb, stride_kmn, stride_gb, stride_gn, stride_dcb, stride_dcn,
    stride_ssb, stride_ssn, stride_seb, stride_sen,
    n, n_glob, heads_per_kv, seg_size,
    qk_scale, qk_scale_lo, sm_scale, sm_scale_lo, drop_scale, drop_scale_lo, drop_row_off, drop_col_off, SEG,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FIXED: tl.constexpr,
    HAS_KMASK: tl.constexpr, HAS_GLOBAL: tl.constexpr, EXACT_SCALE: tl.constexpr, USE_EXP2: tl.constexpr,
    DROPOUT: tl.constexpr, DROP_COLS: tl.constexpr, ONE_SIDED: tl.constexpr,
):
    i_m, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_hk = i_h // heads_per_kv
    ACC = DELTA.dtype.element_ty

    p_q = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    p_do = DO + i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh
    p_k = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    p_v = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
    p_km = KM + i_b.to(tl.int64) * stride_kmb
    p_lse = LSE + i_b.to(tl.int64) * stride_lb + i_h.to(tl.int64) * stride_lh
    p_delta = DELTA + i_b.to(tl.int64) * stride_deb + i_h.to(tl.int64) * stride_deh
    p_ss = SEG_START + i_b.to(tl.int64) * stride_ssb
    p_se = SEG_END + i_b.to(tl.int64) * stride_seb

    i_first = i_m * BLOCK_M
    i_last = tl.minimum(n, i_first + BLOCK_M) - 1
    o_m = i_first + tl.arange(0, BLOCK_M)  # [BM]
    m_m = o_m < n
    o_pm = o_m.to(tl.int64)
    o_d = tl.arange(0, HEAD_DIM)
    b_q = tl.load(p_q + o_pm[:, None] * stride_qn + o_d[None, :] * stride_qd, mask=m_m[:, None], other=0.0)
    b_do = tl.load(p_do + o_pm[:, None] * stride_don + o_d[None, :] * stride_dod, mask=m_m[:, None], other=0.0)
    b_lse, b_delta = attn_bwd_load_rows(p_lse, p_delta, o_pm, stride_ln, stride_den, m_m, True, USE_EXP2)
    drop_thresh, b_rk = 0, 0
    if DROPOUT:
        drop_seed, drop_thresh = dropout_load(DROP)
        b_rk = dropout_row_keys(dropout_head_key(drop_seed, i_b * tl.num_programs(1) + i_h), o_pm + drop_row_off)

    b_start, b_end = _segments(o_m, m_m, n, p_ss, p_se, stride_ssn, stride_sen, seg_size, FIXED)
    before = (o_m - b_start)[:, None]  # [BM, 1]
    after = (b_end - 1 - o_m)[:, None]  # [BM, 1]
    s_first, e_first = _segments(i_first, i_first < n, n, p_ss, p_se, stride_ssn, stride_sen, seg_size, FIXED)
    s_last, e_last = _segments(i_last, i_last < n, n, p_ss, p_se, stride_ssn, stride_sen, seg_size, FIXED)
    lo, full_lo, full_hi, hi = _segment_block_range(s_first, e_first, s_last, e_last, BLOCK_N)

    b_dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=ACC)
    b_dq = attn_bwd_dq_band(
        b_dq, b_q, b_do, b_lse, b_delta, o_m, p_k, p_v, p_km, stride_kn, stride_vn, stride_kmn,
        o_d * stride_kd, o_d * stride_vd, lo, full_lo, full_hi, hi, s_first, e_last, 0, 1, before, after,
        qk_scale, qk_scale_lo, BLOCK_N, HAS_KMASK, EXACT_SCALE, USE_EXP2, b_rk=b_rk, col_offset=drop_col_off,
        drop_thresh=drop_thresh, drop_scale=drop_scale, drop_scale_lo=drop_scale_lo, DROPOUT=DROPOUT,
        RANGE_LOOPS=HEAD_DIM > 128,  # D = 256 (mma.sync tiles): unmasked tile 309 SASS vs 366 with the band tiles
        ONE_SIDED=ONE_SIDED)
    if HAS_GLOBAL:
        b_dq = attn_bwd_dq_list(
            b_dq, b_q, b_do, b_lse, b_delta, GIDX + i_b.to(tl.int64) * stride_gb, stride_gn, n_glob,
            p_k, p_v, stride_kn, stride_vn, o_d * stride_kd, o_d * stride_vd, qk_scale, qk_scale_lo,
            BLOCK_N, EXACT_SCALE, USE_EXP2, b_rk=b_rk, col_offset=drop_col_off, drop_thresh=drop_thresh,
            drop_scale=drop_scale, drop_scale_lo=drop_scale_lo, DROPOUT=DROPOUT,
            p_col=DCOL + i_b.to(tl.int64) * stride_dcb, stride_col=stride_dcn, LIST_COLS=DROP_COLS)
    b_dq = _scale(b_dq, sm_scale, sm_scale_lo, EXACT_SCALE)

    p_dq = DQ + i_b.to(tl.int64) * stride_dqb + i_h.to(tl.int64) * stride_dqh
    tl.store(p_dq + o_pm[:, None] * stride_dqn + o_d[None, :] * stride_dqd, b_dq.to(DQ.dtype.element_ty),
             mask=m_m[:, None])


@_tuned(_dkdv_configs(), key=["HEAD_DIM", "SEG", "DROPOUT", "ONE_SIDED", "SPLIT_END"], kind="dkdv")
@triton.jit
def _seg_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, KM, SEG_START, SEG_END, DROP,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_lb, stride_lh, stride_ln,
    stride_deb, stride_deh, stride_den,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_kmb, stride_kmn,
    stride_ssb, stride_ssn, stride_seb, stride_sen,
    n, heads_per_kv, seg_size,
    qk_scale, qk_scale_lo, sm_scale, sm_scale_lo, drop_scale, drop_scale_lo, drop_row_off, drop_col_off, SEG,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FIXED: tl.constexpr,
    HAS_KMASK: tl.constexpr, EXACT_SCALE: tl.constexpr, USE_EXP2: tl.constexpr, DROPOUT: tl.constexpr,
    ONE_SIDED: tl.constexpr, SPLIT_END: tl.constexpr,
):
    # one program = one block of BLOCK_N keys of one kv head, summed over its query heads
    i_n, i_hk, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ACC = DELTA.dtype.element_ty

    j_first = i_n * BLOCK_N
    j_last = tl.minimum(n, j_first + BLOCK_N) - 1
    o_n = j_first + tl.arange(0, BLOCK_N)  # [BN]
    m_n = o_n < n
    o_pk = o_n.to(tl.int64)
    o_d = tl.arange(0, HEAD_DIM)
    p_k = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    p_v = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
    b_k = tl.load(p_k + o_pk[:, None] * stride_kn + o_d[None, :] * stride_kd, mask=m_n[:, None], other=0.0)
    b_v = tl.load(p_v + o_pk[:, None] * stride_vn + o_d[None, :] * stride_vd, mask=m_n[:, None], other=0.0)
    b_dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=ACC)
    b_dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=ACC)

    # key j is seen by the rows of its segment: start_j <= i < end_j, i.e. with the core's
    # band convention (row i sees j iff i - before <= j <= i + after):
    p_ss = SEG_START + i_b.to(tl.int64) * stride_ssb
    p_se = SEG_END + i_b.to(tl.int64) * stride_seb
    b_start, b_end = _segments(o_n, m_n, n, p_ss, p_se, stride_ssn, stride_sen, seg_size, FIXED)
    before = (b_end - 1 - o_n)[:, None]  # [BN, 1]
    after = (o_n - b_start)[:, None]  # [BN, 1]
    s_first, e_first = _segments(j_first, j_first < n, n, p_ss, p_se, stride_ssn, stride_sen, seg_size, FIXED)
    s_last, e_last = _segments(j_last, j_last < n, n, p_ss, p_se, stride_ssn, stride_sen, seg_size, FIXED)
    lo, full_lo, full_hi, hi = _segment_block_range(s_first, e_first, s_last, e_last, BLOCK_M)
    drop_seed, drop_thresh = 0, 0
    if DROPOUT:  # row keys are rebuilt per query head from the seed; key columns = key positions
        drop_seed, drop_thresh = dropout_load(DROP)

    # query heads of this kv head and their row blocks run in one flat loop per band segment
    b_dk, b_dv = attn_bwd_dkdv_band(
        b_dk, b_dv, b_k, b_v, o_n, Q + i_b.to(tl.int64) * stride_qb, DO + i_b.to(tl.int64) * stride_dob,
        LSE + i_b.to(tl.int64) * stride_lb, DELTA + i_b.to(tl.int64) * stride_deb, i_hk * heads_per_kv,
        heads_per_kv, stride_qh, stride_doh, stride_lh, stride_deh, stride_qn, stride_don, stride_ln, stride_den,
        o_d * stride_qd, o_d * stride_dod, lo, full_lo, full_hi, hi, s_first, e_last, 0, 1, before, after,
        qk_scale, qk_scale_lo, BLOCK_M, EXACT_SCALE, USE_EXP2, b_kcol=o_pk + drop_col_off, drop_seed=drop_seed,
        drop_bh0=i_b * heads_per_kv * tl.num_programs(1), drop_thresh=drop_thresh, drop_scale=drop_scale,
        drop_scale_lo=drop_scale_lo, DROPOUT=DROPOUT, drop_row_off=drop_row_off, ONE_SIDED=ONE_SIDED,
        SPLIT_END=SPLIT_END)

    # keys the segment pass does not see (padding, global) get nothing from it
    m_key = m_n
    if HAS_KMASK:
        m_key = m_key & (tl.load(KM + i_b.to(tl.int64) * stride_kmb + o_pk * stride_kmn, mask=m_n, other=0) != 0)
    b_dk = tl.where(m_key[:, None], _scale(b_dk, sm_scale, sm_scale_lo, EXACT_SCALE), 0.0)
    b_dv = tl.where(m_key[:, None], b_dv, 0.0)
    p_dk = DK + i_b.to(tl.int64) * stride_dkb + i_hk.to(tl.int64) * stride_dkh
    p_dv = DV + i_b.to(tl.int64) * stride_dvb + i_hk.to(tl.int64) * stride_dvh
    tl.store(p_dk + o_pk[:, None] * stride_dkn + o_d[None, :] * stride_dkd, b_dk.to(DK.dtype.element_ty),
             mask=m_n[:, None])
    tl.store(p_dv + o_pk[:, None] * stride_dvn + o_d[None, :] * stride_dvd, b_dv.to(DV.dtype.element_ty),
             mask=m_n[:, None])


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_size: Optional[int],
           segment_bounds: Optional[Tuple[torch.Tensor, torch.Tensor]]) -> None:
    _check_qkv(q, k, v, same_length=True)
    b, h, n, d = q.shape
    if n >= 2 ** 31:
        raise ValueError(f"sequence length must be < 2**31 (32-bit token indices), got {n}")
    if (segment_size is None) == (segment_bounds is None):
        raise ValueError("give exactly one of segment_size and segment_bounds, got "
                         f"segment_size={segment_size} and segment_bounds="
                         f"{'given' if segment_bounds is not None else None}")
    if segment_size is not None:
        if isinstance(segment_size, bool) or not isinstance(segment_size, int) or segment_size < 1:
            raise ValueError(f"segment_size must be an int >= 1, got {segment_size!r}")
        return
    if not isinstance(segment_bounds, (tuple, list)) or len(segment_bounds) != 2:
        raise ValueError(f"segment_bounds must be a (start, end) pair of [B, N] tensors, got {segment_bounds!r}")
    for name, t in zip(("start", "end"), segment_bounds):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (b, n) or t.dtype not in (torch.int32, torch.int64) \
                or t.device != q.device:
            got = (f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, torch.Tensor)
                   else type(t).__name__)
            raise ValueError(f"segment_bounds {name} must be a [B, N] = {(b, n)} int64/int32 tensor on "
                             f"{q.device}, got {got}")


def _fixed(q: torch.Tensor, segment_size: Optional[int]) -> Optional[int]:
    """The kernels' fixed segment size (``seg_size`` of :func:`_segment_args`), None for per-token bounds."""
    return None if segment_size is None else min(segment_size, q.shape[2])


def _segment_args(segment_size: Optional[int], segment_bounds, q: torch.Tensor) -> dict:
    """Kernel arguments describing the segments (fixed size, or per-token bounds)."""
    n = q.shape[2]
    if segment_size is not None:
        size = min(segment_size, n)  # one segment covering everything if S >= N (no int32 overflow)
        dummy = q.new_zeros((1, 1), dtype=torch.int64)
        return dict(SEG_START=dummy, SEG_END=dummy, stride_ssb=0, stride_ssn=0, stride_seb=0, stride_sen=0,
                    seg_size=size, SEG=min(next_power_of_2(size), 4096), FIXED=True)
    start, end = segment_bounds
    return dict(SEG_START=start, SEG_END=end, **_strides("ss", start, "bn"), **_strides("se", end, "bn"),
                seg_size=0, SEG=0, FIXED=False)


def segment_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    segment_size: Optional[int] = None,
    segment_bounds: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    scale: Optional[float] = None,
    query_mask: Optional[torch.Tensor] = None,
    key_mask: Optional[torch.Tensor] = None,
    global_keys: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    dropout_state: Optional[torch.Tensor] = None,
    drop_row_offset: int = 0,
    drop_col_offset: int = 0,
    drop_cols: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Segment-local attention forward.

    Args:
        q: ``[B, H, N, D]``; k, v: ``[B, H_kv, N, D]`` (``H % H_kv == 0``); any strides.
        segment_size: ``S >= 1``: token ``i`` is in the segment ``[i // S · S, min(N, (i // S + 1) · S))``.
        segment_bounds: ``(start, end)``, each ``[B, N]`` int64 (or int32): token ``i`` of batch
            row ``b`` is in ``[start[b, i], end[b, i])`` -- contiguous segments, as returned by
            :func:`lhattn._index.segment_bounds`.  Exactly one of the two is given.
        query_mask: ``[B, N]`` bool, False rows get ``out = 0``, ``lse = -inf``.
        key_mask: ``[B, N]`` bool, False keys are not seen by the segment part.
        global_keys: ``[B, G]`` int64 positions into k/v (negative = empty slot) that every
            query row also sees; must be distinct and disjoint from the ``key_mask``-visible
            keys (else they count twice).
        scale: softmax scale (default ``D ** -0.5``).
        dropout_p: attention dropout on the probabilities, in ``[0, 1)`` (:mod:`lhattn._dropout`).
        dropout_state: int64 ``[2] = (seed, T)`` on q's device; needed when ``dropout_p > 0``.
        drop_row_offset, drop_col_offset, drop_cols: the dropout positions of a call on part of a
            sequence, as in :func:`kernels.sliding_window.sliding_window_fwd`.

    Returns:
        ``out [B, H, N, D]`` (q's dtype, contiguous) and ``lse [B, H, N]`` (float32;
        float64 for float64 inputs; ``-inf`` where a row sees no key; the undropped softmax's).
    """
    _check(q, k, v, segment_size, segment_bounds)
    drop = _token_dropout_args(dropout_p, dropout_state, q)
    drop.update(**_drop_offset_args(dropout_p, drop_row_offset, drop_col_offset),
                **_drop_cols_arg(dropout_p, drop_cols, global_keys, q))
    b, h, n, d = q.shape
    h_kv = k.shape[1]
    qm, s_qmb, s_qmn = _mask_arg(query_mask, q)
    km, s_kmb, s_kmn = _mask_arg(key_mask, q)
    gidx, n_glob = _global_keys_arg(global_keys, q)

    out = torch.empty((b, h, n, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, n), dtype=acc_dtype(q.dtype), device=q.device)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]), h, b)

    _seg_fwd_kernel[grid](
        Q=q, K=k, V=v, O=out, LSE=lse, QM=qm, KM=km, GIDX=gidx,
        **_strides("q", q), **_strides("k", k), **_strides("v", v), **_strides("o", out),
        **_strides("l", lse, "bhn"), stride_qmb=s_qmb, stride_qmn=s_qmn, stride_kmb=s_kmb, stride_kmn=s_kmn,
        **_strides("g", gidx, "bn"), n=n, n_glob=n_glob, heads_per_kv=h // h_kv, **_scale_args(scale, q),
        HEAD_DIM=d, HAS_QMASK=query_mask is not None, HAS_KMASK=key_mask is not None, HAS_GLOBAL=n_glob > 0,
        **_segment_args(segment_size, segment_bounds, q), **drop, **_meta("fwd"),
        **_one_sided("fwd", _fixed(q, segment_size)),
    )
    return out, lse


def _dkdv_one_sided(d: int, seg_size: Optional[int], dropout: bool) -> dict:
    """``ONE_SIDED`` / ``SPLIT_END`` of the dk/dv launch (:func:`._launch._segment_one_sided_for`).  Moving the
    query tile that holds the sequence end to the right edge (``SPLIT_END``) shortened the left edge's tiles on
    sm_90 with Triton 3.9 and 3.6 at D = 16 to 256 (D = 64: 457 -> 434 SASS instructions;
    ``bench/results/sm90-static-20261203/s26/``), but with dropout at D = 16 it lengthened both kinds of tile
    (Triton 3.9: the unmasked one 1010 -> 1042): not there."""
    one = _one_sided("dkdv", seg_size)
    if dropout and d <= 16:
        one["SPLIT_END"] = False
    return one


def segment_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    segment_size: Optional[int] = None,
    segment_bounds: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    scale: Optional[float] = None,
    key_mask: Optional[torch.Tensor] = None,
    global_keys: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    dropout_state: Optional[torch.Tensor] = None,
    drop_row_offset: int = 0,
    drop_col_offset: int = 0,
    drop_cols: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`segment_fwd` (same arguments; ``query_mask`` is not needed:
    masked rows carry ``lse = -inf`` and get zero gradients).  ``out`` is the (dropped)
    output of the forward, the same dropout arguments regenerate its keep bits.

    Returns ``dq [B, H, N, D]``, ``dk, dv [B, H_kv, N, D]`` in the input dtype
    (contiguous); dk/dv are summed over the query heads of each kv head (GQA).
    """
    _check(q, k, v, segment_size, segment_bounds)
    b, h, n, d = q.shape
    h_kv = k.shape[1]
    km, s_kmb, s_kmn = _mask_arg(key_mask, q)
    gidx, n_glob = _global_keys_arg(global_keys, q)
    seg = _segment_args(segment_size, segment_bounds, q)
    drop = _token_dropout_args(dropout_p, dropout_state, q)
    drop.update(_drop_offset_args(dropout_p, drop_row_offset, drop_col_offset))
    cols = _drop_cols_arg(dropout_p, drop_cols, global_keys, q)  # the dq pass over the listed keys only

    delta = bwd_preprocess(out, dout)  # [B, H, N]; rowsum(dO ∘ O) of the dropped O
    common = _bwd_common(q, k, v, dout, lse, delta, scale)  # strides, scales, HEAD_DIM
    kw = dict(KM=km, stride_kmb=s_kmb, stride_kmn=s_kmn, HAS_KMASK=key_mask is not None, heads_per_kv=h // h_kv,
              **seg, **common, **drop)

    # dq: one program per query block (its segment keys + the global keys)
    dq = torch.empty((b, h, n, d), dtype=q.dtype, device=q.device)

    def grid_dq(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]), h, b)

    _seg_bwd_dq_kernel[grid_dq](
        Q=q, K=k, V=v, DO=dout, LSE=lse, DELTA=delta, DQ=dq, GIDX=gidx, **_strides("dq", dq),
        **_strides("g", gidx, "bn"), n=n, n_glob=n_glob, HAS_GLOBAL=n_glob > 0, **kw, **cols, **_meta("dq"),
        **_one_sided("dq", _fixed(q, segment_size)),
    )

    # dk, dv: one program per key block and kv head (segment part)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)

    def grid_kv(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), h_kv, b)

    _seg_bwd_dkdv_kernel[grid_kv](
        Q=q, K=k, V=v, DO=dout, LSE=lse, DELTA=delta, DK=dk, DV=dv, **_strides("dk", dk), **_strides("dv", dv),
        n=n, **kw, **_meta("dkdv"), **_dkdv_one_sided(d, _fixed(q, segment_size), drop["DROPOUT"]),
    )

    if n_glob > 0:  # the global keys are seen by every (local) row
        add_global_key_grads(dout, q, k, v, lse, delta, gidx, dk, dv, common, dropout_p=dropout_p,
                             dropout_state=dropout_state, drop_row_offset=drop_row_offset,
                             drop_col_offset=drop_col_offset, drop_cols=drop_cols)
    return dq, dk, dv
