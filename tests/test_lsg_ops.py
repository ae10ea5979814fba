"""torch.ops.lhattn.lsg_norm_select, the fused LSG ``norm`` selection (scores + top-k + gather):
exact agreement with the plain-torch selection (lhattn.selection, impl="torch") and with a
brute-force loop over the documented rule, ties / padding / NaN, opcheck, fp64 gradcheck, bad
input, and CUDA against CPU (the nvcc compile check of csrc/cuda/lsg_select.cu is test_ops.py's)."""

import pytest
import torch

from lhattn import _lsg_ops, selection
from lhattn.patterns import LSG

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPES = [
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float64, id="fp64"),
]
LAYOUTS = ["contiguous", "transposed", "strided_d"]

# B, H, T, D, Dv, chunk, keep, extra chunks (num_chunks - ceil(T / chunk))
SHAPES = [
    pytest.param(2, 3, 37, 16, 16, 8, 4, 0, id="B2-H3-T37-D16-c8-k4"),
    pytest.param(1, 2, 64, 24, 8, 16, 4, 1, id="B1-H2-T64-D24-Dv8-c16-k4-extra1"),
    pytest.param(2, 1, 5, 40, 40, 8, 2, 0, id="B2-H1-T5-D40-c8-k2-short"),
    pytest.param(1, 2, 70, 33, 33, 32, 32, 0, id="B1-H2-T70-D33-c32-k32-keep-all"),
    pytest.param(1, 1, 9, 3, 5, 1, 1, 2, id="B1-H1-T9-D3-Dv5-c1-k1"),
]


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- helpers ------------------------------------------------------------------------------------


def _rows(shape, dtype, layout, device="cpu", seed=0, ties=False):
    """Random rows [B, H, T, D] (never zeros) in the given memory layout.  ties=True: small
    integers, so that many positions have exactly the same score, plus duplicated and negated rows."""
    g = torch.Generator().manual_seed(seed)
    b, h, t, d = shape
    if ties:
        base = torch.randint(-2, 3, (b, t, h, d), generator=g).double()
        if t > 6:
            base[:, 4] = base[:, 1]  # a duplicate
            base[:, 6] = -base[:, 2]  # a negated row: same score
    else:
        base = torch.randn(b, t, h, d, generator=g, dtype=torch.float64)
    if layout == "contiguous":
        x = base.transpose(1, 2).contiguous()
    elif layout == "transposed":  # [B, T, H, D] storage, as after a head split
        x = base.transpose(1, 2)
    elif layout == "strided_d":  # every other element of D: no unit stride
        x = torch.repeat_interleave(base, 2, dim=-1).transpose(1, 2)[..., ::2]
    else:
        raise AssertionError(layout)
    out = torch.empty_strided(x.size(), x.stride(), dtype=dtype, device=device)
    return out.copy_(x)


def _positions(b, h, t, dv, dtype):
    """v whose row p holds p + 1 in every column (exact in every dtype for p < 256): the gathered
    rows name the positions that were selected."""
    pos = torch.arange(1, t + 1, dtype=torch.float64)[None, None, :, None]
    return pos.expand(b, h, t, dv).to(dtype).contiguous()


