"""The Triton sliding-window kernels against the oracle: outputs, lse and every gradient.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tiny shapes);
with one, the same tests run natively and the ``gpu`` tests add realistic sizes,
fp64 gradcheck on CUDA and ``torch.compile``.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

import pytest  # noqa: E402

pytest.importorskip("triton")

import lhattn  # noqa: E402
from lhattn.patterns import SlidingWindow  # noqa: E402

from cases import Case, cast, leaves, make_inputs, run_with_grads  # noqa: E402
from tolerance import assert_close_to_oracle, max_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Dispatch sends float64 to the Triton kernels only under the interpreter (CPU); on a GPU the
# float64 kernels are exercised by test_gpu_gradcheck_fp64_on_cuda, which calls them directly.
FP64_VIA_DISPATCH = pytest.mark.skipif(DEVICE == "cuda", reason="backend='triton' declines float64 on CUDA")
KERNELS = pytest.importorskip("lhattn.kernels.sliding_window")


def _sw(backend):
    def fn(q, k, v, key_padding_mask, global_mask, global_qkv, pattern):
        return lhattn.attention(q, k, v, pattern, key_padding_mask=key_padding_mask, global_mask=global_mask,
                                global_qkv=global_qkv, backend=backend, return_lse=True)
    return fn


def _compare(case, dtype, pattern, oracle_backend="reference"):
    """Triton vs the oracle in fp64, relative to the oracle's own error in ``dtype``."""
    if dtype == torch.float64 and DEVICE == "cuda":
        pytest.skip("backend='triton' declines float64 on CUDA")
    inputs = make_inputs(case, torch.float64, DEVICE)
    oracle = run_with_grads(_sw(oracle_backend), inputs, pattern=pattern)
    ref_low = run_with_grads(_sw(oracle_backend), cast(inputs, dtype), pattern=pattern)
    got = run_with_grads(_sw("triton"), cast(inputs, dtype), pattern=pattern)
    for name in oracle:
        assert got[name].dtype == ref_low[name].dtype, f"{name}: dtype {got[name].dtype} != {ref_low[name].dtype}"
        assert_close_to_oracle(f"{name} ({case.id}, {pattern})", got[name], ref_low[name], oracle[name])


WINDOWS = {
    "w3-2": SlidingWindow((3, 2)),  # asymmetric, narrower than a block: edge blocks only
    "w0": SlidingWindow(0),  # each token sees itself (+ globals)
    "causal5": SlidingWindow(5, causal=True),
    "w-ge-n": SlidingWindow((100, 100)),  # wider than the sequence: dense
    "w24-8": SlidingWindow((24, 8)),  # wide enough for unmasked full blocks (interpreter blocks are 16)
    "dil3": SlidingWindow((2, 1), dilation=3),
    "dil2-wide": SlidingWindow((17, 15), dilation=2),  # dilated, with full blocks in each residue
}

# BASIC: the specialisations without masks and globals, one batch row (the batch offsets are common code
# of every specialisation, checked with B = 2 by RICH and the other cases; no padding, no globals: the
# rows of a batch would all take the same path)
BASIC = Case(b=1, h=2, h_kv=2, n=37)
RICH = Case(b=2, h=2, h_kv=1, n=45, n_global="many", padding=True, seed=1)  # GQA, ragged globals, padding

OTHER_CASES = [
    (Case(b=1, h=2, h_kv=1, n=5), "w3-2"),  # n below the window and below one block
    (Case(b=1, h=2, h_kv=1, n=5), "dil3"),
    (Case(b=2, h=2, h_kv=2, n=37, n_global="one", padding=True, global_proj=True, seed=2), "causal5"),
    (Case(b=2, h=2, h_kv=2, n=37, n_global="one", padding=True, global_proj=True, seed=2), "w24-8"),
    (Case(b=2, h=4, h_kv=2, n=41, n_global="many", global_proj=True, strided=True, seed=3), "w3-2"),  # GQA, kv head 1
    (Case(b=2, h=4, h_kv=2, n=41, n_global="many", global_proj=True, strided=True, seed=3), "dil2-wide"),
]


