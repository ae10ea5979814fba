"""Attention dropout in the blocked fallback: for the same seed it drops the same entries as the
oracle (outputs, lse and every gradient, global rows and LSG's compressed keys included), fp64
gradcheck, p = 0 leaves the fallback as it was, and dropout really happens."""

import pytest
import torch

import lhattn
from lhattn import _dropout
from lhattn.fallback import sliding_window_attention
from lhattn.patterns import LSG, Segments, SlidingWindow

from cases import Case, make_inputs, run_with_grads
from test_fallback import _compare, _ragged_ids

P = [0.1, 0.5]
DTYPES = [torch.float32, torch.float64]


pytestmark = pytest.mark.usefixtures("one_thread")


def _attn(backend, dropout_p, dropout_seed):
    def fn(q, k, v, key_padding_mask, global_mask, global_qkv, pattern, segment_ids=None):
        return lhattn.attention(q, k, v, pattern, key_padding_mask=key_padding_mask, global_mask=global_mask,
                                global_qkv=global_qkv, segment_ids=segment_ids, dropout_p=dropout_p,
                                dropout_seed=dropout_seed, backend=backend, return_lse=True)
    return fn


def _compare_dropout(case, dtype, p, seed=1234, **kw):
    _compare(_attn("reference", p, seed), _attn("fallback", p, seed), case, dtype, **kw)


# ---- against the oracle, same seed --------------------------------------------------------------

SW_CASES = {
    "asym": (SlidingWindow((3, 2)), Case(seed=10)),
    "sym-gqa-globals-pad": (SlidingWindow(4), Case(n=70, h=4, h_kv=2, n_global="many", padding=True, seed=11)),
    "causal-1global-gproj": (SlidingWindow(5, causal=True), Case(n_global="one", padding=True, global_proj=True,
                                                                 seed=12)),
    "dil2-mqa-gproj": (SlidingWindow((3, 1), dilation=2),
                       Case(b=1, h=2, h_kv=1, n=67, n_global="many", global_proj=True, padding=True, strided=True,
                            seed=13)),
    "w70-two-blocks": (SlidingWindow((70, 3)), Case(n=130, h=4, h_kv=2, n_global="many", seed=14)),
}


@pytest.mark.parametrize("p", P)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", SW_CASES.keys())
def test_sliding_window_dropout_matches_oracle(name, dtype, p):
    pattern, case = SW_CASES[name]
    _compare_dropout(case, dtype, p, pattern=pattern)


SEG_CASES = {
    "S8-globals-pad": (Segments(8), Case(n_global="many", padding=True, seed=20)),
    "S70-gqa": (Segments(70), Case(n=130, h=4, h_kv=2, n_global="one", seed=21)),
    "ragged-globals-pad": (Segments(), Case(n=67, h=4, h_kv=2, n_global="many", padding=True, seed=22)),
}


@pytest.mark.parametrize("p", P)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", SEG_CASES.keys())
def test_segment_dropout_matches_oracle(name, dtype, p):
    pattern, case = SEG_CASES[name]
    kw = dict(pattern=pattern)
    if pattern.segment_size is None:
        kw["segment_ids"] = _ragged_ids(case.b, case.n, case.seed)
    _compare_dropout(case, dtype, p, **kw)


LSG_CASES = {
    "norm-inline": (dict(sparsity_type="norm", block_size=4, sparsity_factor=2, num_global_tokens=1),
                    Case(n=37, padding=True, seed=30)),
    "pooling-prepended-gqa": (dict(sparsity_type="pooling", block_size=8, sparse_block_size=4, sparsity_factor=4,
                                   num_global_tokens=2, global_layout="prepended"),
                              Case(h=4, h_kv=2, n=45, padding=True, strided=True, seed=31)),
    "bos_pooling-mqa": (dict(sparsity_type="bos_pooling", block_size=4, sparse_block_size=8, sparsity_factor=2,
                             num_global_tokens=3),  # compressed keys per query head
                        Case(b=1, h=2, h_kv=1, n=31, seed=32)),
    "lsh-prepended": (dict(sparsity_type="lsh", block_size=4, sparsity_factor=2, num_global_tokens=1,
                           global_layout="prepended"), Case(h=4, h_kv=2, n=29, seed=33)),
    "full-inline": (dict(sparsity_type="norm", block_size=8, num_global_tokens=1),  # n <= 2b
                    Case(n=13, padding=True, seed=34)),
    "full-prepended-gqa": (dict(sparsity_type="stride", block_size=8, num_global_tokens=2,
                                global_layout="prepended"), Case(h=4, h_kv=2, n=18, seed=35)),  # n - g <= 2b
}


@pytest.mark.parametrize("p", P)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("name", LSG_CASES.keys())
def test_lsg_dropout_matches_oracle(name, causal, dtype, p):
    spec, case = LSG_CASES[name]
    _compare_dropout(case, dtype, p, pattern=LSG(causal=causal, **spec))


# ---- gradcheck in fp64, fixed seed ----------------------------------------------------------------


def test_gradcheck_sliding_window_dropout():
    inputs = make_inputs(Case(b=1, h=2, h_kv=1, n=9, d=4, n_global="one", padding=True, global_proj=True),
                         torch.float64)

    def f(q, k, v, qg, kg, vg):
        return lhattn.attention(q, k, v, SlidingWindow((2, 1), dilation=2), key_padding_mask=inputs[
            "key_padding_mask"], global_mask=inputs["global_mask"], global_qkv=(qg, kg, vg), dropout_p=0.4,
            dropout_seed=5, backend="fallback")
    assert torch.autograd.gradcheck(f, (inputs["q"], inputs["k"], inputs["v"], *inputs["global_qkv"]))


