"""The blocked PyTorch fallback against the oracle: outputs, lse and every gradient."""

import pytest
import torch

import lhattn
from lhattn.patterns import Segments, SlidingWindow

from cases import Case, cast, make_inputs, run_with_grads
from tolerance import assert_close_to_oracle

WINDOWS = {
    "w3-2": SlidingWindow((3, 2)),
    "w0": SlidingWindow(0),
    "causal5": SlidingWindow(5, causal=True),
    "w-ge-n": SlidingWindow((100, 100)),
    "dil2": SlidingWindow((3, 1), dilation=2),
    "w70": SlidingWindow((70, 3)),  # wider than one 64-row block
}

CASES = [
    Case(),
    Case(n=5),  # n smaller than most windows
    Case(n=130, h=4, h_kv=2, n_global="many", padding=True),
    Case(n_global="one", padding=True, global_proj=True),
    Case(n_global="many", h=6, h_kv=2, strided=True),
    Case(b=1, h=2, h_kv=1, n=67, n_global="many", global_proj=True, padding=True, strided=True, seed=3),
]


def _compare(fn_ref, fn, case, dtype, **kw):
    inputs = make_inputs(case, torch.float64)
    oracle = run_with_grads(fn_ref, inputs, **kw)
    low = cast(inputs, dtype)
    ref_low = run_with_grads(fn_ref, low, **kw)
    got = run_with_grads(fn, cast(inputs, dtype), **kw)
    for name in oracle:
        assert_close_to_oracle(f"{name} ({case.id})", got[name], ref_low[name], oracle[name])


def _sw(backend):
    def fn(q, k, v, key_padding_mask, global_mask, global_qkv, pattern):
        return lhattn.attention(q, k, v, pattern, key_padding_mask=key_padding_mask, global_mask=global_mask,
                                global_qkv=global_qkv, backend=backend, return_lse=True)
    return fn


def _seg(backend):
    def fn(q, k, v, key_padding_mask, global_mask, global_qkv, pattern, segment_ids=None):
        assert global_qkv is None
        return lhattn.attention(q, k, v, pattern, key_padding_mask=key_padding_mask, global_mask=global_mask,
                                segment_ids=segment_ids, backend=backend, return_lse=True)
    return fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("pattern", WINDOWS.values(), ids=WINDOWS.keys())
def test_sliding_window_fallback_matches_oracle(pattern, case, dtype):
    _compare(_sw("reference"), _sw("fallback"), case, dtype, pattern=pattern)


