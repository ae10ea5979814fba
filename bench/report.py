"""Markdown report, lhattn-vs-peer ratios and log-log slopes from a bench JSON.

    python -m bench.report bench/results/<run>/bench.json [--out DIR] [--no-plot]

regenerates ``bench.md`` (and the PNGs, through :mod:`bench.plot`) from the JSON alone, e.g.
after a run was cut short: the JSON is rewritten after every case.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections import OrderedDict, defaultdict
from typing import Dict, List, Optional

__all__ = ["ratios", "slopes", "markdown", "write_reports", "main"]

MODES = ("fwd", "bwd", "fwd+bwd")
MIB = 2 ** 20


def _ok(r: dict) -> bool:
    return r.get("status") == "ok" and r.get("median_ms") is not None


def ratios(results: List[dict]) -> List[dict]:
    """Every lhattn provider against every peer of the same level (attention / module), per
    (group, n, mode): ``time_ratio = peer_ms / lhattn_ms`` (> 1: lhattn is faster) and
    ``mem_ratio = peer_peak / lhattn_peak`` (> 1: lhattn needs less). A peer that ran out of
    memory where lhattn ran gets a row with ``peer_status = "oom"`` and no ratios."""
    cells: Dict[tuple, Dict[str, dict]] = defaultdict(dict)
    for r in results:
        if _ok(r) or r.get("status") == "oom":
            cells[(r["group"], r["n"], r["mode"])][r["provider"]] = r
    out = []
    for (group, n, mode), provs in cells.items():
        for ln, lr in provs.items():
            if lr["family"] != "lhattn" or ln == "lhattn-reference" or not _ok(lr):  # the oracle is no contender
                continue
            for pn, pr in provs.items():
                if pr["family"] != "peer" or pr["level"] != lr["level"]:
                    continue
                if not _ok(pr):
                    out.append({"group": group, "n": n, "mode": mode, "lhattn": ln, "peer": pn,
                                "time_ratio": None, "mem_ratio": None, "peer_status": pr["status"]})
                    continue
                lm, pm = lr.get("peak_mem_bytes"), pr.get("peak_mem_bytes")
                out.append({"group": group, "n": n, "mode": mode, "lhattn": ln, "peer": pn,
                            "time_ratio": pr["median_ms"] / lr["median_ms"],
                            "mem_ratio": (pm / lm) if (lm and pm) else None})
    out.sort(key=lambda d: (d["group"], d["lhattn"], d["peer"], MODES.index(d["mode"]), d["n"]))
    return out


def _fit(xs: List[float], ys: List[float]) -> Optional[float]:
    """Least-squares slope of log(y) against log(x)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else None


def slopes(results: List[dict]) -> List[dict]:
    """Log-log slope of time (and peak memory) against n, per (group, provider, mode).
    ~1: O(n·w); ~2: O(n²)."""
    series: Dict[tuple, List[dict]] = defaultdict(list)
    for r in results:
        if _ok(r):
            series[(r["group"], r["provider"], r["mode"])].append(r)
    out = []
    for (group, prov, mode), rs in series.items():
        rs.sort(key=lambda r: r["n"])
        ns = [r["n"] for r in rs]
        out.append({"group": group, "provider": prov, "mode": mode, "n_min": ns[0], "n_max": ns[-1], "points": len(ns),
                    "time_slope": _fit(ns, [r["median_ms"] for r in rs]),
                    "mem_slope": _fit(ns, [r.get("peak_mem_bytes") or 0 for r in rs])})
    return sorted(out, key=lambda d: (d["group"], d["provider"], MODES.index(d["mode"])))


def _fmt_ms(r: Optional[dict]) -> str:
    if r is None:
        return ""
    if _ok(r):
        ms = r["median_ms"]
        return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"
    return r["status"]


def _fmt_mem(r: Optional[dict]) -> str:
    if r is None or not _ok(r) or r.get("peak_mem_bytes") is None:
        return ""
    return f"{r['peak_mem_bytes'] / MIB:.1f}"


def _fmt(x: Optional[float], spec: str = ".2f") -> str:
    return "" if x is None else format(x, spec)


