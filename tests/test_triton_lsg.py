"""The Triton LSG kernels against the oracle: outputs, lse and every gradient.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tiny shapes: the
interpreter is slow, and the whole file must stay well under two minutes on a 2-core box);
with one, the same tests run natively and the ``gpu`` tests add realistic sizes, fp64
gradcheck on CUDA and ``torch.compile`` with inductor.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

import pytest  # noqa: E402

pytest.importorskip("triton")

import lhattn  # noqa: E402
from lhattn.functional import register_triton_backend  # noqa: E402
from lhattn.patterns import LSG, SPARSITY_TYPES  # noqa: E402

from cases import Case, cast, make_inputs, run_with_grads  # noqa: E402
from tolerance import assert_close_to_oracle, max_err  # noqa: E402

KERNELS = pytest.importorskip("lhattn.kernels.lsg")
SW_KERNELS = pytest.importorskip("lhattn.kernels.sliding_window")
from lhattn.autograd import lsg as lsg_autograd  # noqa: E402

# Until lhattn.autograd registers the LSG family itself (idempotent either way).
register_triton_backend(LSG, lsg_autograd.impl, lsg_autograd.reason)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


pytestmark = pytest.mark.usefixtures("one_thread")


def _lsg(backend):
    def fn(q, k, v, key_padding_mask, global_mask, global_qkv, pattern):
        return lhattn.attention(q, k, v, pattern, key_padding_mask=key_padding_mask, backend=backend,
                                return_lse=True)
    return fn


def _compare(case, dtype, pattern, oracle_backend="reference"):
    """Triton vs the oracle in fp64, relative to the oracle's own error in ``dtype``; padding
    rows give exactly 0 / -inf and zero gradients, padding keys zero gradients."""
    inputs = make_inputs(case, torch.float64, DEVICE)
    oracle = run_with_grads(_lsg(oracle_backend), inputs, pattern=pattern)
    ref_low = run_with_grads(_lsg(oracle_backend), cast(inputs, dtype), pattern=pattern)
    got = run_with_grads(_lsg("triton"), cast(inputs, dtype), pattern=pattern)
    for name in oracle:
        assert got[name].dtype == ref_low[name].dtype, f"{name}: dtype {got[name].dtype} != {ref_low[name].dtype}"
        assert_close_to_oracle(f"{name} ({case.id}, {pattern})", got[name], ref_low[name], oracle[name])
    kpm = inputs["key_padding_mask"]
    if kpm is not None:
        rows = kpm[:, None, :].expand(-1, case.h, -1)
        keys = kpm[:, None, :].expand(-1, case.h_kv, -1)
        assert torch.all(got["out"][rows] == 0) and torch.all(got["dq"][rows] == 0), "padding rows are not 0"
        assert torch.all(torch.isneginf(got["lse"][rows])), "padding rows' lse is not -inf"
        assert torch.all(got["dk"][keys] == 0) and torch.all(got["dv"][keys] == 0), "padding keys have gradients"


# --------------------------------------------------------------------------------------
# every sparsity type, causal and not (interpreter-sized)
# --------------------------------------------------------------------------------------

# One input case per sparsity type, so that the sweep also covers both layouts, 0 / 1 / many
# global tokens, sb < b, sb = b, sb > b, f in {2, 4}, odd n, padding, GQA/MQA (bos_pooling's
# per-query-head compressed keys included), non-contiguous inputs and D = 32.  Inline with f = 2
# uses sparse_geometry="regular" (attention_layers' own keeps no sparse key there); the reference
# geometries' other windows: tests/test_lsg_exact.py.
TYPE_CASES = {
    "none": (Case(b=1, h=2, h_kv=1, n=29, padding=True, seed=1),
             dict(block_size=8, num_global_tokens=0)),
    "norm": (Case(b=1, h=2, h_kv=1, n=33, strided=True, seed=2),
             dict(block_size=8, sparse_block_size=4, sparsity_factor=2, num_global_tokens=2,
                  global_layout="prepended")),
    "pooling": (Case(b=2, h=1, h_kv=1, n=29, d=32, padding=True, seed=3),
                dict(block_size=8, sparsity_factor=4, num_global_tokens=1)),
    "stride": (Case(b=1, h=2, h_kv=2, n=29, padding=True, strided=True, seed=4),
               dict(block_size=8, sparse_block_size=12, sparsity_factor=2, num_global_tokens=3,
                  sparse_geometry="regular")),
    "block_stride": (Case(b=1, h=2, h_kv=1, n=31, padding=True, seed=5),
                     dict(block_size=8, sparsity_factor=4, num_global_tokens=1, global_layout="prepended")),
    "bos_pooling": (Case(b=1, h=2, h_kv=1, n=29, padding=True, seed=6),
                    dict(block_size=8, sparsity_factor=2, num_global_tokens=2, sparse_geometry="regular")),
    "lsh": (Case(b=1, h=2, h_kv=1, n=33, padding=True, strided=True, seed=7),
            dict(block_size=8, sparsity_factor=2, num_global_tokens=1, global_layout="prepended", seed=3)),
}
assert set(TYPE_CASES) == set(SPARSITY_TYPES)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("sparsity_type", SPARSITY_TYPES)
def test_triton_matches_oracle(sparsity_type, causal):
    case, spec = TYPE_CASES[sparsity_type]
    _compare(case, torch.float32, LSG(sparsity_type=sparsity_type, causal=causal, **spec))


OTHER_CASES = {
    # f = 1 (the blocked sequence itself), more global tokens than a block (inline: block 0 and
    # part of block 1 are global rows)
    "f1-g10": (Case(b=1, h=2, h_kv=1, n=33, padding=True, seed=8),
               LSG(block_size=8, sparsity_factor=1, sparsity_type="stride", num_global_tokens=10,
                   sparse_geometry="regular")),
    # n <= 2b: full attention (the dense path), inline and prepended (N - o <= 2b)
    "short": (Case(b=2, h=2, h_kv=1, n=13, padding=True, seed=9),
              LSG(block_size=8, sparsity_type="pooling", num_global_tokens=1)),
    "short-prepended-causal": (Case(b=1, h=2, h_kv=1, n=19, padding=True, seed=10),
                               LSG(block_size=8, sparsity_type="norm", num_global_tokens=3, causal=True,
                                   global_layout="prepended")),
    # most tokens global: 6 global keys, 2 non-global rows (the global-key gradient lists more keys
    # than there are rows)
    "g-beyond-half": (Case(b=1, h=2, h_kv=1, n=8, padding=True, seed=21),
                      LSG(block_size=3, sparsity_factor=3, sparsity_type="pooling", num_global_tokens=6)),
    # n = 2b + 1: the smallest blocked sequence; sparse_block_size = 0 (no compressed keys)
    "2b+1-sb0": (Case(b=1, h=2, h_kv=2, n=17, seed=11),
                 LSG(block_size=8, sparse_block_size=0, sparsity_type="pooling", num_global_tokens=1)),
    # no compressed keys and a factor larger than the block (allowed then; the launcher divided by
    # block // factor = 0: found by tests/fuzz.py)
    "f-beyond-block-none": (Case(b=1, h=2, h_kv=1, n=21, padding=True, seed=22),
                            LSG(block_size=2, sparse_block_size=1, sparsity_factor=4, sparsity_type="none",
                                sparse_geometry="regular")),
    "f-beyond-block-sb0": (Case(b=1, h=2, h_kv=1, n=19, seed=23),
                           LSG(block_size=1, sparse_block_size=0, sparsity_factor=2, causal=True,
                               global_layout="prepended")),
}


@pytest.mark.parametrize("name", OTHER_CASES.keys())
def test_triton_matches_oracle_other_cases(name):
    case, pattern = OTHER_CASES[name]
    _compare(case, torch.float32, pattern)


def test_triton_matches_oracle_fp64():
    _compare(Case(b=1, h=2, h_kv=1, n=29, padding=True, strided=True, seed=12), torch.float64,
             LSG(block_size=8, sparsity_factor=2, sparsity_type="bos_pooling", num_global_tokens=2,
                 sparse_geometry="regular"))


@pytest.mark.parametrize("dtype, sparsity_type, causal", [
    (torch.float16, "pooling", False),
    (torch.bfloat16, "norm", True),
], ids=["fp16-pooling-bidir", "bf16-norm-causal"])
def test_triton_matches_oracle_half(dtype, sparsity_type, causal):
    _compare(Case(b=1, h=2, h_kv=1, n=29, padding=True, seed=13), dtype,
             LSG(block_size=8, sparsity_factor=2, sparsity_type=sparsity_type, num_global_tokens=1, causal=causal,
                 sparse_geometry="regular"))


@pytest.mark.parametrize("blocks", [
    {"fwd": (32, 16), "dq": (16, 32), "dkdv": (32, 16)},
    {"fwd": (16, 32), "dq": (32, 16), "dkdv": (16, 32)},
], ids=["tall", "wide"])
def test_triton_block_shapes(monkeypatch, blocks):
    """Kernel tiles that are not LSG blocks: b = 20 (not a power of two) is covered by two
    16-row / 16-key sub-tiles or one 32-wide tile with a masked tail, the compressed-key
    gradient's row tiles straddle LSG blocks, and the dense pass of the global rows and the
    global-key gradient are split into many (unaligned) key / row chunks."""
    if not KERNELS.INTERPRET:
        pytest.skip("block sizes are autotuned on GPU")
    monkeypatch.setattr(KERNELS, "INTERPRET_BLOCKS", blocks)
    monkeypatch.setattr(KERNELS, "INTERPRET_SPLIT_CHUNK", 7)  # the global rows' key chunks
    monkeypatch.setattr(SW_KERNELS, "INTERPRET_SPLIT_CHUNK", 7)  # global rows' keys, global keys' rows
    _compare(Case(b=1, h=1, h_kv=1, n=45, padding=True, seed=14), torch.float64,
             LSG(block_size=20, sparse_block_size=10, sparsity_factor=4, sparsity_type="pooling",
                 num_global_tokens=2, sparse_geometry="regular"))


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("sb,geometry", [(16, "regular"), (32, "regular"), (32, "reference")])
def test_triton_sparse_dkdv_unmasked_rows(causal, sb, geometry):
    """Compressed-key tiles no wider than ``s = b / f`` (interpreter: 16 keys, ``s = 16``): the rows of
    the blocks whose window holds the whole tile take the compressed-key dk/dv walk without the window
    test (whole 16-row steps; block 0's first row is global, so its steps are offset by one), the
    others the masked walk; with ``sb = 32`` two blocks per side hold a tile."""
    _compare(Case(b=1, h=2, h_kv=1, n=150, padding=True, seed=31), torch.float64,
             LSG(block_size=32, sparse_block_size=sb, sparsity_factor=2, sparsity_type="pooling",
                 num_global_tokens=1, causal=causal, sparse_geometry=geometry))


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_triton_aligned_fast_paths(causal):
    """Tiles that divide the LSG block and offset (interpreter: 16 rows / keys; b = 32, inline): the
    forward / dq band starts on a tile (``BLOCK_ALIGN``), its first tile in blocks 0 and 1 taking the
    global keys [16, 20) off the global-key walk (g = 20: more than a tile), and the compressed-key
    dk/dv walk's masked row steps go without the window test (``WIN_ALIGN``: s = 16, regular windows);
    GQA (the local dk/dv walk's carried head), padding, n not a multiple of a tile, float32 (exp2).  The
    unaligned paths: the tests with b = 8 and b = 20 above."""
    if KERNELS.INTERPRET:
        assert KERNELS._pow2_divisor(32, 0) >= 16 and KERNELS._window_align(16, (-32, -16), (32, 48)) >= 16
    _compare(Case(b=1, h=2, h_kv=1, n=118, padding=True, seed=32), torch.float32,
             LSG(block_size=32, sparse_block_size=16, sparsity_factor=2, sparsity_type="pooling",
                 num_global_tokens=20, causal=causal, sparse_geometry="regular"))


# --------------------------------------------------------------------------------------
# gradients, padding, memory, custom ops, compile, bad input
# --------------------------------------------------------------------------------------


def test_triton_gradcheck_fp64():
    """bos_pooling: q reaches the output through the kernels and through the selection.  (GQA
    gradients are checked against the fp64 oracle in test_triton_matches_oracle_fp64.)"""
    inputs = make_inputs(Case(b=1, h=1, h_kv=1, n=17, padding=True, seed=15), torch.float64, DEVICE)
    pattern = LSG(block_size=8, sparsity_factor=2, sparsity_type="bos_pooling", num_global_tokens=1,
                  sparse_geometry="regular")

    def f(q, k, v):
        return lhattn.attention(q, k, v, pattern, key_padding_mask=inputs["key_padding_mask"], backend="triton")
    torch.autograd.gradcheck(f, (inputs["q"], inputs["k"], inputs["v"]), fast_mode=True)


def test_triton_padding_rows_are_exact_zeros_never_nan():
    """An expanded (stride-0) output gradient, a batch row that is padding only."""
    inputs = make_inputs(Case(b=2, h=1, h_kv=1, n=21, seed=17), torch.float32, DEVICE)
    kpm = torch.zeros(2, 21, dtype=torch.bool, device=DEVICE)
    kpm[0, 15:] = True
    kpm[1] = True
    pattern = LSG(block_size=6, sparsity_factor=2, sparsity_type="pooling", num_global_tokens=1,
                  sparse_geometry="regular")
    out, lse = lhattn.attention(inputs["q"], inputs["k"], inputs["v"], pattern, key_padding_mask=kpm,
                                backend="triton", return_lse=True)
    out.sum().backward()
    assert (out.transpose(1, 2)[kpm] == 0).all() and torch.isneginf(lse.transpose(1, 2)[kpm]).all()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    for name in ("q", "k", "v"):
        g = inputs[name].grad
        assert not torch.isnan(g).any(), f"d{name} has NaN"
        assert (g.transpose(1, 2)[kpm] == 0).all(), f"d{name} is not 0 on padding rows"


def test_triton_keeps_no_window_sized_tensor_alive():
    """Between forward and backward only O(N·D) tensors are kept (inputs, compressed keys, out,
    lse, masks): no N × N mask and nothing of size N × window."""
    inputs = make_inputs(Case(b=1, h=1, h_kv=1, n=64, seed=18), torch.float32, DEVICE)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lhattn.attention(inputs["q"], inputs["k"], inputs["v"], LSG(block_size=8, sparsity_type="norm"),
                         backend="triton")
    assert max(saved) <= inputs["q"].numel(), f"a saved tensor has {max(saved)} elements"


def test_triton_custom_op_opcheck():
    """Schema, fake (meta) kernel and autograd registration of the forward op."""
    gen = torch.Generator().manual_seed(19)
    q = torch.randn(1, 2, 19, 16, generator=gen).to(DEVICE).requires_grad_()
    k, v = (torch.randn(1, 1, 19, 16, generator=gen).to(DEVICE).requires_grad_() for _ in range(2))
    kc, vc = (torch.randn(1, 1, 12, 16, generator=gen).to(DEVICE).requires_grad_() for _ in range(2))
    valid = torch.ones(1, 1, 12, dtype=torch.bool, device=DEVICE)
    valid[0, 0, 3] = False
    key_valid = torch.ones(1, 19, dtype=torch.bool, device=DEVICE)
    key_valid[0, -2:] = False
    # b, sb, f, sparse windows (regular: (-s - sb, -s), (2s, 2s + sb)), g, o, causal, scale
    args = (q, k, v, kc, vc, valid, key_valid, 8, 8, 2, [-12, -4, 8, 16], 1, 0, False, 0.25)
    torch.library.opcheck(torch.ops.lhattn.lsg_attn_fwd.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_triton_torch_compile_fullgraph_traces():
    """AOT-autograd tracing through the selection, the fake kernels and the registered backward."""
    inputs = make_inputs(Case(b=1, h=2, h_kv=1, n=19, padding=True, seed=20), torch.float32, DEVICE)
    kpm = inputs["key_padding_mask"]

    def f(q, k, v):
        return lhattn.lsg_attention(q, k, v, block_size=8, sparsity_type="pooling", key_padding_mask=kpm,
                                    backend="triton")
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    out = compiled(q, k, v)
    gq, gk, gv = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref = f(q, k, v)
    rq, rk, rv = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for name, a, b in (("out", out, ref), ("dq", gq, rq), ("dk", gk, rk), ("dv", gv, rv)):
        assert max_err(a, b) <= 1e-6, f"{name}: compiled and eager differ by {max_err(a, b):.2e}"


@pytest.mark.parametrize("d", [264, 512])  # up to 256 the dispatch zero-pads (test_dispatch.py)
def test_triton_unsupported_head_dim_is_a_clear_error(d):
    q = torch.randn(1, 1, 20, d, device=DEVICE)
    with pytest.raises(NotImplementedError, match="head dim"):
        lhattn.lsg_attention(q, q, q, block_size=4, backend="triton")
    out = lhattn.lsg_attention(q, q, q, block_size=4)  # auto: falls back, same function
    assert out.shape == q.shape


def test_launcher_rejects_mismatched_compressed_keys():
    q = torch.randn(1, 2, 20, 16, device=DEVICE)
    kc = torch.randn(1, 3, 10, 16, device=DEVICE)  # 3 compressed heads for 2 query heads
    valid = torch.ones(1, 1, 10, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="k_sparse"):
        KERNELS.lsg_fwd(q, q, q, kc, kc, valid, block_size=4, sparse_block_size=4, sparsity_factor=2,
                        num_global_tokens=1)


# --------------------------------------------------------------------------------------
# GPU: realistic sizes, fp64 gradcheck on CUDA, inductor
# --------------------------------------------------------------------------------------


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("sparsity_type, f, layout", [
    ("norm", 2, "inline"), ("pooling", 4, "prepended"), ("bos_pooling", 8, "inline"), ("stride", 4, "prepended"),
    ("block_stride", 2, "inline"),
])
def test_gpu_matches_oracle_4k(sparsity_type, f, layout, causal, dtype):
    """lsh is left to the interpreter tests: in bf16 its bucket argmax can flip between two
    summation orders of the same sums (the oracle's torch scatter vs the C++/CUDA op)."""
    case = Case(b=2, h=4, h_kv=2, n=4096 + 17, d=64, padding=True, seed=21)
    _compare(case, dtype, LSG(block_size=128, sparsity_factor=f, sparsity_type=sparsity_type, num_global_tokens=2,
                              causal=causal, global_layout=layout))


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_16k_against_fallback(d):
    """n = 16k, bf16; the O(N·w) fallback (fp64) is the oracle."""
    case = Case(b=1, h=4, h_kv=4, n=16384, d=d, padding=True, strided=True, seed=22)
    _compare(case, torch.bfloat16, LSG(block_size=128, sparsity_factor=4, sparsity_type="norm", num_global_tokens=1),
             oracle_backend="fallback")


@pytest.mark.gpu
@GPU
def test_gpu_gradcheck_fp64_on_cuda():
    """The compiled kernels in fp64 (dispatch keeps fp64 on CUDA off Triton; call the impl directly)."""
    inputs = make_inputs(Case(b=1, h=2, h_kv=1, n=70, d=16, padding=True, seed=23), torch.float64, "cuda")
    pattern = LSG(block_size=16, sparsity_factor=4, sparsity_type="pooling", num_global_tokens=2)

    def f(q, k, v):
        return lsg_autograd.impl(q, k, v, pattern, key_padding_mask=inputs["key_padding_mask"])[0]
    torch.autograd.gradcheck(f, (inputs["q"], inputs["k"], inputs["v"]), fast_mode=True)


@pytest.mark.gpu
@GPU
def test_gpu_torch_compile_model():
    torch.manual_seed(24)
    proj = torch.nn.Linear(64, 3 * 64, device="cuda", dtype=torch.bfloat16)

    def model(x):
        b, n, _ = x.shape
        q, k, v = proj(x).view(b, n, 3, 1, 64).permute(2, 0, 3, 1, 4)  # strided [B, H, N, D] views
        return lhattn.lsg_attention(q, k, v, block_size=128, sparsity_factor=4, sparsity_type="pooling",
                                    backend="triton").sum(1)

    x = torch.randn(2, 2048, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = torch.compile(model, fullgraph=True)(x)
    (gx,) = torch.autograd.grad(out.float().square().sum(), x)
    ref = model(x)
    (rx,) = torch.autograd.grad(ref.float().square().sum(), x)
    assert max_err(out, ref) <= 1e-2 and max_err(gx, rx) <= 5e-2 * rx.abs().max().item()
