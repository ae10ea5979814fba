"""The one-sided band edges (``ONE_SIDED``, issue 11): with a wide enough band, the left masked edge of a
band walk tests only each row's first column and the right edge only its last one
(``kernels/_core.py``, "one-sided edges"; the launch decision is ``kernels/_launch.py``'s
``_one_sided_for`` / ``_segment_one_sided_for``).

* The walk, simulated in Python tile by tile, exactly as the kernels split it (``block_range``, the
  segment ranges, ``_one_sided_split``; dk/dv without ``SPLIT_END``: the lse drop of the query rows past
  the sequence):
  wherever the launch decision says one-sided, every (row, column) pair is visited once and seen iff the
  band says so -- for all small windows, block shapes, sequence lengths and key chunks.
* The kernels under the interpreter (16 x 16 tiles) on windows just at and just under the threshold
  (fwd/dq and dk/dv decide separately), causal, dilated, with padding and globals, against the oracle.
"""

import itertools
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

import pytest  # noqa: E402

pytest.importorskip("triton")

import lhattn  # noqa: E402
from lhattn.patterns import Segments, SlidingWindow  # noqa: E402

from cases import Case, cast, make_inputs, run_with_grads  # noqa: E402
from tolerance import assert_close_to_oracle  # noqa: E402

LAUNCH = pytest.importorskip("lhattn.kernels._launch")
SW_KERNELS = pytest.importorskip("lhattn.kernels.sliding_window")
SEG_KERNELS = pytest.importorskip("lhattn.kernels.segment")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------------------
# the walk in Python
# --------------------------------------------------------------------------------------


