"""Context parallelism with the Triton kernels as each rank's engine (lhattn.distributed._local).

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py without a
GPU), so the switch is forced (``ENGINE = "triton"``) on 2 gloo ranks with tiny shapes: each rank
compares its output, lse and input gradients with the single-process fallback call on the whole
sequence (fp64 <= 1e-9, fp32 <= 1e-5) and reports how often the Triton paths ran.  The dropout cases
use the same seed in both calls (the same entries must be dropped: the rule numbers rows and keys by
token position, a rank's kernels by index) and check that dropout changed this rank's output.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lhattn
from lhattn.distributed import _local, context_parallel_attention
from tolerance import max_err

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="forces the Triton engine on CPU tensors: needs TRITON_INTERPRET=1")

TOL = {torch.float64: 1e-9, torch.float32: 1e-5}
SHARDS = [13, 7]  # the second shard is shorter than the windows below
N = sum(SHARDS)

# name -> pattern, dtype, heads (H, H_kv), head dim, globals (both batch rows; row 1 keeps the first only),
# padding (the last tokens of batch row 1), segment cuts, dropout p (seed 1234 + case index)
CASES = {
    # the window spans more than the second shard; globals in both shards; D=8 runs at 16 (zero-padded)
    "wide_window_globals_padding_gqa": dict(pattern=lhattn.SlidingWindow((7, 9)), heads=(4, 2), d=8,
                                            globals=[1, 13, 16], padding=3),
    "causal_dilated_globals_fp32": dict(pattern=lhattn.SlidingWindow(3, dilation=2, causal=True),
                                        dtype=torch.float32, globals=[12, 14], padding=2),
    "segments_ragged_globals": dict(pattern=lhattn.Segments(), segments=[10, 15], globals=[2, 14], padding=2,
                                    heads=(2, 1)),
    "segments_fixed": dict(pattern=lhattn.Segments(6), d=16),
    # dropout: the rank's rows / keys start at its halo's first token, its global keys are appended after
    # them, its global rows are gathered -- every one must keep the token position of the single-process call
    "dropout_wide_window_globals_padding_gqa": dict(pattern=lhattn.SlidingWindow((7, 9)), heads=(4, 2), d=8,
                                                    globals=[1, 13, 16], padding=3, dropout=0.3),
    "dropout_causal_dilated_globals_fp32": dict(pattern=lhattn.SlidingWindow(3, dilation=2, causal=True),
                                                dtype=torch.float32, globals=[3, 14], padding=2, dropout=0.2),
    # (cuts chosen so that rank 1's range starts inside the sequence, at token 11, in both batch rows)
    "dropout_segments_ragged_globals_gqa": dict(pattern=lhattn.Segments(), segments=[4, 11, 15], globals=[2, 14],
                                                padding=2, heads=(4, 2), dropout=0.25),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _split(x, rank, dim):
    return x.narrow(dim, sum(SHARDS[:rank]), SHARDS[rank])


def _inputs(case, seed):
    dtype = case.get("dtype", torch.float64)
    (h, h_kv), d, b = case.get("heads", (2, 2)), case.get("d", 16), 2
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, N, d, generator=g, dtype=dtype)
    k, v = (torch.randn(b, h_kv, N, d, generator=g, dtype=dtype) for _ in range(2))
    dout = torch.randn(b, h, N, d, generator=g, dtype=dtype)
    kw = {}
    if "globals" in case:
        gm = torch.zeros(b, N, dtype=torch.bool)
        gm[0, case["globals"]] = True
        gm[1, case["globals"][:1]] = True
        kw["global_mask"] = gm
    if "padding" in case:
        kpm = torch.zeros(b, N, dtype=torch.bool)
        kpm[1, N - case["padding"]:] = True
        kw["key_padding_mask"] = kpm
    if "segments" in case:
        ids = (torch.arange(N)[:, None] >= torch.tensor(case["segments"])[None, :]).sum(1)
        kw["segment_ids"] = torch.stack([ids, ids // 2])
    return (q, k, v), dout, kw


def _errors(case, rank, seed):
    (q, k, v), dout, kw = _inputs(case, seed)
    drop = dict(dropout_p=case["dropout"], dropout_seed=1234 + seed) if "dropout" in case else {}
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    ref, ref_lse = lhattn.attention(*full, case["pattern"], backend="fallback", return_lse=True, **kw, **drop)
    ref.backward(dout)
    shard = [_split(x, rank, 2).clone().requires_grad_() for x in (q, k, v)]
    out, lse = context_parallel_attention(*shard, case["pattern"], return_lse=True, **drop,
                                          **{name: _split(t, rank, 1) for name, t in kw.items()})
    out.backward(_split(dout, rank, 2))
    errs = {"out": (out - _split(ref, rank, 2)).abs().max().item(), "lse": max_err(lse, _split(ref_lse, rank, 2))}
    for name, a, r in zip("qkv", shard, full):
        errs["d" + name] = (a.grad - _split(r.grad, rank, 2)).abs().max().item()
    if drop:  # how far this rank's rows are from the undropped call: dropout must have changed them
        plain = lhattn.attention(q, k, v, case["pattern"], backend="fallback", **kw)
        changed = (_split(ref, rank, 2) - _split(plain, rank, 2)).abs()
        if "globals" in case:  # a global row of this shard (its attention: the merged dense pass)
            rows = [i - sum(SHARDS[:rank]) for i in case["globals"] if _split(torch.arange(N), rank, 0).eq(i).any()]
            errs["changed_global_row"] = changed[0, :, rows].max().item()
        errs["changed"] = changed.max().item()
    return errs


def _refusals(rank):
    """With ENGINE='triton', what the kernels cannot do here raises instead of falling back."""
    q = torch.randn(1, 2, SHARDS[rank], 16)
    said = {}
    for name, pattern, kw in (("lsg", lhattn.LSG(block_size=4), {}),
                              ("lsg_dropout", lhattn.LSG(block_size=4), dict(dropout_p=0.1, dropout_seed=1))):
        try:
            context_parallel_attention(q, q, q, pattern, **kw)
            said[name] = None
        except NotImplementedError as e:
            said[name] = str(e)
    return said


def _worker(rank, world, port, path):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    _local.ENGINE = "triton"
    result = {}
    try:
        for i, (name, case) in enumerate(CASES.items()):
            result[name] = _errors(case, rank, seed=50 + i)
        result["calls"] = dict(_local.CALLS)
        result["refusals"] = _refusals(rank)
    except Exception:  # noqa: BLE001 -- reported to the test, which fails with the traceback
        result["error"] = traceback.format_exc()
    with open(os.path.join(path, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    path = tmp_path_factory.mktemp("cp_triton")
    mp.start_processes(_worker, args=(2, _free_port(), str(path)), nprocs=2, join=True, start_method="fork")
    out = []
    for r in range(2):
        with open(path / f"rank{r}.json") as f:
            res = json.load(f)
        assert "error" not in res, f"rank {r}:\n{res['error']}"
        out.append(res)
    return out


def test_triton_engine_matches_single_process(results):
    failures = []
    for name, case in CASES.items():
        tol = TOL[case.get("dtype", torch.float64)]
        for rank, res in enumerate(results):
            failures += [f"{name} rank {rank} {what}: {err:.3e} > {tol:.0e}"
                         for what, err in res[name].items() if not what.startswith("changed") and not err <= tol]
    assert not failures, "\n".join(failures)


def test_dropout_dropped_something(results):
    """Each dropout case changed each rank's output, and a global row of each rank, by far more than
    the tolerance: the comparison above did compare dropped attention."""
    cases = [name for name, case in CASES.items() if "dropout" in case]
    assert len(cases) == 3
    for name in cases:
        for rank, res in enumerate(results):
            for what in ("changed", "changed_global_row"):
                assert res[name][what] > 1e-2, (name, rank, what, res[name][what])


def test_triton_engine_was_used(results):
    globals_cases = sum("globals" in c for c in CASES.values())
    for res in results:
        assert res["calls"] == {"triton_band": len(CASES), "triton_global_rows": globals_cases}, res["calls"]


def test_triton_engine_refuses_what_it_cannot_run(results):
    for res in results:
        assert "LSG" in (res["refusals"]["lsg"] or ""), res["refusals"]
        assert "LSG" in (res["refusals"]["lsg_dropout"] or ""), res["refusals"]


def test_engine_switch_without_spawning(monkeypatch):
    q = torch.randn(1, 2, 8, 16)
    w = lhattn.SlidingWindow(2)
    assert _local.choose(q, w, 0.0) == "fallback"  # "auto" on CPU tensors
    old = _local.ENGINE
    try:
        _local.ENGINE = "triton"
        assert _local.choose(q, w, 0.0) == "triton"
        assert _local.choose(q, w, 0.1) == "triton"  # dropout runs on the kernels too
        with pytest.raises(NotImplementedError, match="LSG"):
            _local.choose(q, lhattn.LSG(block_size=4), 0.1)
        _local.ENGINE = "auto"
        monkeypatch.setattr(_local, "_on_cuda", lambda _q: True)  # as on CUDA: Triton, else a warning why not
        assert _local.choose(q, w, 0.0) == "triton"
        assert _local.choose(q, w, 0.1) == "triton"
        with pytest.warns(lhattn.FallbackWarning, match="LSG"):
            assert _local.choose(q, lhattn.LSG(block_size=4), 0.1) == "fallback"
        assert _local.choose(q, w, 0.0, "fallback") == "fallback"  # a call's backend overrides ENGINE
        _local.ENGINE = "fallback"
        assert _local.choose(q, w, 0.0, "triton") == "triton"
        _local.ENGINE = "gpu"
        with pytest.raises(ValueError, match="ENGINE"):
            _local.choose(q, w, 0.0)
    finally:
        _local.ENGINE = old
    with pytest.raises(ValueError, match="backend must be one of"):
        context_parallel_attention(q, q, q, w, backend="gpu")


def test_dropout_position_arguments_are_checked():
    """The launchers' dropout positions of a call on part of a sequence: bad ones are refused by name
    before anything is launched."""
    from lhattn._dropout import make_state
    from lhattn.kernels.segment import segment_fwd
    from lhattn.kernels.sliding_window import sliding_window_fwd

    q = torch.randn(1, 2, 8, 16)
    gidx = torch.tensor([[0, 5]])
    drop = dict(dropout_p=0.1, dropout_state=make_state(0.1, 7, q.device))
    for off in (-1, 2 ** 31, 1.5, True):
        with pytest.raises(ValueError, match="drop_row_offset"):
            sliding_window_fwd(q, q, q, window=(2, 2), drop_row_offset=off, **drop)
        with pytest.raises(ValueError, match="drop_col_offset"):
            segment_fwd(q, q, q, segment_size=4, drop_col_offset=off, **drop)
    for cols, keys in ((torch.tensor([[3]]), gidx), (torch.tensor([[3, 4]], dtype=torch.int32), gidx),
                       (torch.tensor([[3, 4]]), None)):
        with pytest.raises(ValueError, match="drop_cols"):
            sliding_window_fwd(q, q, q, window=(2, 2), global_keys=keys, drop_cols=cols, **drop)
        with pytest.raises(ValueError, match="drop_cols"):
            segment_fwd(q, q, q, segment_size=4, global_keys=keys, drop_cols=cols, **drop)