@pytest.mark.parametrize("window", WINDOWS.keys())
@pytest.mark.parametrize("case", [BASIC, RICH], ids=lambda c: c.id)
def test_triton_matches_oracle_fp32(case, window):
    _compare(case, torch.float32, WINDOWS[window])


@pytest.mark.parametrize("case, window", OTHER_CASES, ids=[f"{c.id}-{w}" for c, w in OTHER_CASES])
def test_triton_matches_oracle_other_cases(case, window):
    _compare(case, torch.float32, WINDOWS[window])


@pytest.mark.parametrize("case, window", [
    (RICH, "w24-8"),
    (Case(b=2, h=2, h_kv=1, n=33, n_global="one", padding=True, global_proj=True, strided=True), "dil3"),
], ids=["rich-w24-8", "gproj-strided-dil3"])
def test_triton_matches_oracle_fp64(case, window):
    _compare(case, torch.float64, WINDOWS[window])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case, window", [
    (RICH, "w3-2"),
    (Case(b=1, h=2, h_kv=2, n=40, n_global="one", global_proj=True), "causal5"),
], ids=["rich-w3-2", "gproj-causal5"])
def test_triton_matches_oracle_half(case, window, dtype):
    _compare(case, dtype, WINDOWS[window])


@pytest.mark.parametrize("window", ["w3-2", "dil2-wide"])
def test_triton_head_dim_32(window):
    _compare(Case(b=1, h=2, h_kv=1, n=39, d=32, n_global="many", padding=True, seed=4), torch.float32,
             WINDOWS[window])


def test_triton_head_dim_64_globals():
    """D = 64: the forward attends to the listed (global) keys before the band there (``LIST_FIRST``)."""
    _compare(Case(b=2, h=2, h_kv=1, n=41, d=64, n_global="many", strided=True, seed=6), torch.float32,
             WINDOWS["w24-8"])


@pytest.mark.parametrize("blocks", [
    {"fwd": (32, 16), "dq": (16, 32), "dkdv": (32, 16)},
    {"fwd": (16, 32), "dq": (32, 16), "dkdv": (16, 32)},
], ids=["tall", "wide"])
@pytest.mark.parametrize("padding", [True, False], ids=["pad", "nopad"])
def test_triton_block_shapes_and_split_chunks(monkeypatch, blocks, padding):
    """BLOCK_M != BLOCK_N, and dense passes split into many (unaligned) key chunks (without padding: the
    dense pass's column test, ``SIDE == 3``, on chunks starting inside a tile)."""
    if not KERNELS.INTERPRET:
        pytest.skip("block sizes are autotuned on GPU")
    monkeypatch.setattr(KERNELS, "INTERPRET_BLOCKS", blocks)
    monkeypatch.setattr(KERNELS, "INTERPRET_SPLIT_CHUNK", 13)
    _compare(Case(b=2, h=2, h_kv=1, n=47, n_global="many", padding=padding, global_proj=True, seed=5),
             torch.float64, SlidingWindow((20, 13)))


def test_triton_batch_rows_without_globals_and_fully_padded():
    """One batch row has no global token, another is padding only."""
    dtype = torch.float64 if DEVICE == "cpu" else torch.float32
    b, h, n, d = 3, 1, 23, 16
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(b, h, n, d, generator=gen, dtype=torch.float64).to(DEVICE) for _ in range(3))
    gm = torch.zeros(b, n, dtype=torch.bool)
    gm[1, [0, 5, 22]] = True
    gm[2, 3] = True
    kpm = torch.zeros(b, n, dtype=torch.bool)
    kpm[2] = True
    kpm[1, 20:] = True  # global token 22 is padding: neither global nor local
    inputs = {"q": q, "k": k, "v": v, "key_padding_mask": kpm.to(DEVICE), "global_mask": gm.to(DEVICE),
              "global_qkv": None}
    for t in (q, k, v):
        t.requires_grad_(True)
    oracle = run_with_grads(_sw("reference"), inputs, pattern=SlidingWindow((4, 2)))
    ref_low = run_with_grads(_sw("reference"), cast(inputs, dtype), pattern=SlidingWindow((4, 2)))
    got = run_with_grads(_sw("triton"), cast(inputs, dtype), pattern=SlidingWindow((4, 2)))
    for name in oracle:
        assert_close_to_oracle(name, got[name], ref_low[name], oracle[name])
    assert (got["out"][2] == 0).all() and torch.isneginf(got["lse"][2]).all()
    assert all((got[g][2] == 0).all() for g in ("dq", "dk", "dv"))