def _ragged_ids(b, n, seed):
    """Non-decreasing ids with segments of length 1 .. 40 (and a very long one in row 1)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(b):
        lengths, total = [], 0
        while total < n:
            ln = 60 if (i == 1 and not lengths) else int(torch.randint(1, 41, (1,), generator=gen))
            lengths.append(min(ln, n - total))
            total += lengths[-1]
        rows.append(torch.repeat_interleave(torch.arange(len(lengths)) * 3 + 7, torch.tensor(lengths)))
    return torch.stack(rows)


SEGMENTS = {"S1": (Segments(1), False), "S8": (Segments(8), False), "S70": (Segments(70), False),
            "S-all": (Segments(1000), False), "ragged": (Segments(), True)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", [c for c in CASES if not c.global_proj], ids=lambda c: c.id)
@pytest.mark.parametrize("name", SEGMENTS.keys())
def test_segment_fallback_matches_oracle(name, case, dtype):
    pattern, ragged = SEGMENTS[name]
    kw = dict(pattern=pattern)
    if ragged:
        kw["segment_ids"] = _ragged_ids(case.b, case.n, case.seed)
    _compare(_seg("reference"), _seg("fallback"), case, dtype, **kw)


def test_one_token_segments_ragged():
    case = Case(n=9, n_global="one")
    ids = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8], [0, 0, 0, 0, 0, 0, 0, 0, 1]])
    _compare(_seg("reference"), _seg("fallback"), case, torch.float64, pattern=Segments(), segment_ids=ids)


def test_fallback_gradcheck_sliding_window():
    inputs = make_inputs(Case(b=1, h=2, h_kv=1, n=9, d=4, n_global="one", padding=True, global_proj=True),
                         torch.float64)
    qg, kg, vg = inputs["global_qkv"]

    def f(q, k, v, qg, kg, vg):
        return lhattn.attention(q, k, v, SlidingWindow((2, 1), dilation=2), key_padding_mask=inputs[
            "key_padding_mask"], global_mask=inputs["global_mask"], global_qkv=(qg, kg, vg), backend="fallback")
    torch.autograd.gradcheck(f, (inputs["q"], inputs["k"], inputs["v"], qg, kg, vg))


def test_fallback_gradcheck_segments():
    inputs = make_inputs(Case(b=2, h=2, h_kv=2, n=8, d=4, n_global="many", padding=True), torch.float64)
    ids = torch.tensor([[0, 0, 1, 2, 2, 2, 3, 3], [5, 5, 5, 5, 5, 6, 6, 9]])

    def f(q, k, v):
        return lhattn.attention(q, k, v, Segments(), segment_ids=ids, key_padding_mask=inputs["key_padding_mask"],
                                global_mask=inputs["global_mask"], backend="fallback")
    torch.autograd.gradcheck(f, (inputs["q"], inputs["k"], inputs["v"]))


def test_fallback_padding_rows_are_exact_zeros():
    inputs = make_inputs(Case(n=40, padding=True, n_global="many"), torch.float32)
    res = run_with_grads(_sw("fallback"), inputs, pattern=SlidingWindow(4))
    pad = inputs["key_padding_mask"]
    assert (res["out"].transpose(1, 2)[pad] == 0).all()
    assert torch.isneginf(res["lse"].transpose(1, 2)[pad]).all()
    assert (res["dq"].transpose(1, 2)[pad] == 0).all() and (res["dk"].transpose(1, 2)[pad] == 0).all()
    for g in res.values():
        assert not torch.isnan(g).any()


def test_fallback_keeps_no_quadratic_tensor_alive():
    """Memory between forward and backward is O(N·D): what autograd saves is q, k, v, out, lse."""
    n = 2048
    q, k, v = (torch.randn(1, 2, n, 16, requires_grad=True) for _ in range(3))
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = lhattn.attention(q, k, v, SlidingWindow(8), backend="fallback")
    assert max(saved) <= q.numel(), f"a saved tensor has {max(saved)} elements (> N·D·H = {q.numel()})"
    out.sum().backward()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_products_in_float32(dtype):
    """In half precision the fallback keeps the scores, dP and the gradient products in float32 (as the
    Triton kernels do): a window of 0 (each row sees itself, P = 1) has dS = P (dP - rowsum(dO O)) = 0,
    so dq and dk are float32 rounding (about 1e-6) -- a dP rounded to the input dtype made them 1e-2
    (found by tests/fuzz.py) -- and on a wide window its errors are below the dense reference's run in
    that dtype."""
    gen = torch.Generator().manual_seed(7)
    q, k, v, do = (torch.randn(1, 2, 97, 24, generator=gen, dtype=torch.float64) for _ in range(4))

    def grads(backend, dt, pattern):
        leaves = [t.detach().to(dt).requires_grad_(True) for t in (q, k, v)]
        out = lhattn.attention(*leaves, pattern, backend=backend)
        out.backward(do.to(dt))
        return [out] + [t.grad for t in leaves]

    exact = grads("fallback", dtype, SlidingWindow(0, causal=True))
    assert float(exact[1].abs().max()) < 1e-4 and float(exact[2].abs().max()) < 1e-4
    if dtype == torch.float16:
        return  # fp16's errors here are those of rounding the inputs and outputs, in every backend
    pattern = SlidingWindow(32)
    oracle = grads("reference", torch.float64, pattern)
    got, ref = grads("fallback", dtype, pattern), grads("reference", dtype, pattern)
    for name, g, r, o in zip(("out", "dq", "dk", "dv"), got, ref, oracle):
        err, ref_err = float((g.double() - o).abs().max()), float((r.double() - o).abs().max())
        bound = ref_err if name == "out" else 0.8 * ref_err  # out: mostly the final rounding, in both
        assert err <= bound, f"{name}: fallback error {err:.2e} > {bound:.2e} (the reference's: {ref_err:.2e})"