def test_gradcheck_segments_dropout():
    inputs = make_inputs(Case(b=2, h=2, h_kv=1, n=8, d=4, n_global="many", padding=True), torch.float64)
    ids = torch.tensor([[0, 0, 1, 2, 2, 2, 3, 3], [5, 5, 5, 5, 5, 6, 6, 9]])

    def f(q, k, v):
        return lhattn.attention(q, k, v, Segments(), segment_ids=ids, key_padding_mask=inputs["key_padding_mask"],
                                global_mask=inputs["global_mask"], dropout_p=0.4, dropout_seed=6, backend="fallback")
    assert torch.autograd.gradcheck(f, (inputs["q"], inputs["k"], inputs["v"]))


def test_gradcheck_lsg_dropout():
    inputs = make_inputs(Case(b=1, h=2, h_kv=1, n=19, d=4, padding=True, seed=3), torch.float64)
    pattern = LSG(block_size=4, sparsity_factor=2, sparsity_type="pooling", num_global_tokens=1)

    def f(q, k, v):
        return lhattn.attention(q, k, v, pattern, key_padding_mask=inputs["key_padding_mask"], dropout_p=0.4,
                                dropout_seed=7, backend="fallback")
    assert torch.autograd.gradcheck(f, (inputs["q"], inputs["k"], inputs["v"]), fast_mode=True)


# ---- p = 0, seeds, and that dropout happens ---------------------------------------------------------


def test_p0_leaves_fallback_unchanged():
    """``dropout_p = 0`` is the no-dropout path, bit for bit, even with a state at hand."""
    inputs = make_inputs(Case(n=70, h=4, h_kv=2, n_global="many", padding=True, global_proj=True, seed=40))
    pattern = SlidingWindow((5, 2))
    state = _dropout.make_state(0.5, 3, "cpu")
    plain = run_with_grads(sliding_window_attention, inputs, pattern=pattern)
    p0 = run_with_grads(sliding_window_attention, inputs, pattern=pattern, dropout_p=0.0, dropout_state=state)
    api = run_with_grads(_attn("fallback", 0.0, 3), inputs, pattern=pattern)
    for name in plain:
        assert torch.equal(p0[name], plain[name]), name
        assert torch.equal(api[name], plain[name]), name


def _out(inputs, p, seed, pattern=SlidingWindow((4, 3))):
    return _attn("fallback", p, seed)(pattern=pattern, **inputs)[0].detach()


def test_dropout_changes_output_and_follows_the_seed():
    inputs = make_inputs(Case(n=40, n_global="many", padding=True, seed=41))
    base = _out(inputs, 0.0, None)
    drop = _out(inputs, 0.3, 1)
    assert (drop - base).abs().max() > 0.1, "p = 0.3 hardly changed the output"
    assert torch.equal(_out(inputs, 0.3, 1), drop), "the same seed gave another output"
    assert torch.equal(_out(inputs, 0.3, torch.tensor([1])), drop), "a tensor seed differs from the int"
    assert (_out(inputs, 0.3, 2) - drop).abs().max() > 0.1, "another seed gave the same output"
    assert (_out(inputs, 0.6, 1) - drop).abs().max() > 0.1, "another p gave the same output"
    # lse is that of the undropped scores
    lse0 = _attn("fallback", 0.0, None)(pattern=SlidingWindow((4, 3)), **inputs)[1]
    lse = _attn("fallback", 0.3, 1)(pattern=SlidingWindow((4, 3)), **inputs)[1]
    assert torch.equal(lse, lse0)


def test_segment_and_lsg_seeds_differ():
    inputs = make_inputs(Case(n=37, seed=42))
    for pattern in (Segments(8), LSG(block_size=4, sparsity_factor=2)):
        base, one, two = (_out(inputs, p, seed, pattern) for p, seed in ((0.0, None), (0.3, 1), (0.3, 2)))
        assert (one - base).abs().max() > 0.1 and (two - one).abs().max() > 0.1, pattern


def test_mean_over_seeds_approaches_undropped_output():
    """``E[keep / (1 - p)] = 1``: averaged over 300 seeds, the output is close to the p = 0 one
    (error ~ 1/sqrt(300) of one draw's; loose bounds, deterministic seeds)."""
    inputs = make_inputs(Case(b=1, h=2, h_kv=1, n=16, d=4, n_global="one", seed=43))
    pattern = SlidingWindow(3)
    base = _out(inputs, 0.0, None, pattern)
    outs = torch.stack([_out(inputs, 0.2, s, pattern) for s in range(300)])
    one_err = (outs[0] - base).abs().max()
    mean_err = (outs.mean(0) - base).abs().max()
    assert mean_err < 0.25 * one_err and mean_err < 0.1, f"mean error {mean_err:.3f}, one draw {one_err:.3f}"


def test_dropout_keeps_no_quadratic_tensor_alive():
    """Dropout stores no keep mask: what autograd saves is still O(N·D) (bits are regenerated)."""
    n = 2048
    q, k, v = (torch.randn(1, 2, n, 16, requires_grad=True) for _ in range(3))
    gm = torch.zeros(1, n, dtype=torch.bool)
    gm[0, [0, 700]] = True
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = lhattn.attention(q, k, v, SlidingWindow(8), global_mask=gm, dropout_p=0.2, dropout_seed=1,
                               backend="fallback")
    assert max(saved) <= q.numel(), f"a saved tensor has {max(saved)} elements (> N·D·H = {q.numel()})"
    out.sum().backward()
