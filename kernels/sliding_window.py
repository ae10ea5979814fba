"""Sliding-window (Longformer) attention: Triton kernels and plain launchers.

One kernel family serves both passes of :class:`lhattn.SlidingWindow`:

* the **band pass** -- every query row ``i`` sees the key rows ``i + m·d``,
  ``-left <= m <= right`` (inclusive), filtered by ``key_mask``, plus an optional list
  of extra keys (the global tokens) that every row sees;
* the **dense pass** (``window=None``) -- every query row sees every key allowed by
  ``key_mask``; used for the few global rows (gathered beforehand), split over key
  chunks when there are too few rows to fill the GPU and merged by log-sum-exp.

Dilation ``d`` is handled without masking: the tokens ``r, r+d, r+2d, ...`` of each
residue ``r`` form an ordinary sliding window of ``(left, right)`` neighbours, so each
program works on one residue class through strided addressing, and only the
band-edge blocks are masked, exactly as without dilation.

Attention dropout (``dropout_p > 0``, the rule of :mod:`lhattn._dropout`, ``DROPOUT``
constexpr): every kernel regenerates the keep bits of the scores it visits from the
dropout state; a query row's token position is its position in ``q`` (the residue's
``r + t·d``), or ``drop_rows[b, m]`` for gathered rows (the global rows of the dense
pass); a key's column is its token position.  A call on part of a sequence (a
context-parallel rank) shifts both by ``drop_row_offset`` / ``drop_col_offset`` (runtime
scalars) and may give the listed keys' columns as ``drop_cols``.  A dense pass split over key
chunks drops each chunk's partial output with that chunk's columns; the log-sum-exp merge stays
exact (dropout is linear in ``P`` and ``lse`` is the undropped one).

Launchers (no autograd here):

* :func:`sliding_window_fwd` ``-> (out [B, H, Nq, D], lse [B, H, Nq])``
* :func:`sliding_window_bwd` ``-> (dq, dk, dv)`` (its passes: ``_bwd_dq``, ``_bwd_dkdv``,
  :func:`add_global_key_grads`)

Launch plumbing (strides, masks, dropout arguments, tuning, block sizes under the interpreter)
comes from :mod:`._launch`, shared with the other families.

Memory: ``out``, ``lse`` (float32; float64 for float64 inputs) and, in the backward,
``delta [B, H, Nq]``; split passes add ``[S, B, H, M, D]`` partials only for the
few rows/keys they split (``M`` = number of global tokens).  Nothing of size
``N × window``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._core import (HEAD_DIMS, INTERPRET, acc_dtype, attn_bwd_dkdv_band, attn_bwd_dkdv_heads, attn_bwd_dq_band,
                    attn_bwd_dq_list, attn_bwd_load_rows, attn_fwd_band, attn_fwd_finalize, attn_fwd_list, block_range,
                    bwd_preprocess, cast_to, dropout_head_key, dropout_load, dropout_row_keys,
                    merge_partials, next_power_of_2, sum_partial_rows, _scale)
from ._launch import (INTERPRET_BLOCKS, INTERPRET_SPLIT_CHUNK, _D256_NARROW_DKDV, _bwd_common, _check_qkv, _configs,
                      _dkdv_configs, _drop_cols_arg, _drop_offset_args, _dropout_args, _fwd_configs, _global_keys_arg,
                      _key_mask_i32, _mask_arg, _meta_for, _one_sided_for, _pruner, _scale_args, _split_for,
                      _strides, _tuned, _TUNED_FOR_3_9)

__all__ = ["sliding_window_fwd", "sliding_window_bwd", "add_global_key_grads", "HEAD_DIMS", "INTERPRET_BLOCKS"]

# under the interpreter: block sizes from this module's INTERPRET_BLOCKS, split chunks from its
# INTERPRET_SPLIT_CHUNK (module attributes, so that tests can change them for this family)
_meta = _meta_for(globals())
_split = _split_for(globals())
_one_sided = _one_sided_for(globals())  # the band walk's one-sided edges, from this module's INTERPRET_BLOCKS


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _dropout_rows(DROP, p_drow, o_pos, m_rows, i_bh, DROP_ROWS: tl.constexpr, row_off):
    """``(T, row keys [BM])`` of the dropout rule for the query rows at positions ``o_pos [BM]``
    (int64) of query head ``i_bh = b·H + h``.  A row's token position is its position, or with
    ``DROP_ROWS`` the int64 ``p_drow[position]`` (gathered rows; ``m_rows`` masks the load), plus
    ``row_off`` (``drop_row_off``: a call on part of a sequence)."""
    drop_seed, drop_thresh = dropout_load(DROP)
    if DROP_ROWS:
        o_tok = tl.load(p_drow + o_pos, mask=m_rows, other=0)
    else:
        o_tok = o_pos
    return drop_thresh, dropout_row_keys(dropout_head_key(drop_seed, i_bh), o_tok + row_off)


@triton.jit
def _fwd_listed_keys(acc, m_i, l_i, b_q, GIDX, DCOL, i_b, stride_gb, stride_gn, stride_dcb, stride_dcn, n_glob,
                     p_k, p_v, stride_kn, stride_vn, o_kd, o_vd, qk_scale, qk_scale_lo, BLOCK_N: tl.constexpr,
                     EXACT_SCALE: tl.constexpr, USE_EXP2: tl.constexpr, b_rk, drop_col_off, drop_thresh,
                     DROPOUT: tl.constexpr, DROP_COLS: tl.constexpr):
    """The forward's listed (global) keys of batch row ``i_b``: :func:`._core.attn_fwd_list` over ``GIDX[i_b]``,
    dropout columns their positions (``+ drop_col_off``) or, with ``DROP_COLS``, ``DCOL[i_b]``."""
    return attn_fwd_list(
        acc, m_i, l_i, b_q, GIDX + i_b.to(tl.int64) * stride_gb, stride_gn, n_glob, p_k, p_v, stride_kn, stride_vn,
        o_kd, o_vd, qk_scale, qk_scale_lo, BLOCK_N, EXACT_SCALE, USE_EXP2, b_rk=b_rk, col_offset=drop_col_off,
        drop_thresh=drop_thresh, DROPOUT=DROPOUT, p_col=DCOL + i_b.to(tl.int64) * stride_dcb, stride_col=stride_dcn,
        LIST_COLS=DROP_COLS)


@_tuned(_fwd_configs(), key=["HEAD_DIM", "SPAN", "HAS_GLOBAL", "DROPOUT", "ONE_SIDED", "DENSE"], kind="fwd",
        cap_d64=True)
@triton.jit
def _sw_fwd_kernel(
    Q, K, V, O, LSE, QM, KM, GIDX, DROP, DROW, DCOL,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_os, stride_ob, stride_oh, stride_on, stride_od,
    stride_ls, stride_lb, stride_lh, stride_ln,
    stride_qmb, stride_qmn, stride_kmb, stride_kmn, stride_gb, stride_gn, stride_drb, stride_dcb, stride_dcn,
    n_q, n_k, n_glob, heads_per_kv, left, right, dilation, chunk, n_split,
    qk_scale, qk_scale_lo, drop_scale, drop_scale_lo, drop_row_off, drop_col_off, SPAN,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_QMASK: tl.constexpr, HAS_KMASK: tl.constexpr, HAS_GLOBAL: tl.constexpr,
    EXACT_SCALE: tl.constexpr, USE_EXP2: tl.constexpr, DROPOUT: tl.constexpr, DROP_ROWS: tl.constexpr,
    DROP_COLS: tl.constexpr, ONE_SIDED: tl.constexpr, DENSE: tl.constexpr,
):
    # program -> (query block i_m, key chunk i_s, residue i_r); heads; batch
    i_blk, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_r = i_blk % dilation
    i_s = (i_blk // dilation) % n_split
    i_m = i_blk // (dilation * n_split)
    n_sq = (n_q - i_r + dilation - 1) // dilation  # query rows of this residue
    if i_m * BLOCK_M >= n_sq:
        return
    n_sk = (n_k - i_r + dilation - 1) // dilation
    k_begin = i_s * chunk
    k_end = tl.minimum(n_sk, k_begin + chunk)
    i_hk = i_h // heads_per_kv
    ACC = LSE.dtype.element_ty

    p_q = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    p_k = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    p_v = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
    p_km = KM + i_b.to(tl.int64) * stride_kmb

    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] query indices within the residue
    m_m = o_m < n_sq
    o_pq = (i_r + o_m * dilation).to(tl.int64)  # [BM] query positions
    o_d = tl.arange(0, HEAD_DIM)
    b_q = tl.load(p_q + o_pq[:, None] * stride_qn + o_d[None, :] * stride_qd, mask=m_m[:, None], other=0.0)
    drop_thresh, b_rk = 0, 0
    if DROPOUT:  # key columns = key positions; this chunk's output is dropped with its own columns
        drop_thresh, b_rk = _dropout_rows(DROP, DROW + i_b.to(tl.int64) * stride_drb, o_pq, m_m,
                                          i_b * tl.num_programs(1) + i_h, DROP_ROWS, drop_row_off)

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=ACC)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)

    # keys every row sees, at absolute positions (never split: n_split == 1 here): before the band at D = 64,
    # where the list's pointers then are dead during the band walk (bench.sm90: 128 registers, 16 warps/SM,
    # instead of 131 and 8), after it elsewhere (D = 128: 198 registers instead of 206)
    LIST_FIRST: tl.constexpr = HEAD_DIM == 64
    if HAS_GLOBAL and LIST_FIRST:
        acc, m_i, l_i = _fwd_listed_keys(acc, m_i, l_i, b_q, GIDX, DCOL, i_b, stride_gb, stride_gn, stride_dcb,
                                         stride_dcn, n_glob, p_k, p_v, stride_kn, stride_vn, o_d * stride_kd,
                                         o_d * stride_vd, qk_scale, qk_scale_lo, BLOCK_N, EXACT_SCALE, USE_EXP2,
                                         b_rk, drop_col_off, drop_thresh, DROPOUT, DROP_COLS)
    lo, full_lo, full_hi, hi = block_range(i_m * BLOCK_M, left, right, k_begin, k_end, BLOCK_M, BLOCK_N)
    # left band edge (masked), full blocks (no band mask), right band edge (masked)
    acc, m_i, l_i = attn_fwd_band(
        acc, m_i, l_i, b_q, o_m, p_k, p_v, p_km, stride_kn, stride_vn, stride_kmn, o_d * stride_kd,
        o_d * stride_vd, lo, full_lo, full_hi, hi, k_begin, k_end, i_r, dilation, left, right, qk_scale, qk_scale_lo,
        BLOCK_N, HAS_KMASK, EXACT_SCALE, USE_EXP2, b_rk=b_rk, col_offset=drop_col_off, drop_thresh=drop_thresh,
        DROPOUT=DROPOUT, ONE_SIDED=ONE_SIDED, DENSE=DENSE)
    if HAS_GLOBAL and not LIST_FIRST:
        acc, m_i, l_i = _fwd_listed_keys(acc, m_i, l_i, b_q, GIDX, DCOL, i_b, stride_gb, stride_gn, stride_dcb,
                                         stride_dcn, n_glob, p_k, p_v, stride_kn, stride_vn, o_d * stride_kd,
                                         o_d * stride_vd, qk_scale, qk_scale_lo, BLOCK_N, EXACT_SCALE, USE_EXP2,
                                         b_rk, drop_col_off, drop_thresh, DROPOUT, DROP_COLS)

    m_row = m_m
    if HAS_QMASK:
        m_row = m_row & (tl.load(QM + i_b.to(tl.int64) * stride_qmb + o_pq * stride_qmn, mask=m_m, other=0) != 0)
    b_o, b_lse = attn_fwd_finalize(acc, m_i, l_i, m_row, USE_EXP2, drop_scale, drop_scale_lo, EXACT_SCALE, DROPOUT)

    p_o = O + i_s.to(tl.int64) * stride_os + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh
    tl.store(p_o + o_pq[:, None] * stride_on + o_d[None, :] * stride_od, cast_to(b_o, O.dtype.element_ty),
             mask=m_m[:, None])
    p_l = LSE + i_s.to(tl.int64) * stride_ls + i_b.to(tl.int64) * stride_lb + i_h.to(tl.int64) * stride_lh
    tl.store(p_l + o_pq * stride_ln, b_lse.to(LSE.dtype.element_ty), mask=m_m)


@_tuned(_fwd_configs(), key=["HEAD_DIM", "SPAN", "HAS_GLOBAL", "DROPOUT", "ONE_SIDED", "DENSE"], kind="dq")
@triton.jit
def _sw_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KM, GIDX, DROP, DROW, DCOL,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_lb, stride_lh, stride_ln,
    stride_deb, stride_deh, stride_den,
    stride_dqs, stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    stride_kmb, stride_kmn, stride_gb, stride_gn, stride_drb, stride_dcb, stride_dcn,
    n_q, n_k, n_glob, heads_per_kv, left, right, dilation, chunk, n_split,
    qk_scale, qk_scale_lo, sm_scale, sm_scale_lo, drop_scale, drop_scale_lo, drop_row_off, drop_col_off, SPAN,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_KMASK: tl.constexpr, HAS_GLOBAL: tl.constexpr, EXACT_SCALE: tl.constexpr, USE_EXP2: tl.constexpr,
    DROPOUT: tl.constexpr, DROP_ROWS: tl.constexpr, DROP_COLS: tl.constexpr, ONE_SIDED: tl.constexpr,
    DENSE: tl.constexpr,
):
    i_blk, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_r = i_blk % dilation
    i_s = (i_blk // dilation) % n_split
    i_m = i_blk // (dilation * n_split)
    n_sq = (n_q - i_r + dilation - 1) // dilation
    if i_m * BLOCK_M >= n_sq:
        return
    n_sk = (n_k - i_r + dilation - 1) // dilation
    k_begin = i_s * chunk
    k_end = tl.minimum(n_sk, k_begin + chunk)
    i_hk = i_h // heads_per_kv
    ACC = DELTA.dtype.element_ty

    p_q = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    p_do = DO + i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh
    p_k = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    p_v = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
    p_km = KM + i_b.to(tl.int64) * stride_kmb
    p_lse = LSE + i_b.to(tl.int64) * stride_lb + i_h.to(tl.int64) * stride_lh
    p_delta = DELTA + i_b.to(tl.int64) * stride_deb + i_h.to(tl.int64) * stride_deh

    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < n_sq
    o_pq = (i_r + o_m * dilation).to(tl.int64)
    o_d = tl.arange(0, HEAD_DIM)
    b_q = tl.load(p_q + o_pq[:, None] * stride_qn + o_d[None, :] * stride_qd, mask=m_m[:, None], other=0.0)
    b_do = tl.load(p_do + o_pq[:, None] * stride_don + o_d[None, :] * stride_dod, mask=m_m[:, None], other=0.0)
    b_lse, b_delta = attn_bwd_load_rows(p_lse, p_delta, o_pq, stride_ln, stride_den, m_m, True, USE_EXP2)
    drop_thresh, b_rk = 0, 0
    if DROPOUT:
        drop_thresh, b_rk = _dropout_rows(DROP, DROW + i_b.to(tl.int64) * stride_drb, o_pq, m_m,
                                          i_b * tl.num_programs(1) + i_h, DROP_ROWS, drop_row_off)

    b_dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=ACC)
    lo, full_lo, full_hi, hi = block_range(i_m * BLOCK_M, left, right, k_begin, k_end, BLOCK_M, BLOCK_N)
    b_dq = attn_bwd_dq_band(
        b_dq, b_q, b_do, b_lse, b_delta, o_m, p_k, p_v, p_km, stride_kn, stride_vn, stride_kmn,
        o_d * stride_kd, o_d * stride_vd, lo, full_lo, full_hi, hi, k_begin, k_end, i_r, dilation, left, right,
        qk_scale, qk_scale_lo, BLOCK_N, HAS_KMASK, EXACT_SCALE, USE_EXP2, b_rk=b_rk, col_offset=drop_col_off,
        drop_thresh=drop_thresh, drop_scale=drop_scale, drop_scale_lo=drop_scale_lo, DROPOUT=DROPOUT,
        ONE_SIDED=ONE_SIDED, DENSE=DENSE)
    if HAS_GLOBAL:
        b_dq = attn_bwd_dq_list(
            b_dq, b_q, b_do, b_lse, b_delta, GIDX + i_b.to(tl.int64) * stride_gb, stride_gn, n_glob,
            p_k, p_v, stride_kn, stride_vn, o_d * stride_kd, o_d * stride_vd, qk_scale, qk_scale_lo,
            BLOCK_N, EXACT_SCALE, USE_EXP2, b_rk=b_rk, col_offset=drop_col_off, drop_thresh=drop_thresh,
            drop_scale=drop_scale, drop_scale_lo=drop_scale_lo, DROPOUT=DROPOUT,
            p_col=DCOL + i_b.to(tl.int64) * stride_dcb, stride_col=stride_dcn, LIST_COLS=DROP_COLS)
    b_dq = _scale(b_dq, sm_scale, sm_scale_lo, EXACT_SCALE)

    p_dq = DQ + i_s.to(tl.int64) * stride_dqs + i_b.to(tl.int64) * stride_dqb + i_h.to(tl.int64) * stride_dqh
    tl.store(p_dq + o_pq[:, None] * stride_dqn + o_d[None, :] * stride_dqd, cast_to(b_dq, DQ.dtype.element_ty),
             mask=m_m[:, None])


def _dkdv_tuning(key, narrow, keep=None):
    """Autotuning of a sliding-window dk/dv kernel over the dk/dv candidates, keyed on ``key``: at
    D >= 256, :data:`_D256_NARROW_DKDV` (16x32/4w) for the launches where ``narrow(args)`` holds (there
    the 32x32/4w tile of :data:`_D256_SHAPE` spilled on sm_90, ``bench/results/sm90-static-20261203/d256``);
    otherwise the candidates ``keep(configs, args)`` leaves, through the dk/dv pruner."""
    def wrap(fn):
        if INTERPRET:
            return fn

        def prune(configs, named_args, **kwargs):
            args = {**named_args, **kwargs}
            if args["HEAD_DIM"] >= 256 and narrow(args):
                return _configs([_D256_NARROW_DKDV])
            if keep is not None:
                configs = keep(configs, args)
            return _pruner("dkdv")(configs, named_args, **kwargs)
        return triton.autotune(configs=_dkdv_configs(), key=key, prune_configs_by={"early_config_prune": prune})(fn)
    return wrap


# the dilated band's dk/dv spilled 208 B on 32x32/4w at D = 256: keyed on the dilation; before Triton 3.9 the
# dropout variant's too (24 B, Triton 3.6)
@_dkdv_tuning(key=["HEAD_DIM", "SPAN", "DROPOUT", "ONE_SIDED", "SPLIT_END", "dilation"],
              narrow=lambda args: args["dilation"] != 1 or (args["DROPOUT"] and not _TUNED_FOR_3_9))
@triton.jit
def _sw_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, KM, DROP, DROW,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_lb, stride_lh, stride_ln,
    stride_deb, stride_deh, stride_den,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_kmb, stride_kmn, stride_drb,
    n_q, n_k, heads_per_kv, left, right, dilation,
    qk_scale, qk_scale_lo, sm_scale, sm_scale_lo, drop_scale, drop_scale_lo, drop_row_off, drop_col_off, SPAN,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_KMASK: tl.constexpr, EXACT_SCALE: tl.constexpr, USE_EXP2: tl.constexpr,
    DROPOUT: tl.constexpr, DROP_ROWS: tl.constexpr, ONE_SIDED: tl.constexpr, SPLIT_END: tl.constexpr,
):
    # one program = one block of BLOCK_N keys of one kv head, summed over its query heads
    i_blk, i_hk, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_r = i_blk % dilation
    i_n = i_blk // dilation
    n_sk = (n_k - i_r + dilation - 1) // dilation
    if i_n * BLOCK_N >= n_sk:
        return
    n_sq = (n_q - i_r + dilation - 1) // dilation
    ACC = DELTA.dtype.element_ty

    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] key indices within the residue
    m_n = o_n < n_sk
    o_pk = (i_r + o_n * dilation).to(tl.int64)
    o_d = tl.arange(0, HEAD_DIM)
    p_k = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    p_v = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
    b_k = tl.load(p_k + o_pk[:, None] * stride_kn + o_d[None, :] * stride_kd, mask=m_n[:, None], other=0.0)
    b_v = tl.load(p_v + o_pk[:, None] * stride_vn + o_d[None, :] * stride_vd, mask=m_n[:, None], other=0.0)
    b_dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=ACC)
    b_dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=ACC)

    # rows i that see key j: j - right <= i <= j + left
    lo, full_lo, full_hi, hi = block_range(i_n * BLOCK_N, right, left, 0, n_sq, BLOCK_N, BLOCK_M)
    # query heads of this kv head and their row blocks run in one flat loop per segment
    i_h0 = i_hk * heads_per_kv
    p_q = Q + i_b.to(tl.int64) * stride_qb
    p_do = DO + i_b.to(tl.int64) * stride_dob
    p_lse = LSE + i_b.to(tl.int64) * stride_lb
    p_delta = DELTA + i_b.to(tl.int64) * stride_deb
    p_drow = DROW + i_b.to(tl.int64) * stride_drb
    drop_seed, drop_thresh, drop_bh0 = 0, 0, 0
    if DROPOUT:  # row keys are rebuilt per query head from the seed; key columns = key positions
        drop_seed, drop_thresh = dropout_load(DROP)
        drop_bh0 = i_b * heads_per_kv * tl.num_programs(1)  # b·H
    b_dk, b_dv = attn_bwd_dkdv_band(
        b_dk, b_dv, b_k, b_v, o_n, p_q, p_do, p_lse, p_delta, i_h0, heads_per_kv, stride_qh, stride_doh,
        stride_lh, stride_deh, stride_qn, stride_don, stride_ln, stride_den, o_d * stride_qd, o_d * stride_dod,
        lo, full_lo, full_hi, hi, 0, n_sq, i_r, dilation, left, right, qk_scale, qk_scale_lo,
        BLOCK_M, EXACT_SCALE, USE_EXP2,
        b_kcol=o_pk + drop_col_off, drop_seed=drop_seed, drop_bh0=drop_bh0, drop_thresh=drop_thresh,
        drop_scale=drop_scale, drop_scale_lo=drop_scale_lo, DROPOUT=DROPOUT, p_drow=p_drow, DROP_ROWS=DROP_ROWS,
        drop_row_off=drop_row_off, ONE_SIDED=ONE_SIDED, SPLIT_END=SPLIT_END)

    m_key = m_n
    if HAS_KMASK:
        m_key = m_key & (tl.load(KM + i_b.to(tl.int64) * stride_kmb + o_pk * stride_kmn, mask=m_n, other=0) != 0)
    b_dk = tl.where(m_key[:, None], _scale(b_dk, sm_scale, sm_scale_lo, EXACT_SCALE), 0.0)
    b_dv = tl.where(m_key[:, None], b_dv, 0.0)
    p_dk = DK + i_b.to(tl.int64) * stride_dkb + i_hk.to(tl.int64) * stride_dkh
    p_dv = DV + i_b.to(tl.int64) * stride_dvb + i_hk.to(tl.int64) * stride_dvh
    tl.store(p_dk + o_pk[:, None] * stride_dkn + o_d[None, :] * stride_dkd, cast_to(b_dk, DK.dtype.element_ty),
             mask=m_n[:, None])
    tl.store(p_dv + o_pk[:, None] * stride_dvn + o_d[None, :] * stride_dvd, cast_to(b_dv, DV.dtype.element_ty),
             mask=m_n[:, None])


def _at_most_32_key_tiles(configs, args):
    """For at most 32 listed keys, only the dk/dv configs of 32-key tiles (LSG's one global token no
    longer costs a 128-slot tile; a 16-slot 64x16/4w tile spilled 8 B with dropout on sm_90, 32x32/4w
    none)."""
    if int(args["n_glob"]) <= 32:
        return [c for c in configs if c.kwargs["BLOCK_N"] <= 32] or configs
    return configs


# the global keys' dk/dv: 32x32/4w spilled 40 B at D = 256 (LSG's launch), every D >= 256 launch narrows
@_dkdv_tuning(key=["HEAD_DIM", "DROPOUT", "n_glob"], narrow=lambda args: True, keep=_at_most_32_key_tiles)
@triton.jit
def _sw_bwd_dkdv_global_kernel(
    Q, K, V, DO, LSE, DELTA, DKP, DVP, GIDX, DROP, DROW, DCOL,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_lb, stride_lh, stride_ln,
    stride_deb, stride_deh, stride_den,
    stride_ps, stride_pb, stride_ph, stride_pg, stride_pd,
    stride_gb, stride_gn, stride_drb, stride_dcb, stride_dcn,
    n_q, n_glob, heads_per_kv, chunk, n_split,
    qk_scale, qk_scale_lo, sm_scale, sm_scale_lo, drop_scale, drop_scale_lo, drop_row_off, drop_col_off,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EXACT_SCALE: tl.constexpr, USE_EXP2: tl.constexpr, DROPOUT: tl.constexpr, DROP_ROWS: tl.constexpr,
    DROP_COLS: tl.constexpr,
):
    # one program = BLOCK_N listed (global) keys x one chunk of query rows; partial sums out
    i_blk, i_hk, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_s = i_blk % n_split
    i_n = i_blk // n_split
    ACC = DELTA.dtype.element_ty

    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] slots of the key list
    b_idx = tl.load(GIDX + i_b.to(tl.int64) * stride_gb + o_n * stride_gn, mask=o_n < n_glob, other=-1)
    m_key = b_idx >= 0
    o_pk = tl.where(m_key, b_idx, 0).to(tl.int64)
    o_d = tl.arange(0, HEAD_DIM)
    p_k = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    p_v = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
    b_k = tl.load(p_k + o_pk[:, None] * stride_kn + o_d[None, :] * stride_kd, mask=m_key[:, None], other=0.0)
    b_v = tl.load(p_v + o_pk[:, None] * stride_vn + o_d[None, :] * stride_vd, mask=m_key[:, None], other=0.0)
    b_dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=ACC)
    b_dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=ACC)

    r_begin = i_s * chunk
    r_end = tl.minimum(n_q, r_begin + chunk)
    r_full = r_begin + (r_end - r_begin) // BLOCK_M * BLOCK_M
    everything = n_q + n_glob + 1  # band wide enough for every row and every key slot
    i_h0 = i_hk * heads_per_kv
    p_q = Q + i_b.to(tl.int64) * stride_qb
    p_do = DO + i_b.to(tl.int64) * stride_dob
    p_lse = LSE + i_b.to(tl.int64) * stride_lb
    p_delta = DELTA + i_b.to(tl.int64) * stride_deb
    p_drow = DROW + i_b.to(tl.int64) * stride_drb
    drop_seed, drop_thresh, drop_bh0, b_kcol = 0, 0, 0, o_pk
    if DROPOUT:  # the listed keys' columns: drop_col_off + their positions o_pk, or DCOL (empty slots zeroed below)
        drop_seed, drop_thresh = dropout_load(DROP)
        drop_bh0 = i_b * heads_per_kv * tl.num_programs(1)  # b·H
        if DROP_COLS:
            b_kcol = tl.load(DCOL + i_b.to(tl.int64) * stride_dcb + o_n * stride_dcn, mask=m_key, other=0)
        else:
            b_kcol = o_pk + drop_col_off
    b_dk, b_dv = attn_bwd_dkdv_heads(
        b_dk, b_dv, b_k, b_v, o_n, p_q, p_do, p_lse, p_delta, i_h0, heads_per_kv, stride_qh, stride_doh,
        stride_lh, stride_deh, stride_qn, stride_don, stride_ln, stride_den, o_d * stride_qd, o_d * stride_dod,
        r_begin, r_full, r_begin, r_end, 0, 1, everything, everything, qk_scale, qk_scale_lo,
        BLOCK_M, False, EXACT_SCALE, USE_EXP2,
        b_kcol=b_kcol, drop_seed=drop_seed, drop_bh0=drop_bh0, drop_thresh=drop_thresh, drop_scale=drop_scale,
        drop_scale_lo=drop_scale_lo, DROPOUT=DROPOUT, p_drow=p_drow, DROP_ROWS=DROP_ROWS, drop_row_off=drop_row_off)
    b_dk, b_dv = attn_bwd_dkdv_heads(
        b_dk, b_dv, b_k, b_v, o_n, p_q, p_do, p_lse, p_delta, i_h0, heads_per_kv, stride_qh, stride_doh,
        stride_lh, stride_deh, stride_qn, stride_don, stride_ln, stride_den, o_d * stride_qd, o_d * stride_dod,
        r_full, r_end, r_begin, r_end, 0, 1, everything, everything, qk_scale, qk_scale_lo,
        BLOCK_M, True, EXACT_SCALE, USE_EXP2,
        b_kcol=b_kcol, drop_seed=drop_seed, drop_bh0=drop_bh0, drop_thresh=drop_thresh, drop_scale=drop_scale,
        drop_scale_lo=drop_scale_lo, DROPOUT=DROPOUT, p_drow=p_drow, DROP_ROWS=DROP_ROWS, drop_row_off=drop_row_off,
        BAND=False)  # the rows past r_end drop out through their lse: no test per score

    b_dk = tl.where(m_key[:, None], _scale(b_dk, sm_scale, sm_scale_lo, EXACT_SCALE), 0.0)
    b_dv = tl.where(m_key[:, None], b_dv, 0.0)
    m_n = o_n < n_glob
    p_off = i_s.to(tl.int64) * stride_ps + i_b.to(tl.int64) * stride_pb + i_hk.to(tl.int64) * stride_ph \
        + o_n[:, None] * stride_pg + o_d[None, :] * stride_pd
    tl.store(DKP + p_off, b_dk, mask=m_n[:, None])
    tl.store(DVP + p_off, b_dv, mask=m_n[:, None])


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window, dilation: int) -> None:
    _check_qkv(q, k, v, same_length=False)
    nq = q.shape[2]
    if window is not None and nq != k.shape[2]:
        raise ValueError(f"a sliding window needs as many queries as keys, got Nq={nq}, Nk={k.shape[2]}")
    if window is not None and (len(window) != 2 or min(window) < 0):
        raise ValueError(f"window must be (left, right) with both >= 0, got {window}")
    if window is None and dilation != 1:
        raise ValueError(f"dilation needs a window; got window=None with dilation={dilation}")
    if dilation < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}")


def _bands(window, nq: int, nk: int) -> Tuple[int, int, int]:
    """``(left, right, SPAN)`` in kernel units: clamped window, or 'everything' for dense."""
    if window is None:
        return nq + nk, nq + nk, 0
    left, right = (min(int(w), nk) for w in window)
    return left, right, min(next_power_of_2(left + right + 1), 4096)


def _band_args(window, dilation: int, nq: int, nk: int) -> dict:
    """The band keywords of the fwd, dq and dk/dv kernels (:func:`_bands`, the dilation)."""
    left, right, span = _bands(window, nq, nk)
    return dict(left=left, right=right, dilation=dilation, SPAN=span)


def _key_mask_args(key_mask: Optional[torch.Tensor], like: torch.Tensor) -> dict:
    """``KM``, its strides and ``HAS_KMASK``: the key-mask keywords of every kernel here (int32 up to
    D = 128, :func:`._launch._key_mask_i32`; above, the uint8 view of :func:`._launch._mask_arg`)."""
    km, s_kmb, s_kmn = (_key_mask_i32 if like.shape[-1] <= 128 else _mask_arg)(key_mask, like)
    return dict(KM=km, stride_kmb=s_kmb, stride_kmn=s_kmn, HAS_KMASK=key_mask is not None)


def _key_chunks(window, n_glob: int, n_rows: int, nk: int, device: torch.device) -> Tuple[int, int]:
    """``(chunk, n_split)``: a dense pass without listed keys (the global rows) is split into key
    chunks when its ``n_rows`` query blocks alone would leave the GPU idle (partials merged or
    summed afterwards); anything else is one chunk of all ``nk`` keys."""
    chunk = nk
    if window is None and n_glob == 0:
        chunk = _split(n_rows, nk, device)
    return chunk, triton.cdiv(nk, chunk)


def sliding_window_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: Optional[Tuple[int, int]],
    dilation: int = 1,
    scale: Optional[float] = None,
    query_mask: Optional[torch.Tensor] = None,
    key_mask: Optional[torch.Tensor] = None,
    global_keys: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    dropout_state: Optional[torch.Tensor] = None,
    drop_rows: Optional[torch.Tensor] = None,
    drop_row_offset: int = 0,
    drop_col_offset: int = 0,
    drop_cols: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Banded (or dense) attention forward.

    Args:
        q: ``[B, H, Nq, D]``; k, v: ``[B, H_kv, Nk, D]`` (``H % H_kv == 0``); any strides.
        window: ``(left, right)``: query ``i`` sees keys ``i + m·dilation`` for
            ``-left <= m <= right`` (inclusive; needs ``Nq == Nk``); None: every key (dense).
        query_mask: ``[B, Nq]`` bool, False rows get ``out = 0``, ``lse = -inf``.
        key_mask: ``[B, Nk]`` bool, False keys are not seen by the window/dense part.
        global_keys: ``[B, G]`` int64 positions into k/v (negative = empty slot) that every
            query row also sees; must be distinct and disjoint from ``key_mask``-visible
            keys inside the window (else they count twice).  Window mode only.
        scale: softmax scale (default ``D ** -0.5``).
        dropout_p: attention dropout on the probabilities, in ``[0, 1)`` (:mod:`lhattn._dropout`).
        dropout_state: int64 ``[2] = (seed, T)`` on q's device; needed when ``dropout_p > 0``.
            ``H`` of the rule's ``b·H + h`` is q's head count; key columns are key positions.
        drop_rows: ``[B, Nq]`` int64: the token position of query row ``m`` (gathered rows,
            e.g. the global rows of a dense pass; dilation 1 only); None: row ``m`` is position ``m``.
        drop_row_offset, drop_col_offset: for a call on part of a sequence (a context-parallel rank's
            halo-extended range): row ``m`` is token ``drop_row_offset + m`` (``+ drop_rows[m]``), key
            ``j`` has column ``drop_col_offset + j``.  Default 0.
        drop_cols: ``[B, G]`` int64, the dropout columns of the ``global_keys`` slots when they are not
            ``drop_col_offset +`` their positions (a rank's gathered global keys, appended after its own).

    Returns:
        ``out [B, H, Nq, D]`` (q's dtype, contiguous) and ``lse [B, H, Nq]`` (float32;
        float64 for float64 inputs; ``-inf`` where a row sees no key; the undropped softmax's).
    """
    _check(q, k, v, window, dilation)
    drop = _dropout_args(dropout_p, dropout_state, drop_rows, q, dilation)
    drop.update(**_drop_offset_args(dropout_p, drop_row_offset, drop_col_offset),
                **_drop_cols_arg(dropout_p, drop_cols, global_keys, q))
    b, h, nq, d = q.shape
    h_kv, nk = k.shape[1], k.shape[2]
    acc = acc_dtype(q.dtype)
    qm, s_qmb, s_qmn = _mask_arg(query_mask, q)
    gidx, n_glob = _global_keys_arg(global_keys, q)

    out = torch.empty((b, h, nq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, nq), dtype=acc, device=q.device)
    chunk, n_split = _key_chunks(window, n_glob, b * h * triton.cdiv(nq, 64), nk, q.device)
    if n_split > 1:
        o_dst = torch.empty((n_split, b, h, nq, d), dtype=acc, device=q.device)
        l_dst = torch.empty((n_split, b, h, nq), dtype=acc, device=q.device)
    else:
        o_dst, l_dst = out.unsqueeze(0), lse.unsqueeze(0)

    def grid(meta):
        return (triton.cdiv(triton.cdiv(nq, dilation), meta["BLOCK_M"]) * dilation * n_split, h, b)

    band = _band_args(window, dilation, nq, nk)
    _sw_fwd_kernel[grid](
        Q=q, K=k, V=v, O=o_dst, LSE=l_dst, QM=qm, GIDX=gidx,
        **_strides("q", q), **_strides("k", k), **_strides("v", v), **_strides("o", o_dst, "sbhnd"),
        **_strides("l", l_dst, "sbhn"), stride_qmb=s_qmb, stride_qmn=s_qmn, **_strides("g", gidx, "bn"),
        n_q=nq, n_k=nk, n_glob=n_glob, heads_per_kv=h // h_kv, chunk=chunk, n_split=n_split,
        **band, **_key_mask_args(key_mask, q), **_scale_args(scale, q),
        HEAD_DIM=d, HAS_QMASK=query_mask is not None, HAS_GLOBAL=n_glob > 0, **drop, **_meta("fwd"),
        **_one_sided("fwd", band["left"], band["right"], chunk if n_split > 1 else 0, window is None, d),
        DENSE=window is None,
    )
    if n_split > 1:  # each chunk's output is already dropped with its own columns
        merge_partials(o_dst, l_dst, out, lse)
    return out, lse


