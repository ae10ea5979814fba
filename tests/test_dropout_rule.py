"""The attention-dropout rule itself (lhattn._dropout): torch and Triton compute the same bits."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lhattn import _dropout as D


def _mix32_int(x: int) -> int:
    """The finaliser on Python ints: the definition the tensor versions must match."""
    x ^= x >> 16
    x = (x * D.MIX_MUL1) & D.MASK32
    x ^= x >> 15
    x = (x * D.MIX_MUL2) & D.MASK32
    return x ^ (x >> 16)


def test_mix32_matches_python_ints():
    gen = torch.Generator().manual_seed(0)
    xs = torch.randint(0, 2 ** 32, (4096,), generator=gen, dtype=torch.int64)
    xs[:4] = torch.tensor([0, 1, 2 ** 31, 2 ** 32 - 1])
    got = D.mix32(xs)
    want = torch.tensor([_mix32_int(int(x)) for x in xs], dtype=torch.int64)
    assert torch.equal(got, want)
    assert int(got.min()) >= 0 and int(got.max()) < 2 ** 32


def test_keep_mask_follows_the_documented_formula():
    state = D.make_state(0.3, 12345, "cpu")
    b, h, n = 2, 3, 9
    mask = D.keep_mask(state, b, h, torch.arange(n), torch.arange(n + 4))
    t = D.threshold(0.3)
    for bi in range(b):
        for hi in range(h):
            k = _mix32_int(_mix32_int(bi * h + hi) ^ 12345)
            for i in range(n):
                r = _mix32_int(k ^ i)
                for c in range(n + 4):
                    assert bool(mask[bi, hi, i, c]) == (_mix32_int(r ^ c) >= t)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_and_independence(p):
    state = D.make_state(p, 7, "cpu")
    mask = D.keep_mask(state, 2, 4, torch.arange(256), torch.arange(256)).double()
    n = mask.numel()
    rate = mask.mean().item()
    assert abs(rate - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    # neighbouring rows, columns and heads are not copies of each other
    for a, b_ in ((mask[:, :, 1:], mask[:, :, :-1]), (mask[..., 1:], mask[..., :-1]), (mask[:, 1:], mask[:, :-1])):
        agree = (a == b_).double().mean().item()
        assert abs(agree - (p * p + (1 - p) * (1 - p))) < 0.02


def test_seed_changes_the_mask_and_is_reproducible():
    m1 = D.keep_mask(D.make_state(0.5, 1, "cpu"), 1, 2, torch.arange(64), torch.arange(64))
    m1b = D.keep_mask(D.make_state(0.5, 1, "cpu"), 1, 2, torch.arange(64), torch.arange(64))
    m2 = D.keep_mask(D.make_state(0.5, 2, "cpu"), 1, 2, torch.arange(64), torch.arange(64))
    assert torch.equal(m1, m1b) and not torch.equal(m1, m2)
    torch.manual_seed(3)
    s1 = D.make_state(0.5, None, "cpu")
    torch.manual_seed(3)
    s2 = D.make_state(0.5, None, "cpu")
    assert torch.equal(s1, s2)
    big = D.make_state(0.5, torch.tensor([2 ** 40 + 5]), "cpu")  # tensors are reduced modulo 2**32
    assert int(big[0]) == 5
    assert D.make_state(0.0, 3, "cpu") is None


@pytest.mark.parametrize("p,seed,err", [
    (-0.1, None, ValueError), (1.0, None, ValueError), ("0.1", None, TypeError), (True, None, TypeError),
    (0.1, -1, ValueError), (0.1, 2 ** 32, ValueError), (0.1, 1.5, TypeError),
    (0.1, torch.tensor([1, 2]), ValueError), (0.1, torch.tensor([1.0]), ValueError),
])
def test_bad_dropout_arguments(p, seed, err):
    with pytest.raises(err, match="dropout"):
        D.check_dropout(p, seed)


# ---- Triton: the same bits ----------------------------------------------------------------------

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from lhattn.kernels._core import dropout_head_key, dropout_keep, dropout_load, dropout_row_keys  # noqa: E402


@triton.jit
def _keep_kernel(DROP, OUT, N: tl.constexpr, C: tl.constexpr):
    i_bh = tl.program_id(0)
    seed, thresh = dropout_load(DROP)
    o_i = tl.arange(0, N)
    o_c = tl.arange(0, C)
    keep = dropout_keep(dropout_row_keys(dropout_head_key(seed, i_bh), o_i), o_c, thresh)
    tl.store(OUT + i_bh * N * C + o_i[:, None] * C + o_c[None, :], keep.to(tl.int8))


def _triton_keep(state: torch.Tensor, b: int, h: int, n: int, cols: int) -> torch.Tensor:
    out = torch.empty(b * h, n, cols, dtype=torch.int8, device=state.device)
    _keep_kernel[(b * h,)](state, out, N=n, C=cols)
    return out.view(b, h, n, cols).bool()


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("p,seed", [(0.1, 0), (0.5, 2 ** 32 - 1), (0.37, 987654321)])
def test_triton_keep_bits_equal_torch(p, seed):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    state = D.make_state(p, seed, dev)
    got = _triton_keep(state, 2, 3, 16, 32)
    want = D.keep_mask(state, 2, 3, torch.arange(16, device=dev), torch.arange(32, device=dev))
    assert torch.equal(got, want)


_AOT_HASH = r"""
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lhattn.kernels._core import dropout_head_key, dropout_keep, dropout_load, dropout_row_keys

