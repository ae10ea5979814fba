"""Forward+backward of the CPU fallback at long n, with its peak memory.

    python -m bench.fallback_memory [--n 16384] [--heads 8] [--dim 64] [--window 256]

Runs one case in this process and prints time and peak resident memory (the
process's ru_maxrss minus the resident size after the inputs were allocated),
as JSON.  Issue 2 asks that n=16384, H=8, D=64, window (256, 256) fits well
under 2 GiB.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import torch

import lhattn


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--window", type=int, default=256, help="one-sided window w: window=(w, w)")
    ap.add_argument("--globals", type=int, default=0, help="number of global tokens")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    shape = (1, args.heads, args.n, args.dim)
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    dout = torch.randn(shape)
    gm = None
    if args.globals:
        gm = torch.zeros(1, args.n, dtype=torch.bool)
        gm[0, torch.randperm(args.n)[: args.globals]] = True
    base = _rss_mib()
    t0 = time.perf_counter()
    out = lhattn.attention(q, k, v, lhattn.SlidingWindow(args.window), global_mask=gm, backend="fallback")
    t1 = time.perf_counter()
    out.backward(dout)
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    result = {
        "case": f"fallback fp32 B1 H{args.heads} N{args.n} D{args.dim} window=({args.window},{args.window}) "
                f"globals={args.globals}",
        "device": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "fwd_s": round(t1 - t0, 3),
        "bwd_s": round(t2 - t1, 3),
        "inputs_and_grads_mib": round(7 * q.numel() * 4 / 2**20, 1),
        "peak_rss_above_inputs_mib": round(peak - base, 1),
        "peak_rss_mib": round(peak, 1),
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
