"""Host-side launch plumbing shared by the kernel families (no ``@triton.jit`` code in here).

The family modules (:mod:`.sliding_window`, :mod:`.segment`, :mod:`.lsg`) hold their kernels and
launchers; what a launcher does around a launch that is not specific to one family lives here, so
that no family imports plumbing from another one (``tests/test_kernel_structure.py`` checks it):

* block sizes under the interpreter: :data:`INTERPRET_BLOCKS`, :func:`_meta_for` / :func:`_meta`;
* the band walk's one-sided edges (``ONE_SIDED``): :func:`_one_sided_for`, :func:`_segment_one_sided_for`;
* kernel arguments: :func:`_strides`, :func:`_mask_u8` / :func:`_mask_arg`, :func:`_global_keys_arg`,
  :func:`_scale_args`, :func:`_bwd_common`, :func:`_dropout_args` / :func:`_token_dropout_args`,
  :func:`_drop_offset_args` / :func:`_drop_cols_arg` (positions of a call on part of a sequence);
* input checks every family makes: :func:`_check_qkv`;
* tuning: the candidate configs of each family (:func:`_fwd_configs`, :func:`_dkdv_configs`, the
  ``_LSG_*`` shapes), the register / shared-memory model :func:`_tile_cost` and its budgets, the
  early pruner :func:`_pruner` and the decorator :func:`_tuned` (:func:`_lsg_tuned` for LSG's
  calibration); ``$LHATTN_AUTOTUNE_CONFIGS`` is applied on top by :func:`._core.limit_autotuners`;
* splitting a serial loop over the GPU: :data:`INTERPRET_SPLIT_CHUNK`, :func:`_split_for` / :func:`_split`.

The device-side helpers every family shares are in :mod:`._core`.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
import triton

from ._core import HEAD_DIMS, INTERPRET, dropout_scale, next_power_of_2, split_scale

__all__ = ["INTERPRET_BLOCKS", "INTERPRET_SPLIT_CHUNK", "TRITON_VERSION"]

TRITON_VERSION: Tuple[int, int] = tuple(int(p) for p in triton.__version__.split(".")[:2])  # type: ignore[assignment]
"""``(major, minor)`` of the installed Triton.  The tuning below is calibrated with ``python -m bench.sm90`` on
Triton 3.9 (the tested stack); a few choices differ before 3.9, calibrated on Triton 3.6 (the GPU machine's
image) where the same configs spill or lose occupancy on sm_90 (:data:`_D256_SHAPES`, :data:`_FWD_D64_REG_CAP`;
``bench/results/sm90-static-20261203/triton36``)."""

_TUNED_FOR_3_9 = TRITON_VERSION >= (3, 9)
"""Which calibration the pruners use: Triton 3.9's (True) or the one for older releases (False)."""


# --------------------------------------------------------------------------------------
# block sizes under the interpreter
# --------------------------------------------------------------------------------------


INTERPRET_BLOCKS = {"fwd": (16, 16), "dq": (16, 16), "dkdv": (16, 16)}
"""``(BLOCK_M, BLOCK_N)`` used under ``TRITON_INTERPRET=1`` (no autotuning there), per kernel kind.
For ``dkdv``, BLOCK_N is the key block of a program and BLOCK_M the query rows per step.  Each family
module imports it as its own ``INTERPRET_BLOCKS`` attribute, which its ``_meta`` reads at every
launch (tests replace a family's attribute to run other tile shapes)."""

INTERPRET_SPLIT_CHUNK = 40
"""Under the interpreter, dense passes split keys (rows for the global-key gradient)
into chunks of this many, so that the split/merge code runs in CPU tests too.  Imported by
:mod:`.sliding_window` as its own attribute, read by its ``_split`` (:func:`_split_for`)."""


def _meta(kind: str, blocks: Dict[str, Tuple[int, int]]) -> dict:
    """The block-size keywords of a launch of kernel ``kind``: ``BLOCK_M``, ``BLOCK_N`` from
    ``blocks`` under the interpreter, nothing on CUDA (the autotuner picks them)."""
    if not INTERPRET:
        return {}
    bm, bn = blocks[kind]
    return {"BLOCK_M": bm, "BLOCK_N": bn}


def _meta_for(namespace: dict) -> Callable[[str], dict]:
    """A family module's ``_meta(kind)``: :func:`_meta` with the ``INTERPRET_BLOCKS`` of
    ``namespace`` (the module's ``globals()``), looked up at each call."""
    def meta(kind: str) -> dict:
        return _meta(kind, namespace["INTERPRET_BLOCKS"])
    meta.__name__ = meta.__qualname__ = "_meta"
    return meta


