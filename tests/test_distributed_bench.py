"""bench/context_parallel.py without spawning: the configuration list and the report it writes."""

from __future__ import annotations

import argparse

import pytest

from bench import context_parallel as cp


def _args(**kw):
    base = dict(preset=None, configs=None, ranks=[1, 2], per_rank=[8, 16])
    base.update(kw)
    return argparse.Namespace(**base)


def test_configs():
    assert cp._configs(_args()) == [(1, 8), (2, 8), (1, 16), (2, 16)]
    assert cp._configs(_args(configs=["1x65536", "4X65536"])) == [(1, 65536), (4, 65536)]
    issue = cp._configs(_args(preset="issue13"))
    assert {w * m for w, m in issue} == {65536, 131072, 262144} and {w for w, _ in issue} == {1, 2, 4}
    for bad in ("4", "2x0", "ax3"):
        with pytest.raises(SystemExit, match="--configs"):
            cp._configs(_args(configs=[bad]))


def _row(ranks, per_rank, wall, cpu, mem):
    return {"ranks": ranks, "per_rank": per_rank, "n": ranks * per_rank, "median_s": wall, "cpu_median_s": cpu,
            "peak_mem_bytes_max": mem * 2 ** 20, "sent_bytes_max": 2 ** 21, "halo_bytes_max": 2 ** 21,
            "collective_bytes_max": 80}


def test_markdown_reports_wall_and_cpu_time_against_one_rank():
    rows = [_row(1, 1024, 1.0, 0.9, 20), _row(2, 1024, 2.5, 1.0, 22), _row(1, 2048, 2.0, 1.8, 30)]
    md = cp._markdown(rows, cp._meta("gloo", "cpu"))
    assert "| 2 | 1024 | 2048 | 2.50 s | 2.50x | 1.00 s | 1.11x | 22 MiB |" in md
    assert "| 2048 | 2 | 2.50 / 2.00 s | 1.00 / 1.80 s | 22 / 30 MiB |" in md
    assert "blocked fallback engine" in md
