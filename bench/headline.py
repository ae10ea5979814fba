"""The issue-11 headline ratios, in one run and on the same inputs: ``python -m bench.headline``.

* sliding window ``(256, 256)``, fwd+bwd at ``n = 16k``: lhattn-triton against FlexAttention and
  dense SDPA (and the same window with 64 global tokens against the plain one); fwd and bwd
  throughput in useful TFLOP/s (:mod:`bench.flops`) against the H100's 790 TFLOP/s bf16 dense;
* LSG (block 128, factor 2, 1 global token) fwd+bwd at ``n = 4k`` against FlexAttention (recorded
  as skipped with the provider's reason when Flex cannot express it);
* segments (``S = 512``) fwd+bwd at ``n = 16k`` against SDPA on the reshaped problem
  (``[B, H, n/S, S, D]``, one dense attention per segment) and against Flex;
* the encoder layer (:mod:`bench.encoder_layer`) at 16k: stock full / stock windowed-mask against
  the lhattn window.

Shape: ``B = 4, H = 16`` (``B·H = 64``), ``D = 64``, bf16.  Output: ``headline.json`` and the
summary table ``summary.md`` in ``--out``.  ``--small`` shrinks every ``n`` by 16x and runs on
any device (a smoke run of the code paths, e.g. on CPU; the CPU skips the Triton rows).
Timing: :func:`bench.case.measure_mode` (``triton.testing.do_bench`` median on CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from . import flops as FL
from .case import Timing, measure_mode
from .providers import PROVIDERS, Prepared, Provider, Workload

H100_BF16_DENSE_TFLOPS = 790.0
BATCH, HEADS, HEAD_DIM, DTYPE = 4, 16, 64, "bf16"
SEGMENT = 512


def _sdpa_reshaped(w: Workload, grad: bool) -> Prepared:
    """Dense SDPA per segment: ``q, k, v`` viewed as ``[B, H, n/S, S, D]`` (same inputs as the rest)."""
    s = w.params["segment_size"]
    if w.n % s:
        raise ValueError(f"n={w.n} is not a multiple of the segment size {s}")
    q, k, v = w.qkv(grad)
    shape = (w.batch, w.heads, w.n // s, s, w.head_dim)

    def forward():
        out = F.scaled_dot_product_attention(q.view(shape), k.view(shape), v.view(shape))
        return out.view(w.batch, w.heads, w.n, w.head_dim)
    return Prepared(forward, [q, k, v] if grad else [], {"reshaped": list(shape)})


PROVIDERS.setdefault("sdpa-reshaped", Provider(_sdpa_reshaped, "peer", "attention", "pattern",
                                               _sdpa_reshaped.__doc__))


def cases(n_scale: int, device: str):
    """``(name, workload, providers, mode)`` in run order (the headline first: a time limit cuts
    from the end)."""
    def wl(pattern, params, n, num_global=0):
        return Workload(pattern, params, BATCH, HEADS, HEAD_DIM, n // n_scale, DTYPE, device, num_global)

    sw = wl("sliding_window", {"window": [256, 256]}, 16384)
    sw_g = wl("sliding_window", {"window": [256, 256]}, 16384, num_global=64)
    lsg = wl("lsg", {"block_size": 128, "sparsity_factor": 2, "sparsity_type": "norm", "num_global_tokens": 1},
             4096)
    seg = wl("segment", {"segment_size": SEGMENT // (1 if n_scale == 1 else 8)}, 16384)
    return [
        ("sliding_window 16k", sw, ["lhattn-triton", "flex", "sdpa-default"], "fwd+bwd"),
        ("sliding_window 16k", sw, ["lhattn-triton"], "fwd"),
        ("sliding_window 16k", sw, ["lhattn-triton"], "bwd"),
        ("sliding_window 16k + 64 globals", sw_g, ["lhattn-triton"], "fwd+bwd"),
        ("lsg 4k", lsg, ["lhattn-triton", "flex"], "fwd+bwd"),
        ("segment 16k", seg, ["lhattn-triton", "sdpa-reshaped", "flex"], "fwd+bwd"),
    ]


def run(n_scale: int, device: str, deadline: float, log=print,
        after_each: Optional[Callable[[List[dict]], None]] = None) -> List[dict]:
    """Measure every case and provider until ``deadline``; ``after_each(rows)`` after each one (the caller
    rewrites its files, so that a kill in the middle of a case keeps every case before it)."""
    timing = Timing(warmup_ms=10, rep_ms=50, target_s=1.0, max_reps=5)
    rows = []
    for name, w, providers, mode in cases(n_scale, device):
        for prov in providers:
            if time.perf_counter() > deadline:
                rows.append(dict(case=name, provider=prov, mode=mode, status="skipped", reason="time limit"))
                continue
            t0 = time.perf_counter()
            res = measure_mode(w, prov, mode, timing, memory=False)
            res.update(case=name, provider=prov, n=w.n, wall_s=round(time.perf_counter() - t0, 1))
            if res.get("median_ms"):
                useful = FL.attention_flops(FL.visible_pairs(w.lhattn_pattern(), w.n, w.num_global), w.batch,
                                            w.heads, w.head_dim, mode)
                res["useful_tflops"] = useful / (res["median_ms"] * 1e-3) / 1e12
            rows.append(res)
            log(json.dumps({k: res.get(k) for k in ("case", "provider", "mode", "status", "median_ms",
                                                     "useful_tflops", "reason", "wall_s")}))
            if after_each is not None:
                after_each(rows)
    return rows


def encoder(n: int, device: str, log=print) -> List[dict]:
    from .encoder_layer import main as encoder_main
    res = encoder_main(["--device", device, "--n", str(n)])
    rows = res.get("results", [])
    for r in rows:
        log(json.dumps(r))
    return rows


def _ms(rows, case, provider, mode="fwd+bwd") -> Optional[float]:
    for r in rows:
        if r.get("case") == case and r.get("provider") == provider and r.get("mode") == mode:
            return r.get("median_ms")
    return None


def _reason(rows, case, provider, mode="fwd+bwd") -> str:
    for r in rows:
        if r.get("case") == case and r.get("provider") == provider and r.get("mode") == mode:
            return f"{r.get('status')}: {str(r.get('reason'))[:140]}"
    return "not run"


def summary(rows: List[dict], enc: List[dict], meta: dict) -> str:
    """The summary table: each headline ratio against its target (speed-ups = peer time / ours)."""
    def ratio(case, peer, ours="lhattn-triton", case_ours=None, mode="fwd+bwd"):
        a, b = _ms(rows, case, peer, mode), _ms(rows, case_ours or case, ours, mode)
        if a and b:
            return a / b, ""
        return None, _reason(rows, case, peer, mode) if not a else _reason(rows, case_ours or case, ours, mode)

    def tflops(case, mode):
        for r in rows:
            if r.get("case") == case and r.get("provider") == "lhattn-triton" and r.get("mode") == mode:
                v = r.get("useful_tflops")
                return (v / H100_BF16_DENSE_TFLOPS, "") if v else (None, _reason(rows, case, "lhattn-triton", mode))
        return None, "not run"

    enc_ms = {r.get("setup"): r.get("median_ms") for r in enc if r.get("status", "ok") == "ok"}
    def enc_ratio(stock):
        a, b = enc_ms.get(stock), enc_ms.get("lhattn-window")
        return (a / b, "") if a and b else (None, "not run / " + ", ".join(
            f"{r.get('setup')}: {r.get('status')}" for r in enc))

    items = [
        ("sliding window fwd+bwd vs FlexAttention, 16k", ratio("sliding_window 16k", "flex"), ">= 1.3x"),
        ("sliding window fwd+bwd vs dense SDPA, 16k", ratio("sliding_window 16k", "sdpa-default"), ">= 10x"),
        ("+ 64 globals: time / plain window time", ratio("sliding_window 16k", "lhattn-triton",
                                                         case_ours="sliding_window 16k + 64 globals"), "<= 1.15"),
        ("sliding window fwd, fraction of 790 TFLOP/s useful", tflops("sliding_window 16k", "fwd"), ">= 0.40"),
        ("sliding window bwd, fraction of 790 TFLOP/s useful", tflops("sliding_window 16k", "bwd"), ">= 0.25"),
        ("LSG fwd+bwd vs FlexAttention, 4k", ratio("lsg 4k", "flex"), ">= 1.3x"),
        ("segments fwd+bwd vs SDPA on the reshape, 16k", ratio("segment 16k", "sdpa-reshaped"), ">= 0.95x"),
        ("segments fwd+bwd vs FlexAttention, 16k", ratio("segment 16k", "flex"), ">= 1.2x"),
        ("encoder layer vs stock full, 16k", enc_ratio("stock-full"), ">= 5x"),
        ("encoder layer vs stock masked, 16k", enc_ratio("stock-window"), ">= 20x"),
    ]
    # the globals row is (plain / globals): invert it to "globals time / plain time"
    name, (val, why), tgt = items[2]
    items[2] = (name, ((1.0 / val) if val else None, why), tgt)
    lines = [f"# Headline ratios ({meta['device']}, {meta['date']})", "",
             f"B={BATCH}, H={HEADS}, D={HEAD_DIM}, {DTYPE}; n scale 1/{meta['n_scale']}; "
             f"LHATTN_AUTOTUNE_CONFIGS={os.environ.get('LHATTN_AUTOTUNE_CONFIGS', '(all)')}; "
             f"{meta['seconds']:.0f} s.", "",
             "| measure | value | target | note |", "|---|---|---|---|"]
    for name, (val, why), tgt in items:
        lines.append(f"| {name} | {'' if val is None else f'{val:.2f}'} | {tgt} | {why} |")
    lines += ["", "Case names give the full-size n; the n column is what ran.", "",
              "| case | n | provider | mode | ms | useful TFLOP/s | wall s | status |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = r.get("median_ms")
        tf = r.get("useful_tflops")
        lines.append(f"| {r.get('case')} | {r.get('n', '')} | {r.get('provider')} | {r.get('mode')} "
                     f"| {'' if ms is None else f'{ms:.3f}'} | {'' if tf is None else f'{tf:.1f}'} | {r.get('wall_s', '')} "
                     f"| {r.get('status')} {str(r.get('reason') or '')[:100]} |")
    for r in enc:
        ms = r.get("median_ms")
        lines.append(f"| encoder layer | {r.get('n')} | {r.get('setup')} | fwd+bwd | {'' if ms is None else f'{ms:.1f}'} "
                     f"| | {r.get('wall_s', '')} | {r.get('status', 'ok')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="n / 16 (a smoke run of the code paths)")
    ap.add_argument("--out", default=None, help="folder for headline.json and summary.md")
    ap.add_argument("--time-limit-s", type=float, default=300.0, help="stop starting cases after this")
    ap.add_argument("--no-encoder", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    n_scale = 16 if args.small else 1
    log = lambda s: print(s, flush=True)  # noqa: E731
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"

    def write(rows, enc) -> str:  # written before the encoder layer too: a kill there keeps the rest
        meta = dict(device=device, date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), n_scale=n_scale,
                    seconds=time.perf_counter() - t0, torch=torch.__version__,
                    autotune_configs=os.environ.get("LHATTN_AUTOTUNE_CONFIGS"))
        md = summary(rows, enc, meta)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "headline.json"), "w") as f:
                json.dump(dict(meta=meta, rows=rows, encoder=enc), f, indent=1, default=str)
            with open(os.path.join(args.out, "summary.md"), "w") as f:
                f.write(md)
        return md

    write([], [])  # a summary exists from the start, rewritten after every case
    rows = run(n_scale, args.device, t0 + args.time_limit_s, log, after_each=lambda r: write(r, []))
    enc = []
    if not args.no_encoder and time.perf_counter() < t0 + args.time_limit_s:
        try:
            enc = encoder(16384 // n_scale, args.device, log)
        except Exception as exc:  # noqa: BLE001 - recorded in the summary
            enc = [{"setup": "encoder", "status": "error", "reason": f"{type(exc).__name__}: {exc}"}]
    print(write(rows, enc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
