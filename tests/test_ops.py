"""torch.ops.lhattn.gather_rows / scatter_add_rows: values, autograd, fake kernels, bad input,
and an nvcc compile check of every csrc/cuda/*.cu (which needs nvcc, not a GPU)."""

import glob
import os
import shutil
import subprocess

import pytest
import torch

from lhattn import _ops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPES = [
    # dtype, atol, rtol (for scatter: the sum is rounded to the dtype once; gather is exact)
    pytest.param(torch.float16, 1e-3, 1e-3, id="fp16"),
    pytest.param(torch.bfloat16, 1e-2, 1e-2, id="bf16"),
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.float64, 1e-12, 1e-12, id="fp64"),
]

SHAPES = [
    # B, H, N, M, D, Hi
    pytest.param(2, 3, 17, 9, 24, 1, id="B2-H3-N17-M9-D24-Hi1"),
    pytest.param(1, 4, 5, 12, 16, 4, id="B1-H4-N5-M12-D16-Hi4"),
    pytest.param(2, 2, 33, 7, 130, 2, id="B2-H2-N33-M7-D130-Hi2"),
    pytest.param(1, 1, 3, 4, 1, 1, id="B1-H1-N3-M4-D1-Hi1"),
]

LAYOUTS = ["contiguous", "transposed", "strided_d"]


# ---- helpers ------------------------------------------------------------------------------------


def _rows(B, H, N, D, dtype, layout, device="cpu", seed=0):
    """A random [B, H, N, D] tensor (never zeros) in the given memory layout."""
    g = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        t = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
    elif layout == "transposed":  # [B, N, H, D] storage, as after a head split
        t = torch.randn(B, N, H, D, generator=g, dtype=torch.float64).transpose(1, 2)
    elif layout == "strided_d":  # every other element of D, heads transposed: no unit stride
        t = torch.randn(B, N, H, 2 * D, generator=g, dtype=torch.float64).transpose(1, 2)[..., ::2]
    else:
        raise AssertionError(layout)
    return _keep_strides(t, dtype, device)


def _keep_strides(t, dtype, device):
    """t converted to dtype/device with its (non-contiguous) strides preserved."""
    base = torch.empty_strided(t.size(), t.stride(), dtype=dtype, device=device)
    base.copy_(t)
    return base