def test_triton_padding_rows_are_exact_zeros_never_nan():
    inputs = make_inputs(Case(b=2, h=2, h_kv=1, n=30, padding=True, n_global="many"), torch.float32, DEVICE)
    out, lse = _sw("triton")(**inputs, pattern=SlidingWindow(4))
    out.sum().backward()  # an expanded (stride-0) output gradient
    pad = inputs["key_padding_mask"]
    assert (out.transpose(1, 2)[pad] == 0).all()
    assert torch.isneginf(lse.transpose(1, 2)[pad]).all()
    for name in ("q", "k", "v"):
        g = inputs[name].grad
        assert not torch.isnan(g).any(), f"d{name} has NaN"
        assert (g.transpose(1, 2)[pad] == 0).all(), f"d{name} is not 0 on padding rows"
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()


@FP64_VIA_DISPATCH
def test_triton_gradcheck_fp64():
    """One head (half the kernel programs of H = 2): GQA is in the gradcheck below and in the fp64
    oracle comparison of test_triton_matches_oracle_fp64 (gproj-strided-dil3: GQA, dilation, gproj)."""
    case = Case(b=1, h=1, h_kv=1, n=11, d=16, n_global="one", padding=True, global_proj=True, seed=8)
    inputs = make_inputs(case, torch.float64, DEVICE)
    pattern = SlidingWindow((2, 1), dilation=2)

    def f(q, k, v, qg, kg, vg):
        return lhattn.attention(q, k, v, pattern, key_padding_mask=inputs["key_padding_mask"],
                                global_mask=inputs["global_mask"], global_qkv=(qg, kg, vg), backend="triton")
    torch.autograd.gradcheck(f, tuple(leaves(inputs).values()), fast_mode=True)


@FP64_VIA_DISPATCH
def test_triton_gradcheck_fp64_causal_gqa():
    inputs = make_inputs(Case(b=1, h=2, h_kv=1, n=19, d=16, n_global="many", seed=9), torch.float64, DEVICE)
    pattern = SlidingWindow(6, causal=True)

    def f(q, k, v):
        return lhattn.attention(q, k, v, pattern, global_mask=inputs["global_mask"], backend="triton")
    torch.autograd.gradcheck(f, (inputs["q"], inputs["k"], inputs["v"]), fast_mode=True)


def test_triton_keeps_no_window_sized_tensor_alive():
    """Between forward and backward only O(N·D) tensors are kept (q, k, v, out, lse, masks)."""
    n = 64
    inputs = make_inputs(Case(b=1, h=1, h_kv=1, n=n, n_global="one"), torch.float32, DEVICE)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = _sw("triton")(**inputs, pattern=SlidingWindow((30, 30)))
    assert max(saved) <= inputs["q"].numel(), f"a saved tensor has {max(saved)} elements"


@pytest.mark.parametrize("d", [264, 512])  # up to 256 the dispatch zero-pads (test_dispatch.py)
def test_triton_unsupported_head_dim_is_a_clear_error(d):
    q = torch.randn(1, 1, 8, d, device=DEVICE)
    with pytest.raises(NotImplementedError, match="head dim"):
        lhattn.sliding_window_attention(q, q, q, 2, backend="triton")
    out = lhattn.sliding_window_attention(q, q, q, 2)  # auto: falls back, same function
    assert out.shape == q.shape


