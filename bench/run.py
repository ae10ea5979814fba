"""``python -m bench``: every provider on the same inputs, swept over n; JSON + markdown + PNG.

Examples::

    python -m bench --quick                          # tiny smoke run of every path, no memory
    python -m bench --pattern sliding_window --mode fwd+bwd --n 1024,2048,4096
    python -m bench --preset cpu-issue7              # the committed CPU numbers of issue 7
    python -m bench --preset gpu-issue7 --budget-s 400 --out $OUT   # on a CUDA machine

What is timed, how, and how memory is measured: see ``bench/case.py``; the providers and what
each one computes: ``bench/providers.py``; the useful-flop count: ``bench/flops.py``.

Cases run provider tier by provider tier (the headline providers first), n ascending within
a provider, so that a time budget (``--budget-s``) cuts the least important cases. A case
that cannot run is recorded -- ``skipped`` (with the reason), ``oom``, ``timeout`` or
``error`` -- never a crash. The JSON is rewritten after every case. Providers that do not run
on the device or in the chosen mode are listed with the reason (printed, ``meta.omitted`` in the
JSON, and in ``bench.md``), and so is memory when it is not measured.

Output goes to ``--out DIR``, by default ``bench/out/<preset|quick|sweep>-<device>-<date>/``,
which git ignores; committed results are copied to ``bench/results/`` by hand.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import torch

from . import flops as FL
from .case import MODE_ORDER, RESULT_PREFIX, Timing, measure_mode, rss_supported
from .providers import PROVIDERS, Workload, estimated_bytes, executed_pairs

__all__ = ["main", "Config", "PRESETS"]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATTERNS = ("sliding_window", "lsg", "segment")
MODES = ("fwd", "bwd", "fwd+bwd")
# Headline providers first: a time budget cuts from the end.
TIERS = (
    ("lhattn-triton", "lhattn-fallback", "sdpa-default", "sdpa-flash", "lhattn-longformer", "hf-longformer"),
    ("flex", "sdpa-efficient"),
    ("lhattn-reference", "sdpa-math"),
)
CPU_PROVIDERS = ["lhattn-fallback", "lhattn-reference", "sdpa-default", "sdpa-math", "flex", "hf-longformer", "lhattn-longformer"]
CUDA_PROVIDERS = ["lhattn-triton", "lhattn-fallback", "lhattn-reference", "sdpa-flash", "sdpa-efficient", "sdpa-math",
                  "flex", "hf-longformer", "lhattn-longformer"]
GIB = 1024 ** 3
# Providers a device's default list leaves out, and why (stated in every run that omits them).
CPU_OMITTED = {
    "lhattn-triton": "needs CUDA (on CPU the Triton kernels run only in Triton's interpreter, which is not timed)",
    "sdpa-flash": "on CPU this is the flash-style kernel that sdpa-default already picks",
    "sdpa-efficient": "CUDA only",
}
QUICK_CPU_OMITTED = {
    "flex": "not run by --quick on CPU: torch.compile builds FlexAttention anew for every shape and mode, "
            "which dominates a smoke run (name it in --providers to include it)",
}


@dataclass
class Config:
    """One sweep: a pattern with fixed parameters and shape, swept over ``ns``."""

    name: str
    pattern: str
    params: dict
    batch: int
    heads: int
    head_dim: int
    dtype: str
    ns: List[int]
    modes: List[str]
    providers: List[str]
    num_global: int = 0
    max_n: Dict[str, int] = field(default_factory=dict)  # provider -> largest n it runs at
    dropout: float = 0.0  # attention dropout (training); every provider that has it applies it

    def workload(self, n: int, device: str, seed: int) -> Workload:
        return Workload(self.pattern, self.params, self.batch, self.heads, self.head_dim, n, self.dtype, device,
                        self.num_global, seed, self.dropout)

    @property
    def group(self) -> str:
        """Results with the same group (everything but n) form one line per provider in the plots."""
        p = ",".join(f"{k}={v}" for k, v in self.params.items())
        p = p.replace(" ", "")
        g = f" g={self.num_global}" if self.num_global else ""
        g += f" dropout={self.dropout:g}" if self.dropout else ""
        return f"{self.pattern}({p}) B={self.batch} H={self.heads} D={self.head_dim} {self.dtype}{g}"


# ---- presets ---------------------------------------------------------------------------------

SW_256 = {"window": [256, 256], "dilation": 1}
LSG_128 = {"block_size": 128, "sparsity_factor": 4, "sparsity_type": "norm", "num_global_tokens": 1}


def preset_cpu_issue7() -> List[Config]:
    """Issue 7's CPU numbers: fallback, fp32, B=1, H=8, D=64, window (256, 256).
    n = 4096: every CPU provider, all modes (HF LongformerSelfAttention included);
    n = 8192 .. 32768: the fallback and dense SDPA (default kernel, and the math kernel that holds
    the n×n scores), fwd and fwd+bwd (the slopes)."""
    common = dict(pattern="sliding_window", params=dict(SW_256), batch=1, heads=8, head_dim=64, dtype="fp32")
    return [
        Config("cpu-issue7-n4096", ns=[4096], modes=list(MODES),
               providers=["lhattn-fallback", "sdpa-default", "sdpa-math", "hf-longformer", "lhattn-longformer",
                          "flex"], **common),
        Config("cpu-issue7-sweep", ns=[8192, 16384, 32768], modes=["fwd", "fwd+bwd"],
               providers=["lhattn-fallback", "sdpa-default", "sdpa-math"], **common),
    ]


def preset_gpu_issue7() -> List[Config]:
    """Issue 7's GPU targets: bf16, B·H = 64 (B=4, H=16), D in {64, 128}; window (256, 256) at
    n in {4k, 16k, 64k}; LSG block 128 at n in {4k, 16k}; segments S in {128, 512} at n in {4k, 16k}."""
    small = {"lhattn-reference": 4096, "sdpa-math": 4096}
    out = []
    for d in (64, 128):
        out.append(Config(f"sw256-d{d}", "sliding_window", dict(SW_256), 4, 16, d, "bf16", [4096, 16384, 65536],
                          list(MODES), list(CUDA_PROVIDERS), max_n=dict(small)))
    for d in (64, 128):
        out.append(Config(f"lsg128-d{d}", "lsg", dict(LSG_128), 4, 16, d, "bf16", [4096, 16384], list(MODES),
                          [p for p in CUDA_PROVIDERS if "longformer" not in p], max_n=dict(small)))
    for s in (128, 512):
        for d in (64, 128):
            out.append(Config(f"seg{s}-d{d}", "segment", {"segment_size": s}, 4, 16, d, "bf16", [4096, 16384],
                              list(MODES), [p for p in CUDA_PROVIDERS if "longformer" not in p], max_n=dict(small)))
    # training with attention dropout 0.1 (HF Longformer's default): the cost of the in-kernel dropout
    out.append(Config("sw256-d64-dropout", "sliding_window", dict(SW_256), 4, 16, 64, "bf16", [4096, 16384],
                      ["fwd+bwd"], ["lhattn-triton", "sdpa-flash", "sdpa-efficient", "hf-longformer",
                                    "lhattn-longformer"], dropout=0.1))
    return out


PRESETS = {"cpu-issue7": (preset_cpu_issue7, "cpu"), "gpu-issue7": (preset_gpu_issue7, "cuda")}


# ---- argument parsing ------------------------------------------------------------------------


def _ints(text: str) -> List[int]:
    out = []
    for tok in re.split(r"[,\s]+", text.strip()):
        if not tok:
            continue
        m = re.fullmatch(r"(\d+)([kK]?)", tok)
        if not m:
            raise argparse.ArgumentTypeError(f"expected integers like 4096 or 4k, got {tok!r}")
        out.append(int(m.group(1)) * (1024 if m.group(2) else 1))
    return out


def _modes(text: str) -> List[str]:
    if text == "all":
        return list(MODES)
    modes = [m.strip() for m in text.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            raise argparse.ArgumentTypeError(f"mode must be one of {MODES} or 'all', got {m!r}")
    return modes


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pattern", default="all", choices=[*PATTERNS, "all"])
    ap.add_argument("--mode", type=_modes, default=None,
                    help="fwd | bwd | fwd+bwd | all, or a comma list (default all)")
    ap.add_argument("--n", type=_ints, default=None, help="sequence lengths, e.g. 4k,16k,64k")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                    help="default: fp32 on CPU, bf16 on CUDA")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and few reps: a smoke test of every path")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="a fixed sweep (overrides shapes)")
    ap.add_argument("--out", default=None,
                    help="output folder (default bench/out/<preset|quick|sweep>-<device>-<date>, ignored by git)")
    ap.add_argument("--providers", default=None, help=f"comma list from {sorted(PROVIDERS)}")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--head-dim", type=_ints, default=None, help="one or more, e.g. 64,128")
    ap.add_argument("--window", type=_ints, default=None, help="left,right (default 256,256)")
    ap.add_argument("--num-global", type=int, default=0, help="first tokens made global (sliding_window, segment)")
    ap.add_argument("--dropout", type=float, default=0.0,
                    help="attention dropout p (training): lhattn, SDPA and HF Longformer apply it; FlexAttention "
                         "has none and is skipped; outputs are then not checked against the reference")
    ap.add_argument("--lsg-block", type=int, default=None)
    ap.add_argument("--lsg-sparsity-factor", type=int, default=4)
    ap.add_argument("--lsg-sparsity-type", default="norm")
    ap.add_argument("--segment-size", type=_ints, default=None, help="one or more, e.g. 128,512")
    ap.add_argument("--reference-max-n", type=int, default=None, help="largest n for lhattn-reference / sdpa-math")
    ap.add_argument("--budget-s", type=float, default=None, help="stop starting new cases after this many seconds")
    ap.add_argument("--max-op-s", type=float, default=None,
                    help="skip a case whose one run is predicted (from the previous n) to take longer")
    ap.add_argument("--mem-cap-gib", type=float, default=None, help="memory cap (default: CUDA 95%% of the card, CPU 8). CPU with --memory: each case "
                         "subprocess runs under this hard limit (RLIMIT_DATA) and a case that needs more is "
                         "recorded as oom; otherwise cases estimated to need more are skipped")
    ap.add_argument("--memory", choices=["auto", "on", "off"], default="auto",
                    help="on: measure peak memory (CPU: one fresh subprocess per case); off: timings only, "
                         "in-process; auto (default): on, except with --quick")
    ap.add_argument("--case-timeout-s", type=float, default=3600.0, help="CPU subprocess time limit per case")
    ap.add_argument("--check-max-n", type=int, default=None,
                    help="in mode fwd, compare each provider's output with the reference up to this n "
                         "(default: CPU 2048, CUDA 4096; 0 = never)")
    ap.add_argument("--dry-run", action="store_true", help="list the cases in run order and exit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-plot", action="store_true")
    return ap


def _configs_from_args(args, device: str) -> List[Config]:
    cuda = device == "cuda"
    if args.quick:  # tiny shapes: every code path in a few minutes
        ns = args.n or ([1024, 4096] if cuda else [256, 512])
        batch = args.batch or (2 if cuda else 1)
        heads = args.heads or (4 if cuda else 2)
        dims = args.head_dim or [64 if cuda else 32]
        window = args.window or ([64, 64] if cuda else [32, 32])
        lsg_block = args.lsg_block or (64 if cuda else 32)
        seg_sizes = args.segment_size or ([64, 256] if cuda else [32, 64])
    else:
        ns = args.n or ([4096, 16384, 65536] if cuda else [1024, 2048, 4096])
        batch = args.batch or (4 if cuda else 1)
        heads = args.heads or (16 if cuda else 8)
        dims = args.head_dim or ([64, 128] if cuda else [64])
        window = args.window or [256, 256]
        lsg_block = args.lsg_block or 128
        seg_sizes = args.segment_size or [128, 512]
    if len(window) == 1:
        window = window * 2
    dtype = args.dtype or ("bf16" if cuda else "fp32")
    modes = args.mode or list(MODES)
    providers = list(CUDA_PROVIDERS if cuda else CPU_PROVIDERS)
    if args.quick and not cuda and args.providers is None:
        providers = [p for p in providers if p not in QUICK_CPU_OMITTED]
    ref_max = args.reference_max_n or (4096 if cuda else 2048)
    max_n = {"lhattn-reference": ref_max, "sdpa-math": ref_max}
    patterns = PATTERNS if args.pattern == "all" else (args.pattern,)
    out = []
    for pat in patterns:
        if pat == "sliding_window":
            variants = [("sw", {"window": list(window), "dilation": 1})]
        elif pat == "lsg":
            variants = [("lsg", {"block_size": lsg_block, "sparsity_factor": args.lsg_sparsity_factor,
                                 "sparsity_type": args.lsg_sparsity_type, "num_global_tokens": 1})]
        else:
            variants = [(f"seg{s}", {"segment_size": s}) for s in seg_sizes]
        for tag, params in variants:
            provs = [p for p in providers if pat == "sliding_window" or "longformer" not in p]
            for d in dims:
                out.append(Config(f"{tag}-d{d}", pat, params, batch, heads, d, dtype, sorted(ns), modes, provs,
                                  0 if pat == "lsg" else args.num_global, dict(max_n), args.dropout))
    return out


# ---- metadata --------------------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(mod: str) -> Optional[str]:
    try:
        return __import__(mod).__version__
    except Exception:  # noqa: BLE001
        return None


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return out.stdout.strip() + ("+uncommitted-changes" if dirty else "") if out.returncode == 0 else None
    except Exception:  # noqa: BLE001
        return None


def collect_meta(device: str, argv: List[str]) -> dict:
    meta = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m bench " + shlex.join(argv),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "lhattn": _version("lhattn"),
        "cuda": torch.version.cuda,
        "git_commit": _git_commit(),
        "device_type": device,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "env": {k: os.environ[k] for k in ("TRITON_INTERPRET", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
                if k in os.environ},
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        meta.update(device_name=torch.cuda.get_device_name(0), gpu_memory_bytes=props.total_memory,
                    cudnn=torch.backends.cudnn.version(), sm=f"{props.major}.{props.minor}",
                    multiprocessors=props.multi_processor_count)
    else:
        meta["device_name"] = (f"CPU: {meta['cpu']} ({os.cpu_count()} logical cores, "
                               f"{torch.get_num_threads()} torch threads)")
    return meta


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:40]


# ---- the sweep -------------------------------------------------------------------------------


class Sweep:
    def __init__(self, configs: List[Config], device: str, timing: Timing, args, out_dir: str, meta: dict):
        self.configs, self.device, self.timing, self.args, self.out_dir = configs, device, timing, args, out_dir
        self.meta = meta
        self.results: List[dict] = []
        self.t0 = time.monotonic()
        want = args.memory == "on" or (args.memory == "auto" and not args.quick)
        self.subprocess = device == "cpu" and want and rss_supported()
        self.memory = want and (device == "cuda" or self.subprocess)
        self.max_op_s = args.max_op_s or (200.0 if device == "cpu" else 60.0)
        if args.mem_cap_gib is not None:
            self.mem_cap = args.mem_cap_gib * GIB
        elif device == "cuda":
            self.mem_cap = 0.95 * torch.cuda.get_device_properties(0).total_memory
        else:
            self.mem_cap = 8 * GIB
        self.check_max_n = (4096 if device == "cuda" else 2048) if args.check_max_n is None else args.check_max_n
        self.poisoned: Optional[str] = None
        self.log_path = os.path.join(out_dir, "cases.log") if self.subprocess else None
        self.meta["omitted"] = omissions(configs, device, args, self.memory)

    # -- bookkeeping --

    def _prior(self, cfg: Config, provider: str, mode: str, n: int):
        """The largest smaller-n result of the same group/provider/mode."""
        best = None
        for r in self.results:
            if (r["group"] == cfg.group and r["provider"] == provider and r["mode"] == mode and r["n"] < n
                    and (best is None or r["n"] > best["n"])):
                best = r
        return best

    def _precheck(self, cfg: Config, provider: str, mode: str, w: Workload, pairs: int) -> Optional[tuple]:
        """(status, reason) if the case should not run, else None."""
        if self.poisoned:
            return "skipped", f"not run: the CUDA context was broken by an earlier case ({self.poisoned})"
        if self.args.budget_s is not None and time.monotonic() - self.t0 > self.args.budget_s:
            return "skipped", f"not run: time budget --budget-s {self.args.budget_s:g} exhausted"
        lim = cfg.max_n.get(provider)
        if lim is not None and w.n > lim:
            return "skipped", f"not run: n > {lim}, the largest n this sweep runs {provider} at"
        est = estimated_bytes(provider, w, mode)
        if est > self.mem_cap and not self.subprocess:  # a CPU subprocess runs it under a hard limit instead
            return "skipped", (f"not run: estimated {est / GIB:.1f} GiB (n×n scores) > cap "
                               f"{self.mem_cap / GIB:.1f} GiB (--mem-cap-gib)")
        prev = self._prior(cfg, provider, mode, w.n)
        if prev is not None and prev["status"] in ("oom", "timeout"):
            return "skipped", f"not run: {prev['status']} at n={prev['n']}"
        if prev is not None and prev["status"] == "ok" and prev["median_ms"]:
            scale = executed_pairs(provider, w, pairs) / max(1, prev["pairs_executed"])
            pred = prev["median_ms"] / 1e3 * scale
            if pred > self.max_op_s:
                return "skipped", (f"not run: predicted {pred:.0f} s per run ({prev['median_ms'] / 1e3:.1f} s at "
                                   f"n={prev['n']}, scaled by executed flops) > --max-op-s {self.max_op_s:g}")
        return None

    def _record(self, cfg: Config, provider: str, w: Workload, pairs: int, res: dict) -> dict:
        prov = PROVIDERS[provider]
        mode = res["mode"]
        exe_pairs = executed_pairs(provider, w, pairs)
        rec = {"config": cfg.name, "group": cfg.group, "pattern": cfg.pattern, "params": cfg.params,
               "batch": cfg.batch, "heads": cfg.heads, "head_dim": cfg.head_dim, "dtype": cfg.dtype,
               "num_global": cfg.num_global, "n": w.n, "device": self.device, "provider": provider,
               "family": prov.family, "level": prov.level, "computes": prov.computes, **res,
               "pairs_useful": pairs, "w_eff": pairs / w.n, "pairs_executed": exe_pairs,
               "flops_useful": FL.attention_flops(pairs, w.batch, w.heads, w.head_dim, mode),
               "flops_executed": FL.attention_flops(exe_pairs, w.batch, w.heads, w.head_dim, mode)}
        ms = rec.get("median_ms")
        rec["tflops_useful"] = rec["flops_useful"] / (ms * 1e-3) / 1e12 if ms else None
        rec["tflops_executed"] = rec["flops_executed"] / (ms * 1e-3) / 1e12 if ms else None
        self.results.append(rec)
        if self.device == "cuda" and rec["status"] == "error" and re.search(
                r"CUDA error|illegal memory access|device-side assert|unspecified launch failure", rec["reason"] or ""):
            self.poisoned = f"{provider} n={w.n} {mode}: {rec['reason'][:200]}"
        return rec

    def _run_subprocess(self, spec: dict) -> List[dict]:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=REPO + os.pathsep + os.environ.get(
            "PYTHONPATH", ""))
        cmd = [sys.executable, "-m", "bench.case"]
        try:
            proc = subprocess.run(cmd, input=json.dumps(spec), capture_output=True, text=True, cwd=REPO, env=env,
                                  timeout=self.args.case_timeout_s)
            out, err, rc, status = proc.stdout, proc.stderr, proc.returncode, None
        except subprocess.TimeoutExpired as exc:
            dec = (lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or ""))
            out, err, rc = dec(exc.stdout), dec(exc.stderr), None
            status = ("timeout", f"case subprocess exceeded --case-timeout-s {self.args.case_timeout_s:g}")
        if self.log_path:
            with open(self.log_path, "a") as fh:
                fh.write(f"=== {spec['provider']} {spec['workload']} rc={rc}\n{err[-4000:]}\n")
        got = [json.loads(line[len(RESULT_PREFIX):]) for line in out.splitlines() if line.startswith(RESULT_PREFIX)]
        done = {r["mode"] for r in got}
        if status is None:
            if rc == -9 or rc == 137:
                status = ("oom", "case subprocess killed (SIGKILL: most likely the out-of-memory killer)")
            else:
                tail = " ".join(err.strip().splitlines()[-3:])[:400]
                status = ("error", f"case subprocess exited with {rc}: {tail}")
        for mode in spec["modes"]:
            if mode not in done:
                got.append({"mode": mode, "status": status[0], "reason": status[1], "median_ms": None,
                            "peak_mem_bytes": None})
        return got

    def plan(self) -> List[tuple]:
        """(config, provider, n) in run order: tier by tier, config by config, n ascending."""
        cases = []
        for tier in TIERS:
            for cfg in self.configs:
                for provider in tier:
                    if provider in cfg.providers:
                        cases += [(cfg, provider, n) for n in cfg.ns]
        listed = {p for t in TIERS for p in t}
        for cfg in self.configs:
            for provider in cfg.providers:
                if provider not in listed:
                    raise ValueError(f"unknown provider {provider!r}; known: {sorted(PROVIDERS)}")
        return cases

    def run(self, progress: bool = True) -> None:
        cases = self.plan()
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(cases), unit="case", disable=not progress, dynamic_ncols=True, mininterval=2.0,
                       file=sys.stderr)
            write = bar.write
        except ImportError:  # pragma: no cover
            bar, write = None, print
        pairs_cache: Dict[tuple, int] = {}
        for cfg, provider, n in cases:
            w = cfg.workload(n, self.device, self.args.seed)
            key = (cfg.group, n)
            if key not in pairs_cache:
                pairs_cache[key] = FL.visible_pairs(w.lhattn_pattern(), n, cfg.num_global)
            pairs = pairs_cache[key]
            if bar is not None:
                bar.set_description(f"{cfg.name} n={n} {provider}")
            todo, recs = [], []
            for mode in MODE_ORDER:
                if mode not in cfg.modes:
                    continue
                pre = self._precheck(cfg, provider, mode, w, pairs)
                if pre is None:
                    todo.append(mode)
                else:
                    recs.append(self._record(cfg, provider, w, pairs, {"mode": mode, "status": pre[0],
                                                                       "reason": pre[1], "median_ms": None,
                                                                       "peak_mem_bytes": None}))
            if todo:
                check = n <= self.check_max_n
                if self.subprocess:
                    spec = {"workload": w.to_dict(), "provider": provider, "modes": todo,
                            "timing": asdict(self.timing), "memory": self.memory, "check": check,
                            "mem_limit_bytes": int(self.mem_cap)}
                    got = self._run_subprocess(spec)
                else:
                    got = [measure_mode(w, provider, mode, self.timing, self.memory, check) for mode in todo]
                recs += [self._record(cfg, provider, w, pairs, r) for r in got]
            for r in sorted(recs, key=lambda r: MODE_ORDER.index(r["mode"])):
                write(_line(r))
            self.save()
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        self.meta["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        self.save()

    def save(self) -> str:
        from .report import ratios

        data = {"meta": self.meta, "configs": [asdict(c) for c in self.configs],
                "timing": asdict(self.timing), "notes": NOTES, "results": self.results,
                "ratios": ratios(self.results)}
        path = os.path.join(self.out_dir, "bench.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=1)
        os.replace(tmp, path)
        return path


NOTES = {
    "modes": "fwd: forward under torch.no_grad(); bwd: backward only (forward run once outside the timed region, "
             "out.backward(dout, retain_graph=True) timed); fwd+bwd: forward with autograd + backward.",
    "timing": "CUDA: triton.testing.do_bench median; CPU: wall-clock median after warm-up (see bench/case.py).",
    "memory": "extra peak memory of one run beyond what was held before it (CUDA: max_memory_allocated; CPU: peak "
              "RSS in a fresh subprocess per case). Not reported for bwd (see fwd+bwd).",
    "flops": "useful flops counted from the pattern: 4·B·H·N·W_eff·D forward, x2.5 backward, x3.5 fwd+bwd; "
             "W_eff = visible keys per query, exact (bench/flops.py). tflops_executed uses N² for dense SDPA.",
    "providers": {k: " ".join(v.doc.split()) for k, v in PROVIDERS.items()},
    "module_level": "hf-longformer and lhattn-longformer time the whole LongformerSelfAttention module (q/k/v "
                    "projections + attention + output reshaping) on hidden states [B, N, H*D], same weights; their "
                    "flops count the attention only.",
    "dense": "sdpa-* compute full (dense) attention, the O(n^2) cost the patterns avoid, not the pattern.",
    "check": "check_rel_err (mode fwd, n <= --check-max-n): max |out - reference| / max |reference| on the same "
             "inputs; reference = lhattn-reference (attention level) or hf-longformer (module level).",
}


def omissions(configs: List[Config], device: str, args, memory: bool) -> List[str]:
    """One sentence per thing this run does not measure: providers left out (and why), memory."""
    used = {p for c in configs for p in c.providers}
    reasons = dict(CPU_OMITTED) if device == "cpu" else {}
    if args.quick and device == "cpu" and not args.providers:
        reasons.update(QUICK_CPU_OMITTED)
    out = []
    for name in sorted(PROVIDERS):
        if name not in used:
            why = reasons.get(name) or ("not in --providers" if args.providers else "not in this preset")
            out.append(f"{name}: {why}")
    other = sorted({c.pattern for c in configs if c.pattern != "sliding_window"})
    if other:
        out.append(f"hf-longformer, lhattn-longformer: not run for {', '.join(other)} "
                   "(Longformer's module has the sliding-window pattern only)")
    if not memory:
        why = ("--quick runs every case in-process for speed" if args.quick and args.memory == "auto"
               else "--memory off" if args.memory == "off"
               else "this platform cannot reset the peak-RSS mark (/proc/self/clear_refs)")
        out.append(f"peak memory: {why} (--memory on measures it"
                   + (", one fresh subprocess per case)" if device == "cpu" else ")"))
    return out


def _line(r: dict) -> str:
    head = f"{r['config']:>18} n={r['n']:<6} {r['provider']:<18} {r['mode']:<8}"
    if r["status"] != "ok":
        return f"{head} {r['status']}: {r['reason']}"
    mem = f"{r['peak_mem_bytes'] / 2**20:9.1f} MiB" if r.get("peak_mem_bytes") is not None else "".rjust(13)
    tf = f"{r['tflops_useful']:.3g} useful TFLOP/s" if r.get("tflops_useful") else ""
    chk = f"  (rel err vs {r['check_against']}: {r['check_rel_err']:.1e})" if "check_rel_err" in r else ""
    return f"{head} {r['median_ms']:11.3f} ms {mem}  {tf}{chk}"


def main(argv: Optional[List[str]] = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.preset:
        make, preset_device = PRESETS[args.preset]
        device = preset_device if args.device == "auto" else args.device
        configs = make()
        if args.pattern != "all":
            configs = [c for c in configs if c.pattern == args.pattern]
        if args.mode:
            for c in configs:
                c.modes = [m for m in c.modes if m in args.mode]
    else:
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        configs = None
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda (or a CUDA preset) but torch.cuda.is_available() is False")
    if configs is None:
        configs = _configs_from_args(args, device)
    if args.providers:
        keep = [p.strip() for p in args.providers.split(",") if p.strip()]
        unknown = [p for p in keep if p not in PROVIDERS]
        if unknown:
            raise SystemExit(f"unknown provider(s) {unknown}; known: {sorted(PROVIDERS)}")
        for c in configs:
            c.providers = [p for p in keep if p in c.providers or not args.preset]
            if c.pattern != "sliding_window":
                c.providers = [p for p in c.providers if "longformer" not in p]
    if args.quick:
        timing = Timing(warmup_s=0.05, target_s=0.3, min_reps=2, max_reps=5, long_s=5.0, warmup_ms=5, rep_ms=20)
    else:
        timing = Timing()
    meta = collect_meta(device, argv)
    out_dir = args.out or os.path.join(REPO, "bench", "out", "-".join(
        [args.preset or ("quick" if args.quick else "sweep"), _slug(meta["device_name"].replace("CPU: ", "")),
         _dt.datetime.now().strftime("%Y%m%d-%H%M")]))
    if not args.dry_run:
        os.makedirs(out_dir, exist_ok=True)
    meta["out_dir"] = os.path.abspath(out_dir)
    if device == "cpu" and "TRITON_INTERPRET" in os.environ:
        print("note: TRITON_INTERPRET is set; Triton is not timed on CPU anyway", file=sys.stderr)
    sweep = Sweep(configs, device, timing, args, out_dir, meta)
    if not args.dry_run:
        print(f"bench: {len(configs)} config(s) on {meta['device_name']} -> {out_dir}", flush=True)
    for line in meta["omitted"]:
        print(f"  not measured: {line}", flush=True)
    if args.dry_run:
        for cfg, provider, n in sweep.plan():
            print(f"{cfg.name:>18} n={n:<6} {provider:<18} {','.join(m for m in MODE_ORDER if m in cfg.modes)}")
        return {}
    sweep.run()
    path = sweep.save()
    from .report import write_reports

    written = write_reports(json.load(open(path)), out_dir, plots=not args.no_plot)
    print(f"wrote {path}" + "".join(f"\nwrote {p}" for p in written), flush=True)
    return {"json": path, "files": written}
