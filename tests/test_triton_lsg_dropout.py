"""Attention dropout in the Triton LSG kernels against the oracle with the same seed.

The keep rule is :mod:`lhattn._dropout`'s (token keys: column = position; compressed key ``p``:
column ``N + p``), so ``backend="triton"`` and ``backend="reference"`` drop exactly the same
entries and are compared like the no-dropout tests of ``test_triton_lsg.py``: out, lse and every
gradient, relative to the oracle's own error in the input dtype.  Interpreter-sized shapes.
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
from lhattn.functional import register_triton_backend  # noqa: E402
from lhattn.patterns import LSG, SPARSITY_TYPES  # noqa: E402

from cases import Case, cast, make_inputs, run_with_grads  # noqa: E402
from tolerance import assert_close_to_oracle, max_err  # noqa: E402

KERNELS = pytest.importorskip("lhattn.kernels.lsg")
SW_KERNELS = pytest.importorskip("lhattn.kernels.sliding_window")
from lhattn.autograd import lsg as lsg_autograd  # noqa: E402

register_triton_backend(LSG, lsg_autograd.impl, lsg_autograd.reason)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


pytestmark = pytest.mark.usefixtures("one_thread")


def _lsg(backend, dropout_p, dropout_seed):
    def fn(q, k, v, key_padding_mask, global_mask, global_qkv, pattern):
        return lhattn.attention(q, k, v, pattern, key_padding_mask=key_padding_mask, dropout_p=dropout_p,
                                dropout_seed=dropout_seed, backend=backend, return_lse=True)
    return fn


def _compare(case, dtype, pattern, p, seed=1234):
    """Triton vs the oracle (fp64) with the same dropout seed, relative to the oracle's own error
    in ``dtype``; padding rows give exactly 0 / -inf and zero gradients, padding keys zero
    gradients."""
    inputs = make_inputs(case, torch.float64, DEVICE)
    oracle = run_with_grads(_lsg("reference", p, seed), inputs, pattern=pattern)
    ref_low = run_with_grads(_lsg("reference", p, seed), cast(inputs, dtype), pattern=pattern)
    got = run_with_grads(_lsg("triton", p, seed), cast(inputs, dtype), pattern=pattern)
    for name in oracle:
        assert got[name].dtype == ref_low[name].dtype, f"{name}: dtype {got[name].dtype} != {ref_low[name].dtype}"
        assert_close_to_oracle(f"{name} ({case.id}, {pattern}, p={p})", got[name], ref_low[name], oracle[name])
    kpm = inputs["key_padding_mask"]
    if kpm is not None:
        rows = kpm[:, None, :].expand(-1, case.h, -1)
        keys = kpm[:, None, :].expand(-1, case.h_kv, -1)
        assert torch.all(got["out"][rows] == 0) and torch.all(got["dq"][rows] == 0), "padding rows are not 0"
        assert torch.all(torch.isneginf(got["lse"][rows])), "padding rows' lse is not -inf"
        assert torch.all(got["dk"][keys] == 0) and torch.all(got["dv"][keys] == 0), "padding keys have gradients"


# --------------------------------------------------------------------------------------
# every sparsity type, causal and not, n > 2b
# --------------------------------------------------------------------------------------

# (input case, LSG fields, p): both layouts, 0 / 1 / many global tokens, GQA (H = 4, H_kv = 2:
# bos_pooling's compressed keys are per query head) and MQA, B = 2 (the row keys' b·H + h),
# padding, odd n, strided inputs.  (make_inputs pads the second batch row: padding needs B = 2.)
TYPE_CASES = {
    "none": (Case(b=1, h=2, h_kv=1, n=29, padding=True, seed=31),
             dict(block_size=8, num_global_tokens=0), 0.5),
    "norm": (Case(b=1, h=2, h_kv=1, n=33, strided=True, seed=32),
             dict(block_size=8, sparse_block_size=4, sparsity_factor=2, num_global_tokens=2,
                  global_layout="prepended"), 0.5),
    "pooling": (Case(b=2, h=1, h_kv=1, n=29, d=32, padding=True, seed=33),
                dict(block_size=8, sparsity_factor=4, num_global_tokens=1), 0.1),
    "stride": (Case(b=2, h=2, h_kv=1, n=29, padding=True, strided=True, seed=34),
               dict(block_size=8, sparse_block_size=12, sparsity_factor=2, num_global_tokens=3,
                    sparse_geometry="regular"), 0.5),
    "block_stride": (Case(b=1, h=2, h_kv=1, n=31, padding=True, seed=35),
                     dict(block_size=8, sparsity_factor=4, num_global_tokens=1, global_layout="prepended"), 0.1),
    "bos_pooling": (Case(b=1, h=4, h_kv=2, n=29, padding=True, seed=36),
                    dict(block_size=8, sparsity_factor=2, num_global_tokens=2, sparse_geometry="regular"), 0.5),
    "lsh": (Case(b=1, h=2, h_kv=1, n=33, padding=True, strided=True, seed=37),
            dict(block_size=8, sparsity_factor=2, num_global_tokens=1, global_layout="prepended", seed=3), 0.5),
}
assert set(TYPE_CASES) == set(SPARSITY_TYPES)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("sparsity_type", SPARSITY_TYPES)
def test_dropout_matches_oracle(sparsity_type, causal):
    case, spec, p = TYPE_CASES[sparsity_type]
    _compare(case, torch.float32, LSG(sparsity_type=sparsity_type, causal=causal, **spec), p)


OTHER_CASES = {
    # n <= 2b: full attention through the sliding-window dense path, inline and prepended
    "short": (Case(b=2, h=2, h_kv=1, n=13, padding=True, seed=38),
              LSG(block_size=8, sparsity_type="pooling", num_global_tokens=1), 0.5),
    "short-prepended-causal": (Case(b=1, h=4, h_kv=2, n=19, padding=True, seed=39),
                               LSG(block_size=8, sparsity_type="norm", num_global_tokens=3, causal=True,
                                   global_layout="prepended"), 0.1),
    # global rows beyond a block (inline), f = 1
    "f1-g10": (Case(b=1, h=2, h_kv=1, n=33, padding=True, seed=40),
               LSG(block_size=8, sparsity_factor=1, sparsity_type="stride", num_global_tokens=10,
                   sparse_geometry="regular"), 0.5),
    # more global keys than non-global rows: the global-key gradient in several calls
    "g-beyond-half": (Case(b=1, h=2, h_kv=1, n=8, padding=True, seed=41),
                      LSG(block_size=3, sparsity_factor=3, sparsity_type="pooling", num_global_tokens=6), 0.5),
}


@pytest.mark.parametrize("name", OTHER_CASES.keys())
def test_dropout_matches_oracle_other_cases(name):
    case, pattern, p = OTHER_CASES[name]
    _compare(case, torch.float32, pattern, p)


def test_dropout_matches_oracle_fp64():
    """B = 2 (a padded row), two query heads per k/v head (bos_pooling's per-query-head compressed
    keys; H = 4 runs in fp32 above), strided inputs."""
    _compare(Case(b=2, h=2, h_kv=1, n=29, padding=True, strided=True, seed=42), torch.float64,
             LSG(block_size=8, sparsity_factor=2, sparsity_type="bos_pooling", num_global_tokens=2,
                 sparse_geometry="regular"), 0.5)


def test_dropout_block_shapes(monkeypatch):
    """Tiles that are not LSG blocks (b = 20, tall forward / wide dq / dk-dv tiles): row keys of
    sub-tiles, compressed-key row tiles straddling blocks, split dense pass and global-key rows.  One
    head, like test_triton_lsg.py's block-shape test (GQA with dropout: the type sweep above)."""
    if not KERNELS.INTERPRET:
        pytest.skip("block sizes are autotuned on GPU")
    monkeypatch.setattr(KERNELS, "INTERPRET_BLOCKS", {"fwd": (32, 16), "dq": (16, 32), "dkdv": (32, 16)})
    monkeypatch.setattr(KERNELS, "INTERPRET_SPLIT_CHUNK", 7)  # the global rows' key chunks
    monkeypatch.setattr(SW_KERNELS, "INTERPRET_SPLIT_CHUNK", 7)
    _compare(Case(b=1, h=1, h_kv=1, n=45, padding=True, seed=43), torch.float64,
             LSG(block_size=20, sparse_block_size=10, sparsity_factor=4, sparsity_type="pooling",
                 sparse_geometry="regular",
                 num_global_tokens=2), 0.3)


