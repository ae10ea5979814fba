"""Measure one case: one provider on one workload, for each requested mode.

Modes (labelled truthfully):

* ``fwd``      -- the forward alone, under ``torch.no_grad()`` (inference: no autograd graph).
* ``bwd``      -- the backward alone: the forward runs once, outside the timed region, and
                  ``out.backward(dout, retain_graph=True)`` is timed (gradients reset to None
                  before each run, untimed).
* ``fwd+bwd``  -- forward with autograd, then ``out.backward(dout)``.

Timing: on CUDA ``triton.testing.do_bench(run, warmup=25, rep=100, grad_to_none=leaves,
return_mode="median")`` after one untimed warm-up call (torch.compile, autotuning); on CPU a
wall-clock median (``time.perf_counter``) after warm-up: at least one run and ``warmup_s``
seconds, then ``target_s / t`` reps clamped to ``[min_reps, max_reps]``; an op slower than
``long_s`` gets one timed rep.

Peak memory, the extra memory one run needs beyond what was already held (inputs, weights,
caches, the saved forward of ``bwd``):

* CUDA: ``torch.cuda.max_memory_allocated()`` during one untimed run minus
  ``memory_allocated()`` right before it.
* CPU: peak RSS of the process during one run (``VmHWM``, the high-water mark that ``ru_maxrss``
  reports, after resetting it through ``/proc/self/clear_refs``) minus the RSS right before it -- i.e. relative to a
  baseline with torch imported and the inputs allocated. The case runs in a fresh subprocess
  (``python -m bench.case``) started with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed blocks
  go back to the OS and RSS follows live memory.
* ``bwd``: not reported (its peak is that of ``fwd+bwd``, whose backward needs the forward's
  saved tensors anyway).

Out of memory: on CUDA the allocator's ``OutOfMemoryError``; on CPU the case subprocess runs under
a hard limit on its data segment (``RLIMIT_DATA`` = ``--mem-cap-gib``, which covers every heap and
anonymous mapping), so a provider that needs more gets a real allocation failure -- recorded as
``oom`` with the allocator's message -- instead of swapping the machine or waking the OOM killer.

``python -m bench.case`` reads a JSON spec on stdin and prints one ``BENCH_RESULT {json}``
line per mode as it finishes, so a crash keeps the modes already measured.
"""

from __future__ import annotations

import gc
import json
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from .providers import PROVIDERS, Skip, Workload

__all__ = ["Timing", "measure", "measure_mode", "MODE_ORDER", "RESULT_PREFIX", "rss_supported"]

MODE_ORDER = ("fwd", "fwd+bwd", "bwd")
RESULT_PREFIX = "BENCH_RESULT "
CUDA_MEM_METHOD = "torch.cuda.max_memory_allocated() during one run - memory_allocated() before it"
RSS_MEM_METHOD = ("peak RSS during one run (VmHWM after a /proc/self/clear_refs reset) - RSS before it; "
                  "fresh subprocess per case, MALLOC_MMAP_THRESHOLD_=65536")


@dataclass
class Timing:
    warmup_s: float = 0.5  # CPU: warm up for at least this long (and at least one run)
    target_s: float = 5.0  # CPU: aim for this much timed work per mode
    min_reps: int = 3
    max_reps: int = 50
    long_s: float = 20.0  # CPU: an op slower than this is timed once
    warmup_ms: int = 25  # CUDA: do_bench warm-up
    rep_ms: int = 100  # CUDA: do_bench repetition time


# ---- memory probes -------------------------------------------------------------------------------