def _index(B, Hi, M, N, device="cpu", seed=1):
    """[B, Hi, M] int64 in [-1, N) with some -1 slots and (where M > 1) duplicates."""
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, max(N, 1), (B, Hi, M), generator=g)
    if M > 1:
        index[..., 0] = index[..., 1]  # a duplicate
    index[..., M // 2] = -1  # an empty slot
    if N == 0:
        index.fill_(-1)
    return index.to(device)


def _expected_gather(x, index):
    B, H, N, D = x.shape
    idx = index.expand(B, H, index.shape[2])
    out = torch.gather(x, 2, idx.clamp(min=0)[..., None].expand(-1, -1, -1, D))
    return out.masked_fill((idx < 0)[..., None], 0)


def _expected_scatter(src, index, n):
    """fp64 sum; negative indices go to a spare row n that is dropped."""
    B, H, M, D = src.shape
    idx = index.expand(B, H, M)
    idx = torch.where(idx >= 0, idx, torch.full_like(idx, n))
    out = torch.zeros(B, H, n + 1, D, dtype=torch.float64, device=src.device)
    out.scatter_add_(2, idx[..., None].expand(-1, -1, -1, D), src.double())
    return out[:, :, :n]


# ---- values -------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("B, H, N, M, D, Hi", SHAPES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_gather_rows_matches_indexing(dtype, atol, rtol, B, H, N, M, D, Hi, layout):
    x = _rows(B, H, N, D, dtype, layout)
    index = _index(B, Hi, M, N)
    out = _ops.gather_rows(x, index)
    assert out.shape == (B, H, M, D) and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out, _expected_gather(x, index), atol=0, rtol=0)  # a pure copy
    assert (out[:, :, M // 2] == 0).all(), "index -1 must give a zero row"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("B, H, N, M, D, Hi", SHAPES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_scatter_add_rows_matches_indexing(dtype, atol, rtol, B, H, N, M, D, Hi, layout):
    src = _rows(B, H, M, D, dtype, layout)
    index = _index(B, Hi, M, N)
    out = _ops.scatter_add_rows(src, index, N)
    assert out.shape == (B, H, N, D) and out.dtype == dtype and out.is_contiguous()
    expected = _expected_scatter(src, index, N)
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=rtol)


def test_scatter_add_rows_accepts_expanded_src():
    src = torch.randn(2, 1, 6, 8).expand(2, 3, 6, 8)  # stride 0 over heads, as autograd can give
    index = _index(2, 3, 6, 10)
    torch.testing.assert_close(
        _ops.scatter_add_rows(src, index, 10).double(), _expected_scatter(src, index, 10)
    )


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_ops_run_in_parallel_chunks(dtype, atol, rtol):
    """Big enough that at::parallel_for splits the work over threads."""
    B, H, N, M, D = 2, 4, 300, 2000, 32
    x = _rows(B, H, N, D, dtype, "transposed")
    index = _index(B, H, M, N)
    torch.testing.assert_close(_ops.gather_rows(x, index), _expected_gather(x, index), atol=0, rtol=0)
    src = _rows(B, H, M, D, dtype, "contiguous", seed=3)
    expected = _expected_scatter(src, index, N)
    # ~M/N ≈ 7 terms per row: allow the one rounding of the sum plus a little.
    torch.testing.assert_close(_ops.scatter_add_rows(src, index, N).double(), expected,
                               atol=4 * atol, rtol=4 * rtol)


def test_scatter_is_adjoint_of_gather():
    """<gather(x), y> == <x, scatter(y)> for random x, y."""
    x = _rows(2, 3, 11, 5, torch.float64, "transposed")
    index = _index(2, 1, 8, 11)
    y = torch.randn(2, 3, 8, 5, dtype=torch.float64)
    lhs = (_ops.gather_rows(x, index) * y).sum()
    rhs = (x * _ops.scatter_add_rows(y, index, 11)).sum()
    torch.testing.assert_close(lhs, rhs)


@pytest.mark.parametrize(
    "B, H, N, M, D",
    [
        pytest.param(2, 3, 4, 0, 8, id="M0"),
        pytest.param(2, 3, 0, 5, 8, id="N0-all-empty"),
        pytest.param(0, 3, 4, 5, 8, id="B0"),
        pytest.param(2, 3, 4, 5, 0, id="D0"),
    ],
)
def test_empty_shapes(B, H, N, M, D):
    x = torch.randn(B, H, N, D)
    index = _index(B, 1, M, N) if B * M else torch.zeros(B, 1, M, dtype=torch.int64)
    out = _ops.gather_rows(x, index)
    assert out.shape == (B, H, M, D)
    if N == 0:
        assert (out == 0).all(), "with N = 0 every slot is empty"
    back = _ops.scatter_add_rows(out, index, N)
    assert back.shape == (B, H, N, D)


# ---- torch.library registration, autograd, compile -------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("Hi", [1, 3], ids=["Hi1", "Hi3"])
def test_opcheck_cpu(dtype, Hi):
    x = _rows(2, 3, 9, 8, dtype, "transposed").requires_grad_()
    index = _index(2, Hi, 6, 9)
    torch.library.opcheck(torch.ops.lhattn.gather_rows, (x, index))
    src = _rows(2, 3, 6, 8, dtype, "contiguous").requires_grad_()
    torch.library.opcheck(torch.ops.lhattn.scatter_add_rows, (src, index, 9))


@pytest.mark.parametrize("Hi", [1, 3], ids=["Hi1", "Hi3"])
def test_gradcheck_fp64(Hi):
    x = _rows(2, 3, 6, 4, torch.float64, "strided_d").requires_grad_()
    index = _index(2, Hi, 7, 6)  # M > N: duplicates, plus a -1 slot
    torch.autograd.gradcheck(lambda t: _ops.gather_rows(t, index), (x,))
    torch.autograd.gradgradcheck(lambda t: _ops.gather_rows(t, index), (x,))
    src = _rows(2, 3, 7, 4, torch.float64, "transposed").requires_grad_()
    torch.autograd.gradcheck(lambda t: _ops.scatter_add_rows(t, index, 6), (src,))
    torch.autograd.gradgradcheck(lambda t: _ops.scatter_add_rows(t, index, 6), (src,))


def test_torch_compile_fullgraph():
    def f(x, index):
        rows = _ops.gather_rows(x, index)
        return _ops.scatter_add_rows(rows * 2, index, x.shape[2])

    x = torch.randn(2, 3, 9, 8, requires_grad=True)
    index = _index(2, 1, 5, 9)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, index)
    torch.testing.assert_close(out, f(x, index))
    (grad,) = torch.autograd.grad(out.sum(), x)
    (grad_eager,) = torch.autograd.grad(f(x, index).sum(), x)
    torch.testing.assert_close(grad, grad_eager)


