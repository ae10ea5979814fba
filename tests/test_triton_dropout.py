"""Attention dropout in the Triton sliding-window and segment kernels, against the oracle.

The keep rule (:mod:`lhattn._dropout`) is a pure function of the seed and the entry, so
``backend="triton"`` and ``backend="reference"`` given the same ``dropout_seed`` drop the
same probabilities: outputs and every gradient are compared exactly as without dropout
(relative to the reference's own error in the input dtype).  Without a GPU the kernels run
in Triton's interpreter on CPU tensors (tiny shapes).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

import pytest  # noqa: E402

pytest.importorskip("triton")

import lhattn  # noqa: E402
from lhattn import _dropout  # noqa: E402
from lhattn.patterns import Segments, SlidingWindow  # noqa: E402
from lhattn.reference.core import masked_attention  # noqa: E402

from cases import Case, cast, leaves, make_inputs, run_with_grads  # noqa: E402
from test_triton_segment import ragged_ids  # noqa: E402
from tolerance import assert_close_to_oracle, max_err  # noqa: E402

KERNELS = pytest.importorskip("lhattn.kernels.sliding_window")
SEG_KERNELS = pytest.importorskip("lhattn.kernels.segment")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP64_VIA_DISPATCH = pytest.mark.skipif(DEVICE == "cuda", reason="backend='triton' declines float64 on CUDA")
SEED = 1234567


def _attn(backend, pattern, dropout_p, dropout_seed, segment_ids=None):
    """``(q, k, v, masks, global_qkv) -> (out, lse)`` through :func:`lhattn.attention`."""
    def fn(q, k, v, key_padding_mask, global_mask, global_qkv):
        extra = dict(segment_ids=segment_ids) if isinstance(pattern, Segments) else dict(global_qkv=global_qkv)
        return lhattn.attention(q, k, v, pattern, key_padding_mask=key_padding_mask, global_mask=global_mask,
                                dropout_p=dropout_p, dropout_seed=dropout_seed, backend=backend, return_lse=True,
                                **extra)
    return fn


def _compare(case, dtype, pattern, p, segment_ids=None, seed=SEED):
    """Triton vs the fp64 oracle (same seed), relative to the oracle's own error in ``dtype``;
    out, lse and the gradients of q, k, v (and of ``global_qkv``).  Returns Triton's results."""
    if dtype == torch.float64 and DEVICE == "cuda":
        pytest.skip("backend='triton' declines float64 on CUDA")
    inputs = make_inputs(case, torch.float64, DEVICE)
    oracle = run_with_grads(_attn("reference", pattern, p, seed, segment_ids), inputs)
    ref_low = run_with_grads(_attn("reference", pattern, p, seed, segment_ids), cast(inputs, dtype))
    got = run_with_grads(_attn("triton", pattern, p, seed, segment_ids), cast(inputs, dtype))
    assert set(got) == set(oracle)
    for name in oracle:
        assert got[name].dtype == ref_low[name].dtype, f"{name}: dtype {got[name].dtype} != {ref_low[name].dtype}"
        assert_close_to_oracle(f"{name} ({case.id}, {pattern}, p={p})", got[name], ref_low[name], oracle[name])
    return got


# --------------------------------------------------------------------------------------
# sliding window
# --------------------------------------------------------------------------------------

SW_CASES = [
    # (case, pattern, p)
    (Case(b=2, h=2, h_kv=2, n=37), SlidingWindow((4, 4)), 0.1),  # symmetric, no global
    (Case(b=2, h=2, h_kv=1, n=37, n_global="one", seed=1), SlidingWindow((3, 2)), 0.5),  # asymmetric, GQA
    (Case(b=2, h=2, h_kv=2, n=33, n_global="many", padding=True, seed=2), SlidingWindow(5, causal=True), 0.3),
    (Case(b=2, h=2, h_kv=1, n=41, n_global="many", padding=True, global_proj=True, seed=3),
     SlidingWindow((17, 15), dilation=2), 0.2),  # dilated, full blocks in each residue, per-row global counts
    (Case(b=1, h=2, h_kv=1, n=23, n_global="one", padding=True, seed=4), SlidingWindow((100, 100)), 0.5),  # w >= n
    (Case(b=2, h=2, h_kv=1, n=45, n_global="many", global_proj=True, strided=True, seed=5),
     SlidingWindow((24, 8)), 0.1),  # strided inputs; global rows split over key chunks, merged by lse
    (Case(b=1, h=2, h_kv=1, n=5), SlidingWindow((2, 1), dilation=3), 0.5),  # n below one block
]