def _status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    """Reset the process's peak-RSS mark (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def rss_supported() -> bool:
    return _status_kib("VmRSS") is not None and _reset_hwm()


# ---- one mode ------------------------------------------------------------------------------------


def _classify(exc: BaseException):
    msg = f"{type(exc).__name__}: {exc}".strip()
    msg = " ".join(msg.split())[:600]
    low = msg.lower()
    if isinstance(exc, Skip):
        return "skipped", str(exc)
    if (isinstance(exc, MemoryError) or "out of memory" in low or "can't allocate memory" in low
            or type(exc).__name__ == "OutOfMemoryError"):
        return "oom", msg
    if isinstance(exc, (NotImplementedError, ImportError)) or "no available kernel" in low:
        return "skipped", msg
    return "error", msg


def _runner(prep, mode: str, w: Workload):
    """(run, reset): ``run()`` does one timed unit of ``mode``; ``reset()`` clears grads (untimed)."""
    leaves = prep.leaves

    def reset():
        for t in leaves:
            t.grad = None

    if mode == "fwd":
        def run():
            with torch.no_grad():
                prep.forward()
        return run, reset
    out = prep.forward()
    gen = torch.Generator().manual_seed(w.seed * 1000 + 99)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float32).to(device=out.device, dtype=out.dtype)
    if mode == "fwd+bwd":
        del out
        reset()

        def run():
            prep.forward().backward(dout)
        return run, reset
    if mode == "bwd":
        def run():
            out.backward(dout, retain_graph=True)
        return run, reset
    raise ValueError(f"unknown mode {mode!r}")


def _freeze_heap() -> None:
    """Hand every object alive now (imported modules, the provider's weights and inputs) to
    ``gc.freeze``, so that the full ``gc.collect()`` before each timed CPU run scans only what the
    runs create.  Without it each collect walks torch's and transformers' whole heap: about 1 s on
    a loaded 2-core machine, a dozen times per case, which made ``--quick`` take 8 minutes.
    Frozen objects are still freed by reference counting; only cycles among them would stay."""
    gc.collect()
    gc.freeze()


def _one_cpu(run, reset, memory: bool):
    """One run: (seconds, peak extra bytes or None)."""
    reset()
    gc.collect()
    rss0 = None
    if memory and _reset_hwm():
        rss0 = _status_kib("VmRSS")
    gc.disable()
    try:
        t0 = time.perf_counter()
        run()
        dt = time.perf_counter() - t0
    finally:
        gc.enable()
    peak = None
    if rss0 is not None:
        # VmHWM is the mm's high-water mark that clear_refs resets. (ru_maxrss can be stale: the kernel
        # also folds in the mark seen when a thread exited, which the reset does not touch.)
        hwm = _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = max(0, hwm - rss0) * 1024
    return dt, peak


def _time_cpu(run, reset, timing: Timing, memory: bool) -> dict:
    warm = [_one_cpu(run, reset, False)[0]]
    while sum(warm) < timing.warmup_s and len(warm) < 20 and warm[-1] < timing.long_s:
        warm.append(_one_cpu(run, reset, False)[0])
    est = warm[-1]
    times, peak = [], None
    if est >= timing.long_s:
        dt, peak = _one_cpu(run, reset, memory)  # the single timed rep is also the memory run
        times.append(dt)
    else:
        if memory:
            _, peak = _one_cpu(run, reset, True)
        reps = int(min(timing.max_reps, max(timing.min_reps, timing.target_s // max(est, 1e-9))))
        times = [_one_cpu(run, reset, False)[0] for _ in range(reps)]
    return {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3,
            "reps": len(times), "warmup_runs": len(warm), "timer": "wall-clock median (time.perf_counter)",
            "peak_mem_bytes": peak, "mem_method": RSS_MEM_METHOD if peak is not None else None}


def _time_cuda(run, reset, leaves, timing: Timing, memory: bool) -> dict:
    reset()
    run()  # warm-up: compilation, autotuning, lazy initialisation
    torch.cuda.synchronize()
    peak = None
    if memory:
        reset()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    reset()
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        ms = do_bench(run, warmup=timing.warmup_ms, rep=timing.rep_ms, grad_to_none=leaves or None,
                      return_mode="median")
        timer = f"triton.testing.do_bench(warmup={timing.warmup_ms}, rep={timing.rep_ms}, return_mode='median')"
    else:  # pragma: no cover - CUDA without triton
        times = []
        for _ in range(max(timing.min_reps, 10)):
            reset()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        ms, timer = statistics.median(times), "CUDA events, median of 10"
    return {"median_ms": float(ms), "timer": timer, "peak_mem_bytes": peak,
            "mem_method": CUDA_MEM_METHOD if peak is not None else None}


def _reference_output(w: Workload, provider: str):
    """What ``provider``'s forward must equal on ``w``'s inputs: lhattn's oracle for the attention
    level, HF's own module for the module level; None where nothing comparable exists."""
    prov = PROVIDERS[provider]
    if prov.computes != "pattern" or provider in ("lhattn-reference", "hf-longformer") or w.dropout:
        return None, None  # with dropout every call draws a new mask: nothing to compare with
    with torch.no_grad():
        if prov.level == "module":
            return PROVIDERS["hf-longformer"].build(w, False).forward(), "hf-longformer"
        import lhattn

        q, k, v = w.qkv(False)
        return lhattn.attention(q, k, v, w.lhattn_pattern(), global_mask=w.global_mask(),
                                backend="reference"), "lhattn-reference"


def _check(prep, w: Workload, provider: str) -> dict:
    """Max |provider - reference| / max |reference| of the forward output (same seeded inputs)."""
    try:
        want, against = _reference_output(w, provider)
        if want is None:
            return {}
        with torch.no_grad():
            got = prep.forward()
        err = float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30))
        return {"check_rel_err": err, "check_against": against}
    except Exception as exc:  # noqa: BLE001 - a failed check must not hide the timing
        return {"check_error": _classify(exc)[1]}
    finally:
        want = got = None
        if w.device.startswith("cuda"):
            torch.cuda.empty_cache()