# --------------------------------------------------------------------------------------
# one-sided band edges (the ONE_SIDED constexpr of the band walk, kernels/_core.py)
# --------------------------------------------------------------------------------------


def _left_edge_one_sided(before: int, after: int, block_self: int, block_other: int) -> bool:
    """Whether every tile of the left masked edge ``[lo, full_lo)`` of :func:`._core.block_range` (rows
    ``[s, s + block_self)``, ``s`` a multiple of ``block_self``; row ``i`` sees ``i - before <= j <= i + after``)
    lies at or before the *first* row's last column ``s + after``, so that only the lower bound can cut
    through it: ``full_lo = ceil((s + block_self - 1 - before) / block_other) * block_other <= s + after + 1``
    for every block start.  That bound minus ``s`` depends only on ``s mod block_other``, so the residues
    of the block starts decide it (block sizes are powers of two).  The right edge ``[full_hi, hi)``
    starts at or after ``full_lo``, past every row's first column: it needs no condition."""
    for r in range(0, max(block_self, block_other), block_self):
        first = r + block_self - 1 - before  # the last row's first column, relative to this start
        if -(-first // block_other) * block_other > r + after + 1:
            return False
    return True


def _one_sided_for(namespace: dict) -> Callable[..., dict]:
    """A sliding-window family module's ``_one_sided(kind, left, right, chunk=0, dense=False, head_dim=64, n_k=None)``:
    ``{"ONE_SIDED": bool}`` for a launch of kernel ``kind`` with the (clamped) window ``(left, right)`` and key
    chunks starting at multiples of ``chunk`` (0: one chunk, starting at 0).  True when it holds for *every*
    tile shape the launch may run
    (the module's ``INTERPRET_BLOCKS[kind]`` under the interpreter, else every candidate of the autotuner, so
    that the config the autotuner picks cannot matter):

    * fwd / dq (rows: query tiles ``BLOCK_M``; the walk crosses key tiles ``BLOCK_N``): the left edge is
      one-sided (:func:`_left_edge_one_sided` with ``before = left``); chunks start on a tile boundary; and
      ``left >= BLOCK_N - 2``: a sequence's last key tile moves to the right edge
      (:func:`._core._one_sided_split`), where it may only fail the upper bound -- a row ``i <= n - 1`` has
      its first key ``i - left`` at or before that tile's start ``> n - BLOCK_N``.
    * dk/dv (rows: key tiles ``BLOCK_N``; the walk crosses query tiles ``BLOCK_M``; ``before = right``): the
      left edge is one-sided (the query rows past the sequence drop out through their lse there).  With
      ``right >= BLOCK_M - 2`` or ``right >= n_k`` (``n_k`` given) also ``{"SPLIT_END": True}``: the query
      tile holding the sequence end moves to the right edge as in the forward, where it may only fail the
      upper bound -- a key ``j <= n_k - 1 = n_q - 1`` has its first query row ``j - right`` at or before that
      tile's start (a window needs ``n_q == n_k``; a dense pass has ``right = n_q + n_k``); a causal window
      (``right = 0``) does not qualify.  dk/dv launches always get both keys.

    A dense pass (``left = right = Nq + Nk``) qualifies too, but its forward and dq (key chunks: they
    would need tile-aligned chunks) have a cheaper test of their own, the ``DENSE`` constexpr of the
    sliding-window kernels (every row's interval is the chunk: one column test per tile, broadcast over
    the rows): a ``dense`` launch gets ``ONE_SIDED`` False here, as does ``head_dim > 128`` (there the
    one-sided tiles compiled worse on sm_90: the D = 256 dq's unmasked tile 336 instructions instead of
    305).  The dense dk/dv pass is one-sided (the same kernel as the band pass's)."""
    def one_sided(kind: str, left: int, right: int, chunk: int = 0, dense: bool = False, head_dim: int = 64,
                  n_k: Optional[int] = None) -> dict:
        if dense or head_dim > 128:  # see the docstring: the dense pass's own test; D > 128 cost instructions
            return {"ONE_SIDED": False, "SPLIT_END": False} if kind == "dkdv" else {"ONE_SIDED": False}
        shapes = [namespace["INTERPRET_BLOCKS"][kind]] if INTERPRET else \
            [s[:2] for s in (_DKDV_SHAPES if kind == "dkdv" else _FWD_SHAPES)]
        if kind == "dkdv":
            ok = all(_left_edge_one_sided(right, left, bn, bm) for bm, bn in shapes)
            wide = n_k is not None and right >= n_k
            return {"ONE_SIDED": ok, "SPLIT_END": ok and all(right >= bm - 2 or wide for bm, _ in shapes)}
        else:
            ok = all(_left_edge_one_sided(left, right, bm, bn) and left >= bn - 2 and chunk % bn == 0
                     for bm, bn in shapes)
        return {"ONE_SIDED": ok}
    one_sided.__name__ = one_sided.__qualname__ = "_one_sided"
    return one_sided


def _segment_one_sided_for(namespace: dict) -> Callable[[str, Optional[int]], dict]:
    """The segment family's ``_one_sided(kind, seg_size)``: ``{"ONE_SIDED": bool}`` (and for dk/dv
    ``"SPLIT_END"``, the same value: see :func:`_one_sided_for`), True for fixed segments
    (``seg_size``; None for per-token bounds: False) that are a multiple of the tile the walk crosses and
    at least as long as the tile a program owns, for every tile shape the launch may run (as
    :func:`_one_sided_for`; :data:`_D256_SHAPES` included).  A block then spans at most two segments
    whose boundary is a tile boundary: the left edge holds the first segment's keys (the second one's
    rows fail only their lower bound), the right edge the second one's.  The last segment starts on a tile
    boundary too, at or before the tile holding the sequence end, so dk/dv may move that tile to the right
    edge (``SPLIT_END``)."""
    def one_sided(kind: str, seg_size: Optional[int]) -> dict:
        if seg_size is None:
            return {"ONE_SIDED": False, "SPLIT_END": False} if kind == "dkdv" else {"ONE_SIDED": False}
        d256 = [t[kind] for t in _D256_SHAPES.values()]  # either calibration's
        shapes = [namespace["INTERPRET_BLOCKS"][kind]] if INTERPRET else \
            [s[:2] for s in (_DKDV_SHAPES if kind == "dkdv" else _FWD_SHAPES) + d256]
        pairs = [(bn, bm) if kind == "dkdv" else (bm, bn) for bm, bn in shapes]  # (tile owned, tile crossed)
        ok = all(seg_size % other == 0 and seg_size >= own for own, other in pairs)
        return {"ONE_SIDED": ok, "SPLIT_END": ok} if kind == "dkdv" else {"ONE_SIDED": ok}
    one_sided.__name__ = one_sided.__qualname__ = "_one_sided"
    return one_sided


# --------------------------------------------------------------------------------------
# kernel arguments
# --------------------------------------------------------------------------------------


def _strides(name: str, x: torch.Tensor, axes: str = "bhnd") -> dict:
    """``{"stride_<name><axis>": x.stride(i)}``: kernel stride keywords, named so a misordered
    stride cannot go unnoticed."""
    return {f"stride_{name}{a}": x.stride(i) for i, a in enumerate(axes)}


def _mask_u8(mask: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """A bool mask as a uint8 view (no copy), or a one-element dummy."""
    if mask is None:
        return like.new_zeros((1, 1), dtype=torch.uint8)
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def _mask_arg(mask: Optional[torch.Tensor], like: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
    """A ``[B, N]`` bool mask as a uint8 view (no copy) with its strides, or a dummy with strides 0."""
    m = _mask_u8(mask, like)
    return (m, 0, 0) if mask is None else (m, m.stride(0), m.stride(1))


def _key_mask_i32(mask: Optional[torch.Tensor], like: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
    """A ``[B, N]`` bool *key* mask as int32 (a copy, 4 bytes per key) with its strides, or a dummy with
    strides 0.  A band walk loads it once per key tile; with 4-byte elements the pipeliner issues those
    loads as ``cp.async`` with the K/V tiles, where the uint8 view of :func:`_mask_arg` is loaded
    synchronously in 2-byte pieces (``bench.sm90``, the sliding-window forward with a key mask, D = 64:
    160 registers instead of 169, masked / unmasked tile 452 / 372 SASS instead of 494 / 389; LSG's
    forward 406 / 387 instead of 457 / 396, its global-row kernels about 20% shorter tiles).  Not for
    every kernel: the segment forward at D = 64 took 152 registers with it instead of 125 (8 warps/SM
    instead of 16), and the sliding window at D = 256 more registers and instructions."""
    if mask is None:
        return like.new_zeros((1, 1), dtype=torch.int32), 0, 0
    m = mask.to(torch.int32)
    return m, m.stride(0), m.stride(1)


def _global_keys_arg(global_keys: Optional[torch.Tensor], like: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """``(gidx, n_glob)``: the ``[B, G]`` list of keys every row sees, or a dummy and 0 when there is
    none (None or ``G == 0``)."""
    if global_keys is None or global_keys.shape[1] == 0:
        return like.new_zeros((1, 1), dtype=torch.int64), 0
    return global_keys, global_keys.shape[1]


def _scale_args(scale: Optional[float], q: torch.Tensor, backward: bool = False) -> dict:
    """The softmax-scale keywords (default ``D ** -0.5``): ``qk_scale, qk_scale_lo, EXACT_SCALE,
    USE_EXP2`` (:func:`._core.split_scale`) and, for the backward kernels, ``sm_scale, sm_scale_lo``."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    qk_scale, qk_scale_lo, exact, use_exp2 = split_scale(scale, q.dtype)
    args = dict(qk_scale=qk_scale, qk_scale_lo=qk_scale_lo, EXACT_SCALE=exact, USE_EXP2=use_exp2)
    if backward:  # dS -> dq/dk use the plain scale (split into float32 halves for float64, like qk_scale)
        args.update(sm_scale=qk_scale if exact else scale, sm_scale_lo=qk_scale_lo if exact else 0.0)
    return args


def _bwd_common(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor,
                delta: torch.Tensor, scale: Optional[float]) -> dict:
    """The keywords every backward kernel of the sliding-window and segment families takes: strides
    of q, k, v, dout (``[B, H, N, D]``), lse and delta (``[B, H, N]``), the scales and ``HEAD_DIM``
    (the ``common`` of :func:`.sliding_window.add_global_key_grads`)."""
    return dict(**_strides("q", q), **_strides("k", k), **_strides("v", v), **_strides("do", dout),
                **_strides("l", lse, "bhn"), **_strides("de", delta, "bhn"), HEAD_DIM=q.shape[3],
                **_scale_args(scale, q, backward=True))


def _token_dropout_args(dropout_p: float, dropout_state: Optional[torch.Tensor], like: torch.Tensor) -> dict:
    """Kernel arguments of attention dropout (:mod:`lhattn._dropout`) when a row's token position is
    its position (segment, LSG): the state ``DROP = (seed, T)``, ``1 / (1 - p)`` as ``(drop_scale,
    drop_scale_lo)`` and ``DROPOUT``; with ``dropout_p == 0`` a never-read dummy and ``DROPOUT=False``
    (the compiled no-dropout kernels)."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p == 0.0:
        return dict(DROP=like.new_zeros((1, 1), dtype=torch.int64), drop_scale=1.0, drop_scale_lo=0.0,
                    DROPOUT=False)
    if (dropout_state is None or dropout_state.shape != (2,) or dropout_state.dtype != torch.int64
            or dropout_state.device != like.device):
        got = None if dropout_state is None else (tuple(dropout_state.shape), dropout_state.dtype,
                                                  dropout_state.device)
        raise ValueError(f"dropout_p > 0 needs dropout_state, an int64 [2] tensor (seed, T) on {like.device} "
                         f"(lhattn._dropout.make_state); got {got}")
    hi, lo = dropout_scale(dropout_p, like.dtype)
    return dict(DROP=dropout_state, drop_scale=hi, drop_scale_lo=lo, DROPOUT=True)


def _dropout_args(dropout_p: float, dropout_state: Optional[torch.Tensor], drop_rows: Optional[torch.Tensor],
                  q: torch.Tensor, dilation: int = 1) -> dict:
    """:func:`_token_dropout_args` plus the row-position table of the sliding-window kernels:
    ``DROW = drop_rows [B, Nq]`` (int64, made contiguous; the token position of gathered query row
    ``m``, dilation 1 only), its batch stride and ``DROP_ROWS``; without it row ``m`` is position ``m``."""
    drop = _token_dropout_args(dropout_p, dropout_state, q)
    if not drop["DROPOUT"]:
        return dict(drop, DROW=drop["DROP"], stride_drb=0, DROP_ROWS=False)
    if drop_rows is not None:
        b, _, nq, _ = q.shape
        if drop_rows.shape != (b, nq) or drop_rows.dtype != torch.int64 or drop_rows.device != q.device:
            raise ValueError(f"drop_rows must be an int64 [B, Nq] = {(b, nq)} tensor on {q.device}, got "
                             f"{tuple(drop_rows.shape)} {drop_rows.dtype} on {drop_rows.device}")
        if dilation != 1:
            raise ValueError(f"drop_rows (gathered query rows) needs dilation 1, got dilation={dilation}")
    rows = q.new_zeros((1, 1), dtype=torch.int64) if drop_rows is None else drop_rows.contiguous()
    return dict(drop, DROW=rows, stride_drb=rows.stride(0), DROP_ROWS=drop_rows is not None)


def _drop_offset_args(dropout_p: float, row_offset: int = 0, col_offset: int = 0) -> dict:
    """Where a call's rows and keys sit in the sequence, for the dropout rule (a call on part of a
    sequence, e.g. a context-parallel rank's halo-extended range): the token position of query row
    ``m`` is ``row_offset + m`` (``row_offset + drop_rows[m]`` with :func:`_dropout_args`'s table),
    the column of key ``j`` is ``col_offset + j``.  Runtime scalars ``drop_row_off``, ``drop_col_off``
    (0 without dropout: nothing to compile or pass)."""
    for name, off in (("drop_row_offset", row_offset), ("drop_col_offset", col_offset)):
        if isinstance(off, bool) or not isinstance(off, int) or not 0 <= off < 2 ** 31:
            raise ValueError(f"{name} must be an int in [0, 2**31), got {off!r}")
    if dropout_p == 0.0:
        row_offset = col_offset = 0
    return dict(drop_row_off=row_offset, drop_col_off=col_offset)


def _drop_cols_arg(dropout_p: float, drop_cols: Optional[torch.Tensor], global_keys: Optional[torch.Tensor],
                   like: torch.Tensor) -> dict:
    """The dropout columns of the listed (global) keys when they are not their positions:
    ``DCOL = drop_cols [B, G]`` (int64, one per slot of ``global_keys``; e.g. a context-parallel rank's
    gathered global keys, appended after its own keys), its strides and ``DROP_COLS``; without it a
    listed key's column is ``col_offset + its position`` (:func:`_drop_offset_args`)."""
    none = dict(DCOL=like.new_zeros((1, 1), dtype=torch.int64), stride_dcb=0, stride_dcn=0, DROP_COLS=False)
    if drop_cols is None:
        return none
    shape = None if global_keys is None else tuple(global_keys.shape)
    if shape is None or drop_cols.shape != shape or drop_cols.dtype != torch.int64 or drop_cols.device != like.device:
        raise ValueError(f"drop_cols must be an int64 tensor on {like.device} shaped like global_keys {shape}, got "
                         f"{tuple(drop_cols.shape)} {drop_cols.dtype} on {drop_cols.device}")
    if dropout_p == 0.0 or shape[1] == 0:
        return none
    return dict(DCOL=drop_cols, stride_dcb=drop_cols.stride(0), stride_dcn=drop_cols.stride(1), DROP_COLS=True)


# --------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, same_length: bool) -> None:
    """q ``[B, H, Nq, D]``, k and v ``[B, H_kv, Nk, D]`` with ``H % H_kv == 0`` and a compiled head dim;
    ``same_length``: ``Nq == Nk`` too (one sequence)."""
    n_q, n_k = ("N", "N") if same_length else ("Nq", "Nk")
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"q must be [B, H, {n_q}, D] and k, v [B, H_kv, {n_k}, D]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    b, h, n, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or h % k.shape[1] != 0 or (same_length and k.shape[2] != n):
        need = "need the same B, N and D, and H % H_kv == 0" if same_length else "need same B and D, H % H_kv == 0"
        raise ValueError(f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)} ({need})")
    if d not in HEAD_DIMS:
        raise ValueError(f"head dim must be one of {HEAD_DIMS} for the Triton kernels, got {d}")


# --------------------------------------------------------------------------------------
# tuning: candidates, cost model, pruner, autotune
# --------------------------------------------------------------------------------------


def _configs(shapes) -> list:
    """``triton.Config`` of ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` shapes, in order."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in shapes]


_FWD_SHAPES = [(128, 64, 8, 3), (128, 32, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 8, 2),
               (64, 64, 4, 3), (64, 32, 4, 2), (64, 64, 4, 2), (32, 32, 4, 2), (32, 16, 2, 2)]
"""Forward / dq candidates of the sliding-window and segment kernels, best first."""

_DKDV_SHAPES = [(64, 128, 8, 2), (32, 128, 8, 2), (64, 64, 8, 2), (32, 64, 8, 2), (64, 64, 4, 2),
                (32, 64, 4, 3), (32, 32, 4, 2), (16, 32, 2, 2)]
"""dk/dv candidates of the sliding-window and segment kernels (``BLOCK_N`` keys per program,
``BLOCK_M`` query rows per step), best first."""


def _fwd_configs():
    """Forward / dq candidates, best first (``LHATTN_AUTOTUNE_CONFIGS=1`` runs the first kept one).
    128-row tiles on 8 warps lead: two warpgroups of 64 rows keep wgmma at half the registers per
    thread of the 4-warp tile (no spills at D = 128, see :func:`_tile_cost`)."""
    return _configs(_FWD_SHAPES)


def _dkdv_configs():
    """dk/dv candidates (``BLOCK_N`` keys per program, ``BLOCK_M`` query rows per step), best first."""
    return _configs(_DKDV_SHAPES)


_REG_BUDGET = {"fwd": 128, "dq": 128, "dkdv": 160}
"""Largest :func:`_tile_cost` register estimate a kept config may have, per kernel kind (sliding window,
segment).  Calibrated on sm_90 with ``python -m bench.sm90`` (bf16/fp16): the measured spilling configs
are over it (e.g. fwd 128x32/4w at D = 128: 160; dq 128x64/4w at D = 64: 192) or use 8 warps on a
64-row tile (see :func:`_pruner`)."""
_SMEM_BUDGET = 200 * 1024  # bytes; an H100 SM has 227 KB per block, Triton adds its own scratch

_LSG_FWD_SHAPES = [(128, 64, 8, 3), (128, 32, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (64, 64, 4, 2),
                   (64, 32, 4, 2), (32, 32, 4, 2), (32, 16, 2, 2), (16, 16, 2, 2), (16, 16, 2, 1), (64, 16, 4, 2)]
"""LSG's forward / dq candidates (``kernels/lsg.py`` imports them as ``_FWD_SHAPES``)."""
_LSG_DKDV_SHAPES = [(64, 128, 8, 2), (32, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 3), (32, 64, 4, 2),
                    (16, 64, 4, 2), (32, 32, 4, 2), (16, 32, 2, 2), (16, 16, 2, 2)]
"""LSG's dk/dv candidates (imported as ``_DKDV_SHAPES``)."""

_LSG_REG_BUDGET = {"fwd": 80, "dq": 96, "dkdv": 144}
"""Largest :func:`_tile_cost` register estimate a kept LSG config may have, per kernel kind: below
:data:`_REG_BUDGET`, because LSG's forward and dq kernels carry six band walks (three local, two
compressed-key windows, the global keys) and its dk/dv kernels two.  Calibrated on sm_90 with
``python -m bench.sm90 --family lsg``: the spilling configs measured there are over it (fwd 128x64/4w at
D = 64: 128; fwd 64x64/4w at D = 128: 96; dq 64x64/4w at D = 128: 128; dkdv_local 32x128/8w at D = 128:
160)."""

_LSG_CAUSAL_LOCAL_DKDV_BUDGET = 120
""":data:`_LSG_REG_BUDGET` of LSG's causal local dk/dv kernel (``bench.sm90``: 64x128/8w at D = 64, model
128, took 255 registers and spilled 16 B causal, 248 and none otherwise); ``kernels/lsg.py`` imports it
as ``_CAUSAL_LOCAL_DKDV_BUDGET``."""

_D256_SHAPE = {"fwd": (64, 16, 4, 2), "dq": (64, 16, 4, 2), "dkdv": (32, 32, 4, 2)}
"""The one sliding-window / segment config kept at D >= 256, per kernel kind (BLOCK_M, BLOCK_N, warps,
stages), where the register model underestimates: compiled for sm_90 in every flag variant, bf16 and
fp16 (``bench/results/sm90-static-20261203/d256``), these spill nothing on Triton 3.9 (but see
:data:`_D256_NARROW_DKDV`) and the forward and dq run on wgmma.  The 32x32/4w forward / dq tile the
pruner chose before spilled up to 80 B (dq with dropout), and 32x16/4w or 16x32/4w ones 8-16 B (ptxas
capped them at 128-168 registers)."""

_D256_SHAPES = {True: _D256_SHAPE, False: {**_D256_SHAPE, "dq": (32, 32, 4, 2)}}
""":data:`_D256_SHAPE` by :data:`_TUNED_FOR_3_9`.  Before Triton 3.9 the 64x16/4w dq tile spills in every
flag variant (Triton 3.6: 72-496 B, 3.7 and 3.8 alike), the 32x32/4w one in none (3.6; 182-221 registers,
mma.sync; 3.8 still spills 16-64 B with dropout)."""

_D256_NARROW_DKDV = (16, 32, 4, 2)
"""The dk/dv shape at D >= 256 where :data:`_D256_SHAPE`'s 32x32/4w spilled on sm_90: the dilated
sliding window (208 B) and the global keys' kernel (40 B in LSG's launch).  It costs more SASS per
score (2.6 against 1.7 for 32x32/4w, unmasked, base variant) and spills nothing in any variant;
``kernels/sliding_window.py`` picks it."""

_LSG_D256_SHAPE = {"fwd": (16, 16, 2, 1), "dq": (64, 16, 4, 2), "dkdv": (32, 16, 4, 2)}
"""The one LSG config kept at D >= 256, per kernel kind (BLOCK_M, BLOCK_N, warps, stages): no spills in
any flag variant, bf16 and fp16, compiled for sm_90 (``bench/results/sm90-static-20261203/d256``; the
16x16/2w dk/dv tile chosen before spilled 164 B local, 84 B sparse)."""

_LSG_D256_SHAPES = {True: _LSG_D256_SHAPE, False: {**_LSG_D256_SHAPE, "dq": (32, 32, 4, 2)}}
""":data:`_LSG_D256_SHAPE` by :data:`_TUNED_FOR_3_9`: before Triton 3.9 the 64x16/4w dq tile spills (Triton 3.6:
292-376 B), 32x32/4w does not (184-186 registers, every flag variant)."""

_FWD_D64_REG_CAP = 128
"""``maxnreg`` of the sliding-window and segment forward's 128x64/8w tile at D = 64 without dropout, before
Triton 3.9 (:func:`_pruner`'s ``cap_d64``): there ptxas gives it 130-170 registers in several flag variants
(Triton 3.6: globals 130, dilation 135, fixed segments 139-141, key masks 161-166; 3.7 alike), one 8-warp
CTA per SM instead of two; capped at 128 none spills (3.6, 3.7, 3.8) and occupancy is back at 16 warps/SM.
Triton 3.9 needs no cap (128 registers where it matters) and spills with it (globals: 44 B)."""


def _tile_cost(kind: str, bm: int, bn: int, warps: int, stages: int, d: int, elem: int) -> tuple:
    """``(registers, shared bytes)`` a config needs, as a model: fp32 accumulator and score elements per
    thread (float64 counts twice), and the resident + pipelined operand tiles in shared memory.

    fwd: ``acc [BM, D]`` + scores ``[BM, BN]``; q resident, k/v staged.  dq: ``dq [BM, D]`` + scores
    and dP ``[BM, BN]``; q, dO resident.  dkdv: ``dk, dv [BN, D]`` + transposed scores and dP
    ``[BN, BM]``; k, v resident, q/dO staged."""
    threads = 32 * warps
    words = 2 if elem == 8 else 1
    if kind == "fwd":
        regs, smem = bm * d + bm * bn, elem * d * (bm + stages * 2 * bn)
    elif kind == "dq":
        regs, smem = bm * d + 2 * bm * bn, elem * d * (2 * bm + stages * 2 * bn)
    else:
        regs, smem = 2 * bn * d + 2 * bn * bm, elem * d * (2 * bn + stages * 2 * bm)
    return words * regs // threads, smem


def _capped(c, maxnreg: int):
    """A copy of config ``c`` whose kernel ptxas compiles with at most ``maxnreg`` registers per thread."""
    return triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=c.num_stages, maxnreg=maxnreg)


def _pruner(kind: str, budgets: Optional[Dict[str, int]] = None, tile: Optional[str] = None,
            bound: Optional[str] = None, causal_budget: Optional[int] = None,
            d256: Optional[Dict[bool, Dict[str, tuple]]] = None, cap_d64: bool = False):
    """The autotuner's early pruner for one kernel kind (``kind``: "fwd", "dq" or "dkdv"): keep, in
    their best-first order, the configs whose :func:`_tile_cost` fits the register budget
    (``budgets[kind]``, default :data:`_REG_BUDGET`) and :data:`_SMEM_BUDGET` for this head dim and
    dtype, and whose 8 warps (two warpgroups) get a 128-row accumulator tile -- on a 64-row tile they
    split the head dim and spilled at D >= 128 (sm_90, ``bench.sm90``).  At D >= 128, tiles of fewer
    than 64 accumulator rows (mma.sync, not wgmma; 32x32/4w spilled there) are kept only when no larger
    tile fits.  The smallest tile if none fits.

    Options (LSG, :func:`_lsg_tuned`): ``tile``/``bound``: the ``tile`` axis (the one a program owns) not
    much longer than the launch argument ``bound`` (an LSG block, ``Tc``); ``causal_budget`` replaces the
    budget of a ``CAUSAL`` launch; ``d256``: the one shape kept at D >= 256 per kind, where the register
    model underestimates, by :data:`_TUNED_FOR_3_9` (default :data:`_D256_SHAPES`; it need not be one of
    ``configs``).  ``cap_d64`` (sliding window, segments): before Triton 3.9, the 128x64/8w forward tile at
    D = 64 without dropout gets ``maxnreg`` :data:`_FWD_D64_REG_CAP`."""
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}  # launches pass keywords: they arrive in kwargs
        d = args["HEAD_DIM"]
        q = args.get("Q")
        elem = q.element_size() if q is not None else 2
        budget = (causal_budget if causal_budget is not None and args.get("CAUSAL")
                  else (_REG_BUDGET if budgets is None else budgets)[kind])
        cap = None if tile is None else max(16, next_power_of_2(int(args[bound])))

        def rows(c):  # the accumulator's rows: under 64 there is no wgmma (mma.sync)
            return c.kwargs["BLOCK_N"] if kind == "dkdv" else c.kwargs["BLOCK_M"]

        def fits(c):
            regs, smem = _tile_cost(kind, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, d,
                                    elem)
            return (regs <= budget and smem <= _SMEM_BUDGET and (c.num_warps < 8 or rows(c) >= 128)
                    and (cap is None or c.kwargs[tile] <= cap))
        if d >= 256:  # the register model underestimates here: the tile measured best
            return _configs([(_D256_SHAPES if d256 is None else d256)[_TUNED_FOR_3_9][kind]])
        kept = [c for c in configs if fits(c)]
        if d >= 128 and any(rows(c) >= 64 for c in kept):  # mma.sync tiles only as the last resort
            kept = [c for c in kept if rows(c) >= 64]
        if cap_d64 and not _TUNED_FOR_3_9 and d == 64 and not args.get("DROPOUT"):
            kept = [_capped(c, _FWD_D64_REG_CAP) if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps)
                    == (128, 64, 8) else c for c in kept]
        return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_warps,
                                                     c.num_stages))]
    return prune


