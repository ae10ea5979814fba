"""The lhattn demo: each pattern against dense attention, checked against the oracle.

    python -m bench.demo                 # CPU: about 2-3 minutes on 2 cores; GPU: well under a minute
    python -m bench.demo --n 4k,16k      # other lengths

1. Correctness, on a small case with padding and global tokens: ``lhattn.attention(...,
   backend="auto")`` against the oracle in ``lhattn.reference`` -- output and the gradients of
   q, k, v, as ``max |auto - oracle| / max |oracle|``.
2. Speed: for each pattern and length, the forward (and on CUDA also forward+backward) of
   lhattn (backend auto: Triton on CUDA where it can run the call, else the blocked fallback)
   against dense ``F.scaled_dot_product_attention`` on the same q, k, v. Dense attention
   computes all n² pairs; the patterns compute n·W_eff. Median times: ``triton.testing.do_bench``
   on CUDA, a wall-clock median on CPU.

For the full comparison (FlexAttention, HF Longformer, memory, bwd) use ``python -m bench``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

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


def _time(fn, device: str, reset=None) -> float:
    """Median milliseconds of ``fn()``."""
    if device == "cuda":
        from triton.testing import do_bench

        fn()
        return float(do_bench(fn, warmup=25, rep=100, grad_to_none=reset, return_mode="median"))
    t0 = time.perf_counter()
    fn()  # warm-up
    first = time.perf_counter() - t0
    reps = 1 if first > 3.0 else (2 if first > 0.5 else 5)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _modes(device: str):
    return ("fwd", "fwd+bwd") if device == "cuda" else ("fwd",)


def timings(pattern, n: int, device: str, dtype, b: int, h: int, d: int):
    gen = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(b, h, n, d, generator=gen).to(device, dtype).requires_grad_() for _ in range(3))
    out = {}
    for mode in _modes(device):
        if mode == "fwd":
            def lh():
                with torch.no_grad():
                    lhattn.attention(q, k, v, pattern, backend="auto")

            def dense():
                with torch.no_grad():
                    F.scaled_dot_product_attention(q, k, v)
        else:
            do = torch.randn(b, h, n, d, generator=gen).to(device, dtype)

            def lh():
                lhattn.attention(q, k, v, pattern, backend="auto").backward(do)

            def dense():
                F.scaled_dot_product_attention(q, k, v).backward(do)
        out[mode] = (_time(lh, device, [q, k, v]), dense, [q, k, v])
    return out, _backend_of(q, pattern)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--n", default=None, help="lengths (default: CPU 4k,16k,32k; CUDA 4k,16k,64k)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="skip a length whose predicted time would pass this (default: CPU 150 s, CUDA none)")
    args = ap.parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
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
    print(f"\n2. median time, {dname}, B={b} H={h} D={d}; dense = F.scaled_dot_product_attention on the same q, k, v"
          + ("" if cuda else " (forward; see python -m bench for backward)"))
    head = f"   {'pattern':<38} {'n':>6} {'W_eff':>7} {'mode':<8} {'lhattn ms':>10} {'dense ms':>10} {'speed-up':>8}"
    print(head)
    print("   " + "-" * (len(head) - 3))
    dense_ms = {}
    last = {}  # label -> (n, seconds of one lhattn run), to predict the next length
    t_start = time.monotonic()
    for n in ns:  # every pattern at a length before the next length: a budget cut drops the largest n
        for label, pattern in available.items():
            elapsed = time.monotonic() - t_start
            if label in last and args.budget_s:
                n0, s0 = last[label]
                dense_s = 0.0 if (n, "fwd") in dense_ms else (dense_ms.get((n0, "fwd")) or 0) / 1e3 * (n / n0) ** 2
                predicted = 3 * (s0 * n / n0 + dense_s)  # warm-up + reps, lhattn and (uncached) dense
                if elapsed + predicted > args.budget_s:
                    print(f"   {label:<38} {n:>6} skipped: predicted {predicted:.0f} s would pass the "
                          f"--budget-s {args.budget_s:g} s")
                    continue
            try:
                res, backend = timings(pattern, n, device, dtype, b, h, d)
            except (NotImplementedError, ImportError, RuntimeError) as exc:
                print(f"   {label:<38} {n:>6} n/a: {type(exc).__name__}: {str(exc)[:120]}")
                continue
            last[label] = (n, res["fwd"][0] / 1e3)
            for mode, (ms, dense, leaves) in res.items():
                if (n, mode) not in dense_ms:
                    try:
                        dense_ms[(n, mode)] = _time(dense, device, leaves)
                    except RuntimeError as exc:  # e.g. out of memory
                        dense_ms[(n, mode)] = None
                        print(f"   dense SDPA at n={n} {mode}: {type(exc).__name__}: {str(exc)[:100]}")
                dm = dense_ms[(n, mode)]
                dtxt = f"{dm:10.1f}" if dm else f"{'—':>10}"
                sp = f"{dm / ms:7.2f}x" if dm else f"{'':>8}"
                print(f"   {label + ' [' + backend + ']':<38} {n:>6} {w_eff(pattern, n):7.0f} {mode:<8} {ms:10.1f} "
                      f"{dtxt} {sp}", flush=True)
    print(f"\n   ({time.monotonic() - t_start:.0f} s of timing; speed-up = dense ms / lhattn ms)")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
