"""HourglassLM vs a vanilla transformer LM of the same depth and width: one training step (issue 14).

    python -m bench.hourglass                                  # CPU: n = 2k .. 32k under a time budget
    python -m bench.hourglass --device cuda                    # GPU
    python -m bench.hourglass --n 2048,4096 --setups vanilla-window,hourglass-window --out DIR

One training step = forward, loss on the shifted targets, backward (no optimizer step) of an LM on
random byte tokens, B = 1, training mode, dropout 0.  Width: d_model 128, 4 heads, FFN 512, vocab 256,
rotary positions.  Depth 6 everywhere:

* ``vanilla-*``    ``HourglassLM(shortening_factors=[], layers_per_level=[6])``: six layers at full resolution;
* ``hourglass-*``  ``HourglassLM(shortening_factors=[4], layers_per_level=[1, 4])``: the paper's layout
  ``1@1, 4@4, 1@1`` (one layer at full resolution, four at n/4, one at full resolution), avg shortening,
  naive upsampling;
* ``hourglass-attn-*``  the same with the paper's best resampling, attention shortening and upsampling.

``*-full`` is full causal attention (through lhattn: ``SlidingWindow(n - 1, causal=True)``, the blocked
fallback on CPU, O(n²) time and memory); ``*-window`` is ``SlidingWindow(128, causal=True)`` at every level
(so the shortened levels see 4 x 128 tokens back), O(n·w).

Time: wall-clock median on CPU (after one warm-up run), ``triton.testing.do_bench`` on CUDA.  Peak memory:
on CPU each set-up runs in its own subprocess (its n ascending, ``MALLOC_MMAP_THRESHOLD_=65536`` so freed
blocks go back to the OS), under a hard limit of ``--mem-cap-gib`` on its data segment (a step that needs
more is recorded as ``oom``), and reports its peak RSS increase during one step (``bench.case``); on CUDA
``max_memory_allocated``.  A
case predicted (from the same set-up at the previous n: x4 per doubling for full attention, x2 for a
window) to take longer than ``--max-case-s`` is recorded as skipped, not run.  Output: JSON + markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import List, Optional

import torch

from .case import Timing, _classify, _time_cpu, _time_cuda, add_device_args, limit_memory, write_results
from .encoder_layer import _device_name

D_MODEL, HEADS, FF, VOCAB, WINDOW, K = 128, 4, 512, 256, 128, 4
SETUPS = ("vanilla-full", "hourglass-full", "vanilla-window", "hourglass-window", "hourglass-attn-window")
PREFIX = "HOURGLASS_RESULT "


def _model(setup: str, device: str, dtype):
    import lhattn
    import lhattn.nn

    family, attn = setup.rsplit("-", 1)
    kw = dict(dim_feedforward=FF, dropout=0.0, device=device, dtype=dtype,
              pattern=lhattn.SlidingWindow(WINDOW, causal=True) if attn == "window" else None)
    if family == "vanilla":
        kw.update(layers_per_level=[6])
        factors = []
    else:
        kw.update(layers_per_level=[1, 4])
        factors = [K]
        if family == "hourglass-attn":
            kw.update(shortening="attention", upsampling="attention")
    torch.manual_seed(0)
    return lhattn.nn.HourglassLM(VOCAB, D_MODEL, HEADS, factors, **kw)


def measure(setup: str, n: int, device: str, dtype_name: str) -> dict:
    dtype = getattr(torch, dtype_name)
    lm = _model(setup, device, dtype).train()
    ids = torch.randint(0, VOCAB, (1, n), device=device, generator=None)
    leaves = list(lm.parameters())

    def run():
        lm(ids, ids).loss.backward()

    def reset():
        for p in leaves:
            p.grad = None
    if device == "cuda":
        res = _time_cuda(run, reset, leaves, Timing(), memory=True)
    else:
        res = _time_cpu(run, reset, Timing(warmup_s=0.0, target_s=0.0, min_reps=1, max_reps=1, long_s=2.0),
                        memory=True)
    if device != "cuda" and res.get("peak_mem_bytes") is not None:
        res["mem_method"] = ("peak RSS during one step (VmHWM after a /proc/self/clear_refs reset) - RSS before it; "
                             "one subprocess per set-up, n ascending, MALLOC_MMAP_THRESHOLD_=65536")
    res["tokens_per_s"] = n / (res["median_ms"] / 1e3)
    res["params"] = sum(p.numel() for p in leaves)
    return {"setup": setup, "n": n, "status": "ok", **res}


def _skip_reason(rows: List[dict], setup: str, n: int, max_case_s: float) -> Optional[str]:
    """Why ``setup`` is not run at n: it failed at a smaller n, or it is predicted (from its largest
    measured n: x4 per doubling for full attention, x2 for a window) to take longer than ``max_case_s``."""
    mine = [r for r in rows if r["setup"] == setup and r["n"] < n]
    if any(r["status"] != "ok" for r in mine):
        return "skipped or failed at a smaller n"
    if not mine:
        return None
    last = max(mine, key=lambda r: r["n"])
    pred = last["median_ms"] / 1e3 * (n / last["n"]) ** (2.0 if setup.endswith("-full") else 1.0)
    return f"predicted {pred:.0f} s per step > --max-case-s {max_case_s:g}" if pred > max_case_s else None


def _sweep(setup: str, ns: List[int], device: str, dtype: str, max_case_s: float, emit) -> List[dict]:
    """Every n of one set-up, smallest first, in this process."""
    rows: List[dict] = []
    for n in ns:
        why = _skip_reason(rows, setup, n, max_case_s)
        if why is not None:
            rows.append({"setup": setup, "n": n, "status": "skipped", "reason": why})
        else:
            t0 = time.perf_counter()
            try:
                rows.append(measure(setup, n, device, dtype))
            except Exception as exc:  # noqa: BLE001 - recorded, e.g. an allocation beyond the limit
                if device == "cuda":
                    torch.cuda.empty_cache()
                status, reason = _classify(exc)
                rows.append({"setup": setup, "n": n, "status": status, "reason": reason})
            rows[-1]["wall_s"] = round(time.perf_counter() - t0, 1)
        emit(rows[-1])
    return rows


def _run_setup_cpu(setup: str, ns: List[int], dtype: str, cap: float, max_case_s: float, threads: int) -> List[dict]:
    """One subprocess per set-up (its n ascending), under the memory cap, with large blocks returned to the
    OS on free (``MALLOC_MMAP_THRESHOLD_``) so each step's peak RSS increase is its own."""
    cmd = [sys.executable, "-m", "bench.hourglass", "--one", setup, ",".join(map(str, ns)), "cpu", dtype,
           "--mem-cap-gib", str(cap / 2**30), "--max-case-s", str(max_case_s), "--threads", str(threads)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rows = []
    for line in proc.stdout:
        if line.startswith(PREFIX):
            rows.append(json.loads(line[len(PREFIX):]))
            print(json.dumps(rows[-1]), flush=True)
    err = proc.stderr.read()
    proc.wait()
    for n in ns[len(rows):]:  # the process died (e.g. killed for memory) before these
        rows.append({"setup": setup, "n": n, "status": "error", "reason": f"rc={proc.returncode}: {err[-300:]}"})
    return rows


def _get(rows: List[dict], setup: str, n: int) -> Optional[dict]:
    return next((r for r in rows if r["setup"] == setup and r["n"] == n), None)


def _table(rows: List[dict], ns: List[int], setups: List[str]) -> str:
    def cell(r: Optional[dict]) -> str:
        if r is None:
            return "-"
        if r["status"] != "ok":
            return r["status"]
        mem = r.get("peak_mem_bytes")
        mem_s = f", {mem / 2**20:.0f} MiB" if mem is not None else ""
        return f"{r['tokens_per_s']:.0f} tok/s{mem_s}"

    def ratio(a: str, b: str, n: int) -> str:
        ra, rb = _get(rows, a, n), _get(rows, b, n)
        ok = ra and rb and ra["status"] == "ok" and rb["status"] == "ok"
        return f"{rb['median_ms'] / ra['median_ms']:.2f}x" if ok else "-"
    pairs = [(h, v) for h, v in (("hourglass-full", "vanilla-full"), ("hourglass-window", "vanilla-window"))
             if h in setups and v in setups]
    lines = ["| n | " + " | ".join(setups) + "".join(f" | {h} speed-up vs {v}" for h, v in pairs) + " |",
             "|---|" + "---|" * (len(setups) + len(pairs))]
    for n in ns:
        lines.append(f"| {n} | " + " | ".join(cell(_get(rows, s, n)) for s in setups)
                     + "".join(f" | {ratio(h, v, n)}" for h, v in pairs) + " |")
    return "\n".join(lines)


def _memory_per_token(rows: List[dict], ns: List[int], setups: List[str]) -> str:
    """Peak memory / n for each set-up: flat for a linear-memory set-up."""
    lines = ["| n | " + " | ".join(setups) + " |", "|---|" + "---|" * len(setups)]
    for n in ns:
        cells = []
        for s in setups:
            r = _get(rows, s, n)
            ok = r and r["status"] == "ok" and r.get("peak_mem_bytes")
            cells.append(f"{r['peak_mem_bytes'] / n / 1024:.1f} KiB" if ok else "-")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _skipped(rows: List[dict]) -> str:
    out = [f"- {r['setup']} at n={r['n']}: {r['status']} ({r.get('reason', '')})" for r in rows if r["status"] != "ok"]
    return "\n".join(out) if out else "- none"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_args(ap, "2048,4096,8192,16384,32768")
    ap.add_argument("--setups", default=",".join(SETUPS), help="comma-separated subset of " + ",".join(SETUPS))
    ap.add_argument("--mem-cap-gib", type=float, default=None,
                    help="CPU: the hard memory limit of each case subprocess (default 6)")
    ap.add_argument("--max-case-s", type=float, default=40.0,
                    help="skip a case predicted to take longer than this per step (default 40)")
    ap.add_argument("--threads", type=int, default=1, help="CPU: torch threads per case (default 1)")
    ap.add_argument("--out", default=None, help="folder for hourglass.json / .md (default: print only)")
    ap.add_argument("--one", nargs=4, metavar=("SETUP", "NS", "DEVICE", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one:
        setup, ns, device, dtype = args.one
        if args.mem_cap_gib is not None:
            limit_memory(int(args.mem_cap_gib * 2**30))
        _sweep(setup, [int(t) for t in ns.split(",")], device, dtype, args.max_case_s,
               lambda r: print(PREFIX + json.dumps(r), flush=True))
        return {}

    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    cap = (args.mem_cap_gib if args.mem_cap_gib is not None else 6.0) * 2**30
    ns = sorted(int(t) for t in args.n.split(","))
    setups = args.setups.split(",")
    for s in setups:
        if s not in SETUPS:
            raise SystemExit(f"--setups: unknown set-up {s!r}; allowed: {SETUPS}")
    rows: List[dict] = []
    for setup in setups:
        if args.device == "cuda":
            rows += _sweep(setup, ns, "cuda", dtype, args.max_case_s, lambda r: print(json.dumps(r), flush=True))
        else:
            rows += _run_setup_cpu(setup, ns, dtype, cap, args.max_case_s, args.threads)
    import lhattn
    meta = {"device": _device_name(args.device), "dtype": dtype, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": args.threads,
            "lhattn": lhattn.__version__,
            "model": f"HourglassLM d_model={D_MODEL} nhead={HEADS} dim_feedforward={FF} vocab={VOCAB} depth 6; "
                     f"hourglass 1@1, 4@{K}, 1@1; window {WINDOW}; B=1, forward+loss+backward, dropout 0",
            "command": "python -m bench.hourglass " + " ".join(argv if argv is not None else sys.argv[1:])}
    table = _table(rows, ns, setups)
    per_token = _memory_per_token(rows, ns, setups)
    print(table + "\n\n" + per_token)
    write_results(args.out, "hourglass", meta, rows,
                  f"# HourglassLM vs vanilla LM: one training step\n\n{meta['model']}\n\n{meta['device']}; {dtype}; "
                  f"{args.threads} torch thread(s); torch {meta['torch']}; {meta['date']}\n\n"
                  f"`{meta['command']}`\n\n"
                  "Cells: tokens/s of forward+loss+backward, peak extra memory of one step.\n\n"
                  + table + "\n\nPeak memory per token (flat = linear memory):\n\n" + per_token
                  + "\n\nNot measured:\n\n" + _skipped(rows) + "\n")
    return {"meta": meta, "results": rows}


if __name__ == "__main__":
    main()