def _tuned(configs, key, kind: str, **prune):
    """Autotune on CUDA over ``configs`` with ``key``, pruned by :func:`_pruner` (``kind`` and the
    ``prune`` options); the plain kernel (block sizes passed at launch, :func:`_meta`) under the
    interpreter."""
    def wrap(fn):
        if INTERPRET:
            return fn
        return triton.autotune(configs=configs, key=key,
                               prune_configs_by={"early_config_prune": _pruner(kind, **prune)})(fn)
    return wrap


def _lsg_tuned(shapes, key, kind: str, tile: str, bound: str, causal_budget: Optional[int] = None):
    """LSG's :func:`_tuned` (``kernels/lsg.py`` imports it as ``_tuned``): candidates given as shapes,
    :data:`_LSG_REG_BUDGET`, the ``tile``/``bound`` cap, ``causal_budget`` and :data:`_LSG_D256_SHAPES`."""
    return _tuned(_configs(shapes), key, kind, budgets=_LSG_REG_BUDGET, tile=tile, bound=bound,
                  causal_budget=causal_budget, d256=_LSG_D256_SHAPES)


# --------------------------------------------------------------------------------------
# splitting serial loops
# --------------------------------------------------------------------------------------


def _split(n_programs: int, n_items: int, device: torch.device, interpret_chunk: int = INTERPRET_SPLIT_CHUNK) -> int:
    """Chunk length for splitting a serial loop over ``n_items`` (keys of a dense pass,
    rows of the global-key gradient) when ``n_programs`` alone would leave the GPU idle;
    ``interpret_chunk`` under the interpreter."""
    if INTERPRET:
        return interpret_chunk
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = 2 * sms
    if n_programs >= want or n_items <= 1024:
        return max(n_items, 1)
    n_split = min(triton.cdiv(want, n_programs), triton.cdiv(n_items, 512))
    return triton.cdiv(triton.cdiv(n_items, n_split), 256) * 256


def _split_for(namespace: dict) -> Callable[[int, int, torch.device], int]:
    """A family module's ``_split(n_programs, n_items, device)``: :func:`_split` with the
    ``INTERPRET_SPLIT_CHUNK`` of ``namespace`` (the module's ``globals()``), looked up at each call."""
    def split(n_programs: int, n_items: int, device: torch.device) -> int:
        return _split(n_programs, n_items, device, namespace["INTERPRET_SPLIT_CHUNK"])
    split.__name__ = split.__qualname__ = "_split"
    return split
