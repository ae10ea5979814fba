"""An ``nn.TransformerEncoderLayer`` with stock attention vs lhattn swapped in (issue 6).

    python -m bench.encoder_layer                    # CPU: n = 4k, 16k, 32k (stock cases capped)
    python -m bench.encoder_layer --device cuda      # GPU
    python -m bench.encoder_layer --n 4096 --out DIR
    python -m bench.encoder_layer --dropout 0.1      # training as configured by default in torch

Forward+backward of one layer in training mode (d_model 512, 8 heads, feed-forward 2048, batch
first, B = 1; dropout 0 unless ``--dropout``: then it acts on the attention weights -- inside
SDPA for the stock layer, inside lhattn's kernels for the swapped one -- and on the residual
branches, as in ``nn.TransformerEncoderLayer``) for three attention set-ups on the same weights
and input:

* ``stock-full``     torch's ``nn.MultiheadAttention``, no mask (dense O(n²));
* ``stock-window``   the same with the equivalent sliding-window ``attn_mask`` ([n, n] bool, built
  outside the timed region): what a user without lhattn would write;
* ``lhattn-window``  ``lhattn.nn.replace_attention(layer, pattern=SlidingWindow((256, 256)))``
  (Triton on CUDA, the blocked fallback on CPU).

Time: ``triton.testing.do_bench`` median on CUDA, a wall-clock median on CPU.  Peak memory: on
CUDA ``max_memory_allocated`` during one run; on CPU each case runs in its own subprocess and
reports its peak RSS during one run (see ``bench.case``), under a hard limit of ``--mem-cap-gib``
on its data segment: a case that needs more is recorded as ``oom`` (e.g. the stock layer in
training with dropout, which sends CPU SDPA to its math kernel and its [H, n, n] scores).  A
stock case whose attention matrices are predicted not to fit is recorded as skipped, not run.
Output: JSON + markdown.
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

SETUPS = ("stock-full", "stock-window", "lhattn-window")
D_MODEL, HEADS, FF, WINDOW = 512, 8, 2048, 256
PREFIX = "ENCODER_RESULT "


def _layer(setup: str, n: int, device: str, dtype, dropout: float = 0.0):
    import lhattn
    import lhattn.nn

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(D_MODEL, HEADS, FF, dropout=dropout, batch_first=True,
                                             device=device, dtype=dtype)
    mask = None
    if setup == "lhattn-window":
        lhattn.nn.replace_attention(layer, pattern=lhattn.SlidingWindow((WINDOW, WINDOW)))
    elif setup == "stock-window":
        i = torch.arange(n, device=device)
        mask = (i[None, :] - i[:, None]).abs() > WINDOW  # True = not allowed (torch's bool convention)
    x = torch.randn(1, n, D_MODEL, device=device, dtype=dtype, requires_grad=True)
    dout = torch.randn_like(x)
    leaves = [x] + list(layer.parameters())

    def run():
        layer(x, src_mask=mask).backward(dout)

    def reset():
        for t in leaves:
            t.grad = None
    return run, reset, leaves


def measure(setup: str, n: int, device: str, dtype_name: str, dropout: float = 0.0) -> dict:
    dtype = getattr(torch, dtype_name)
    run, reset, leaves = _layer(setup, n, device, dtype, dropout)
    if device == "cuda":
        res = _time_cuda(run, reset, leaves, Timing(), memory=True)
    else:
        res = _time_cpu(run, reset, Timing(target_s=3.0, long_s=10.0), memory=True)
    return {"setup": setup, "n": n, "status": "ok", **res}


def _predicted_bytes(setup: str, n: int, elem: int) -> int:
    """What the stock set-ups hold beyond O(n): the [n, n] mask, and the [H, n, n] scores a masked
    SDPA may materialise (kept for backward, plus softmax temporaries)."""
    return 3 * HEADS * n * n * elem + n * n if setup == "stock-window" else 0


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return "CPU: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"


def _run_case(setup: str, n: int, device: str, dtype: str, dropout: float, cap: float) -> dict:
    if device == "cuda":
        try:
            return measure(setup, n, device, dtype, dropout)
        except torch.cuda.OutOfMemoryError as e:
            torch.cuda.empty_cache()
            return {"setup": setup, "n": n, "status": "oom", "reason": str(e)[:200]}
    cmd = [sys.executable, "-m", "bench.encoder_layer", "--one", setup, str(n), device, dtype, "--dropout",
           str(dropout), "--mem-cap-gib", str(cap / 2**30)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    for line in proc.stdout.splitlines():
        if line.startswith(PREFIX):
            return json.loads(line[len(PREFIX):])
    return {"setup": setup, "n": n, "status": "error", "reason": (proc.stderr or proc.stdout)[-400:]}


def _table(rows: List[dict], ns: List[int]) -> str:
    def cell(r: Optional[dict]) -> str:
        if r is None:
            return "-"
        if r["status"] != "ok":
            return r["status"]
        mem = r.get("peak_mem_bytes")
        return f"{r['median_ms'] / 1e3:.3g} s, {mem / 2**20:.0f} MiB" if mem is not None else f"{r['median_ms']:.3g} ms"

    def get(setup, n):
        return next((r for r in rows if r["setup"] == setup and r["n"] == n), None)
    lines = ["| n | " + " | ".join(SETUPS) + " | lhattn speed-up vs full | vs window mask |",
             "|---|" + "---|" * (len(SETUPS) + 2)]
    for n in ns:
        ours = get("lhattn-window", n)
        ratios = []
        for peer in ("stock-full", "stock-window"):
            p = get(peer, n)
            ok = ours and p and ours["status"] == "ok" and p["status"] == "ok"
            ratios.append(f"{p['median_ms'] / ours['median_ms']:.1f}x" if ok else "-")
        lines.append(f"| {n} | " + " | ".join(cell(get(s, n)) for s in SETUPS) + " | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_args(ap, "4096,16384,32768")
    ap.add_argument("--setups", default=",".join(SETUPS), help="comma-separated subset of " + ",".join(SETUPS))
    ap.add_argument("--mem-cap-gib", type=float, default=None,
                    help="skip stock cases predicted above this (default: 12 on CPU, 0.9 x GPU memory); on CPU also "
                         "the hard memory limit of each case subprocess")
    ap.add_argument("--dropout", type=float, default=0.0, help="the layer's dropout (attention weights and residuals)")
    ap.add_argument("--out", default=None, help="folder for encoder_layer.json / .md (default: print only)")
    ap.add_argument("--one", nargs=4, metavar=("SETUP", "N", "DEVICE", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        setup, n, device, dtype = args.one
        if args.mem_cap_gib is not None:
            limit_memory(int(args.mem_cap_gib * 2**30))
        try:
            res = measure(setup, int(n), device, dtype, args.dropout)
        except Exception as exc:  # noqa: BLE001 - recorded, e.g. an allocation beyond the limit
            status, reason = _classify(exc)
            res = {"setup": setup, "n": int(n), "status": status, "reason": reason}
        print(PREFIX + json.dumps(res), flush=True)
        return {}

    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    elem = torch.tensor([], dtype=getattr(torch, dtype)).element_size()
    if args.mem_cap_gib is not None:
        cap = args.mem_cap_gib * 2**30
    elif args.device == "cuda":
        cap = 0.9 * torch.cuda.get_device_properties(0).total_memory
    else:
        cap = 12 * 2**30
    ns = [int(t) for t in args.n.split(",")]
    rows = []
    for n in ns:
        for setup in args.setups.split(","):
            if setup not in SETUPS:
                raise SystemExit(f"--setups: unknown set-up {setup!r}; allowed: {SETUPS}")
            if _predicted_bytes(setup, n, elem) > cap:
                rows.append({"setup": setup, "n": n, "status": "skipped",
                             "reason": f"predicted {_predicted_bytes(setup, n, elem) / 2**30:.1f} GiB > cap "
                                       f"{cap / 2**30:.1f} GiB"})
            else:
                t0 = time.perf_counter()
                rows.append(_run_case(setup, n, args.device, dtype, args.dropout, cap))
                rows[-1]["wall_s"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(rows[-1]), flush=True)
    import lhattn
    meta = {"device": _device_name(args.device), "dtype": dtype, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(), "lhattn": lhattn.__version__,
            "layer": f"TransformerEncoderLayer(d_model={D_MODEL}, nhead={HEADS}, dim_feedforward={FF}, "
                     f"dropout={args.dropout:g}, batch_first=True), training mode, B=1, forward+backward",
            "window": [WINDOW, WINDOW],
            "command": "python -m bench.encoder_layer " + " ".join(argv if argv is not None else sys.argv[1:])}
    table = _table(rows, ns)
    print(table)
    write_results(args.out, "encoder_layer", meta, rows,
                  f"# TransformerEncoderLayer: stock vs lhattn\n\n{meta['layer']}; {meta['device']}; "
                  f"{dtype}; torch {meta['torch']}; {meta['date']}\n\n"
                  "Cells: median time of forward+backward, peak extra memory of one run.\n\n" + table + "\n")
    return {"meta": meta, "results": rows}


if __name__ == "__main__":
    main()