def test_triton_custom_op_opcheck():
    """Schema, fake (meta) kernel and autograd registration of the forward op."""
    gen = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(1, 2, 17, 16, generator=gen).to(DEVICE).requires_grad_() for _ in range(3))
    local = torch.ones(1, 17, dtype=torch.bool, device=DEVICE)
    local[0, 3] = False
    gidx = torch.tensor([[3, -1]], device=DEVICE)
    args = (q, k, v, local, local, gidx, 4, 2, 2, 0.25)
    torch.library.opcheck(torch.ops.lhattn.sliding_window_attn_fwd.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_triton_torch_compile_fullgraph_traces():
    """AOT-autograd tracing through the fake kernels and the registered backward."""
    inputs = make_inputs(Case(b=1, h=2, h_kv=1, n=21, padding=True), torch.float32, DEVICE)
    kpm = inputs["key_padding_mask"]

    def f(q, k, v):
        return lhattn.sliding_window_attention(q, k, v, (3, 2), key_padding_mask=kpm, backend="triton")
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    out = compiled(q, k, v)
    (gq, gk, gv) = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref = f(q, k, v)
    rq, rk, rv = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for name, a, b in (("out", out, ref), ("dq", gq, rq), ("dk", gk, rk), ("dv", gv, rv)):
        assert max_err(a, b) <= 1e-6, f"{name}: compiled and eager differ by {max_err(a, b):.2e}"


# --------------------------------------------------------------------------------------
# GPU: realistic sizes, fp64 gradcheck on CUDA, inductor
# --------------------------------------------------------------------------------------


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("window", ["longformer", "causal", "dilated"])
def test_gpu_matches_oracle_4k(window, d, dtype):
    pattern = {"longformer": SlidingWindow((256, 256)), "causal": SlidingWindow(300, causal=True),
               "dilated": SlidingWindow((64, 64), dilation=4)}[window]
    case = Case(b=2, h=4, h_kv=2, n=4096 + 17, d=d, n_global="many", padding=True, global_proj=True, seed=11)
    _compare(case, dtype, pattern)


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_16k_against_fallback(dtype):
    """n = 16k, Longformer-style window and a CLS global token; the O(N·w) fallback is the oracle."""
    case = Case(b=1, h=4, h_kv=4, n=16384, d=64, n_global="one", padding=True, strided=True, seed=12)
    _compare(case, dtype, SlidingWindow((256, 256)), oracle_backend="fallback")


@pytest.mark.gpu
@GPU
def test_gpu_gradcheck_fp64_on_cuda():
    """The compiled kernels in fp64 (dispatch keeps fp64 on CUDA off Triton; call the op directly)."""
    from lhattn.autograd.sliding_window import sliding_window_attention as triton_sw

    inputs = make_inputs(Case(b=1, h=2, h_kv=1, n=70, d=16, n_global="many", padding=True, global_proj=True),
                         torch.float64, "cuda")
    pattern = SlidingWindow((5, 3), dilation=2)

    def f(q, k, v, qg, kg, vg):
        return triton_sw(q, k, v, pattern, key_padding_mask=inputs["key_padding_mask"],
                         global_mask=inputs["global_mask"], global_qkv=(qg, kg, vg))[0]
    torch.autograd.gradcheck(f, tuple(leaves(inputs).values()), fast_mode=True)


@pytest.mark.gpu
@GPU
def test_gpu_torch_compile_model():
    torch.manual_seed(13)
    proj = torch.nn.Linear(64, 3 * 64, device="cuda", dtype=torch.bfloat16)

    def model(x):
        b, n, _ = x.shape
        q, k, v = proj(x).view(b, n, 3, 1, 64).permute(2, 0, 3, 1, 4)  # strided [B, H, N, D] views
        return lhattn.sliding_window_attention(q, k, v, (128, 128), backend="triton").sum(1)

    x = torch.randn(2, 2048, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = torch.compile(model, fullgraph=True)(x)
    (gx,) = torch.autograd.grad(out.float().square().sum(), x)
    ref = model(x)
    (rx,) = torch.autograd.grad(ref.float().square().sum(), x)
    assert max_err(out, ref) <= 1e-2 and max_err(gx, rx) <= 5e-2 * rx.abs().max().item()


_AOT_SCRIPT = r"""
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lhattn.kernels import segment as G, sliding_window as S

def compile_for(kernel, consts, pointers, target):
    fn = kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn
    sig, consts, attrs = {}, dict(consts), {}
    for i, p in enumerate(fn.params):
        name = p.name
        if p.is_constexpr or name in consts:
            sig[name] = "constexpr"
        elif name.startswith("stride") and name.endswith("d"):
            sig[name], consts[name] = "constexpr", 1  # a real launch specialises unit strides
        elif name.startswith("stride") or name in ("n", "n_q", "n_k", "n_glob", "heads_per_kv", "left", "right",
                                                    "dilation", "chunk", "n_split", "SPAN", "seg_size", "SEG",
                                                    "drop_row_off", "drop_col_off"):
            sig[name] = "i32"
        elif "scale" in name:
            sig[name] = "fp32"
        else:
            sig[name] = pointers.get(name, "*bf16")
            attrs[(i,)] = [["tt.divisibility", 16]]
    triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=target,
                   options=dict(num_warps=4, num_stages=2))

acc = {"LSE": "*fp32", "DELTA": "*fp32", "QM": "*u8", "KM": "*u8", "GIDX": "*i64", "DQ": "*fp32", "DKP": "*fp32",
       "DVP": "*fp32", "DROP": "*i64", "DROW": "*i64", "DCOL": "*i64", "SEG_START": "*i64", "SEG_END": "*i64"}
target = GPUTarget("cuda", 90, 32)
# without dropout, then with it (band rows, and the gathered rows of the dense pass: DROP_ROWS), then with the
# listed keys' own dropout columns (a context-parallel rank's gathered global keys: DROP_COLS)
for drop in (dict(DROPOUT=False, DROP_ROWS=False, DROP_COLS=False),
             dict(DROPOUT=True, DROP_ROWS=False, DROP_COLS=False),
             dict(DROPOUT=True, DROP_ROWS=True, DROP_COLS=False), dict(DROPOUT=True, DROP_ROWS=False, DROP_COLS=True)):
    base = dict(HEAD_DIM=64, BLOCK_M=64, BLOCK_N=32, EXACT_SCALE=False, USE_EXP2=True, **drop)
    compile_for(S._sw_fwd_kernel, dict(base, HAS_QMASK=True, HAS_KMASK=True, HAS_GLOBAL=True), acc, target)
    compile_for(S._sw_bwd_dq_kernel, dict(base, HAS_KMASK=True, HAS_GLOBAL=True), acc, target)
    compile_for(S._sw_bwd_dkdv_kernel, {k: v for k, v in dict(base, HAS_KMASK=True).items() if k != "DROP_COLS"},
                acc, target)
    compile_for(S._sw_bwd_dkdv_global_kernel, dict(base), acc, target)
# the segment kernels with dropout (ragged segments: bounds loaded), and with the listed keys' columns
for cols in (False, True):
    seg = dict(HEAD_DIM=64, BLOCK_M=64, BLOCK_N=32, EXACT_SCALE=False, USE_EXP2=True, DROPOUT=True, FIXED=False)
    compile_for(G._seg_fwd_kernel, dict(seg, HAS_QMASK=True, HAS_KMASK=True, HAS_GLOBAL=True, DROP_COLS=cols), acc,
                target)
    compile_for(G._seg_bwd_dq_kernel, dict(seg, HAS_KMASK=True, HAS_GLOBAL=True, DROP_COLS=cols), acc, target)
compile_for(G._seg_bwd_dkdv_kernel, dict(seg, HAS_KMASK=True), acc, target)
print("compiled")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU every test above compiles the kernels natively")
def test_triton_kernels_compile_for_cuda_without_a_gpu():
    """The interpreter never compiles: cross-compile the main kernels for sm_90 (bf16, D=64) with the
    ptxas shipped in the Triton wheel, so CUDA-only compile errors show up on CPU-only CI too."""
    import subprocess
    import sys

    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"this Triton has no ahead-of-time compile API ({exc})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0 and ("ptxas" in proc.stderr and "not found" in proc.stderr):
        pytest.skip("no ptxas in this Triton install")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]
