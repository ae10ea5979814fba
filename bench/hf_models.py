"""Hugging Face models with ``attn_implementation="lhattn"`` vs ``"sdpa"`` vs ``"eager"`` (issue 12).

    python -m bench.hf_models                          # CPU: ModernBERT-base-sized, n = 4k, 8k, 16k
    python -m bench.hf_models --device cuda            # GPU: both models, n = 4k .. 32k
    python -m bench.hf_models --models mistral-7b-layer --n 8192 --out DIR

Forward + backward (training mode, dropout 0, B = 1, random weights and tokens) of a one-layer model
built from the configuration of a real checkpoint, so the layer is full-sized:

* ``modernbert-base-local``: ``ModernBertModel``, ModernBERT-base's sizes (hidden 768, 12 heads,
  intermediate 1152, ``local_attention=128`` -> window ``|q - kv| <= 64``), its one layer local;
* ``mistral-7b-layer``: ``MistralModel``, Mistral-7B-v0.1's sizes (hidden 4096, 32 heads, 8 KV
  heads, intermediate 14336, ``sliding_window=4096``), one layer.

Loss: ``(last_hidden_state * dout).sum()``.  Time: wall-clock median on CPU (each case in its own
subprocess, peak RSS of one run, under a hard memory cap: a case that needs more is ``oom``),
``triton.testing.do_bench`` median and ``max_memory_allocated`` on CUDA (see ``bench.case``).
``eager`` cases whose ``[H, n, n]`` scores are predicted not to fit are ``skipped``.
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

IMPLS = ("lhattn", "sdpa", "eager")
MODELS = ("modernbert-base-local", "mistral-7b-layer")
PREFIX = "HF_RESULT "


def _model(name: str, n: int):
    from transformers import MistralConfig, MistralModel, ModernBertConfig, ModernBertModel
    common = dict(vocab_size=1024, num_hidden_layers=1, max_position_embeddings=max(n, 8192), attention_dropout=0.0)
    if name == "modernbert-base-local":
        return ModernBertModel(ModernBertConfig(hidden_size=768, num_attention_heads=12, intermediate_size=1152,
                                                local_attention=128, layer_types=["sliding_attention"],
                                                pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                                                sep_token_id=2, embedding_dropout=0.0, mlp_dropout=0.0, **common))
    if name == "mistral-7b-layer":
        return MistralModel(MistralConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                                          intermediate_size=14336, sliding_window=4096, **common))
    raise SystemExit(f"--models: unknown model {name!r}; allowed: {MODELS}")


def measure(model_name: str, impl: str, n: int, device: str, dtype_name: str) -> dict:
    import lhattn.integrations.huggingface  # noqa: F401 - registers "lhattn"

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    model = _model(model_name, n).to(device=device, dtype=dtype).train()
    model.set_attn_implementation(impl)
    ids = torch.randint(3, 1024, (1, n), device=device)
    dout = torch.randn(1, n, model.config.hidden_size, device=device, dtype=dtype)
    leaves = list(model.parameters())

    def run():
        (model(input_ids=ids).last_hidden_state * dout).sum().backward()

    def reset():
        for p in leaves:
            p.grad = None
    if device == "cuda":
        res = _time_cuda(run, reset, leaves, Timing(), memory=True)
    else:
        res = _time_cpu(run, reset, Timing(target_s=2.0, long_s=8.0), memory=True)
    return {"model": model_name, "impl": impl, "n": n, "status": "ok", **res}


def _predicted_bytes(model_name: str, impl: str, n: int, elem: int) -> int:
    """What eager holds beyond O(n): [H, n, n] scores and probabilities (kept for backward) + the mask."""
    heads = 12 if model_name.startswith("modernbert") else 32
    return 3 * heads * n * n * elem + n * n * elem if impl == "eager" else 0


def _run_case(model_name: str, impl: str, n: int, device: str, dtype: str, cap: float) -> dict:
    if device == "cuda":
        try:
            return measure(model_name, impl, n, device, dtype)
        except torch.cuda.OutOfMemoryError as e:
            torch.cuda.empty_cache()
            return {"model": model_name, "impl": impl, "n": n, "status": "oom", "reason": str(e)[:200]}
    cmd = [sys.executable, "-m", "bench.hf_models", "--one", model_name, impl, str(n), device, dtype,
           "--mem-cap-gib", str(cap / 2**30)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    for line in proc.stdout.splitlines():
        if line.startswith(PREFIX):
            return json.loads(line[len(PREFIX):])
    return {"model": model_name, "impl": impl, "n": n, "status": "error", "reason": (proc.stderr or proc.stdout)[-400:]}


def _table(rows: List[dict], models: List[str], ns: List[int]) -> str:
    def get(m, impl, n) -> Optional[dict]:
        return next((r for r in rows if r["model"] == m and r["impl"] == impl and r["n"] == n), None)

    def cell(r: Optional[dict]) -> str:
        if r is None:
            return "-"
        if r["status"] != "ok":
            return r["status"]
        mem = r.get("peak_mem_bytes")
        return f"{r['median_ms'] / 1e3:.3g} s, {mem / 2**20:.0f} MiB" if mem is not None else f"{r['median_ms']:.3g} ms"
    lines = ["| model | n | " + " | ".join(IMPLS) + " | lhattn speed-up vs sdpa |", "|---|---|" + "---|" * (len(IMPLS) + 1)]
    for m in models:
        for n in ns:
            ours, sdpa = get(m, "lhattn", n), get(m, "sdpa", n)
            ok = ours and sdpa and ours["status"] == "ok" and sdpa["status"] == "ok"
            ratio = f"{sdpa['median_ms'] / ours['median_ms']:.2f}x" if ok else "-"
            if any(get(m, i, n) for i in IMPLS):
                lines.append(f"| {m} | {n} | " + " | ".join(cell(get(m, i, n)) for i in IMPLS) + f" | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_args(ap, None, "default: 4096,8192,16384 on CPU, 4096,8192,16384,32768 on CUDA")
    ap.add_argument("--models", default=None, help="comma-separated subset of " + ",".join(MODELS) +
                    " (default: modernbert-base-local on CPU, both on CUDA)")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--mem-cap-gib", type=float, default=None,
                    help="skip eager cases predicted above this (default: 12 on CPU, 0.9 x GPU memory); on CPU also "
                         "the hard memory limit of each case subprocess")
    ap.add_argument("--out", default=None, help="folder for hf_models.json / .md (default: print only)")
    ap.add_argument("--one", nargs=5, metavar=("MODEL", "IMPL", "N", "DEVICE", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        model_name, impl, n, device, dtype = args.one
        if args.mem_cap_gib is not None:
            limit_memory(int(args.mem_cap_gib * 2**30))
        try:
            res = measure(model_name, impl, int(n), device, dtype)
        except Exception as exc:  # noqa: BLE001 - recorded, e.g. an allocation beyond the limit
            status, reason = _classify(exc)
            res = {"model": model_name, "impl": impl, "n": int(n), "status": status, "reason": reason}
        print(PREFIX + json.dumps(res), flush=True)
        return {}

    cuda = args.device == "cuda"
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    elem = torch.tensor([], dtype=getattr(torch, dtype)).element_size()
    models = (args.models or (",".join(MODELS) if cuda else MODELS[0])).split(",")
    ns = [int(t) for t in (args.n or ("4096,8192,16384,32768" if cuda else "4096,8192,16384")).split(",")]
    cap = (args.mem_cap_gib * 2**30 if args.mem_cap_gib is not None
           else 0.9 * torch.cuda.get_device_properties(0).total_memory if cuda else 12 * 2**30)
    rows = []
    for m in models:
        for n in ns:
            for impl in args.impls.split(","):
                if _predicted_bytes(m, impl, n, elem) > cap:
                    rows.append({"model": m, "impl": impl, "n": n, "status": "skipped",
                                 "reason": f"predicted {_predicted_bytes(m, impl, n, elem) / 2**30:.1f} GiB > cap"})
                else:
                    t0 = time.perf_counter()
                    rows.append(_run_case(m, impl, n, args.device, dtype, cap))
                    rows[-1]["wall_s"] = round(time.perf_counter() - t0, 1)
                print(json.dumps(rows[-1]), flush=True)
    import lhattn
    import transformers
    meta = {"device": _device_name(args.device), "dtype": dtype, "torch": torch.__version__,
            "transformers": transformers.__version__, "lhattn": lhattn.__version__, "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d"), "what": "one-layer model, training mode, B=1, forward+backward",
            "command": "python -m bench.hf_models " + " ".join(argv if argv is not None else sys.argv[1:])}
    table = _table(rows, models, ns)
    print(table)
    write_results(args.out, "hf_models", meta, rows,
                  f"# Hugging Face models: attn_implementation lhattn vs sdpa vs eager\n\n{meta['what']}; "
                  f"{meta['device']}; {dtype}; {meta['threads']} torch threads; torch {meta['torch']}; "
                  f"transformers {meta['transformers']}; {meta['date']}\n\n"
                  f"Command: `{meta['command']}`\n\n"
                  "Cells: median time of forward+backward, peak memory of one run.\n\n" + table + "\n")
    return {"meta": meta, "results": rows}


if __name__ == "__main__":
    main()
