"""Differential fuzzing of :func:`lhattn.attention`: random patterns, shapes and options, every backend
against the reference, output, lse and every gradient.

Each seed draws one call (pattern and its parameters, ``B``, ``H``/``H_kv``, ``N``, ``D`` including head
dims the kernels pad, strided inputs, padding masks with holes, global tokens and their own
projections, per-token segment ids, dropout, a custom scale) and runs it in every backend asked for.
A call the reference rejects (``ValueError`` / ``TypeError``) must be rejected by every backend with the
same exception type; otherwise each backend's results are compared with the float64 reference: in
float64 to ``1e-9`` relative, in a lower dtype by the rule of :mod:`tests.tolerance` with its floor
scaled by the size of the call's values (the dense reference is exact where it cancels exactly, e.g. a window
of 0, while the FlashAttention backward's ``rowsum(dO ∘ O)`` keeps the rounding of ``O``).  Inputs are fresh
random numbers from the seed (reproducible).

    python tests/fuzz.py --seeds 0:200                      # triton (interpreter on CPU) and fallback, float64
    python tests/fuzz.py --seeds 0:50 --dtype bfloat16 --backends triton

``tests/test_fuzz.py`` runs a few seeds in CI; longer campaigns are run by hand (their findings become
tests of their own).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import sys
import time
import warnings
from typing import List, Optional

import torch

if __name__ == "__main__":  # as tests/conftest.py does for pytest
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lhattn  # noqa: E402
from lhattn import LSG, Segments, SlidingWindow  # noqa: E402

from tolerance import FLOOR, max_err  # noqa: E402  (tests/ is on the path: pytest's rootdir, or this script's folder)

OUTPUTS = ("out", "lse", "dq", "dk", "dv", "dq_global", "dk_global", "dv_global")


@dataclasses.dataclass
class Call:
    seed: int
    b: int
    h: int
    h_kv: int
    n: int
    d: int
    pattern: object
    strided: bool
    kwargs: dict  # masks as tensors; global_qkv=True asks for separate projections

    def __str__(self) -> str:
        opts = ", ".join(f"{k}={tuple(v.shape) if isinstance(v, torch.Tensor) else v}" for k, v in self.kwargs.items())
        return (f"seed {self.seed}: B={self.b} H={self.h}/{self.h_kv} N={self.n} D={self.d} {self.pattern}"
                f"{' strided' if self.strided else ''} {{{opts}}}")


def _token_mask(gen: torch.Generator, b: int, n: int, rate: float) -> torch.Tensor:
    return torch.rand(b, n, generator=gen) < rate


def draw(seed: int) -> Call:
    """The call of ``seed`` (a pattern whose constructor rejects its parameters is drawn again)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    b = rng.choice([1, 2, 3])
    h_kv = rng.choice([1, 2])
    h = h_kv * rng.choice([1, 2, 3])
    n = rng.choice([1, 2, 5, 16, 17, 31, 33, 48, 64, 65, 80, 97, 130])
    d = rng.choice([16, 16, 32, 64, 8, 24])  # 8 and 24 run padded to the kernels' head dims
    kwargs: dict = {}
    kind = rng.choice(["sliding_window", "lsg", "segments"])
    if kind == "sliding_window":
        if rng.random() < 0.25:
            pattern = SlidingWindow(rng.choice([0, 1, 3, 7, 16, 40]), dilation=rng.choice([1, 1, 2, 3]), causal=True)
        else:
            window = (rng.choice([0, 1, 2, 5, 8, 15, 16, 33, 100]) if rng.random() < 0.5
                      else (rng.choice([0, 1, 4, 9, 20, 64]), rng.choice([0, 1, 3, 16, 31])))
            pattern = SlidingWindow(window, dilation=rng.choice([1, 1, 1, 2, 3]))
        if rng.random() < 0.5:
            kwargs["global_mask"] = _token_mask(gen, b, n, rng.choice([0.02, 0.1, 0.3]))
            if rng.random() < 0.3:
                kwargs["global_qkv"] = True
    elif kind == "lsg":
        while True:
            block = rng.choice([1, 2, 4, 5, 8, 16])
            try:
                pattern = LSG(block_size=block, sparse_block_size=rng.choice([None, 0, block, 2 * block,
                                                                              max(1, block // 2)]),
                              sparsity_factor=rng.choice([1, 2, 4]), sparsity_type=rng.choice(lhattn.patterns.SPARSITY_TYPES),
                              num_global_tokens=rng.choice([0, 1, 1, 2, 3]), causal=rng.random() < 0.3,
                              global_layout=rng.choice(["inline", "prepended"]),
                              sparse_geometry=rng.choice(["reference", "regular"]))
                break
            except ValueError:
                continue
    else:
        if rng.random() < 0.5:
            pattern = Segments(rng.choice([1, 2, 3, 8, 16, 17, 32, 64]))
        else:
            pattern = Segments()
            ids = torch.zeros(b, n, dtype=torch.long)
            for i in range(b):
                for cut in rng.sample(range(1, n), min(n - 1, rng.choice([0, 1, 3, 8]))) if n > 1 else []:
                    ids[i, cut:] += 1
            kwargs["segment_ids"] = ids
        if rng.random() < 0.4:
            kwargs["global_mask"] = _token_mask(gen, b, n, rng.choice([0.02, 0.1, 0.3]))
    if rng.random() < 0.4:  # padding at the end of some rows, sometimes with holes
        kpm = torch.zeros(b, n, dtype=torch.bool)
        for i in range(b):
            if rng.random() < 0.7:
                kpm[i, rng.randrange(0, n + 1):] = True
            if rng.random() < 0.2:
                kpm[i] |= torch.rand(n, generator=gen) < 0.3
        kwargs["key_padding_mask"] = kpm
    if rng.random() < 0.25:
        kwargs["dropout_p"] = rng.choice([0.1, 0.5])
        kwargs["dropout_seed"] = rng.randrange(2 ** 32)
    if rng.random() < 0.2:
        kwargs["scale"] = rng.choice([0.05, 0.3, 1.0])
    return Call(seed, b, h, h_kv, n, d, pattern, rng.random() < 0.3, kwargs)


def _inputs(call: Call, dtype: torch.dtype, device: str):
    gen = torch.Generator().manual_seed(call.seed)

    def rand(heads):
        if call.strided:  # a [B, N, H, 2D] buffer seen as [B, H, N, D]
            x = torch.randn(call.b, call.n, heads, 2 * call.d, generator=gen, dtype=torch.float64)[..., ::2]
            x = x.transpose(1, 2)
        else:
            x = torch.randn(call.b, heads, call.n, call.d, generator=gen, dtype=torch.float64)
        return x.to(device=device, dtype=dtype).requires_grad_(True)

    qkv = [rand(call.h), rand(call.h_kv), rand(call.h_kv)]
    gqkv = [rand(call.h), rand(call.h_kv), rand(call.h_kv)] if call.kwargs.get("global_qkv") else []
    dout = torch.randn(call.b, call.h, call.n, call.d, generator=gen, dtype=torch.float64).to(device=device,
                                                                                               dtype=dtype)
    return qkv, gqkv, dout


def run(call: Call, backend: str, dtype: torch.dtype, device: str = "cpu") -> List[torch.Tensor]:
    """``[out, lse, dq, dk, dv(, dq_g, dk_g, dv_g)]`` of ``call`` in ``backend``."""
    qkv, gqkv, dout = _inputs(call, dtype, device)
    kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in call.kwargs.items()}
    if gqkv:
        kwargs["global_qkv"] = tuple(gqkv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, lse = lhattn.attention(*qkv, call.pattern, backend=backend, return_lse=True, **kwargs)
        out.backward(dout)
    return [out, lse] + [t.grad if t.grad is not None else torch.zeros_like(t) for t in qkv + gqkv]


def _outcome(call, backend, dtype, device):
    try:
        return run(call, backend, dtype, device)
    except (ValueError, TypeError, NotImplementedError) as exc:  # the last: backend= names one that cannot
        return exc  # run the call, and says why (lhattn.triton_unavailable_reason)


def check(call: Call, backends=("triton", "fallback"), dtype=torch.float64, device: str = "cpu") -> List[str]:
    """What is wrong with ``call`` in each backend (an empty list when nothing is)."""
    ref = _outcome(call, "reference", torch.float64, device)
    ref_low = _outcome(call, "reference", dtype, device) if dtype != torch.float64 else ref
    problems = []
    for backend in backends:
        got = _outcome(call, backend, dtype, device)
        if isinstance(got, NotImplementedError) and not isinstance(ref, Exception):
            continue  # a documented limit of that backend, not a wrong answer
        if isinstance(ref, Exception) or isinstance(got, Exception):
            if type(ref) is not type(got):
                problems.append(f"{backend}: {type(got).__name__ if isinstance(got, Exception) else 'ran'} where the "
                                f"reference {'raised ' + type(ref).__name__ if isinstance(ref, Exception) else 'ran'}"
                                f" ({got if isinstance(got, Exception) else ref})")
            continue
        scale = max(float(t.detach().double().nan_to_num(0.0, 0.0, 0.0).abs().max()) if t.numel() else 0.0
                    for t in ref) + 1.0
        for name, g, r, rl in zip(OUTPUTS, got, ref, ref_low):
            err = max_err(g, r)
            if dtype == torch.float64:
                bound = 1e-9 * scale
            else:  # the floor scaled by the size of the call's values: where the dense formula cancels
                # exactly (one key per row: dq = dk = 0) its error is 0, while the FlashAttention backward's
                # dS = P (dP - rowsum(dO O)) keeps the rounding of O (as large as O is)
                bound = 2 * max_err(rl, r) + FLOOR[dtype] * scale
            if not err <= bound:
                problems.append(f"{backend}: {name} error {err:.3e} > {bound:.3e}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0:100", help="START:STOP")
    parser.add_argument("--backends", default="triton,fallback")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    start, stop = (int(x) for x in args.seeds.split(":"))
    dtype = getattr(torch, args.dtype)
    t0, bad = time.perf_counter(), 0
    for seed in range(start, stop):
        call = draw(seed)
        problems = check(call, args.backends.split(","), dtype, args.device)
        if problems:
            bad += 1
            print(f"FAIL {call}\n  " + "\n  ".join(problems), flush=True)
        if (seed - start + 1) % 50 == 0:
            print(f"... {seed - start + 1} calls, {bad} failed, {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"{stop - start} calls, {bad} failed, {time.perf_counter() - t0:.0f} s ({args.dtype}, {args.device})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