def test_dropout_matches_oracle_half():
    _compare(Case(b=1, h=2, h_kv=1, n=29, padding=True, seed=44), torch.bfloat16,
             LSG(block_size=8, sparsity_factor=2, sparsity_type="norm", num_global_tokens=1, causal=True,
                 sparse_geometry="regular"), 0.1)


def test_dropout_gradcheck_fp64():
    """A fixed seed makes dropout a fixed mask: the function stays smooth in q, k, v."""
    inputs = make_inputs(Case(b=1, h=1, h_kv=1, n=17, padding=True, seed=45), torch.float64, DEVICE)
    pattern = LSG(block_size=8, sparsity_factor=2, sparsity_type="bos_pooling", num_global_tokens=1,
                  sparse_geometry="regular")

    def f(q, k, v):
        return lhattn.attention(q, k, v, pattern, key_padding_mask=inputs["key_padding_mask"], dropout_p=0.3,
                                dropout_seed=5, backend="triton")
    torch.autograd.gradcheck(f, (inputs["q"], inputs["k"], inputs["v"]), fast_mode=True)


# --------------------------------------------------------------------------------------
# dropout happens, follows the seed, and p = 0 is the plain kernel
# --------------------------------------------------------------------------------------


def _run(inputs, pattern, **kwargs):
    return run_with_grads(lambda q, k, v, key_padding_mask, global_mask, global_qkv, pattern: lhattn.attention(
        q, k, v, pattern, key_padding_mask=key_padding_mask, backend="triton", return_lse=True, **kwargs),
        inputs, pattern=pattern)


