"""Context-parallel sliding-window attention over torch.distributed: weak scaling on 1-4 ranks (issue 13).

    python -m bench.context_parallel                          # CPU, gloo: ranks 1 2 3 4, 4096 tokens per rank
    python -m bench.context_parallel --per-rank 16384 --ranks 1 2 --out DIR
    python -m bench.context_parallel --preset issue13 --out DIR   # n = 64k..256k (below); ~15 min idle
    python -m bench.context_parallel --configs 1x65536 2x65536 --reps 2   # explicit ranks x tokens per rank
    torchrun --nproc_per_node=4 -m bench.context_parallel --per-rank 16384   # one launch, its world size

Workload: :func:`lhattn.distributed.context_parallel_attention`, ``SlidingWindow((256, 256))``,
``B = 1, H = 8, D = 64``, float32, forward + backward; rank ``t`` holds tokens
``[t·m, (t+1)·m)`` with ``m = --per-rank``, so ``n = m · ranks`` grows with the ranks (weak
scaling: ideally the time stays that of one rank on ``m`` tokens).  Each configuration runs in
fresh processes (started with ``MALLOC_MMAP_THRESHOLD_=65536`` so that RSS follows live memory),
one torch thread per rank, gloo on CPU (NCCL on CUDA when launched with torchrun on GPUs).

``--preset issue13`` is the issue's measurement: 64k tokens per rank on 1, 2 and 4 ranks
(n = 64k, 128k, 256k; weak scaling), then one rank on the whole 128k and 256k (what one process
needs for those n: time and memory).

Reported per configuration: the median over ``--reps`` iterations of the wall time of one
iteration (a barrier before, a barrier after: the slowest rank's time); the median of the CPU
time one iteration costs a rank (``time.process_time`` of its process, every thread; the largest
over ranks), which does not grow when ranks share cores the way the wall time does; the largest
peak extra RSS over ranks during one iteration (``VmHWM`` after a ``/proc/self/clear_refs`` reset,
minus the RSS before it: see ``bench.case``; on GPUs the allocator's peak above what was
allocated); and the largest number of bytes a rank sent (halo and collectives,
:func:`lhattn.distributed.count_bytes`).  Output: JSON + markdown in ``--out``.  Each rank's
attention runs on the Triton kernels on CUDA, in the blocked fallback engine on CPU
(:mod:`lhattn.distributed._local`).

On a machine with fewer cores than ranks the ranks share cores, so the wall time grows with the
ranks for that reason alone; the weak-scaling target (within 1.3x of one rank) needs a core per
rank to show in wall time, while the CPU time per rank shows the work each rank does either way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from typing import List

import torch

WINDOW, B, H, D = 256, 1, 8, 64


def _iteration(q, k, v, dout, pattern):
    from lhattn.distributed import context_parallel_attention

    for x in (q, k, v):
        x.grad = None
    out = context_parallel_attention(q, k, v, pattern)
    out.backward(dout)


def _measure(per_rank: int, reps: int, device: str) -> dict:
    """This rank's numbers (inside an initialised process group)."""
    import torch.distributed as dist

    import lhattn
    from lhattn.distributed import count_bytes

    from .case import _reset_hwm, _status_kib

    rank = dist.get_rank()
    g = torch.Generator().manual_seed(rank)
    q, k, v, dout = (torch.randn(B, H, per_rank, D, generator=g).to(device) for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_()
    pattern = lhattn.SlidingWindow((WINDOW, WINDOW))

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()
        dist.barrier()

    _iteration(q, k, v, dout, pattern)  # warm-up
    sync()
    if device == "cuda":  # GPU memory: the allocator's peak above what was allocated before
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    rss0 = _status_kib("VmRSS") if _reset_hwm() else None
    with count_bytes() as traffic:
        _iteration(q, k, v, dout, pattern)
    sync()
    peak = None if rss0 is None else max(0, (_status_kib("VmHWM") or 0) - rss0) * 1024
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    times, cpu, thread = [], [], []
    for _ in range(reps):
        sync()
        t0, c0, h0 = time.perf_counter(), time.process_time(), time.thread_time()
        _iteration(q, k, v, dout, pattern)
        if device == "cuda":
            torch.cuda.synchronize()
        c1, h1 = time.process_time(), time.thread_time()  # before the barrier: this rank's own work
        sync()
        times.append(time.perf_counter() - t0)
        cpu.append(c1 - c0)
        thread.append(h1 - h0)
    return {"rank": rank, "times_s": times, "cpu_s": cpu, "thread_cpu_s": thread, "peak_mem_bytes": peak,
            "halo_bytes": traffic.halo, "collective_bytes": traffic.collective}


def _gather(res: dict) -> List[dict]:
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, res)
    return out


