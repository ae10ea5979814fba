"""Context-parallel sliding-window attention over torch.distributed: weak scaling on 1-4 ranks (issue 13).

    python -m bench.context_parallel                          # CPU, gloo: ranks 1 2 3 4, 4096 tokens per rank
    python -m bench.context_parallel --per-rank 16384 --ranks 1 2 --out DIR
    torchrun --nproc_per_node=4 -m bench.context_parallel --per-rank 16384   # one launch, its world size

Workload: :func:`lhattn.distributed.context_parallel_attention`, ``SlidingWindow((256, 256))``,
``B = 1, H = 8, D = 64``, float32, forward + backward; rank ``t`` holds tokens
``[t·m, (t+1)·m)`` with ``m = --per-rank``, so ``n = m · ranks`` grows with the ranks (weak
scaling: ideally the time stays that of one rank on ``m`` tokens).  Each configuration runs in
fresh processes (started with ``MALLOC_MMAP_THRESHOLD_=65536`` so that RSS follows live memory),
one torch thread per rank, gloo on CPU (NCCL on CUDA when launched with torchrun on GPUs).

Reported per configuration: the median over ``--reps`` iterations of the wall time of one
iteration (a barrier before, a barrier after: the slowest rank's time), the largest peak extra
RSS over ranks during one iteration (``VmHWM`` after a ``/proc/self/clear_refs`` reset, minus the
RSS before it: see ``bench.case``), and the largest number of bytes a rank sent (halo and
collectives, :func:`lhattn.distributed.count_bytes`).  Output: JSON + markdown in ``--out``.

On a machine with fewer cores than ranks the ranks share cores, so the time grows with the ranks
for that reason alone; the weak-scaling target (within 1.3x of one rank) needs a core per rank.
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
    rss0 = _status_kib("VmRSS") if _reset_hwm() else None
    with count_bytes() as traffic:
        _iteration(q, k, v, dout, pattern)
    sync()
    peak = None if rss0 is None else max(0, (_status_kib("VmHWM") or 0) - rss0) * 1024
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        _iteration(q, k, v, dout, pattern)
        sync()
        times.append(time.perf_counter() - t0)
    return {"rank": rank, "times_s": times, "peak_mem_bytes": peak, "halo_bytes": traffic.halo,
            "collective_bytes": traffic.collective}


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

    path = os.path.join(out_dir, f"ranks{world}.json")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by the spawned interpreters
    mp.start_processes(_worker, args=(world, _free_port(), per_rank, reps, path), nprocs=world, join=True,
                       start_method="spawn")
    with open(path) as f:
        return json.load(f)


def _markdown(rows: List[dict], meta: dict) -> str:
    base = {r["per_rank"]: r["median_s"] for r in rows if r["ranks"] == 1}
    lines = ["# Context-parallel sliding-window attention, weak scaling", "",
             f"SlidingWindow(({WINDOW}, {WINDOW})), B={B}, H={H}, D={D}, float32, forward+backward; "
             f"{meta['backend']} on {meta['device']}; torch {meta['torch']}; {meta['date']}", "",
             "Time: median over iterations of the slowest rank's iteration. Memory: largest peak extra RSS over "
             "ranks. Bytes: the most a rank sent (halo + collectives).", "",
             "| ranks | tokens per rank | n | time | vs 1 rank on n/ranks | peak memory per rank | bytes sent per rank "
             "(halo + collectives) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['median_s'] / base[r['per_rank']]:.2f}x" if r["per_rank"] in base else "-"
        mem = "-" if r["peak_mem_bytes_max"] is None else f"{r['peak_mem_bytes_max'] / 2**20:.0f} MiB"
        lines.append(f"| {r['ranks']} | {r['per_rank']} | {r['n']} | {r['median_s']:.2f} s | {ratio} | {mem} | "
                     f"{r['sent_bytes_max'] / 2**20:.2f} MiB ({r['halo_bytes_max'] / 2**20:.2f} + "
                     f"{r['collective_bytes_max']} B) |")
    return "\n".join(lines) + "\n"


def _meta(backend: str, device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    return {"backend": backend, "device": device if device == "cuda" else f"CPU ({os.cpu_count()} logical cores, "
            f"{cpu})", "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--per-rank", type=int, nargs="+", default=[4096])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

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
    for m in args.per_rank:
        for w in args.ranks:
            t0 = time.perf_counter()
            rows.append(_run_local(w, m, args.reps, out_dir))
            print(f"ranks={w} per_rank={m}: {rows[-1]['median_s']:.2f} s per iteration "
                  f"({time.perf_counter() - t0:.0f} s wall)", file=sys.stderr, flush=True)
    meta = _meta("gloo", "cpu")
    with open(os.path.join(out_dir, "context_parallel.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    md = _markdown(rows, meta)
    with open(os.path.join(out_dir, "context_parallel.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