def test_dropout_drops_and_follows_the_seed_and_zero_is_the_plain_kernel():
    """p = 0.5 changes out and every gradient, the same seed gives the same bits, another seed other
    ones, lse is that of the undropped softmax; ``dropout_p = 0`` ignores any state and is bit for bit
    the call without dropout (one shared run without dropout for both checks)."""
    inputs = make_inputs(Case(b=1, h=2, h_kv=1, n=25, padding=True, seed=46), torch.float32, DEVICE)
    pattern = LSG(block_size=8, sparsity_factor=2, sparsity_type="pooling", num_global_tokens=2,
                  sparse_geometry="regular")
    plain = _run(inputs, pattern)
    first = _run(inputs, pattern, dropout_p=0.5, dropout_seed=1)
    again = _run(inputs, pattern, dropout_p=0.5, dropout_seed=1)
    other = _run(inputs, pattern, dropout_p=0.5, dropout_seed=2)
    for name in first:
        assert torch.equal(first[name], again[name]), f"{name}: the same seed gave different results"
    assert torch.equal(first["lse"], plain["lse"]), "lse must be that of the undropped softmax"
    for name in ("out", "dq", "dk", "dv"):
        scale = plain[name].abs().max().item()
        assert max_err(first[name], plain[name]) > 0.1 * scale, f"{name}: p = 0.5 changed little"
        assert max_err(first[name], other[name]) > 0.1 * scale, f"{name}: another seed changed little"

    state = _dropout.make_state(0.5, 3, DEVICE)

    def zero_p(q, k, v, key_padding_mask, global_mask, global_qkv, pattern):
        return lsg_autograd.impl(q, k, v, pattern, key_padding_mask=key_padding_mask, dropout_p=0.0,
                                 dropout_state=state)
    zero = run_with_grads(zero_p, inputs, pattern=pattern)
    for name in plain:
        assert torch.equal(plain[name], zero[name]), f"{name}: dropout_p = 0 changed the result"