def sliding_window_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    window: Optional[Tuple[int, int]],
    dilation: int = 1,
    scale: Optional[float] = None,
    key_mask: Optional[torch.Tensor] = None,
    global_keys: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    dropout_state: Optional[torch.Tensor] = None,
    drop_rows: Optional[torch.Tensor] = None,
    drop_row_offset: int = 0,
    drop_col_offset: int = 0,
    drop_cols: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`sliding_window_fwd` (same arguments; ``query_mask`` is not
    needed: masked rows carry ``lse = -inf`` and get zero gradients).  ``out`` is the
    (dropped) output of the forward, the same dropout arguments regenerate its keep bits.

    Three passes: :func:`_bwd_dq` (query blocks), :func:`_bwd_dkdv` (key blocks of the band or
    dense part) and, with ``global_keys``, :func:`add_global_key_grads` (the listed keys).

    Returns ``dq [B, H, Nq, D]``, ``dk, dv [B, H_kv, Nk, D]`` in the input dtype
    (contiguous); dk/dv are summed over the query heads of each kv head (GQA).
    """
    _check(q, k, v, window, dilation)
    gidx, n_glob = _global_keys_arg(global_keys, q)
    drop = _dropout_args(dropout_p, dropout_state, drop_rows, q, dilation)
    drop.update(_drop_offset_args(dropout_p, drop_row_offset, drop_col_offset))
    cols = _drop_cols_arg(dropout_p, drop_cols, global_keys, q)  # the passes over the listed keys only
    delta = bwd_preprocess(out, dout)  # [B, H, Nq]; rowsum(dO ∘ O) of the dropped O
    common = _bwd_common(q, k, v, dout, lse, delta, scale)  # strides, scales, HEAD_DIM
    band = _band_args(window, dilation, q.shape[2], k.shape[2])
    kw = dict(**band, **_key_mask_args(key_mask, q), **common, **drop)

    dq = _bwd_dq(q, k, v, dout, lse, delta, gidx, n_glob, window, dict(kw, **cols))
    dk, dv = _bwd_dkdv(q, k, v, dout, lse, delta, kw)
    if n_glob > 0:  # the listed keys are seen by every query row
        add_global_key_grads(dout, q, k, v, lse, delta, gidx, dk, dv, common, dropout_p=dropout_p,
                             dropout_state=dropout_state, drop_rows=drop_rows, drop_row_offset=drop_row_offset,
                             drop_col_offset=drop_col_offset, drop_cols=drop_cols)
    return dq, dk, dv


def _bwd_dq(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor,
            delta: torch.Tensor, gidx: torch.Tensor, n_glob: int, window, kw: dict) -> torch.Tensor:
    """dq of :func:`sliding_window_bwd`: one program per query block of a residue class; a dense
    pass without listed keys is split over key chunks (:func:`_key_chunks`), its partials summed.
    ``kw``: the band, key-mask, :func:`._launch._bwd_common` and dropout keywords."""
    b, h, nq, d = q.shape
    h_kv, nk = k.shape[1], k.shape[2]
    dq = torch.empty((b, h, nq, d), dtype=q.dtype, device=q.device)
    chunk, n_split = _key_chunks(window, n_glob, b * h * triton.cdiv(nq, 64), nk, q.device)
    if n_split > 1:
        dq_dst = torch.empty((n_split, b, h, nq, d), dtype=acc_dtype(q.dtype), device=q.device)
    else:
        dq_dst = dq.unsqueeze(0)
    dilation = kw["dilation"]

    def grid(meta):
        return (triton.cdiv(triton.cdiv(nq, dilation), meta["BLOCK_M"]) * dilation * n_split, h, b)

    _sw_bwd_dq_kernel[grid](
        Q=q, K=k, V=v, DO=dout, LSE=lse, DELTA=delta, DQ=dq_dst, GIDX=gidx,
        **_strides("dq", dq_dst, "sbhnd"), **_strides("g", gidx, "bn"),
        n_q=nq, n_k=nk, n_glob=n_glob, heads_per_kv=h // h_kv, chunk=chunk, n_split=n_split,
        HAS_GLOBAL=n_glob > 0, **kw, **_meta("dq"),
        **_one_sided("dq", kw["left"], kw["right"], chunk if n_split > 1 else 0, window is None, d),
        DENSE=window is None,
    )
    if n_split > 1:
        sum_partial_rows(dq_dst, dq)
    return dq


def _bwd_dkdv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor,
              delta: torch.Tensor, kw: dict) -> Tuple[torch.Tensor, torch.Tensor]:
    """dk, dv of the band (or dense) part of :func:`sliding_window_bwd`: one program per key block of
    a residue class and kv head, summed over the query heads of that kv head (``kw`` as :func:`_bwd_dq`)."""
    b, h, nq = q.shape[:3]
    h_kv, nk = k.shape[1], k.shape[2]
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    dilation = kw["dilation"]

    def grid(meta):
        return (triton.cdiv(triton.cdiv(nk, dilation), meta["BLOCK_N"]) * dilation, h_kv, b)

    _sw_bwd_dkdv_kernel[grid](
        Q=q, K=k, V=v, DO=dout, LSE=lse, DELTA=delta, DK=dk, DV=dv,
        **_strides("dk", dk), **_strides("dv", dv),
        n_q=nq, n_k=nk, heads_per_kv=h // h_kv, **kw, **_meta("dkdv"), **_dkdv_one_sided(q.shape[3], nk, kw),
    )
    return dk, dv


def _dkdv_one_sided(d: int, nk: int, kw: dict) -> dict:
    """``ONE_SIDED`` / ``SPLIT_END`` of the band's (or dense pass's) dk/dv launch (:func:`._launch._one_sided_for`).
    Moving the query tile that holds the sequence end to the right edge (``SPLIT_END``) shortens the left
    edge's tiles on sm_90 with Triton 3.9 (D = 64, 64x128/8w: 482 -> 457 SASS instructions, dilated 510 -> 459;
    ``bench/results/sm90-static-20261203/s26/``) but not with dropout (D = 64: it spilled 8 B; D = 128: the
    unmasked tile grew, 640 -> 647) nor with a dilation at D = 128 (it spilled 16 B), and before Triton 3.9 it
    lengthened the unmasked tile (Triton 3.6, D = 64: 380 -> 408; D = 128: 292 -> 329): only where it was
    measured to help."""
    one = _one_sided("dkdv", kw["left"], kw["right"], 0, False, d, nk)  # dense too: the base variant
    if not _TUNED_FOR_3_9 or kw["DROPOUT"] or (kw["dilation"] != 1 and d > 64):
        one["SPLIT_END"] = False
    return one


def add_global_key_grads(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         lse: torch.Tensor, delta: torch.Tensor, global_keys: torch.Tensor,
                         dk: torch.Tensor, dv: torch.Tensor, common: dict, *, dropout_p: float = 0.0,
                         dropout_state: Optional[torch.Tensor] = None,
                         drop_rows: Optional[torch.Tensor] = None, drop_row_offset: int = 0,
                         drop_col_offset: int = 0, drop_cols: Optional[torch.Tensor] = None) -> None:
    """``dk[b, :, g] +=`` / ``dv[b, :, g] +=`` the gradient of the listed keys
    ``global_keys [B, G]`` (int64, distinct, negative = empty slot), which every query row
    sees (rows with ``lse = -inf`` contribute nothing).  ``common``: the stride / scale
    keywords of the backward kernels (q, k, v, dout, lse, delta strides; qk/sm scales;
    HEAD_DIM, EXACT_SCALE, USE_EXP2), as built by :func:`sliding_window_bwd`.  Rows are
    split into chunks when there are too few programs; partials are summed deterministically.
    Dropout as :func:`sliding_window_fwd` (``drop_rows [B, Nq]``: the token positions of q's rows,
    None: row ``m`` is position ``m``; the listed keys' columns are their positions; ``drop_row_offset``,
    ``drop_col_offset`` and ``drop_cols`` as there).
    Shared by every family with global tokens (sliding window, segments, LSG)."""
    b, h, nq, d = q.shape
    h_kv = k.shape[1]
    n_glob = global_keys.shape[1]
    block_n = INTERPRET_BLOCKS["dkdv"][1] if INTERPRET else (32 if n_glob <= 32 else 64)
    chunk_r = _split(b * h_kv * triton.cdiv(n_glob, block_n), nq, q.device)
    n_split_r = triton.cdiv(nq, chunk_r)
    drop = _dropout_args(dropout_p, dropout_state, drop_rows, q)
    drop.update(**_drop_offset_args(dropout_p, drop_row_offset, drop_col_offset),
                **_drop_cols_arg(dropout_p, drop_cols, global_keys, q))
    dk_parts = torch.empty((n_split_r, b, h_kv, n_glob, d), dtype=acc_dtype(q.dtype), device=q.device)
    dv_parts = torch.empty_like(dk_parts)

    def grid_g(meta):
        return (triton.cdiv(n_glob, meta["BLOCK_N"]) * n_split_r, h_kv, b)

    _sw_bwd_dkdv_global_kernel[grid_g](
        Q=q, K=k, V=v, DO=dout, LSE=lse, DELTA=delta, DKP=dk_parts, DVP=dv_parts, GIDX=global_keys,
        stride_ps=dk_parts.stride(0), stride_pb=dk_parts.stride(1), stride_ph=dk_parts.stride(2),
        stride_pg=dk_parts.stride(3), stride_pd=dk_parts.stride(4),
        stride_gb=global_keys.stride(0), stride_gn=global_keys.stride(1),
        n_q=nq, n_glob=n_glob, heads_per_kv=h // h_kv, chunk=chunk_r, n_split=n_split_r,
        **common, **drop, **_meta("dkdv"),
    )
    sum_partial_rows(dk_parts, dk, global_keys, accumulate=True)
    sum_partial_rows(dv_parts, dv, global_keys, accumulate=True)