@pytest.mark.parametrize("case, pattern, p", SW_CASES, ids=[f"{c.id}-{pt}-p{p}" for c, pt, p in SW_CASES])
def test_sliding_window_dropout_fp32(case, pattern, p):
    _compare(case, torch.float32, pattern, p)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_sliding_window_dropout_rates(p):
    _compare(Case(b=2, h=2, h_kv=1, n=29, n_global="many", padding=True, seed=6), torch.float32,
             SlidingWindow((6, 3)), p)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_sliding_window_dropout_half(dtype):
    _compare(Case(b=1, h=2, h_kv=1, n=40, n_global="one", padding=True, global_proj=True, seed=7), dtype,
             SlidingWindow((5, 3)), 0.3)


def test_sliding_window_dropout_fp64():
    _compare(Case(b=2, h=2, h_kv=1, n=33, n_global="many", padding=True, global_proj=True, strided=True, seed=8),
             torch.float64, SlidingWindow((2, 1), dilation=2), 0.4)


def test_sliding_window_dropout_block_shapes_and_split_chunks(monkeypatch):
    """BLOCK_M != BLOCK_N, dense passes split into many unaligned key chunks (each chunk's partial
    output dropped with its own columns) and the global-key gradient split over row chunks."""
    if not KERNELS.INTERPRET:
        pytest.skip("block sizes are autotuned on GPU")
    monkeypatch.setattr(KERNELS, "INTERPRET_BLOCKS", {"fwd": (32, 16), "dq": (16, 32), "dkdv": (32, 16)})
    monkeypatch.setattr(KERNELS, "INTERPRET_SPLIT_CHUNK", 13)
    _compare(Case(b=2, h=2, h_kv=1, n=47, n_global="many", padding=True, global_proj=True, seed=9),
             torch.float64, SlidingWindow((20, 13)), 0.3)


# --------------------------------------------------------------------------------------
# segments
# --------------------------------------------------------------------------------------

SEG_CASES = [
    # (case, segment_size or None for ragged ids, p)
    (Case(b=2, h=2, h_kv=2, n=37), 8, 0.1),
    (Case(b=2, h=2, h_kv=1, n=45, n_global="many", padding=True, seed=1), 20, 0.5),  # GQA, full blocks
    (Case(b=2, h=2, h_kv=1, n=41, n_global="one", padding=True, strided=True, seed=2), None, 0.3),
    (Case(b=3, h=2, h_kv=2, n=30, n_global="many", seed=3), None, 0.2),
]


def _segments(case, size):
    if size is not None:
        return Segments(size), None
    return Segments(), ragged_ids(case.b, case.n, case.seed)


@pytest.mark.parametrize("case, size, p", SEG_CASES, ids=[f"{c.id}-S{s or 'ragged'}-p{p}" for c, s, p in SEG_CASES])
def test_segment_dropout_fp32(case, size, p):
    pattern, ids = _segments(case, size)
    _compare(case, torch.float32, pattern, p, segment_ids=ids)


def test_segment_dropout_fp64():
    case = Case(b=2, h=2, h_kv=1, n=35, n_global="many", padding=True, seed=4)
    pattern, ids = _segments(case, None)
    _compare(case, torch.float64, pattern, 0.4, segment_ids=ids)