# --------------------------------------------------------------------------------------
# custom ops, memory, compile, bad input
# --------------------------------------------------------------------------------------


def _op_inputs(requires_grad: bool):
    gen = torch.Generator().manual_seed(48)
    q = torch.randn(1, 2, 19, 16, generator=gen).to(DEVICE).requires_grad_(requires_grad)
    k, v = (torch.randn(1, 1, 19, 16, generator=gen).to(DEVICE).requires_grad_(requires_grad) for _ in range(2))
    kc, vc = (torch.randn(1, 1, 12, 16, generator=gen).to(DEVICE).requires_grad_(requires_grad) for _ in range(2))
    valid = torch.ones(1, 1, 12, dtype=torch.bool, device=DEVICE)
    valid[0, 0, 3] = False
    key_valid = torch.ones(1, 19, dtype=torch.bool, device=DEVICE)
    key_valid[0, -2:] = False
    return q, k, v, kc, vc, valid, key_valid


def test_custom_ops_opcheck_with_dropout():
    """Schema, fake kernels and autograd registration with ``dropout_p > 0`` and a state."""
    state = _dropout.make_state(0.3, 11, DEVICE)
    q, k, v, kc, vc, valid, key_valid = _op_inputs(True)
    # b, sb, f, sparse windows (regular), g, o, causal, scale, dropout_p
    scalars = (8, 8, 2, [-12, -4, 8, 16], 1, 0, False, 0.25, 0.3)
    torch.library.opcheck(torch.ops.lhattn.lsg_attn_fwd.default,
                          (q, k, v, kc, vc, valid, key_valid) + scalars + (state,),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    q, k, v, kc, vc, valid, key_valid = _op_inputs(False)
    out, lse = torch.ops.lhattn.lsg_attn_fwd(q, k, v, kc, vc, valid, key_valid, *scalars, state)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(49)).to(DEVICE)
    torch.library.opcheck(torch.ops.lhattn.lsg_attn_bwd.default,
                          (dout, q, k, v, out, lse, kc, vc, valid, key_valid) + scalars + (state,),
                          test_utils=("test_schema", "test_faketensor"))


def test_dropout_keeps_no_window_sized_tensor_alive():
    """The dropout state is two numbers: between forward and backward only O(N·D) tensors."""
    inputs = make_inputs(Case(b=1, h=1, h_kv=1, n=64, seed=50), torch.float32, DEVICE)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lhattn.attention(inputs["q"], inputs["k"], inputs["v"], LSG(block_size=8, sparsity_type="norm"),
                         dropout_p=0.2, dropout_seed=1, backend="triton")
    assert max(saved) <= inputs["q"].numel(), f"a saved tensor has {max(saved)} elements"


def test_dropout_torch_compile_fullgraph_traces():
    """The state is a traced tensor input of both custom ops (saved for the backward)."""
    inputs = make_inputs(Case(b=1, h=2, h_kv=1, n=19, padding=True, seed=51), torch.float32, DEVICE)
    kpm = inputs["key_padding_mask"]
    seed = torch.tensor(7, device=DEVICE)

    def f(q, k, v, seed):
        return lhattn.lsg_attention(q, k, v, block_size=8, sparsity_type="pooling", key_padding_mask=kpm,
                                    dropout_p=0.4, dropout_seed=seed, backend="triton")
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    out = compiled(q, k, v, seed)
    gq, gk, gv = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref = f(q, k, v, seed)
    rq, rk, rv = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for name, a, b in (("out", out, ref), ("dq", gq, rq), ("dk", gk, rk), ("dv", gv, rv)):
        assert max_err(a, b) <= 1e-6, f"{name}: compiled and eager differ by {max_err(a, b):.2e}"


def test_launcher_needs_a_dropout_state():
    q = torch.randn(1, 2, 20, 16, device=DEVICE)
    with pytest.raises(ValueError, match="dropout_state"):
        KERNELS.lsg_fwd(q, q, q, block_size=4, sparse_block_size=4, sparsity_factor=2, num_global_tokens=1,
                        dropout_p=0.5)
