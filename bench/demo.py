"""The lhattn demo: each pattern against dense attention, checked against the oracle.

    python -m bench.demo                 # CPU: at most about --budget-s 150 s of timing
    python -m bench.demo --n 4k,16k      # other lengths
    python -m bench.demo --repeats 9     # more rounds

1. Correctness, on a small case with padding and global tokens: ``lhattn.attention(...,
   backend="auto")`` against the oracle in ``lhattn.reference`` -- output and the gradients of
   q, k, v, as ``max |auto - oracle| / max |oracle|``.
2. Speed: for each pattern and length, the forward (and on CUDA also forward+backward) of
   lhattn (backend auto: Triton on CUDA where it can run the call, else the blocked fallback)
   against dense ``F.scaled_dot_product_attention`` on the same q, k, v. Dense attention
   computes all n² pairs; the patterns compute n·W_eff. The providers are interleaved: after a
   warm-up, each round times every provider once (order rotating), for ``--repeats`` rounds; the
   table gives the median and the spread ``(max - min) / median`` of the rounds (one round: one
   wall-clock run on CPU, a short ``triton.testing.do_bench`` median on CUDA). The demo warns
   when a spread passes 25 % or the load average passes 0.5 per core, and the time budget
   ``--budget-s`` covers all timings together.

For the full comparison (FlexAttention, HF Longformer, memory, bwd) use ``python -m bench``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F

import lhattn
import lhattn.reference as oracle
from lhattn.patterns import LSG, Segments, SlidingWindow

from .flops import w_eff

PATTERNS = {
    "sliding_window (256,256)": SlidingWindow((256, 256)),
    "lsg (block 128, f=4)": LSG(block_size=128, sparsity_factor=4, sparsity_type="norm", num_global_tokens=1),
    "segment (S=512)": Segments(512),
}
ORACLE = {SlidingWindow: oracle.sliding_window_attention, LSG: oracle.lsg_attention,
          Segments: oracle.segment_attention}


def _parse_n(text: str):
    out = []
    for tok in text.split(","):
        tok = tok.strip().lower()
        out.append(int(tok[:-1]) * 1024 if tok.endswith("k") else int(tok))
    return out


def _backend_of(q, pattern) -> str:
    return "triton" if q.device.type == "cuda" and lhattn.triton_unavailable_reason(q, pattern) is None else "fallback"


# ---- 1. correctness ----------------------------------------------------------------------------


def check(pattern, device: str, n: int = 300):
    """Max relative error of auto vs the oracle (out, dq, dk, dv) on a padded case with globals."""
    gen = torch.Generator().manual_seed(0)
    b, h, d = 2, 2, 32
    q, k, v = (torch.randn(b, h, n, d, generator=gen).to(device).requires_grad_() for _ in range(3))
    kpm = torch.zeros(b, n, dtype=torch.bool, device=device)
    kpm[1, n - 37:] = True  # row 1 ends with padding
    kw = {"key_padding_mask": kpm}
    if not isinstance(pattern, LSG):  # LSG's global tokens are its first num_global_tokens positions
        gm = torch.zeros(b, n, dtype=torch.bool, device=device)
        gm[0, [0, 17, 150]] = True
        gm[1, 5] = True
        kw["global_mask"] = gm
    dout = torch.randn(b, h, n, d, generator=gen).to(device)
    got = lhattn.attention(q, k, v, pattern, backend="auto", **kw)
    g_got = torch.autograd.grad(got, (q, k, v), dout)
    want, _ = ORACLE[type(pattern)](q, k, v, pattern, **kw)
    g_want = torch.autograd.grad(want, (q, k, v), dout)
    errs = {}
    for name, a, c in zip(("out", "dq", "dk", "dv"), (got, *g_got), (want, *g_want)):
        errs[name] = float((a - c).detach().abs().max() / c.detach().abs().max().clamp_min(1e-30))
    return errs, _backend_of(q, pattern)


# ---- 2. speed ----------------------------------------------------------------------------------

SPREAD_WARN = 0.25  # (max - min) / median of a row above this: the numbers are not trustworthy
LOAD_WARN = 0.5  # 1-minute load average per logical core above this: other work competes for the CPU


def _once(fn, device: str, reset) -> float:
    """Milliseconds of one measurement of ``fn()``: one wall-clock run on CPU; on CUDA the median
    of a short ``triton.testing.do_bench``."""
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=5, rep=25, grad_to_none=reset, return_mode="median"))
    if reset:
        for t in reset:
            t.grad = None
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _modes(device: str):
    return ("fwd", "fwd+bwd") if device == "cuda" else ("fwd",)


def runners(patterns: dict, n: int, device: str, dtype, b: int, h: int, d: int, mode: str):
    """``{name: (fn, leaves)}`` on one set of q, k, v: ``dense`` (SDPA) and every pattern (lhattn auto)."""
    gen = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(b, h, n, d, generator=gen).to(device, dtype).requires_grad_() for _ in range(3))
    do = torch.randn(b, h, n, d, generator=gen).to(device, dtype)
    leaves = [q, k, v] if mode == "fwd+bwd" else []

    def make(call):
        if mode == "fwd":
            def fn():
                with torch.no_grad():
                    call()
        else:
            def fn():
                call().backward(do)
        return fn, leaves

    out = {"dense": make(lambda: F.scaled_dot_product_attention(q, k, v))}
    for label, pattern in patterns.items():
        out[label] = make(lambda pattern=pattern: lhattn.attention(q, k, v, pattern, backend="auto"))
    return out, q


def interleaved(fns: dict, device: str, rounds: int, deadline: Optional[float] = None) -> dict:
    """``{name: [ms, ...]}``: ``rounds`` rounds, each timing every provider once in turn (the order
    rotates each round), so that a change of machine load hits all of them alike.  After two rounds,
    no new round starts once ``time.monotonic()`` has passed ``deadline``."""
    names = list(fns)
    times = {name: [] for name in names}
    for r in range(rounds):
        if r >= 2 and deadline is not None and time.monotonic() > deadline:
            break
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn, leaves = fns[name]
            times[name].append(_once(fn, device, leaves))
    return times


def spread(ms: list) -> float:
    """(max - min) / median."""
    return (max(ms) - min(ms)) / statistics.median(ms)


def _load_per_core() -> Optional[float]:
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except (AttributeError, OSError):  # not on every platform
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--n", default=None, help="lengths (default: CPU 4k,16k,32k; CUDA 4k,16k,64k)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="rounds of interleaved measurements per length (default 5; 3 for a length whose "
                         "warm-up round takes over 10 s on CPU)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="a budget for all timings together: skip a length whose predicted time would bring "
                         "the total past it, and start no third or later round past it (default: CPU 150 s, "
                         "CUDA none)")
    args = ap.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    load0 = _load_per_core()
    if args.budget_s is None and not cuda:
        args.budget_s = 150.0
    ns = _parse_n(args.n) if args.n else ([4096, 16384, 65536] if cuda else [4096, 16384, 32768])
    dtype = torch.bfloat16 if cuda else torch.float32
    b, h, d = (1, 16, 64) if cuda else (1, 4, 64)
    name = torch.cuda.get_device_name(0) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"lhattn {lhattn.__version__} demo on {name}, torch {torch.__version__}\n")

    tol = 5e-3 if cuda else 1e-4  # fp32; CUDA matmuls may use TF32
    print(f"1. auto backend vs the oracle (lhattn.reference), fp32, B=2 H=2 N=300 D=32, padding + globals "
          f"(pass: max rel err <= {tol:g})")
    ok_all = True
    available = {}
    for label, pattern in PATTERNS.items():
        try:
            errs, backend = check(pattern, device)
        except (NotImplementedError, ImportError) as exc:
            print(f"   {label:<26} n/a: {type(exc).__name__}: {exc}")
            continue
        ok = all(e <= tol for e in errs.values())
        ok_all &= ok
        available[label] = pattern
        detail = "  ".join(f"{k} {e:.1e}" for k, e in errs.items())
        print(f"   {label:<26} [{backend}] {'PASS' if ok else 'FAIL'}  {detail}")

    dname = str(dtype).replace("torch.", "")
    print(f"\n2. time in ms, {dname}, B={b} H={h} D={d}; dense = F.scaled_dot_product_attention on the same q, k, v"
          + ("" if cuda else " (forward; see python -m bench for backward)"))
    print("   Providers are interleaved: each round times every provider once, in rotating order; median of the "
          "rounds, spread = (max - min) / median.")
    head = (f"   {'pattern':<38} {'n':>6} {'W_eff':>7} {'mode':<8} {'lhattn ms':>10} {'spread':>7} "
            f"{'dense ms':>10} {'spread':>7} {'speed-up':>8}")
    print(head)
    print("   " + "-" * (len(head) - 3))
    t_start = time.monotonic()
    last = None  # (n, seconds of one lhattn round, seconds of one dense run) at the previous length
    spreads = []
    for n in ns:
        elapsed = time.monotonic() - t_start
        if last is not None and args.budget_s:
            n0, lh_s, dense_s = last
            rounds = args.repeats or 5
            predicted = (rounds + 1) * (lh_s * n / n0 + dense_s * (n / n0) ** 2)  # warm-up + rounds
            if elapsed + predicted > args.budget_s:
                print(f"   n={n} skipped: it would take about {predicted:.0f} s more (predicted from n={n0}), "
                      f"bringing the total to {elapsed + predicted:.0f} s, past --budget-s {args.budget_s:g} "
                      f"(one budget for all timings together)")
                continue
        for mode in _modes(device):
            try:
                fns, q = runners(available, n, device, dtype, b, h, d, mode)
                warm = {k: _once(fn, device, leaves) for k, (fn, leaves) in fns.items()}  # compile, allocate
                round_s = sum(warm.values()) / 1e3
                rounds = args.repeats or (3 if round_s > 10 and not cuda else 5)
                deadline = t_start + args.budget_s if args.budget_s else None
                times = interleaved(fns, device, rounds, deadline)
            except (NotImplementedError, ImportError, RuntimeError) as exc:  # e.g. out of memory
                print(f"   n={n} {mode}: {type(exc).__name__}: {str(exc)[:120]}")
                continue
            if mode == "fwd":
                last = (n, (round_s * 1e3 - warm["dense"]) / 1e3, warm["dense"] / 1e3)
            if len(times["dense"]) < rounds:
                print(f"   n={n} {mode}: stopped after {len(times['dense'])} of {rounds} rounds: --budget-s "
                      f"{args.budget_s:g} passed (one budget for all timings together)")
            dm = statistics.median(times["dense"])
            spreads.append(spread(times["dense"]))
            for label, pattern in available.items():
                ms = statistics.median(times[label])
                spreads.append(spread(times[label]))
                row = f"{label} [{_backend_of(q, pattern)}]"
                print(f"   {row:<38} {n:>6} {w_eff(pattern, n):7.0f} {mode:<8} {ms:10.1f} "
                      f"{spread(times[label]):6.0%} {dm:10.1f} {spread(times['dense']):6.0%} {dm / ms:7.2f}x",
                      flush=True)
            del fns, q
    total = time.monotonic() - t_start
    print(f"\n   ({total:.0f} s of timing; speed-up = dense ms / lhattn ms)")
    load1 = _load_per_core()
    worst = max(spreads, default=0.0)
    if worst > SPREAD_WARN:
        print(f"   WARNING: a row's timings spread by {worst:.0%} (over {SPREAD_WARN:.0%}): the machine was busy "
              "or throttling; rerun on a quiet machine before trusting the ratios.")
    loads = [x for x in (load0, load1) if x is not None]
    if loads and max(loads) > LOAD_WARN:
        print(f"   WARNING: load average {max(loads) * (os.cpu_count() or 1):.1f} on {os.cpu_count()} logical cores "
              f"(over {LOAD_WARN:g} per core, this demo included): other processes compete for the CPU, so "
              "times are inflated and speed-ups are unreliable.")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