@triton.jit
def keep_kernel(DROP, OUT, N: tl.constexpr, C: tl.constexpr):
    i_bh = tl.program_id(0)
    seed, thresh = dropout_load(DROP)
    o_i = tl.arange(0, N)
    o_c = tl.arange(0, C)
    keep = dropout_keep(dropout_row_keys(dropout_head_key(seed, i_bh), o_i), o_c, thresh)
    tl.store(OUT + i_bh * N * C + o_i[:, None] * C + o_c[None, :], keep.to(tl.int8))

k = triton.compile(ASTSource(keep_kernel, {"DROP": "*i64", "OUT": "*i8", "N": "constexpr", "C": "constexpr"},
                             constexprs={"N": 16, "C": 32}), target=GPUTarget("cuda", 90, 32))
ir = k.asm["llir"]
print("ashr" in ir, "lshr" in ir, "icmp uge" in ir or "icmp ult" in ir)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the test above runs the compiled kernel")
def test_hash_compiles_to_unsigned_ops_for_cuda(tmp_path):
    """Without a GPU, the compiled hash is checked by its LLVM IR: logical (unsigned) shifts and
    an unsigned comparison, the operations that make it equal the interpreter's numpy uint32."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"this Triton has no ahead-of-time compile API ({exc})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "aot_hash.py"  # @triton.jit needs its source in a file
    script.write_text(_AOT_HASH)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(script)], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("no ptxas in this Triton install")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == ["False", "True", "True"], proc.stdout


# ---- the CPU op of the fallback: torch.ops.lhattn.dropout_keep -----------------------------------


@pytest.mark.parametrize("per_batch", [False, True])
def test_cpu_keep_op_equals_the_torch_rule(per_batch):
    from lhattn import _ops

    gen = torch.Generator().manual_seed(1)
    state = D.make_state(0.3, 4242, "cpu")
    r = D.row_keys(D.head_keys(state, 2, 3), torch.randint(0, 5000, (2, 17), generator=gen))  # [2, 3, 17]
    cols = torch.randint(-1, 9000, (2, 40) if per_batch else (40,), generator=gen)  # -1: a padding slot
    got = _ops.dropout_keep(r, cols, state)
    want = D.keep(r, cols, state)
    valid = (cols >= 0)[:, None, None, :] if per_batch else (cols >= 0)
    assert got.shape == want.shape == (2, 3, 17, 40)
    assert torch.equal(got & valid, want & valid)  # padding slots are masked by every caller


def test_cpu_keep_op_opcheck_and_errors():
    from lhattn import _ops  # noqa: F401  (registers the fake kernel)

    state = D.make_state(0.5, 1, "cpu")
    r = torch.randint(0, 2 ** 32, (2, 6), dtype=torch.int64)
    cols = torch.arange(10).view(1, 10)
    torch.library.opcheck(torch.ops.lhattn.dropout_keep.default, (r, cols, state))
    with pytest.raises(RuntimeError, match="cols.size"):
        torch.ops.lhattn.dropout_keep(r, torch.arange(30).view(3, 10), state)
    with pytest.raises(RuntimeError, match="state"):
        torch.ops.lhattn.dropout_keep(r, cols, state.to(torch.int32))