def measure_mode(w: Workload, provider: str, mode: str, timing: Timing, memory: bool,
                 check: bool = False) -> dict:
    """Time (and measure the memory of) ``provider`` on ``w`` in ``mode``; never raises.
    ``check``: in mode fwd, also compare the output with the reference (see :func:`_check`)."""
    res = {"mode": mode, "status": "ok", "reason": None, "median_ms": None, "peak_mem_bytes": None}
    prep = run = reset = None
    try:
        prep = PROVIDERS[provider].build(w, mode != "fwd")
        _freeze_heap()
        if check and mode == "fwd":
            res.update(_check(prep, w, provider))
        run, reset = _runner(prep, mode, w)
        mem = memory and mode != "bwd"
        if w.device.startswith("cuda"):
            res.update(_time_cuda(run, reset, prep.leaves if mode != "fwd" else [], timing, mem))
        else:
            res.update(_time_cpu(run, reset, timing, mem))
        res["info"] = dict(prep.info)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a recorded status
        res["status"], res["reason"] = _classify(exc)
        res["median_ms"] = res["peak_mem_bytes"] = None
        if prep is not None:
            res["info"] = dict(prep.info)
    finally:
        del prep, run, reset
        gc.collect()
        if w.device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.empty_cache()
    if mode == "bwd" and res["status"] == "ok":
        res["mem_note"] = "bwd: see fwd+bwd for peak memory"
    return res



def add_device_args(ap, n_default: Optional[str], n_help: Optional[str] = None) -> None:
    """``--device``, ``--dtype`` and ``--n``: the arguments every model-level benchmark shares."""
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--n", default=n_default, help=n_help)


def write_results(out: Optional[str], stem: str, meta: dict, rows: list, markdown: str) -> None:
    """``OUT/STEM.json`` (``{"meta", "results"}``) and ``OUT/STEM.md``; nothing when ``out`` is None."""
    if not out:
        return
    import os

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, stem + ".json"), "w") as fh:
        json.dump({"meta": meta, "results": rows}, fh, indent=1)
    with open(os.path.join(out, stem + ".md"), "w") as fh:
        fh.write(markdown)

def limit_memory(nbytes: int) -> None:
    """Cap this process's data segment (heap + anonymous mappings) at ``nbytes``: an allocation
    beyond it fails with an error the case records as ``oom``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        nbytes = min(nbytes, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (nbytes, hard))


def measure(spec: dict) -> Iterator[dict]:
    """Every mode of one case, in MODE_ORDER; ``spec = {workload, provider, modes, timing, memory, check}``
    (+ ``mem_limit_bytes``, applied by :func:`main`)."""
    w = Workload(**spec["workload"])
    timing = Timing(**spec.get("timing", {}))
    for mode in MODE_ORDER:
        if mode in spec["modes"]:
            yield measure_mode(w, spec["provider"], mode, timing, bool(spec.get("memory", False)),
                               bool(spec.get("check", False)))


def main() -> None:
    spec = json.loads(sys.stdin.read())
    if spec.get("memory") and not rss_supported():
        spec["memory"] = False
    if spec.get("mem_limit_bytes"):
        limit_memory(int(spec["mem_limit_bytes"]))
    for res in measure(spec):
        print(RESULT_PREFIX + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