def _mask(b, t, seed=0):
    """[B, T] bool: row 0 a few scattered masked positions, row 1 end padding (last row: none)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, t, dtype=torch.bool)
    mask[0] = torch.rand(t, generator=g) < 0.3
    if b > 1:
        mask[1, t - t // 3:] = True
    return mask


def _brute_force_index(k, mask, chunk, keep, num_chunks):
    """The documented rule, one (b, h, chunk) at a time with Python's sort: score descending,
    NaN first, position ascending; the best `keep`, listed in ascending score."""
    score = selection._norm_score(k)  # [B, H, T]; the exact score (its bits are tested below)
    b_, h_, t = score.shape
    out = torch.full((b_, h_, num_chunks * keep), -1, dtype=torch.int64)
    for b in range(b_):
        for h in range(h_):
            for c in range(num_chunks):
                cand = []
                for p in range(c * chunk, (c + 1) * chunk):
                    s = -1.0 if p >= t or (mask is not None and bool(mask[b, p])) else float(score[b, h, p])
                    cand.append((0 if s != s else 1, -s if s == s else 0.0, p))  # NaN first, then -s, then p
                best = [p for _, _, p in sorted(cand)[:keep]]
                out[b, h, c * keep:(c + 1) * keep] = torch.tensor([p if p < t else -1 for p in reversed(best)])
    return out


def _gather(x, index):
    rows = torch.gather(x, 2, index.clamp(min=0)[..., None].expand(-1, -1, -1, x.shape[-1]))
    return rows.masked_fill((index < 0)[..., None], 0)


# ---- values -------------------------------------------------------------------------------------


@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("B, H, T, D, Dv, chunk, keep, extra", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_op_matches_brute_force(dtype, B, H, T, D, Dv, chunk, keep, extra, layout, ties):
    k = _rows((B, H, T, D), dtype, layout, ties=ties)
    v = _rows((B, H, T, Dv), dtype, layout, seed=1)
    mask = _mask(B, T)
    num_chunks = -(-T // chunk) + extra
    k_sel, v_sel, index = _lsg_ops.lsg_norm_select(k, v, mask, chunk=chunk, keep=keep, num_chunks=num_chunks)
    m = num_chunks * keep
    assert k_sel.shape == (B, H, m, D) and v_sel.shape == (B, H, m, Dv) and index.shape == (B, H, m)
    assert k_sel.dtype == v_sel.dtype == dtype and index.dtype == torch.int64
    assert k_sel.is_contiguous() and v_sel.is_contiguous() and index.is_contiguous()
    expected = _brute_force_index(k, mask, chunk, keep, num_chunks)
    assert torch.equal(index, expected), f"index differs at {(index != expected).nonzero()[:5].tolist()}"
    assert torch.equal(k_sel, _gather(k, index)) and torch.equal(v_sel, _gather(v, index))


def test_score_is_the_left_to_right_sum():
    """The torch path's score: 0 + k0² + k1² + ... in fp32, one rounding per step."""
    g = torch.Generator().manual_seed(3)
    k = torch.randn(1, 1, 8, 37, generator=g) * torch.logspace(-3, 3, 37)  # wide range: rounding matters
    score = selection._norm_score(k)
    for p in range(8):
        s = torch.zeros((), dtype=torch.float32)
        for x in k[0, 0, p]:
            s = s + x * x
        assert torch.equal(score[0, 0, p], s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_op_sums_left_to_right(dtype):
    """Row 1 = [e, e, 1] with e² = 2^-24 (half an fp32 ulp of 1): left to right its score is
    (e² + e²) + 1 = 1 + 2^-23 > 1, the score of row 0 = [1, 0, 0]; adding the 1 first would give
    exactly 1, a tie that row 0 (the lower position) wins.  So the op must pick row 1."""
    e = 2.0 ** -12
    k = torch.tensor([[1.0, 0.0, 0.0], [e, e, 1.0]], dtype=dtype)[None, None]
    _, _, index = _lsg_ops.lsg_norm_select(k, k, None, chunk=2, keep=1)
    assert index.tolist() == [[[1]]]
    score = selection._norm_score(k)[0, 0]
    assert score[1] > score[0]


def test_op_with_nan_and_inf_keys():
    k = torch.randn(1, 1, 12, 4)
    k[0, 0, 2, 1] = float("nan")
    k[0, 0, 7, 0] = float("nan")
    k[0, 0, 5, 3] = float("inf")
    v = _positions(1, 1, 12, 2, torch.float32)
    _, _, index = _lsg_ops.lsg_norm_select(k, v, None, chunk=12, keep=4)
    second = selection._norm_score(k)[0, 0].masked_fill(torch.tensor([p in (2, 5, 7) for p in range(12)]), -1)
    # NaN first (position 2 before 7), then inf, then the largest finite score; listed reversed
    assert index[0, 0].tolist() == [int(second.argmax()), 5, 7, 2]


def test_op_when_every_position_is_masked():
    k = torch.randn(2, 2, 10, 4)
    mask = torch.ones(2, 10, dtype=torch.bool)
    _, _, index = _lsg_ops.lsg_norm_select(k, k, mask, chunk=4, keep=2, num_chunks=3)
    # every score is -1: ranks by position, listed reversed; positions >= 10 are -1
    assert index[0, 0].tolist() == [1, 0, 5, 4, 9, 8]
    k0 = torch.randn(2, 2, 0, 4)
    k_sel, _, index = _lsg_ops.lsg_norm_select(k0, k0, None, chunk=4, keep=2, num_chunks=2)
    assert (index == -1).all() and (k_sel == 0).all() and k_sel.shape == (2, 2, 4, 4)


def test_op_splits_work_over_threads():
    """Large enough for at::parallel_for to split the (b, h, chunk) tasks: same result."""
    k = _rows((2, 4, 1000, 32), torch.float32, "transposed", seed=4)
    mask = _mask(2, 1000)
    one = _lsg_ops.lsg_norm_select(k, k, mask, chunk=64, keep=16)
    torch.set_num_threads(2)
    two = _lsg_ops.lsg_norm_select(k, k, mask, chunk=64, keep=16)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


# ---- the routing in lhattn.selection ------------------------------------------------------------

# LSG configurations whose norm chunk c = min(b, sb) takes every branch: sb = b, sb < b, sb > b,
# inline / prepended globals, GQA (H_kv < H: selection per kv head).
PATTERNS = [
    pytest.param(dict(block_size=8, sparsity_factor=2, num_global_tokens=1), 2, id="b8-f2-g1"),
    pytest.param(dict(block_size=8, sparse_block_size=4, sparsity_factor=2, num_global_tokens=2,
                      global_layout="prepended"), 1, id="b8-sb4-f2-g2-prepended-mqa"),
    pytest.param(dict(block_size=16, sparse_block_size=32, sparsity_factor=4, num_global_tokens=3), 2,
                 id="b16-sb32-f4-g3"),
    pytest.param(dict(block_size=4, sparsity_factor=4, num_global_tokens=0, sparse_geometry="regular"), 2,
                 id="b4-f4-g0"),  # (attention_layers' own windows fail for b / f = 1 with f even)
]


@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("n", [29, 64, 83])
@pytest.mark.parametrize("spec, h_kv", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_select_sparse_ops_equals_torch(dtype, spec, h_kv, n, ties):
    """impl="ops" (the fused op) and impl="torch" (the oracle's chain of torch ops): the same bits."""
    pattern = LSG(sparsity_type="norm", **spec)
    k = _rows((2, h_kv, n, 16), dtype, "transposed", seed=n, ties=ties)
    v = _rows((2, h_kv, n, 16), dtype, "strided_d", seed=n + 1)
    q = torch.randn(2, 2, n, 16).to(dtype)
    kpm = _mask(2, n, seed=n)
    want = selection.select_sparse(q, k, v, pattern, key_padding_mask=kpm, impl="torch")
    got = selection.select_sparse(q, k, v, pattern, key_padding_mask=kpm, impl="ops")
    assert torch.equal(got.k, want.k) and torch.equal(got.v, want.v) and torch.equal(got.valid, want.valid)
    # and the positions themselves, through v = position + 1
    pos_v = _positions(2, h_kv, n, 1, torch.float64)
    want_pos = selection.select_sparse(q.double(), k.double(), pos_v, pattern, key_padding_mask=kpm, impl="torch")
    got_pos = selection.select_sparse(q.double(), k.double(), pos_v, pattern, key_padding_mask=kpm, impl="ops")
    assert torch.equal(got_pos.v, want_pos.v)


def test_select_sparse_routes_norm_through_the_fused_op(monkeypatch):
    calls = []
    real = _lsg_ops.lsg_norm_select

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(_lsg_ops, "lsg_norm_select", spy)
    q = k = v = torch.randn(1, 2, 40, 8)
    selection.select_sparse(q, k, v, LSG(block_size=8, sparsity_factor=4), impl="ops")
    assert calls == [dict(chunk=8, keep=2, num_chunks=5)]
    selection.select_sparse(q, k, v, LSG(block_size=8, sparsity_factor=4), impl="torch")
    assert len(calls) == 1, "the oracle's path must not use the extension"
    # chunks above the op's limit stay on the torch chain (same rule, same result)
    assert selection._FUSED_MAX_CHUNK == _lsg_ops.MAX_CHUNK
    k = torch.randn(1, 1, 4200, 4)
    sp = selection.select_sparse(k, k, k, LSG(block_size=2048, sparsity_factor=1024), impl="ops")
    assert len(calls) == 1 and sp.k.shape == (1, 1, 6, 4)


def test_select_sparse_gradients_ops_equal_torch():
    pattern = LSG(block_size=4, sparsity_factor=2, num_global_tokens=1)
    k0 = torch.randn(2, 2, 19, 8, dtype=torch.float64)
    v0 = torch.randn(2, 2, 19, 8, dtype=torch.float64)
    kpm = _mask(2, 19)
    grads = []
    for impl in ("torch", "ops"):
        k, v = k0.clone().requires_grad_(), v0.clone().requires_grad_()
        sp = selection.select_sparse(k, k, v, pattern, key_padding_mask=kpm, impl=impl)
        w = torch.linspace(-1, 1, sp.k.numel(), dtype=torch.float64).view_as(sp.k)
        ((sp.k * w).sum() + (sp.v * w.flip(-1)).sum()).backward()
        grads.append((k.grad, v.grad))
    torch.testing.assert_close(grads[0], grads[1], atol=0, rtol=0)


# ---- torch.library registration, autograd -------------------------------------------------------


@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no-mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck_cpu(dtype, with_mask):
    k = _rows((2, 3, 13, 8), dtype, "transposed").requires_grad_()
    v = _rows((2, 3, 13, 6), dtype, "contiguous", seed=2).requires_grad_()
    mask = _mask(2, 13) if with_mask else None
    torch.library.opcheck(torch.ops.lhattn.lsg_norm_select, (k, v, mask, 4, 2, 5))


def test_gradcheck_fp64():
    """Well-separated random norms, so that the finite differences never change the selection."""
    k = _rows((2, 2, 11, 4), torch.float64, "strided_d", seed=7).requires_grad_()
    v = _rows((2, 2, 11, 3), torch.float64, "transposed", seed=8).requires_grad_()
    mask = _mask(2, 11)

    def f(k, v):
        k_sel, v_sel, _ = _lsg_ops.lsg_norm_select(k, v, mask, chunk=4, keep=2, num_chunks=4)
        return k_sel, v_sel

    assert torch.autograd.gradcheck(f, (k, v))
    assert torch.autograd.gradgradcheck(f, (k, v))


def test_backward_is_scatter_over_index():
    k = torch.randn(1, 2, 10, 4, requires_grad=True)
    v = torch.randn(1, 2, 10, 4, requires_grad=True)
    k_sel, v_sel, index = _lsg_ops.lsg_norm_select(k, v, None, chunk=4, keep=3)
    assert not index.requires_grad
    (k_sel.sum() + 2 * v_sel.sum()).backward()
    hit = torch.zeros(1, 2, 10).scatter_add_(2, index.clamp(min=0), (index >= 0).float())
    torch.testing.assert_close(k.grad, hit[..., None].expand(-1, -1, -1, 4))
    torch.testing.assert_close(v.grad, 2 * hit[..., None].expand(-1, -1, -1, 4))


# ---- bad input ----------------------------------------------------------------------------------

_K = torch.randn(2, 3, 10, 4)
_M = torch.zeros(2, 10, dtype=torch.bool)


def _call(k=_K, v=_K, mask=_M, **kw):
    kw = {"chunk": 4, "keep": 2, **kw}
    return lambda: _lsg_ops.lsg_norm_select(k, v, mask, **kw)


@pytest.mark.parametrize("call, error, match", [
    pytest.param(_call(k=_K[0]), ValueError, r"k must be 4-D", id="k-rank"),
    pytest.param(_call(k=_K.tolist()), TypeError, r"k must be a torch.Tensor", id="k-list"),
    pytest.param(_call(k=_K.int(), v=_K.int()), TypeError, r"k.dtype", id="k-int"),
    pytest.param(_call(v=_K.double()), TypeError, r"v.dtype must equal k.dtype", id="v-dtype"),
    pytest.param(_call(v=_K[:, :, :9]), ValueError, r"v must be \[B, H, T, Dv\]", id="v-T"),
    pytest.param(_call(mask=_M.int()), TypeError, r"key_padding_mask must be bool", id="mask-int"),
    pytest.param(_call(mask=_M[:, :9]), ValueError, r"key_padding_mask must be \[B, T\]", id="mask-shape"),
    pytest.param(_call(chunk=0), ValueError, r"chunk must be in \[1, 1024\]", id="chunk-0"),
    pytest.param(_call(chunk=2048), ValueError, r"chunk must be in \[1, 1024\]", id="chunk-big"),
    pytest.param(_call(chunk=4.0), TypeError, r"chunk must be an int", id="chunk-float"),
    pytest.param(_call(keep=5), ValueError, r"keep must be in \[1, 4\]", id="keep-above-chunk"),
    pytest.param(_call(keep=0), ValueError, r"keep must be in \[1, 4\]", id="keep-0"),
    pytest.param(_call(num_chunks=2), ValueError, r"num_chunks must be >= 3", id="num-chunks-short"),
])
def test_bad_input_raises(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_raw_op_checks_in_cpp():
    op = torch.ops.lhattn.lsg_norm_select
    with pytest.raises(RuntimeError, match=r"k must be 4-D"):
        op(_K[0], _K[0], None, 4, 2, 3)
    with pytest.raises(RuntimeError, match=r"keep must be in \[1, chunk = 4\]"):
        op(_K, _K, None, 4, 5, 3)
    with pytest.raises(RuntimeError, match=r"num_chunks \* chunk must cover T = 10"):
        op(_K, _K, None, 4, 2, 2)
    with pytest.raises(RuntimeError, match=r"key_padding_mask must be bool"):
        op(_K, _K, _M.float(), 4, 2, 3)


# ---- CUDA ---------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("B, H, T, D, Dv, chunk, keep, extra", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu(dtype, B, H, T, D, Dv, chunk, keep, extra, layout, ties):
    k = _rows((B, H, T, D), dtype, layout, ties=ties)
    v = _rows((B, H, T, Dv), dtype, layout, seed=1)
    mask = _mask(B, T)
    num_chunks = -(-T // chunk) + extra
    want = _lsg_ops.lsg_norm_select(k, v, mask, chunk=chunk, keep=keep, num_chunks=num_chunks)
    got = _lsg_ops.lsg_norm_select(_rows((B, H, T, D), dtype, layout, "cuda", ties=ties),
                                   _rows((B, H, T, Dv), dtype, layout, "cuda", seed=1), mask.cuda(),
                                   chunk=chunk, keep=keep, num_chunks=num_chunks)
    for name, a, b in zip(("k_sel", "v_sel", "index"), got, want):
        assert torch.equal(a.cpu(), b), f"{name}: CUDA differs from CPU"


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_large_chunks_match_cpu(dtype):
    """chunk = 1024 (the limit), many chunks, D = 128, and a sparse selection through select_sparse."""
    k = _rows((2, 4, 5000, 128), dtype, "transposed", seed=9)
    mask = _mask(2, 5000)
    want = _lsg_ops.lsg_norm_select(k, k, mask, chunk=1024, keep=256)
    got = _lsg_ops.lsg_norm_select(k.cuda(), k.cuda(), mask.cuda(), chunk=1024, keep=256)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want))
    pattern = LSG(block_size=64, sparsity_factor=4)
    q = torch.randn(2, 4, 5000, 128, device="cuda").to(dtype)
    want = selection.select_sparse(q, k.cuda(), k.cuda(), pattern, key_padding_mask=mask.cuda(), impl="torch")
    got = selection.select_sparse(q, k.cuda(), k.cuda(), pattern, key_padding_mask=mask.cuda(), impl="ops")
    assert torch.equal(got.k, want.k) and torch.equal(got.valid, want.valid)


@requires_cuda
def test_opcheck_and_gradcheck_cuda():
    k = torch.randn(2, 3, 13, 8, device="cuda", requires_grad=True)
    v = torch.randn(2, 3, 13, 6, device="cuda", requires_grad=True)
    mask = _mask(2, 13).cuda()
    torch.library.opcheck(torch.ops.lhattn.lsg_norm_select, (k, v, mask, 4, 2, 5))
    k64 = torch.randn(2, 2, 11, 4, dtype=torch.float64, device="cuda", requires_grad=True)
    v64 = torch.randn(2, 2, 11, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda k, v: _lsg_ops.lsg_norm_select(k, v, mask[:, :11], chunk=4, keep=2)[:2], (k64, v64))