def markdown(data: dict) -> str:
    meta, results = data["meta"], data["results"]
    lines = [f"# lhattn benchmarks — {meta.get('device_name')}", ""]
    for key in ("date_utc", "command", "torch", "triton", "cuda", "transformers", "lhattn", "git_commit", "platform",
                "torch_threads", "elapsed_s"):
        if meta.get(key) is not None:
            val = f"`{meta[key]}`" if key == "command" else meta[key]
            lines.append(f"- **{key}**: {val}")
    if meta.get("omitted"):
        lines += ["", "## Not measured in this run", ""] + [f"- {line}" for line in meta["omitted"]]
    lines += ["", "## What is measured", ""]
    notes = data.get("notes", {})
    for key in ("modes", "timing", "memory", "flops", "module_level", "dense", "check"):
        if key in notes:
            lines.append(f"- **{key}**: {notes[key]}")
    lines.append("- **providers**:")
    for name, doc in notes.get("providers", {}).items():
        if any(r["provider"] == name for r in results):
            lines.append(f"  - `{name}`: {doc}")
    lines.append("")

    groups: "OrderedDict[str, List[dict]]" = OrderedDict()
    for r in sorted(results, key=lambda r: (r["group"], r["n"])):
        groups.setdefault(r["group"], []).append(r)
    rat = data.get("ratios") or ratios(results)
    slo = slopes(results)
    for group, rs in groups.items():
        lines += [f"## {group}", "",
                  "Median time in ms; peak memory in MiB (extra over inputs); useful TFLOP/s of fwd+bwd "
                  "(flops of the pattern, also for dense SDPA); W_eff = visible keys per query.", "",
                  "| n | provider | fwd ms | bwd ms | fwd+bwd ms | fwd MiB | fwd+bwd MiB "
                  "| useful TFLOP/s (fwd+bwd) | W_eff | check (fwd rel err) |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        cell: Dict[tuple, Dict[str, dict]] = defaultdict(dict)
        for r in rs:
            cell[(r["n"], r["provider"])][r["mode"]] = r
        for (n, prov), modes in sorted(cell.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            fb = modes.get("fwd+bwd")
            any_r = next(iter(modes.values()))
            lines.append(f"| {n} | {prov} | {_fmt_ms(modes.get('fwd'))} | {_fmt_ms(modes.get('bwd'))} | "
                         f"{_fmt_ms(fb)} | {_fmt_mem(modes.get('fwd'))} | {_fmt_mem(fb)} | "
                         f"{_fmt(fb.get('tflops_useful') if fb else None, '.3g')} | {any_r['w_eff']:.1f} | "
                         f"{_fmt((modes.get('fwd') or {}).get('check_rel_err'), '.1e')} |")
        grat = [d for d in rat if d["group"] == group]
        if grat:
            lines += ["", "lhattn against each peer (time: peer ms / lhattn ms, > 1 = lhattn faster; "
                          "memory: peer MiB / lhattn MiB, > 1 = lhattn needs less):", "",
                      "| lhattn | peer | mode | n | time ratio | memory ratio |", "|---|---|---|---:|---:|---:|"]
            for d in grat:
                if d.get("peer_status"):
                    lines.append(f"| {d['lhattn']} | {d['peer']} | {d['mode']} | {d['n']} | "
                                 f"peer {d['peer_status'].upper()} | peer {d['peer_status'].upper()} |")
                    continue
                lines.append(f"| {d['lhattn']} | {d['peer']} | {d['mode']} | {d['n']} | {d['time_ratio']:.3g} | "
                             f"{_fmt(d['mem_ratio'], '.3g')} |")
        gslo = [d for d in slo if d["group"] == group and d["points"] >= 2]
        if gslo:
            lines += ["", "Log-log slope against n (1 = linear, O(n·w); 2 = quadratic, O(n²)):", "",
                      "| provider | mode | n range | points | time slope | memory slope |",
                      "|---|---|---|---:|---:|---:|"]
            for d in gslo:
                lines.append(f"| {d['provider']} | {d['mode']} | {d['n_min']}–{d['n_max']} | {d['points']} | "
                             f"{_fmt(d['time_slope'])} | {_fmt(d['mem_slope'])} |")
        lines.append("")

    bad = [r for r in results if r.get("status") != "ok"]
    if bad:
        lines += ["## Not run or failed", "", "| group | provider | mode | n | status | reason |",
                  "|---|---|---|---|---|---|"]
        merged: "OrderedDict[tuple, List[int]]" = OrderedDict()
        for r in bad:
            merged.setdefault((r["group"], r["provider"], r["mode"], r["status"], r.get("reason") or ""), []).append(
                r["n"])
        for (group, prov, mode, status, reason), ns in merged.items():
            reason = reason.replace("|", "\\|")
            n_list = ", ".join(map(str, sorted(set(ns))))
            lines.append(f"| {group} | {prov} | {mode} | {n_list} | {status} | {reason} |")
        lines.append("")
    return "\n".join(lines)


def write_reports(data: dict, out_dir: str, plots: bool = True) -> List[str]:
    """Write ``bench.md`` (and ``bench_time.png`` / ``bench_memory.png``) into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "bench.md")
    with open(path, "w") as fh:
        fh.write(markdown(data))
    written = [path]
    if plots:
        from .plot import plot_all

        written += plot_all(data, out_dir)
    return written


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("json_path")
    ap.add_argument("--out", default=None, help="default: the JSON's folder")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    with open(args.json_path) as fh:
        data = json.load(fh)
    data["ratios"] = ratios(data["results"])
    for p in write_reports(data, args.out or os.path.dirname(os.path.abspath(args.json_path)), not args.no_plot):
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