def _summary(per_rank: int, ranks: List[dict]) -> dict:
    times = [max(r["times_s"][i] for r in ranks) for i in range(len(ranks[0]["times_s"]))]
    peaks = [r["peak_mem_bytes"] for r in ranks if r["peak_mem_bytes"] is not None]
    return {"ranks": len(ranks), "per_rank": per_rank, "n": per_rank * len(ranks),
            "median_s": statistics.median(times), "times_s": times,
            "cpu_median_s": max(statistics.median(r["cpu_s"]) for r in ranks),
            "thread_cpu_median_s": max(statistics.median(r["thread_cpu_s"]) for r in ranks),
            "peak_mem_bytes_max": max(peaks) if peaks else None,
            "sent_bytes_max": max(r["halo_bytes"] + r["collective_bytes"] for r in ranks),
            "halo_bytes_max": max(r["halo_bytes"] for r in ranks),
            "collective_bytes_max": max(r["collective_bytes"] for r in ranks)}


def _worker(rank: int, world: int, port: int, per_rank: int, reps: int, path: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ranks = _gather(_measure(per_rank, reps, "cpu"))
    if rank == 0:
        with open(path, "w") as f:
            json.dump(_summary(per_rank, ranks), f)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_local(world: int, per_rank: int, reps: int, out_dir: str) -> dict:
    import torch.multiprocessing as mp

    path = os.path.join(out_dir, f"ranks{world}-per-rank{per_rank}.json")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by the spawned interpreters
    mp.start_processes(_worker, args=(world, _free_port(), per_rank, reps, path), nprocs=world, join=True,
                       start_method="spawn")
    with open(path) as f:
        return json.load(f)


def _markdown(rows: List[dict], meta: dict) -> str:
    base = {r["per_rank"]: r for r in rows if r["ranks"] == 1}
    lines = ["# Context-parallel sliding-window attention, weak scaling", "",
             f"SlidingWindow(({WINDOW}, {WINDOW})), B={B}, H={H}, D={D}, float32, forward+backward; "
             f"{meta['backend']} on {meta['device']}; each rank's attention: {meta.get('engine', 'fallback engine')}; "
             f"torch {meta['torch']}; {meta['date']}", "",
             "Wall time: median over iterations of the slowest rank's iteration. CPU time: median over iterations "
             "of the CPU time of a rank's process (all threads), the largest over ranks. Memory: largest peak "
             "extra RSS (on GPUs: allocated memory) over ranks. Bytes: the most a rank sent (halo + collectives). "
             "Ratios: against one rank on the same tokens per rank (n/ranks).", "",
             "| ranks | tokens per rank | n | wall time | vs 1 rank | CPU time per rank | vs 1 rank | "
             "peak memory per rank | bytes sent per rank (halo + collectives) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        one = base.get(r["per_rank"])
        ratio = "-" if one is None else f"{r['median_s'] / one['median_s']:.2f}x"
        cpu = r.get("cpu_median_s")
        cpu_txt = "-" if cpu is None else f"{cpu:.2f} s"
        cpu_ratio = "-" if one is None or cpu is None or not one.get("cpu_median_s") else \
            f"{cpu / one['cpu_median_s']:.2f}x"
        mem = "-" if r["peak_mem_bytes_max"] is None else f"{r['peak_mem_bytes_max'] / 2**20:.0f} MiB"
        lines.append(f"| {r['ranks']} | {r['per_rank']} | {r['n']} | {r['median_s']:.2f} s | {ratio} | "
                     f"{cpu_txt} | {cpu_ratio} | {mem} | "
                     f"{r['sent_bytes_max'] / 2**20:.2f} MiB ({r['halo_bytes_max'] / 2**20:.2f} + "
                     f"{r['collective_bytes_max']} B) |")
    whole = {r["n"]: r for r in rows if r["ranks"] == 1}
    same_n = [(r, whole[r["n"]]) for r in rows if r["ranks"] > 1 and r["n"] in whole]
    if same_n:
        lines += ["", "The same n in one process (one rank on all n tokens) against the ranks above:", "",
                  "| n | ranks | wall time: ranks / one process | CPU time per rank / one process | "
                  "peak memory per rank / one process |", "|---|---|---|---|---|"]
        for r, one in same_n:
            mem = "-"
            if r["peak_mem_bytes_max"] is not None and one["peak_mem_bytes_max"]:
                mem = (f"{r['peak_mem_bytes_max'] / 2**20:.0f} / {one['peak_mem_bytes_max'] / 2**20:.0f} MiB")
            lines.append(f"| {r['n']} | {r['ranks']} | {r['median_s']:.2f} / {one['median_s']:.2f} s | "
                         f"{r['cpu_median_s']:.2f} / {one['cpu_median_s']:.2f} s | {mem} |")
    return "\n".join(lines) + "\n"


def _meta(backend: str, device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    engine = "Triton kernels" if device == "cuda" else "blocked fallback engine"  # lhattn.distributed._local
    return {"backend": backend, "engine": engine,
            "device": device if device == "cuda" else f"CPU ({os.cpu_count()} logical cores, {cpu})",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


PRESETS = {"issue13": [(1, 65536), (2, 65536), (4, 65536), (1, 131072), (1, 262144)]}


def _configs(args) -> List[tuple]:
    """``(ranks, tokens per rank)`` pairs in run order: ``--preset``, else ``--configs``, else every
    ``--per-rank`` with every ``--ranks``."""
    if args.preset is not None:
        return list(PRESETS[args.preset])
    if args.configs is not None:
        out = []
        for c in args.configs:
            try:
                w, m = (int(x) for x in c.lower().split("x"))
            except ValueError:
                raise SystemExit(f"--configs: expected RANKSxTOKENS such as 2x65536, got {c!r}") from None
            if w < 1 or m < 1:
                raise SystemExit(f"--configs: ranks and tokens must be >= 1, got {c!r}")
            out.append((w, m))
        return out
    return [(w, m) for m in args.per_rank for w in args.ranks]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--per-rank", type=int, nargs="+", default=[4096])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--configs", nargs="+", default=None, metavar="RANKSxTOKENS",
                    help="explicit configurations, e.g. 1x65536 4x65536 (instead of --ranks x --per-rank)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="a named list of configurations (issue13: 64k per rank on 1, 2, 4 ranks; "
                         "1 rank at 128k, 256k)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    configs = _configs(args)

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun: one configuration
        import torch.distributed as dist

        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        torch.set_num_threads(1)
        rows = [_summary(m, _gather(_measure(m, args.reps, device))) for m in args.per_rank]
        if dist.get_rank() == 0:
            print(_markdown(rows, _meta(dist.get_backend(), device)))
        dist.destroy_process_group()
        return

    out_dir = args.out or os.path.join("bench", "results", "context-parallel-cpu-" + time.strftime("%Y%m%d"))
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for w, m in configs:
        t0 = time.perf_counter()
        rows.append(_run_local(w, m, args.reps, out_dir))
        print(f"ranks={w} per_rank={m}: {rows[-1]['median_s']:.2f} s wall, {rows[-1]['cpu_median_s']:.2f} s CPU "
              f"per iteration ({time.perf_counter() - t0:.0f} s in all)", file=sys.stderr, flush=True)
    meta = _meta("gloo", "cpu")
    with open(os.path.join(out_dir, "context_parallel.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    md = _markdown(rows, meta)
    with open(os.path.join(out_dir, "context_parallel.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
