"""PNG plots of a bench JSON: time and peak memory against n, log-log, one line per provider.

    python -m bench.plot bench/results/<run>/bench.json [--out DIR]

``bench_time.png``: one row per group (pattern + shape + dtype), one column per mode.
``bench_memory.png``: the same for fwd and fwd+bwd (bwd has no memory figure of its own); not
written when the run measured no memory (e.g. ``--quick``).
Dashed grey guides show the slopes of O(n) and O(n²), anchored at the first point of the
panel, so O(n·w) and O(n²) curves can be read off directly.
"""

from __future__ import annotations

import argparse
import json
import os
import textwrap
from collections import OrderedDict, defaultdict
from typing import List

__all__ = ["plot_all", "main"]

MODES = ("fwd", "bwd", "fwd+bwd")
STYLE = {  # provider -> (colour, marker, linestyle)
    "lhattn-triton": ("tab:red", "o", "-"),
    "lhattn-fallback": ("tab:orange", "s", "-"),
    "lhattn-reference": ("tab:brown", "x", ":"),
    "lhattn-longformer": ("tab:pink", "D", "-"),
    "hf-longformer": ("tab:purple", "D", "--"),
    "sdpa-default": ("tab:blue", "^", "--"),
    "sdpa-flash": ("tab:blue", "^", "--"),
    "sdpa-efficient": ("tab:cyan", "v", "--"),
    "sdpa-math": ("tab:gray", "<", "--"),
    "flex": ("tab:green", "P", "-."),
}


def _panel(ax, rows: List[dict], key: str, scale: float):
    series = defaultdict(list)
    for r in rows:
        if r.get("status") == "ok" and r.get(key) is not None and r[key] > 0:
            series[r["provider"]].append((r["n"], r[key] / scale))
    first = None
    for prov in sorted(series):
        pts = sorted(series[prov])
        colour, marker, ls = STYLE.get(prov, (None, "o", "-"))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle=ls, color=colour, label=prov)
        if first is None or pts[0][0] < first[0]:
            first = pts[0]
    ns = sorted({r["n"] for r in rows})
    if first is not None and len(ns) > 1:
        n0, y0 = first
        xs = [n for n in ns if n >= n0]
        ax.plot(xs, [y0 * (n / n0) for n in xs], color="0.6", linestyle=":", linewidth=1, label="∝ n")
        ax.plot(xs, [y0 * (n / n0) ** 2 for n in xs], color="0.75", linestyle=":", linewidth=1, label="∝ n²")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    return bool(series)


def _figure(data: dict, key: str, scale: float, ylabel: str, modes, path: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: "OrderedDict[str, List[dict]]" = OrderedDict()
    for r in data["results"]:
        groups.setdefault(r["group"], []).append(r)
    modes = [m for m in modes if any(r["mode"] == m for r in data["results"])]
    if not groups or not modes:
        return False
    if not any(r.get("status") == "ok" and (r.get(key) or 0) > 0 for r in data["results"] if r["mode"] in modes):
        return False  # nothing measured: no empty figure
    # panel titles wrapped to the panel's width (a long LSG group name would run into its neighbours)
    titles = {g: textwrap.wrap(g.replace(",", ", "), 58) for g in groups}
    lines = max(len(t) for t in titles.values()) + 1
    fig, axes = plt.subplots(len(groups), len(modes), figsize=(5.2 * len(modes), (3.3 + 0.15 * lines) * len(groups)),
                             squeeze=False)
    drew = False
    for i, (group, rows) in enumerate(groups.items()):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            has = _panel(ax, [r for r in rows if r["mode"] == mode], key, scale)
            drew |= has
            ax.set_title("\n".join(titles[group] + [mode]), fontsize=8)
            ax.set_xlabel("n (sequence length)", fontsize=8)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.tick_params(labelsize=7)
            if has:
                ax.legend(fontsize=6, loc="upper left")
            else:
                ax.text(0.5, 0.5, "no measurement", ha="center", va="center", transform=ax.transAxes, fontsize=8)
    meta = data.get("meta", {})
    title = f"lhattn — {ylabel} vs n — {meta.get('device_name', '')} — {meta.get('date_utc', '')}"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drew


def plot_all(data: dict, out_dir: str) -> List[str]:
    """Write ``bench_time.png`` and ``bench_memory.png``; returns the paths written."""
    written = []
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # pragma: no cover
        print("matplotlib is not installed: no PNG plots")
        return written
    p = os.path.join(out_dir, "bench_time.png")
    if _figure(data, "median_ms", 1.0, "median time (ms)", MODES, p):
        written.append(p)
    p = os.path.join(out_dir, "bench_memory.png")
    if _figure(data, "peak_mem_bytes", 2 ** 20, "peak memory (MiB)", ("fwd", "fwd+bwd"), p):
        written.append(p)
    else:
        print("no memory plot: this run measured no peak memory")
    return written


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__.split("\n\n")[0])
    ap.add_argument("json_path")
    ap.add_argument("--out", default=None, help="default: the JSON's folder")
    args = ap.parse_args(argv)
    with open(args.json_path) as fh:
        data = json.load(fh)
    for p in plot_all(data, args.out or os.path.dirname(os.path.abspath(args.json_path))):
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
