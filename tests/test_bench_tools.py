"""The benchmark harness's bookkeeping (no timing is asserted): what a run says it did not
measure, where it writes, the plots it draws, and the demo's interleaved rounds."""

import gc
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import demo, run  # noqa: E402
from bench.case import _freeze_heap  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _args(*argv):
    return run.build_parser().parse_args(list(argv))


def test_quick_cpu_states_every_omission():
    args = _args("--quick")
    configs = run._configs_from_args(args, "cpu")
    used = {p for c in configs for p in c.providers}
    said = run.omissions(configs, "cpu", args, memory=False)
    text = "\n".join(said)
    for name in run.PROVIDERS:
        assert name in used or f"{name}:" in text, f"{name} is neither run nor said to be left out:\n{text}"
    assert "flex: not run by --quick on CPU" in text
    assert any(line.startswith("peak memory: --quick") for line in said), text
    assert "not run for lsg, segment" in text


def test_explicit_providers_and_measured_memory_say_so():
    args = _args("--providers", "lhattn-fallback,flex", "--pattern", "sliding_window")
    configs = run._configs_from_args(args, "cpu")
    for c in configs:
        c.providers = [p for p in ("lhattn-fallback", "flex") if p in c.providers]
    said = run.omissions(configs, "cpu", args, memory=True)
    assert "sdpa-math: not in --providers" in said
    assert "lhattn-triton: needs CUDA" in "\n".join(said)
    assert not any(line.startswith("peak memory") for line in said)
    assert not any("longformer: not run for" in line for line in said)


def test_default_output_is_git_ignored(tmp_path, capsys):
    run.main(["--quick", "--dry-run", "--pattern", "segment"])
    out = capsys.readouterr().out
    assert "not measured: flex" in out and "seg32-d32" in out
    assert "/bench/out/" in (ROOT / ".gitignore").read_text().splitlines()
    assert "bench/out/" in run.build_parser().format_help()


def _result(n, mode, ms, mem=None, group="lsg(block_size=32,sparsity_factor=4,sparsity_type=norm) B=1"):
    return {"group": group, "n": n, "mode": mode, "provider": "lhattn-fallback", "status": "ok",
            "median_ms": ms, "peak_mem_bytes": mem}


def test_plots_skip_the_memory_figure_without_memory(tmp_path):
    pytest.importorskip("matplotlib")
    from bench.plot import plot_all

    data = {"meta": {}, "results": [_result(256, "fwd", 1.0), _result(512, "fwd", 2.0)]}
    written = plot_all(data, str(tmp_path))
    assert [os.path.basename(p) for p in written] == ["bench_time.png"]
    assert sorted(os.listdir(tmp_path)) == ["bench_time.png"], "no empty memory figure on disk"
    data["results"] = [_result(256, "fwd", 1.0, 2 ** 20), _result(512, "fwd", 2.0, 2 ** 21)]
    assert sorted(os.path.basename(p) for p in plot_all(data, str(tmp_path))) == ["bench_memory.png",
                                                                                  "bench_time.png"]


def test_demo_rounds_interleave_in_rotating_order():
    calls = []
    fns = {name: (lambda name=name: calls.append(name), []) for name in ("dense", "a", "b")}
    times = demo.interleaved(fns, "cpu", rounds=3)
    assert calls == ["dense", "a", "b", "a", "b", "dense", "b", "dense", "a"]
    assert {k: len(v) for k, v in times.items()} == {"dense": 3, "a": 3, "b": 3}
    assert demo.spread([10.0, 12.0, 11.0]) == pytest.approx(2 / 11)
    calls.clear()
    times = demo.interleaved(fns, "cpu", rounds=5, deadline=0.0)  # past: two rounds, then stop
    assert {k: len(v) for k, v in times.items()} == {"dense": 2, "a": 2, "b": 2}


def test_demo_says_the_budget_is_for_all_timings(capsys):
    demo.main(["--device", "cpu", "--n", "64,65536", "--budget-s", "0.001", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "n=65536 skipped" in out and "one budget for all timings together" in out
    assert "spread" in out


def test_freeze_heap_leaves_collection_working():
    gc.enable()
    _freeze_heap()
    try:
        cycle = []
        cycle.append(cycle)
        del cycle
        assert gc.collect() >= 1, "objects made after the freeze are still collected"
    finally:
        gc.unfreeze()


def test_headline_files_exist_from_the_start_and_after_every_case(tmp_path, monkeypatch):
    """bench.headline (the GPU proof's ratios) writes summary.md and headline.json before its first case and
    after each one, so that gpu_check.sh killing it mid-case keeps what was measured; a case past the time
    limit is listed as skipped, not dropped."""
    import json
    from bench import headline

    seen, real_run = [], headline.run

    def fake_run(n_scale, device, deadline, log=print, after_each=None):
        assert (tmp_path / "summary.md").exists()  # written before any case
        rows = []
        for i in range(2):
            rows.append(dict(case=f"case {i}", provider="sdpa-default", mode="fwd+bwd", status="ok",
                             median_ms=1.0 + i))
            after_each(rows)
            seen.append(len(json.loads((tmp_path / "headline.json").read_text())["rows"]))
        return rows
    monkeypatch.setattr(headline, "run", fake_run)
    assert headline.main(["--device", "cpu", "--out", str(tmp_path), "--no-encoder"]) == 0
    assert seen == [1, 2]
    assert "case 1" in (tmp_path / "summary.md").read_text()

    rows = real_run(16, "cpu", deadline=0.0, log=lambda s: None, after_each=lambda r: None)
    assert rows and all(r["status"] == "skipped" and r["reason"] == "time limit" for r in rows)