# ---- bad input ----------------------------------------------------------------------------------

_X = torch.randn(2, 3, 5, 4)
_I = torch.zeros(2, 1, 6, dtype=torch.int64)
_S = torch.randn(2, 3, 6, 4)


@pytest.mark.parametrize(
    "call, error, match",
    [
        pytest.param(lambda: _ops.gather_rows(_X[0], _I), ValueError, r"x must be 4-D", id="gather-x-rank"),
        pytest.param(lambda: _ops.gather_rows(_X.int(), _I), TypeError, r"x.dtype", id="gather-x-int"),
        pytest.param(lambda: _ops.gather_rows(_X, _I.float()), TypeError, r"index.dtype must be torch.int64", id="gather-index-float"),
        pytest.param(lambda: _ops.gather_rows(_X, _I.int()), TypeError, r"index.dtype", id="gather-index-int32"),
        pytest.param(lambda: _ops.gather_rows(_X, _I[0]), ValueError, r"index must be 3-D", id="gather-index-rank"),
        pytest.param(lambda: _ops.gather_rows(_X, _I[:1]), ValueError, r"index.shape\[0\] \(B\)", id="gather-B-mismatch"),
        pytest.param(lambda: _ops.gather_rows(_X, _I.expand(2, 2, 6)), ValueError, r"\(Hi\) must be 1", id="gather-Hi-2-of-3"),
        pytest.param(lambda: _ops.gather_rows(_X.tolist(), _I), TypeError, r"x must be a torch.Tensor", id="gather-x-list"),
        pytest.param(lambda: _ops.scatter_add_rows(_S[:, :, :5], _I, 5), ValueError, r"index.shape\[2\] \(M\)", id="scatter-M-mismatch"),
        pytest.param(lambda: _ops.scatter_add_rows(_S, _I.float(), 5), TypeError, r"index.dtype", id="scatter-index-float"),
        pytest.param(lambda: _ops.scatter_add_rows(_S, _I, -1), ValueError, r"n \(number of output rows\)", id="scatter-n-negative"),
        pytest.param(lambda: _ops.scatter_add_rows(_S, _I, 5.0), TypeError, r"n must be an int", id="scatter-n-float"),
        pytest.param(lambda: _ops.scatter_add_rows(_S[..., 0], _I, 5), ValueError, r"src must be 4-D", id="scatter-src-rank"),
    ],
)
def test_bad_input_raises(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_index_out_of_range_raises_on_cpu():
    index = _I.clone()
    index[1, 0, 3] = 5  # N = 5
    with pytest.raises((IndexError, RuntimeError), match=r"index\[1, 0, 3\] = 5 is out of range"):
        _ops.gather_rows(_X, index)
    with pytest.raises((IndexError, RuntimeError), match=r"out of range for n = 5"):
        _ops.scatter_add_rows(_S, index, 5)


def test_raw_op_checks_in_cpp():
    with pytest.raises(RuntimeError, match=r"x must be 4-D"):
        torch.ops.lhattn.gather_rows(_X[0], _I)
    with pytest.raises(RuntimeError, match=r"index must be int64"):
        torch.ops.lhattn.scatter_add_rows(_S, _I.int(), 5)
    with pytest.raises(RuntimeError, match=r"\(Hi\) must be 1 or"):
        torch.ops.lhattn.gather_rows(_X, _I.expand(2, 2, 6))


# ---- CUDA ---------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("B, H, N, M, D, Hi", SHAPES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_cuda_matches_cpu(dtype, atol, rtol, B, H, N, M, D, Hi, layout):
    x = _rows(B, H, N, D, dtype, layout)
    index = _index(B, Hi, M, N)
    out = _ops.gather_rows(_keep_strides(x, dtype, "cuda"), index.cuda())
    torch.testing.assert_close(out.cpu(), _ops.gather_rows(x, index), atol=0, rtol=0)
    src = _rows(B, H, M, D, dtype, layout, seed=5)
    out = _ops.scatter_add_rows(_keep_strides(src, dtype, "cuda"), index.cuda(), N)
    # CUDA adds in the dtype with atomics, CPU in fp32: compare both with the fp64 sum.
    expected = _expected_scatter(src, index, N)
    torch.testing.assert_close(out.cpu().double(), expected, atol=4 * atol, rtol=4 * rtol)


@requires_cuda
def test_cuda_large_scatter_with_many_duplicates():
    B, H, N, M, D = 2, 8, 64, 4096, 128
    src = torch.randn(B, H, M, D, device="cuda")
    index = torch.randint(-1, N, (B, 1, M), device="cuda")
    torch.testing.assert_close(
        _ops.scatter_add_rows(src, index, N).double(), _expected_scatter(src, index, N),
        atol=1e-3, rtol=1e-4,
    )


@requires_cuda
def test_cuda_out_of_range_index_is_empty_slot():
    x = torch.randn(1, 2, 5, 8, device="cuda")
    index = torch.tensor([[[0, 5, 100, -1]]], device="cuda")
    out = _ops.gather_rows(x, index)
    torch.testing.assert_close(out[:, :, 0], x[:, :, 0])
    assert (out[:, :, 1:] == 0).all()
    back = _ops.scatter_add_rows(out, index, 5)
    torch.testing.assert_close(back[:, :, 0], x[:, :, 0])
    assert (back[:, :, 1:] == 0).all()


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck_cuda(dtype):
    x = _keep_strides(_rows(2, 3, 9, 8, dtype, "transposed"), dtype, "cuda").requires_grad_()
    index = _index(2, 1, 6, 9, device="cuda")
    torch.library.opcheck(torch.ops.lhattn.gather_rows, (x, index))
    src = torch.randn(2, 3, 6, 8, device="cuda", dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.lhattn.scatter_add_rows, (src, index, 9))


@requires_cuda
def test_gradcheck_cuda_fp64():
    x = torch.randn(2, 3, 6, 4, dtype=torch.float64, device="cuda", requires_grad=True)
    index = _index(2, 3, 7, 6, device="cuda")
    torch.autograd.gradcheck(lambda t: _ops.gather_rows(t, index), (x,))
    torch.autograd.gradgradcheck(lambda t: _ops.gather_rows(t, index), (x,))
    src = torch.randn(2, 3, 7, 4, dtype=torch.float64, device="cuda", requires_grad=True)
    torch.autograd.gradcheck(lambda t: _ops.scatter_add_rows(t, index, 6), (src,))


# ---- nvcc compile check (no GPU, no CUDA torch needed) -------------------------------------------

CU_FILES = sorted(glob.glob(os.path.join(REPO, "csrc", "cuda", "*.cu")))
# torch's default nvcc flags, so the .cu files compile as they will in the real build.
TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("cu_file", CU_FILES, ids=[os.path.basename(f) for f in CU_FILES])
def test_nvcc_compiles(cu_file, tmp_path):
    cmd = [
        "nvcc", "-c", cu_file, "-o", str(tmp_path / "x.o"),
        "-std=c++17", "-O1", "-DWITH_CUDA",
        "-I", os.path.join(REPO, "csrc"), "-I", os.path.join(REPO, "csrc", "cuda"),
        "-gencode", "arch=compute_80,code=sm_80",
        "-gencode", "arch=compute_90,code=sm_90",
        *TORCH_NVCC_FLAGS,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (
        f"nvcc failed on {os.path.relpath(cu_file, REPO)}:\n{' '.join(cmd)}\n"
        f"{result.stdout}\n{result.stderr}"
    )