def test_segment_dropout_bf16():
    _compare(Case(b=1, h=2, h_kv=1, n=40, n_global="one", padding=True, seed=5), torch.bfloat16, Segments(16), 0.3)


# --------------------------------------------------------------------------------------
# dropout happens, follows the seed, and p = 0 is the plain kernel
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", [SlidingWindow((4, 2)), Segments(8)], ids=["window", "segments"])
def test_dropout_changes_the_output_and_follows_the_seed(pattern):
    inputs = make_inputs(Case(b=1, h=2, h_kv=1, n=30, n_global="many", seed=10), torch.float32, DEVICE)
    args = {key: val for key, val in inputs.items() if key != "global_qkv"}
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")

    def run(**kw):
        return lhattn.attention(q, k, v, pattern, **args, backend="triton", return_lse=True, **kw)

    plain, lse0 = run()
    dropped, lse1 = run(dropout_p=0.5, dropout_seed=1)
    again, _ = run(dropout_p=0.5, dropout_seed=1)
    other, _ = run(dropout_p=0.5, dropout_seed=2)
    scale = plain.abs().max().item()
    assert torch.equal(dropped, again), "the same seed must give the same output"
    assert max_err(dropped, plain) > 0.1 * scale, "p = 0.5 left the output (almost) unchanged"
    assert max_err(other, dropped) > 0.1 * scale, "a different seed dropped the same entries"
    torch.testing.assert_close(lse1, lse0, rtol=0, atol=0, msg="lse must be that of the undropped softmax")
    # p = 0 (with or without a seed) is the plain path, bit for bit
    zero, _ = run(dropout_p=0.0, dropout_seed=3)
    assert torch.equal(zero, plain)


@pytest.mark.parametrize("pattern", [SlidingWindow((3, 2), dilation=2), Segments(8)], ids=["window", "segments"])
def test_no_dropout_still_matches_oracle(pattern):
    _compare(Case(b=2, h=2, h_kv=1, n=33, n_global="many", padding=True, seed=11), torch.float32, pattern, 0.0)


def test_dropout_keeps_no_window_sized_tensor_alive():
    """Between forward and backward only O(N·D) tensors are kept: no keep mask is saved."""
    inputs = make_inputs(Case(b=1, h=1, h_kv=1, n=64, n_global="one"), torch.float32, DEVICE)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _attn("triton", SlidingWindow((30, 30)), 0.3, 5)(**inputs)
    assert max(saved) <= inputs["q"].numel(), f"a saved tensor has {max(saved)} elements"


# --------------------------------------------------------------------------------------
# gathered rows (drop_rows) on the dense pass, directly
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_dense_pass_gathered_rows(dtype):
    """``sliding_window_attn_fwd`` dense (left < 0) on rows gathered from the sequence, whose
    token positions are ``drop_rows`` (-1 = empty slot), against :func:`masked_attention` with
    the dense keep mask of those positions; key chunks split and merged under the interpreter."""
    if dtype == torch.float64 and DEVICE == "cuda":
        pytest.skip("the float64 kernels are exercised on CUDA by the gpu tests of test_triton_sliding_window")
    b, h, h_kv, n, d, p = 2, 2, 1, 45, 16, 0.3
    gen = torch.Generator().manual_seed(12)
    q = torch.randn(b, h, 6, d, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(b, h_kv, n, d, generator=gen, dtype=torch.float64) for _ in range(2))
    rows = torch.tensor([[40, 3, 17, 0, 22, -1], [5, 44, -1, -1, 9, 30]])
    valid = torch.rand(b, n, generator=gen) > 0.2
    state = _dropout.make_state(p, SEED, DEVICE)
    q, k, v, rows, valid = (t.to(DEVICE) for t in (q, k, v, rows, valid))
    keep = _dropout.keep_mask(state, b, h, rows.clamp(min=0), torch.arange(n, device=DEVICE))
    mask = ((rows >= 0)[:, :, None] & valid[:, None, :])[:, None]
    dout = torch.randn(b, h, 6, d, generator=gen, dtype=torch.float64).to(DEVICE)

    def grads(fn, args):
        args = [t.detach().requires_grad_() for t in args]
        out, lse = fn(*args)
        return (out, lse) + torch.autograd.grad(out, args, dout.to(out.dtype))

    oracle = grads(lambda *a: masked_attention(*a, mask, d ** -0.5, p, keep), (q, k, v))
    ref_low = grads(lambda *a: masked_attention(*a, mask, d ** -0.5, p, keep), (t.to(dtype) for t in (q, k, v)))
    got = grads(lambda *a: torch.ops.lhattn.sliding_window_attn_fwd(*a, rows >= 0, valid, None, -1, -1, 1, d ** -0.5,
                                                                     p, state, rows), (t.to(dtype) for t in (q, k, v)))
    for name, g, r, o in zip(("out", "lse", "dq", "dk", "dv"), got, ref_low, oracle):
        assert_close_to_oracle(f"{name} (gathered rows)", g, r, o)