def _cdiv(a, b):
    return -(-a // b)


def _block_range(start, before, after, k_begin, k_end, bs, bo):
    """kernels._core.block_range (every quotient there is of a non-negative number)."""
    lo = max(start - before, k_begin) // bo * bo
    hi = max(min(start + bs + after, k_end), lo)
    hi_up = _cdiv(hi, bo) * bo
    full_lo = _cdiv(max(start + bs - 1 - before, k_begin), bo) * bo
    full_lo = min(max(full_lo, lo), hi_up)
    full_hi = max(min(start + after + 1, k_end) // bo * bo, full_lo)
    return lo, full_lo, full_hi, hi


def _segment_block_range(s_first, e_first, s_last, e_last, bo):
    """kernels.segment._segment_block_range."""
    lo = s_first // bo * bo
    hi = e_last
    hi_up = _cdiv(hi, bo) * bo
    full_lo = min(max(_cdiv(s_last, bo) * bo, lo), hi_up)
    full_hi = max(e_first // bo * bo, full_lo)
    return lo, full_lo, full_hi, hi


def _split(lo, full_lo, full_hi, k_end, bo):
    """kernels._core._one_sided_split."""
    e = k_end // bo * bo
    cut = min(full_lo, max(e, lo))
    return cut, max(min(full_hi, e), cut)


def _walk(rows, bounds, ranges, k_begin, k_end, bo, split):
    """Check one block's one-sided walk: ``bounds(i) = (first, last)`` column row ``i`` sees (inclusive,
    clipped to ``[k_begin, k_end)``), ``ranges = (lo, full_lo, full_hi, hi)``.  ``split``: the tile holding
    ``k_end`` moves to the right edge (the forward and dq always; dk/dv with ``SPLIT_END``); else the left
    edge's columns past ``k_end`` drop out (dk/dv: those query rows' lse is loaded as ``+inf``)."""
    lo, full_lo, full_hi, hi = ranges
    if split:
        full_lo, full_hi = _split(lo, full_lo, full_hi, k_end, bo)
    seen = {}

    def visit(i, j, ok):
        seen[i, j] = seen.get((i, j), 0) + int(ok)
    for j0 in range(lo, full_lo, bo):  # left edge: first column only
        assert j0 >= 0
        for j in range(j0, j0 + bo):
            assert j < k_end or not split  # unclamped loads inside [0, k_end)
            for i in rows:
                visit(i, j, j >= bounds(i)[0] and j < k_end)
    for j0 in range(full_lo, full_hi, bo):  # unmasked
        for j in range(j0, j0 + bo):
            for i in rows:
                first, last = bounds(i)
                assert first <= j <= last, (i, j, "unmasked tile outside the band")
                visit(i, j, True)
    for j0 in range(full_hi, hi, bo):  # right edge: last column only (loads clamped / predicated at k_end)
        for j in range(j0, j0 + bo):
            for i in rows:
                visit(i, j, j <= min(bounds(i)[1], k_end - 1))
    for (i, j), count in seen.items():
        first, last = bounds(i)
        assert count == int(first <= j <= last), (i, j, count, ranges)
    for i in rows:
        first, last = bounds(i)
        assert all(seen.get((i, j)) == 1 for j in range(first, last + 1)), (i, ranges)


def _sliding_window_walk(n, left, right, bm, bn, kind, chunk=0, split=True):
    bs, bo, before, after = (bn, bm, right, left) if kind == "dkdv" else (bm, bn, left, right)
    chunks = [(0, n)] if chunk == 0 else [(c, min(n, c + chunk)) for c in range(0, n, chunk)]
    for start in range(0, n, bs):
        rows = range(start, min(n, start + bs))
        for k_begin, k_end in chunks:
            def bounds(i):
                return max(i - before, k_begin), min(i + after, k_end - 1)
            ranges = _block_range(start, before, after, k_begin, k_end, bs, bo)
            _walk(rows, bounds, ranges, k_begin, k_end, bo, split)


def _decision(kind, left, right, bm, bn, chunk=0, n_k=None):
    ns = {"INTERPRET_BLOCKS": {kind: (bm, bn)}}
    return LAUNCH._one_sided_for(ns)(kind, left, right, chunk, n_k=n_k)


def _decide(kind, left, right, bm, bn, chunk=0):
    return _decision(kind, left, right, bm, bn, chunk)["ONE_SIDED"]


SHAPES = [(16, 16), (32, 16), (16, 32), (64, 16), (16, 64), (32, 32)]


@pytest.mark.parametrize("kind", ["fwd", "dkdv"])
def test_sliding_window_walk_is_exact_where_one_sided(monkeypatch, kind):
    monkeypatch.setattr(LAUNCH, "INTERPRET", True)
    decided = set()
    for (bm, bn), n in itertools.product(SHAPES, (1, 17, 70)):
        for left, right in itertools.product((0, 1, 13, 14, 15, 16, 17, 31, 33, 64, 100), repeat=2):
            left, right = min(left, n), min(right, n)  # the launcher clamps the window to Nk
            got = _decision(kind, left, right, bm, bn, n_k=n)
            split = got.get("SPLIT_END", True)
            decided.add((got["ONE_SIDED"], split))
            if got["ONE_SIDED"]:
                _sliding_window_walk(n, left, right, bm, bn, kind, split=split)
    # dk/dv: both ways of ending the left edge are walked
    want = {(True, True), (True, False), (False, False)} if kind == "dkdv" else {(True, True), (False, True)}
    assert decided == want


def test_sliding_window_dense_split_walk_is_exact_where_one_sided(monkeypatch):
    """The dense pass (every key, split into chunks): one-sided only with tile-aligned chunks."""
    monkeypatch.setattr(LAUNCH, "INTERPRET", True)
    decided = set()
    for (bm, bn), n, chunk in itertools.product(SHAPES, (17, 47, 70), (0, 13, 16, 32, 40)):
        big = 2 * n  # the dense pass's window: Nq + Nk
        one = _decide("fwd", big, big, bm, bn, chunk)
        decided.add(one)
        assert not (one and chunk % bn)
        if one:
            _sliding_window_walk(n, big, big, bm, bn, "fwd", chunk)
    assert decided == {True, False}
    decided = set()
    for (bm, bn), n in itertools.product(SHAPES, (1, 17, 47, 70)):  # the dense dk/dv pass: one chunk
        got = _decision("dkdv", 2 * n, 2 * n, bm, bn, n_k=n)
        assert got["SPLIT_END"] == got["ONE_SIDED"]  # the band reaches every query row
        decided.add(got["ONE_SIDED"])
        if got["ONE_SIDED"]:
            _sliding_window_walk(n, 2 * n, 2 * n, bm, bn, "dkdv")
    assert decided == {True, False}


def test_segment_walk_is_exact_where_one_sided(monkeypatch):
    monkeypatch.setattr(LAUNCH, "INTERPRET", True)
    decided = set()
    for (bm, bn), n, size, kind in itertools.product(SHAPES, (5, 16, 47, 64, 70), (1, 3, 16, 24, 32, 48, 64),
                                                     ("fwd", "dkdv")):
        size = min(size, n)
        got = LAUNCH._segment_one_sided_for({"INTERPRET_BLOCKS": {kind: (bm, bn)}})(kind, size)
        one = got["ONE_SIDED"]
        assert got.get("SPLIT_END", one) == one
        decided.add(one)
        if not one:
            continue
        bs, bo = (bn, bm) if kind == "dkdv" else (bm, bn)

        def seg(i):
            return i // size * size, min(i // size * size + size, n)
        for start in range(0, n, bs):
            last = min(n, start + bs) - 1
            (s_first, e_first), (s_last, e_last) = seg(start), seg(last)
            ranges = _segment_block_range(s_first, e_first, s_last, e_last, bo)
            _walk(range(start, last + 1), lambda i: (seg(i)[0], seg(i)[1] - 1), ranges, s_first, e_last, bo, True)
    assert decided == {True, False}


def test_launch_decision_at_the_threshold(monkeypatch):
    """16 x 16 tiles (the interpreter's): the windows the kernel tests below run on either side."""
    monkeypatch.setattr(LAUNCH, "INTERPRET", True)
    assert _decide("fwd", 14, 15, 16, 16) and _decide("dkdv", 14, 15, 16, 16)
    assert not _decide("fwd", 13, 15, 16, 16) and _decide("dkdv", 13, 15, 16, 16)  # fwd: left >= BLOCK_N - 2
    assert not _decide("fwd", 14, 14, 16, 16) and not _decide("dkdv", 14, 14, 16, 16)
    assert _decide("fwd", 15, 0, 16, 16) and _decide("dkdv", 15, 0, 16, 16)  # causal
    assert not _decide("fwd", 14, 0, 16, 16) and not _decide("dkdv", 14, 0, 16, 16)
    # dk/dv moves the query tile holding the sequence end to the right edge when right >= BLOCK_M - 2 (or the
    # band reaches every query row): not in a causal window, whose keys see their own row first
    assert _decision("dkdv", 14, 15, 16, 16)["SPLIT_END"] and _decision("dkdv", 15, 14, 16, 16)["SPLIT_END"]
    assert _decision("dkdv", 15, 13, 16, 16) == {"ONE_SIDED": True, "SPLIT_END": False}
    assert _decision("dkdv", 15, 13, 16, 16, n_k=13) == {"ONE_SIDED": True, "SPLIT_END": True}
    assert _decision("dkdv", 15, 0, 16, 16) == {"ONE_SIDED": True, "SPLIT_END": False}
    assert _decision("dkdv", 14, 14, 16, 16) == {"ONE_SIDED": False, "SPLIT_END": False}
    # the dk/dv kernels take both keywords, whatever the call (a dense pass, D > 128, per-token segments)
    ns = {"INTERPRET_BLOCKS": {"dkdv": (16, 16)}}
    for args in ((30, 30), (30, 30, 0, True), (30, 30, 0, False, 256), (30, 0, 0, False, 128, 100)):
        assert set(LAUNCH._one_sided_for(ns)("dkdv", *args)) == {"ONE_SIDED", "SPLIT_END"}, args
    for seg in (None, 16, 17):
        assert set(LAUNCH._segment_one_sided_for(ns)("dkdv", seg)) == {"ONE_SIDED", "SPLIT_END"}, seg


@pytest.mark.parametrize("tuned_for_3_9", [True, False])
def test_sliding_window_dkdv_split_only_where_measured(monkeypatch, tuned_for_3_9):
    """The sliding window's dk/dv takes ``SPLIT_END`` where sm_90 compiles it better (its launch's
    ``_dkdv_one_sided``): not with dropout nor with a dilation at D > 64, nor before Triton 3.9."""
    monkeypatch.setattr(SW_KERNELS, "_TUNED_FOR_3_9", tuned_for_3_9)
    band = dict(left=256, right=256, dilation=1, DROPOUT=False)
    for d, change, want in ((64, {}, True), (128, {}, True), (64, {"DROPOUT": True}, False),
                            (32, {"DROPOUT": True}, False), (128, {"DROPOUT": True}, False),
                            (64, {"dilation": 2}, True), (128, {"dilation": 2}, False), (256, {}, False)):
        got = SW_KERNELS._dkdv_one_sided(d, 4096, dict(band, **change))
        assert got == {"ONE_SIDED": d <= 128, "SPLIT_END": want and tuned_for_3_9}, (d, change, got)
    # a causal window stays one-sided without the split
    assert SW_KERNELS._dkdv_one_sided(64, 4096, dict(band, right=0)) == {"ONE_SIDED": True, "SPLIT_END": False}


def test_segment_dkdv_split_only_where_measured():
    """Fixed segments' dk/dv takes ``SPLIT_END`` with ``ONE_SIDED`` (every release), but not with dropout at
    D = 16 (``kernels/segment.py``, ``_dkdv_one_sided``); per-token bounds take neither."""
    for d, dropout in itertools.product((16, 32, 64, 128, 256), (False, True)):
        got = SEG_KERNELS._dkdv_one_sided(d, 512, dropout)
        assert got == {"ONE_SIDED": True, "SPLIT_END": not (dropout and d <= 16)}, (d, dropout, got)
    assert SEG_KERNELS._dkdv_one_sided(64, None, False) == {"ONE_SIDED": False, "SPLIT_END": False}


# --------------------------------------------------------------------------------------
# the kernels (interpreter: 16 x 16 tiles)
# --------------------------------------------------------------------------------------


def _attn(backend):
    def fn(q, k, v, key_padding_mask, global_mask, global_qkv, pattern):
        return lhattn.attention(q, k, v, pattern, key_padding_mask=key_padding_mask, global_mask=global_mask,
                                global_qkv=global_qkv, backend=backend, return_lse=True)
    return fn


def _compare(case, pattern, dtype=torch.float32):
    inputs = make_inputs(case, torch.float64, DEVICE)
    oracle = run_with_grads(_attn("reference"), inputs, pattern=pattern)
    ref_low = run_with_grads(_attn("reference"), cast(inputs, dtype), pattern=pattern)
    got = run_with_grads(_attn("triton"), cast(inputs, dtype), pattern=pattern)
    for name in oracle:
        assert_close_to_oracle(f"{name} ({case.id}, {pattern})", got[name], ref_low[name], oracle[name])


def _record_one_sided(monkeypatch, module):
    """Record every launch decision of ``module`` (kind -> set of ONE_SIDED values)."""
    seen = {}
    inner = module._one_sided

    def spy(kind, *args):
        out = inner(kind, *args)
        seen.setdefault(kind, set()).add(out["ONE_SIDED"])
        if "SPLIT_END" in out and not hasattr(module, "_dkdv_one_sided"):
            seen.setdefault(kind + " split", set()).add(out["SPLIT_END"])
        return out
    monkeypatch.setattr(module, "_one_sided", spy)
    if hasattr(module, "_dkdv_one_sided"):  # each family's dk/dv launch has the last word on SPLIT_END
        inner_dkdv = module._dkdv_one_sided

        def spy_dkdv(*args):
            out = inner_dkdv(*args)
            seen.setdefault("dkdv split", set()).add(out["SPLIT_END"])
            return out
        monkeypatch.setattr(module, "_dkdv_one_sided", spy_dkdv)
    return seen


@pytest.mark.parametrize("window, dilation, want", [
    ((14, 15), 1, {"fwd": True, "dq": True, "dkdv": True, "dkdv split": True}),  # at the threshold
    ((13, 15), 2, {"fwd": False, "dq": False, "dkdv": True, "dkdv split": True}),  # fwd/dq just under it
    ((15, 0), 1, {"fwd": True, "dq": True, "dkdv": True, "dkdv split": False}),  # causal, at the threshold
], ids=["w14-15", "w13-15-dil2", "causal15"])
def test_sliding_window_kernels_at_the_threshold(monkeypatch, window, dilation, want):
    if not SW_KERNELS.INTERPRET:
        pytest.skip("block sizes are autotuned on GPU")
    monkeypatch.setattr(SW_KERNELS, "INTERPRET_BLOCKS", {"fwd": (16, 16), "dq": (16, 16), "dkdv": (16, 16)})
    seen = _record_one_sided(monkeypatch, SW_KERNELS)
    # n not a multiple of 16: the last key tile crosses the sequence end
    _compare(Case(b=2, h=2, h_kv=1, n=45, n_global="many", padding=True, seed=21),
             SlidingWindow(window, dilation=dilation))
    for kind, value in want.items():
        assert value in seen[kind], (kind, seen)


def test_segment_kernels_one_sided(monkeypatch):
    if not SEG_KERNELS.INTERPRET:
        pytest.skip("block sizes are autotuned on GPU")
    monkeypatch.setattr(SEG_KERNELS, "INTERPRET_BLOCKS", {"fwd": (16, 16), "dq": (16, 16), "dkdv": (16, 16)})
    seen = _record_one_sided(monkeypatch, SEG_KERNELS)
    _compare(Case(b=2, h=2, h_kv=1, n=45, n_global="many", padding=True, seed=22), Segments(16))
    assert seen == {"fwd": {True}, "dq": {True}, "dkdv": {True}, "dkdv split": {True}}, seen
