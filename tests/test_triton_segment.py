"""The Triton segment (HAT) kernels against the oracle: outputs, lse and every gradient.

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
from lhattn.functional import register_triton_backend  # noqa: E402
from lhattn.patterns import Segments  # noqa: E402

from cases import Case, cast, make_inputs, run_with_grads  # noqa: E402
from tolerance import assert_close_to_oracle, max_err  # noqa: E402

KERNELS = pytest.importorskip("lhattn.kernels.segment")
SEGMENT = pytest.importorskip("lhattn.autograd.segment")
register_triton_backend(Segments, SEGMENT.impl, SEGMENT.reason)  # idempotent; lhattn.autograd will do it too

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _seg(backend):
    def fn(q, k, v, key_padding_mask, global_mask, global_qkv, pattern, segment_ids=None):
        assert global_qkv is None
        return lhattn.attention(q, k, v, pattern, key_padding_mask=key_padding_mask, global_mask=global_mask,
                                segment_ids=segment_ids, backend=backend, return_lse=True)
    return fn


def ragged_ids(b: int, n: int, seed: int, max_len: int = 24) -> torch.Tensor:
    """``[B, N]`` non-decreasing ids, different per row: row 0 opens with three one-token
    segments, row 1 with a segment longer than a block; the rest 1 .. max_len long.  Ids
    are neither 0-based nor consecutive (only equality and order matter)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(b):
        lengths = {0: [1, 1, 1], 1: [n // 2 + 3]}.get(i, [])
        while sum(lengths) < n:
            lengths.append(int(torch.randint(1, max_len + 1, (1,), generator=gen)))
        ids = torch.repeat_interleave(torch.arange(len(lengths)) * 3 + 7 + i, torch.tensor(lengths))
        rows.append(ids[:n])
    return torch.stack(rows).to(DEVICE)


def _compare(case, dtype, pattern, ragged=False, oracle_backend="reference", max_len=24):
    """Triton vs the oracle in fp64, relative to the oracle's own error in ``dtype``;
    ``ragged``: segments from :func:`ragged_ids` (pattern ``Segments()``)."""
    inputs = make_inputs(case, torch.float64, DEVICE)
    kw = dict(pattern=pattern, segment_ids=ragged_ids(case.b, case.n, case.seed, max_len) if ragged else None)
    oracle = run_with_grads(_seg(oracle_backend), inputs, **kw)
    ref_low = run_with_grads(_seg(oracle_backend), cast(inputs, dtype), **kw)
    got = run_with_grads(_seg("triton"), cast(inputs, dtype), **kw)
    for name in oracle:
        assert got[name].dtype == ref_low[name].dtype, f"{name}: dtype {got[name].dtype} != {ref_low[name].dtype}"
        assert_close_to_oracle(f"{name} ({case.id}, {pattern}, ragged={ragged})", got[name], ref_low[name],
                               oracle[name])


# (pattern, ragged): interpreter blocks are 16 x 16
SEGMENTS = {
    "S1": (Segments(1), False),  # every token alone (+ globals)
    "S8": (Segments(8), False),  # several segments per block: masked blocks only
    "S40": (Segments(40), False),  # unaligned, with unmasked full blocks inside
    "S-all": (Segments(1000), False),  # one segment covering everything
    "ragged": (Segments(), True),  # segment_ids: lengths 1 .. 24 and one of n/2 + 3, per row different
}

BASIC = Case(b=2, h=2, h_kv=2, n=37)
RICH = Case(b=2, h=2, h_kv=1, n=45, n_global="many", padding=True, seed=1)  # GQA, ragged globals, padding


@pytest.mark.parametrize("segments", SEGMENTS.keys())
def test_triton_matches_oracle_fp32(segments):
    _compare(RICH, torch.float32, *SEGMENTS[segments])


@pytest.mark.parametrize("segments", ["S8", "ragged"])
def test_triton_matches_oracle_fp32_no_globals_no_padding(segments):
    _compare(BASIC, torch.float32, *SEGMENTS[segments])


OTHER_CASES = [
    (Case(b=1, h=2, h_kv=1, n=5, n_global="one"), Segments(3), False),  # n below one block
    (Case(b=2, h=2, h_kv=2, n=48, n_global="one", padding=True, strided=True, seed=2), Segments(16), False),
    (Case(b=2, h=2, h_kv=1, n=41, n_global="many", strided=True, seed=3), Segments(), True),  # odd n
]


@pytest.mark.parametrize("case, pattern, ragged", OTHER_CASES,
                         ids=[f"{c.id}-{'ragged' if r else p.segment_size}" for c, p, r in OTHER_CASES])
def test_triton_matches_oracle_other_cases(case, pattern, ragged):
    _compare(case, torch.float32, pattern, ragged)


def test_triton_matches_oracle_fp64():
    _compare(Case(b=2, h=2, h_kv=1, n=43, n_global="many", padding=True, strided=True, seed=4), torch.float64,
             Segments(), ragged=True)


@pytest.mark.parametrize("dtype, segments", [(torch.float16, "S8"), (torch.bfloat16, "ragged")],
                         ids=["fp16-S8", "bf16-ragged"])
def test_triton_matches_oracle_half(dtype, segments):
    _compare(Case(b=2, h=2, h_kv=1, n=40, n_global="many", padding=True, seed=1), dtype, *SEGMENTS[segments])


def test_triton_head_dim_32():
    _compare(Case(b=1, h=2, h_kv=1, n=39, d=32, n_global="many", padding=True, seed=5), torch.float32,
             Segments(), ragged=True)


@pytest.mark.parametrize("blocks, pattern, ragged", [
    ({"fwd": (32, 16), "dq": (16, 32), "dkdv": (32, 16)}, Segments(20), False),
    ({"fwd": (16, 32), "dq": (32, 16), "dkdv": (16, 32)}, Segments(), True),
], ids=["tall-S20", "wide-ragged"])
def test_triton_block_shapes(monkeypatch, blocks, pattern, ragged):
    """BLOCK_M != BLOCK_N in every kernel."""
    if not KERNELS.INTERPRET:
        pytest.skip("block sizes are autotuned on GPU")
    monkeypatch.setattr(KERNELS, "INTERPRET_BLOCKS", blocks)
    _compare(Case(b=1, h=2, h_kv=1, n=47, n_global="many", padding=True, seed=6), torch.float64, pattern, ragged)


def test_triton_one_token_segments_and_one_segment_ids():
    """Row 0: every token its own segment; row 1: one id for the whole row; one global each."""
    case = Case(b=2, h=2, h_kv=1, n=21, n_global="one", seed=7)
    inputs = make_inputs(case, torch.float64, DEVICE)
    ids = torch.stack([torch.arange(21), torch.full((21,), 4)]).to(DEVICE)
    oracle = run_with_grads(_seg("reference"), inputs, pattern=Segments(), segment_ids=ids)
    got = run_with_grads(_seg("triton"), cast(inputs, torch.float64), pattern=Segments(), segment_ids=ids)
    for name in oracle:
        assert_close_to_oracle(name, got[name], oracle[name], oracle[name])


def test_triton_batch_rows_without_globals_and_fully_padded():
    """One batch row has no global token, another is padding only; padding rows are exact
    zeros with lse -inf and zero gradients, never NaN."""
    b, h, n, d = 3, 1, 23, 16
    gen = torch.Generator().manual_seed(8)
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
    ids = ragged_ids(b, n, 8, max_len=6)
    oracle = run_with_grads(_seg("reference"), inputs, pattern=Segments(), segment_ids=ids)
    got = run_with_grads(_seg("triton"), cast(inputs, torch.float64), pattern=Segments(), segment_ids=ids)
    for name in oracle:
        assert_close_to_oracle(name, got[name], oracle[name], oracle[name])
    pad = kpm.to(DEVICE)
    assert (got["out"].transpose(1, 2)[pad] == 0).all() and torch.isneginf(got["lse"].transpose(1, 2)[pad]).all()
    for g in ("dq", "dk", "dv"):
        assert (got[g].transpose(1, 2)[pad] == 0).all(), f"{g} is not 0 on padding rows"


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
def test_triton_never_reads_other_segments():
    """Keys outside a query block's segments are never loaded: NaN in the k/v rows of one
    16-token segment (one interpreter block) leaves every other segment's output exact."""
    if not KERNELS.INTERPRET:
        pytest.skip("relies on the interpreter's 16-row blocks")
    inputs = make_inputs(Case(b=1, h=2, h_kv=1, n=64, seed=9), torch.float32, DEVICE)
    q, k, v = (inputs[x].detach() for x in ("q", "k", "v"))
    poisoned = [t.clone() for t in (k, v)]
    for t in poisoned:
        t[:, :, 16:32] = float("nan")
    out, lse = lhattn.segment_attention(q, *poisoned, segment_size=16, backend="triton", return_lse=True)
    ref, ref_lse = lhattn.segment_attention(q, k, v, segment_size=16, backend="reference", return_lse=True)
    keep = torch.ones(64, dtype=torch.bool, device=DEVICE)
    keep[16:32] = False
    assert max_err(out[:, :, keep], ref[:, :, keep]) <= 1e-5
    assert max_err(lse[:, :, keep], ref_lse[:, :, keep]) <= 1e-5


def test_triton_gradcheck_fp64():
    """One head (half the kernel programs of H = 2); GQA gradients against the fp64 oracle:
    test_triton_matches_oracle_fp64."""
    inputs = make_inputs(Case(b=1, h=1, h_kv=1, n=11, d=16, n_global="many", padding=True, seed=10),
                         torch.float64, DEVICE)
    ids = torch.tensor([[0, 0, 1, 2, 2, 2, 3, 3, 3, 3, 4]], device=DEVICE)

    def f(q, k, v):
        return lhattn.attention(q, k, v, Segments(), segment_ids=ids, key_padding_mask=inputs["key_padding_mask"],
                                global_mask=inputs["global_mask"], backend="triton")
    torch.autograd.gradcheck(f, (inputs["q"], inputs["k"], inputs["v"]), fast_mode=True)


def test_triton_keeps_no_segment_sized_tensor_alive():
    """Between forward and backward only O(N·D) tensors are kept (q, k, v, out, lse, masks, bounds)."""
    inputs = make_inputs(Case(b=1, h=1, h_kv=1, n=40, n_global="one"), torch.float32, DEVICE)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _seg("triton")(**inputs, pattern=Segments(), segment_ids=ragged_ids(1, 40, 0, max_len=30))
    assert max(saved) <= inputs["q"].numel(), f"a saved tensor has {max(saved)} elements"


@pytest.mark.parametrize("d", [264, 512])  # up to 256 the dispatch zero-pads (test_dispatch.py)
def test_triton_unsupported_head_dim_is_a_clear_error(d):
    q = torch.randn(1, 1, 8, d, device=DEVICE)
    with pytest.raises(NotImplementedError, match="head dim"):
        lhattn.segment_attention(q, q, q, segment_size=4, backend="triton")
    out = lhattn.segment_attention(q, q, q, segment_size=4)  # auto: falls back, same function
    assert out.shape == q.shape


def test_launcher_bad_segment_arguments():
    q = torch.randn(1, 1, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="exactly one of segment_size and segment_bounds"):
        KERNELS.segment_fwd(q, q, q)
    with pytest.raises(ValueError, match="segment_bounds start must be a"):
        bad = torch.zeros(1, 7, dtype=torch.int64, device=DEVICE)
        KERNELS.segment_fwd(q, q, q, segment_bounds=(bad, bad))
    with pytest.raises(ValueError, match="head dim"):
        KERNELS.segment_fwd(q[..., :12], q[..., :12], q[..., :12], segment_size=4)


def test_triton_custom_op_opcheck():
    """Schema, fake (meta) kernel and autograd registration of the forward op."""
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, 17, 16, generator=gen).to(DEVICE).requires_grad_() for _ in range(3))
    local = torch.ones(1, 17, dtype=torch.bool, device=DEVICE)
    local[0, 3] = False
    gidx = torch.tensor([[3, -1]], device=DEVICE)
    ids = torch.tensor([[0] * 5 + [1] + [2] * 11], device=DEVICE)
    start, end = lhattn._index.segment_bounds(ids)
    for args in [(q, k, v, local, local, gidx, start, end, 0, 0.25), (q, k, v, None, None, None, None, None, 6, 0.25)]:
        torch.library.opcheck(torch.ops.lhattn.segment_attn_fwd.default, args,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_triton_torch_compile_fullgraph_traces():
    """AOT-autograd tracing through the fake kernels and the registered backward, for fixed
    segments (public API) and segment ids (the bounds are computed in the graph).  The ids
    path calls the implementation directly: ``lhattn.attention`` validates ids with a
    data-dependent check that ``fullgraph=True`` cannot trace.  One batch row (with a padded tail):
    compiled and eager are compared bit for bit; the kernels against the oracle are the tests above."""
    inputs = make_inputs(Case(b=1, h=2, h_kv=1, n=21), torch.float32, DEVICE)
    kpm = torch.zeros(1, 21, dtype=torch.bool, device=DEVICE)
    kpm[0, 17:] = True  # make_inputs pads no row when B = 1
    ids = ragged_ids(1, 21, 12, max_len=8)

    def f(q, k, v):
        out, _ = SEGMENT.segment_attention(q, k, v, Segments(), segment_ids=ids, key_padding_mask=kpm)
        return out + lhattn.segment_attention(q, k, v, segment_size=5, key_padding_mask=kpm, backend="triton")
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
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("segments", ["S128", "S512", "ragged"])
def test_gpu_matches_oracle_4k(segments, d):
    pattern, ragged = {"S128": (Segments(128), False), "S512": (Segments(512), False),
                       "ragged": (Segments(), True)}[segments]
    case = Case(b=2, h=4, h_kv=2, n=4096 + 17, d=d, n_global="many", padding=True, seed=13)
    _compare(case, torch.bfloat16, pattern, ragged, max_len=700)


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("segment_size", [128, 512])
def test_gpu_16k_against_fallback(segment_size):
    """n = 16k, bf16, a CLS global token; the O(N·S) fallback is the oracle."""
    case = Case(b=1, h=4, h_kv=4, n=16384, d=64, n_global="one", padding=True, strided=True, seed=14)
    _compare(case, torch.bfloat16, Segments(segment_size), oracle_backend="fallback")


@pytest.mark.gpu
@GPU
def test_gpu_16k_ragged_fp16_against_fallback():
    case = Case(b=2, h=2, h_kv=1, n=16384, d=128, n_global="many", padding=True, seed=15)
    _compare(case, torch.float16, Segments(), ragged=True, oracle_backend="fallback")


@pytest.mark.gpu
@GPU
def test_gpu_gradcheck_fp64_on_cuda():
    """The compiled kernels in fp64 (dispatch keeps fp64 on CUDA off Triton; call the impl directly)."""
    inputs = make_inputs(Case(b=1, h=2, h_kv=1, n=70, d=16, n_global="many", padding=True), torch.float64, "cuda")
    ids = ragged_ids(1, 70, 16, max_len=9)

    def f(q, k, v):
        return SEGMENT.segment_attention(q, k, v, Segments(), segment_ids=ids,
                                         key_padding_mask=inputs["key_padding_mask"],
                                         global_mask=inputs["global_mask"])[0]
    torch.autograd.gradcheck(f, (inputs["q"], inputs["k"], inputs["v"]), fast_mode=True)


@pytest.mark.gpu
@GPU
def test_gpu_torch_compile_model():
    torch.manual_seed(17)
    proj = torch.nn.Linear(64, 3 * 64, device="cuda", dtype=torch.bfloat16)

    def model(x):
        b, n, _ = x.shape
        q, k, v = proj(x).view(b, n, 3, 1, 64).permute(2, 0, 3, 1, 4)  # strided [B, H, N, D] views
        return lhattn.segment_attention(q, k, v, segment_size=128, backend="triton").sum(1)

    x = torch.randn(2, 2048, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = torch.compile(model, fullgraph=True)(x)
    (gx,) = torch.autograd.grad(out.float().square().sum(), x)
    ref = model(x)
    (rx,) = torch.autograd.grad(ref.float().square().sum(), x)
    assert max_err(out, ref) <= 1e-2 and max_err(gx, rx) <= 5e-2 * rx.abs().max().item()