def test_launcher_dropout_argument_errors():
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    state = _dropout.make_state(0.2, 1, DEVICE)
    with pytest.raises(ValueError, match="needs dropout_state"):
        KERNELS.sliding_window_fwd(q, q, q, window=(2, 2), dropout_p=0.2)
    with pytest.raises(ValueError, match="needs dilation 1"):
        KERNELS.sliding_window_fwd(q, q, q, window=(2, 2), dilation=2, dropout_p=0.2, dropout_state=state,
                                   drop_rows=torch.zeros(1, 8, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="drop_rows must be an int64"):
        KERNELS.sliding_window_fwd(q, q, q, window=None, dropout_p=0.2, dropout_state=state,
                                   drop_rows=torch.zeros(1, 7, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="needs dropout_state"):
        SEG_KERNELS.segment_fwd(q, q, q, segment_size=4, dropout_p=0.2, dropout_state=state[:1])


# --------------------------------------------------------------------------------------
# gradcheck, custom ops, torch.compile
# --------------------------------------------------------------------------------------


@FP64_VIA_DISPATCH
def test_sliding_window_dropout_gradcheck_fp64():
    """One head (half the kernel programs of H = 2); GQA with dropout against the fp64 oracle:
    test_sliding_window_dropout_fp64."""
    case = Case(b=1, h=1, h_kv=1, n=11, d=16, n_global="one", padding=True, global_proj=True, seed=13)
    inputs = make_inputs(case, torch.float64, DEVICE)
    pattern = SlidingWindow((2, 1), dilation=2)

    def f(q, k, v, qg, kg, vg):
        return lhattn.attention(q, k, v, pattern, key_padding_mask=inputs["key_padding_mask"],
                                global_mask=inputs["global_mask"], global_qkv=(qg, kg, vg), dropout_p=0.4,
                                dropout_seed=SEED, backend="triton")
    torch.autograd.gradcheck(f, tuple(leaves(inputs).values()), fast_mode=True)


@FP64_VIA_DISPATCH
def test_segment_dropout_gradcheck_fp64():
    """One head (half the kernel programs of H = 2); GQA with dropout against the fp64 oracle:
    test_segment_dropout_fp64."""
    inputs = make_inputs(Case(b=1, h=1, h_kv=1, n=13, d=16, n_global="many", seed=14), torch.float64, DEVICE)

    def f(q, k, v):
        return lhattn.attention(q, k, v, Segments(5), global_mask=inputs["global_mask"], dropout_p=0.4,
                                dropout_seed=SEED, backend="triton")
    torch.autograd.gradcheck(f, (inputs["q"], inputs["k"], inputs["v"]), fast_mode=True)


def test_custom_ops_opcheck_with_dropout():
    """Schema, fake (meta) kernels and autograd registration of the four ops with a dropout state."""
    gen = torch.Generator().manual_seed(15)
    q, k, v = (torch.randn(1, 2, 17, 16, generator=gen).to(DEVICE).requires_grad_() for _ in range(3))
    local = torch.ones(1, 17, dtype=torch.bool, device=DEVICE)
    local[0, 3] = False
    gidx = torch.tensor([[3, -1]], device=DEVICE)
    state = _dropout.make_state(0.3, SEED, DEVICE)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    band = (q, k, v, local, local, gidx, 4, 2, 1, 0.25, 0.3, state, None)
    dense = (q[:, :, :2], k, v, gidx >= 0, local, None, -1, -1, 1, 0.25, 0.3, state, gidx)
    for args in (band, dense):
        torch.library.opcheck(torch.ops.lhattn.sliding_window_attn_fwd.default, args, test_utils=utils)
    out, lse = torch.ops.lhattn.sliding_window_attn_fwd(*band)
    dout = torch.randn(out.shape, generator=gen).to(DEVICE)
    bwd = (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, local, gidx, 4, 2, 1, 0.25, 0.3, state, None)
    torch.library.opcheck(torch.ops.lhattn.sliding_window_attn_bwd.default, bwd,
                          test_utils=("test_schema", "test_faketensor"))

    ids = torch.tensor([[0] * 5 + [1] + [2] * 11], device=DEVICE)
    start, end = lhattn._index.segment_bounds(ids)
    for args in [(q, k, v, local, local, gidx, start, end, 0, 0.25, 0.3, state),
                 (q, k, v, None, None, None, None, None, 6, 0.25, 0.3, state)]:
        torch.library.opcheck(torch.ops.lhattn.segment_attn_fwd.default, args, test_utils=utils)
    out, lse = torch.ops.lhattn.segment_attn_fwd(q, k, v, None, None, None, None, None, 6, 0.25, 0.3, state)
    bwd = (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, None, None, None, None, 6, 0.25, 0.3, state)
    torch.library.opcheck(torch.ops.lhattn.segment_attn_bwd.default, bwd, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("pattern", [SlidingWindow((4, 2)), Segments(8)], ids=["window", "segments"])
def test_fullgraph_compile_with_dropout_and_a_tensor_seed(pattern):
    """One graph for every seed (the seed is a tensor); compiled == eager, forward and backward.
    One batch row of 24 tokens (two tiles), two global tokens and a padded tail: the traced call has
    the globals, padding and dropout of the oracle tests above with less interpreted work than the
    B = 2, N = 40 it had (compiled and eager are compared bit for bit; the kernels against the
    oracle are the tests above)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    inputs = make_inputs(Case(b=1, h=2, h_kv=2, n=24, n_global="many", seed=16), torch.float32, DEVICE)
    q, k, v, gm = (inputs[key] for key in ("q", "k", "v", "global_mask"))
    kpm = torch.zeros_like(gm)
    kpm[0, 19:] = True  # make_inputs pads no row when B = 1

    def f(q, k, v, gm, kpm, seed):
        return lhattn.attention(q, k, v, pattern, global_mask=gm, key_padding_mask=kpm, dropout_p=0.3,
                                dropout_seed=seed, backend="triton")

    counter = CompileCounterWithBackend("aot_eager" if DEVICE == "cpu" else "inductor")
    compiled = torch.compile(f, fullgraph=True, backend=counter)
    outs = []
    for s in (11, 12):
        seed = torch.tensor(s, device=DEVICE)
        eager = f(q, k, v, gm, kpm, seed)
        traced = compiled(q, k, v, gm, kpm, seed)
        torch.testing.assert_close(traced, eager, rtol=0, atol=0)
        g_eager = torch.autograd.grad(eager.sum(), (q, k, v))
        g_traced = torch.autograd.grad(traced.sum(), (q, k, v))
        for name, a, b in zip("qkv", g_traced, g_eager):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"d{name} differs under torch.compile")
        outs.append(traced)
    assert counter.frame_count == 1, f"a new seed recompiled ({counter.frame_count} frames)"
    assert max_err(outs[0], outs[1]) > 0.05 * outs[0].abs().max().item(), "the seed tensor had no effect"
