"""lhattn.nn.LSGSelfAttention: the hand-assembled computation (reference backend), lsg_converter's
own LSG model attention with the same weights, the fallback backend forward + backward, gradients
into the learned global tokens, padding, and bad arguments."""

import copy

import pytest
import torch
import torch.nn.functional as F

import lhattn
import lhattn.nn as lnn
from lhattn.patterns import LSG

from tolerance import assert_close_to_oracle

MIN32 = torch.finfo(torch.float32).min


pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    kw = {"block_size": 4, "sparsity_factor": 2, "num_global_tokens": 2, "backend": "reference", **kw}
    layer = lnn.LSGSelfAttention(16, 2, dtype=dtype, **kw).eval()
    if layer.global_embeddings is not None:  # larger than the 0.02 init, so that they matter
        torch.nn.init.normal_(layer.global_embeddings)
    return layer


def _x(b, n, e=16, dtype=torch.float32, seed=1):
    return torch.randn(b, n, e, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _padding(b, n, pad):
    kpm = torch.zeros(b, n, dtype=torch.bool)
    kpm[-1, n - pad:] = True
    return kpm


def _by_hand(layer, x, kpm, dropout_p=0.0):
    """Globals prepended, projections, the LSG oracle (prepended layout; attention dropout
    ``dropout_p``, seed from torch's default generator), global rows dropped, out_proj."""
    b, n, e = x.shape
    g, h = layer.num_global_tokens, layer.num_heads
    xs = torch.cat([layer.global_embeddings[None].expand(b, g, e), x], dim=1) if g else x
    q, k, v = (F.linear(xs, p.weight, p.bias).view(b, g + n, h, e // h).transpose(1, 2)
               for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    pattern = LSG(block_size=layer.pattern.block_size, sparse_block_size=layer.pattern.sparse_block_size,
                  sparsity_factor=layer.pattern.sparsity_factor, sparsity_type=layer.pattern.sparsity_type,
                  num_global_tokens=g, causal=layer.pattern.causal, global_layout="prepended")
    full_kpm = None if kpm is None else torch.cat([torch.zeros(b, g, dtype=torch.bool), kpm], dim=1)
    out = lhattn.attention(q, k, v, pattern, key_padding_mask=full_kpm, dropout_p=dropout_p, backend="reference")
    return F.linear(out[:, :, g:].transpose(1, 2).reshape(b, n, e), layer.out_proj.weight, layer.out_proj.bias)


# ---- values -------------------------------------------------------------------------------------

CONFIGS = [
    pytest.param(dict(), id="b4-f2-g2-norm"),
    pytest.param(dict(sparsity_type="pooling", causal=True), id="pooling-causal"),
    pytest.param(dict(block_size=8, sparse_block_size=4, sparsity_type="bos_pooling", num_global_tokens=1),
                 id="b8-sb4-bos-g1"),
    pytest.param(dict(sparsity_type="lsh", num_global_tokens=0), id="lsh-g0"),
    pytest.param(dict(sparsity_type="none", num_global_tokens=3), id="none-g3"),
]


@pytest.mark.parametrize("n", [7, 29])
@pytest.mark.parametrize("config", CONFIGS)
def test_matches_hand_assembled_reference(config, n):
    layer = _layer(**config)
    x, kpm = _x(2, n), _padding(2, n, 3)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, kpm), _by_hand(layer, x, kpm), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(layer(x), _by_hand(layer, x, None), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("sparsity_type", ["norm", "pooling", "bos_pooling", "stride"])
def test_matches_lsg_converter_model_attention(sparsity_type, causal):
    """lsg_converter's LSG model: embeddings with the global tokens prepended, then its
    LSGSelfAttention (the sequence padded to g + a multiple of block_size, as its encoder does);
    lhattn's layer with the same query/key/value weights and global tokens must give the same rows."""
    # test_lsg loads lsg_converter's bert file (skipping when it is not installed) and has the
    # wrapper for LSG's one known slip (bos_pooling unmasks groups that are all padding).
    from test_lsg import _empty_groups, _lsg_bert, _mask_empty_groups

    bert = _lsg_bert()
    b_size, sb, f, g, e, h = 8, 8, 2, 2, 16, 2
    layer = _layer(block_size=b_size, sparse_block_size=sb, sparsity_factor=f, num_global_tokens=g,
                   sparsity_type=sparsity_type, causal=causal)
    cfg = bert.LSGBertConfig(hidden_size=e, num_attention_heads=h, block_size=b_size, sparse_block_size=sb,
                             sparsity_factor=f, sparsity_type=sparsity_type, num_global_tokens=g,
                             attention_probs_dropout_prob=0.0, is_decoder=causal)
    theirs = bert.LSGSelfAttention(cfg).eval()
    selection = theirs.get_sparse_elements
    with torch.no_grad():
        for mine, their in ((layer.q_proj, theirs.query), (layer.k_proj, theirs.key), (layer.v_proj, theirs.value)):
            their.weight.copy_(mine.weight)
            their.bias.copy_(mine.bias)
    for n, pad in ((37, 0), (45, 5)):
        t = -(-n // b_size) * b_size
        x = _x(2, n, seed=n)
        kpm = _padding(2, n, pad)
        hidden = torch.cat([layer.global_embeddings.detach()[None].expand(2, g, e), x], dim=1)
        hidden = F.pad(hidden, (0, 0, 0, t - n))  # the encoder's padding to a multiple of block_size
        pad_t = F.pad(kpm, (0, t - n), value=True)
        additive = torch.zeros(2, 1, 1, t).masked_fill(pad_t[:, None, None], MIN32)  # non-global keys only
        theirs.get_sparse_elements = selection
        if sparsity_type == "bos_pooling" and _empty_groups(F.pad(pad_t, (g, 0)), g + t, b_size, f, g):
            theirs.get_sparse_elements = _mask_empty_groups(selection, f, mask_arg=3)
        with torch.no_grad():
            ctx = theirs(hidden, attention_mask=additive)[0][:, g:g + n]
            want = layer.out_proj(ctx)
            got = layer(x, kpm)
        keep = ~kpm[..., None]
        err = ((got - want) * keep).abs().max().item()
        assert err <= 1e-5, f"n={n} pad={pad}: max |lhattn - lsg_converter| = {err:.3e}"


def test_fallback_forward_and_backward_match_reference():
    kw = dict(block_size=4, sparse_block_size=2, sparsity_factor=2, num_global_tokens=2)
    ref, fb = _layer(**kw), _layer(**kw, backend="fallback")
    x, kpm = _x(2, 31), _padding(2, 31, 4)
    outs, grads = [], []
    for layer in (ref, fb):
        xi = x.clone().requires_grad_()
        out = layer(xi, kpm)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        outs.append(out.detach())
        grads.append([xi.grad] + [p.grad for p in layer.parameters()])
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    names = ["x"] + [name for name, _ in ref.named_parameters()]
    for name, a, b in zip(names, grads[1], grads[0]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"grad of {name}: {m}")


def test_gradients_reach_the_global_embeddings():
    layer = _layer(dtype=torch.float64, backend="fallback", num_global_tokens=3)
    x = _x(2, 21, dtype=torch.float64)
    layer(x, _padding(2, 21, 2)).square().sum().backward()
    grad = layer.global_embeddings.grad
    assert grad is not None and grad.shape == (3, 16) and bool((grad.abs().sum(-1) > 0).all())

    def f(ge):
        return torch.func.functional_call(layer, {"global_embeddings": ge}, (x,))

    assert torch.autograd.gradcheck(f, (layer.global_embeddings.detach().clone().requires_grad_(),), fast_mode=True)


# ---- padding ------------------------------------------------------------------------------------


def test_padding_tokens_do_not_leak():
    layer = _layer(backend="fallback")
    x, kpm = _x(2, 30), _padding(2, 30, 6)
    x2 = x.clone()
    x2[kpm] = 1e3 * torch.randn(int(kpm.sum()), 16)
    with torch.no_grad():
        a, b = layer(x, kpm), layer(x2, kpm)
        torch.testing.assert_close(a[~kpm], b[~kpm], atol=1e-5, rtol=1e-5)
        # a padding row's attention output is 0: the layer returns out_proj.bias there
        torch.testing.assert_close(a[kpm], layer.out_proj.bias.expand(int(kpm.sum()), -1))
        # end padding = the shorter sequence (norm selection never picks a padding token)
        short = layer(x[1:, :24])
        torch.testing.assert_close(a[1:, :24], short, atol=1e-5, rtol=1e-5)


# ---- module surface -----------------------------------------------------------------------------


def test_exported_and_parameters():
    assert lnn.LSGSelfAttention is lhattn.nn.lsg.LSGSelfAttention and "LSGSelfAttention" in lnn.__all__
    layer = lnn.LSGSelfAttention(32, 4, num_global_tokens=3, bias=False)
    names = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert names == {"global_embeddings": (3, 32), "q_proj.weight": (32, 32), "k_proj.weight": (32, 32),
                     "v_proj.weight": (32, 32), "out_proj.weight": (32, 32)}
    assert layer.pattern == LSG(block_size=128, sparsity_factor=2, sparsity_type="norm", num_global_tokens=3,
                                global_layout="prepended")
    assert abs(layer.global_embeddings.std().item() - 0.02) < 0.01
    assert lnn.LSGSelfAttention(32, 4, num_global_tokens=0).global_embeddings is None


@pytest.mark.parametrize("kw", [dict(dropout=0.5), dict(attention_dropout=0.5)], ids=["dropout", "attention_dropout"])
def test_dropout_only_in_training(kw):
    layer = _layer(backend="fallback", **kw)
    x = _x(1, 20)
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x))
        layer.train()
        torch.manual_seed(1)
        a = layer(x)
        torch.manual_seed(1)
        assert torch.equal(layer(x), a), "torch.manual_seed does not reproduce a training step"
        assert (a - layer(x)).abs().max() > 1e-2, "two training steps drop alike"
        assert (a - layer.eval()(x)).abs().max() > 1e-2, "no dropout in training"
    assert f"attention_dropout={layer.attention_dropout}, dropout={layer.dropout}" in repr(layer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("config", [dict(), dict(sparsity_type="pooling", causal=True)], ids=["norm", "pooling-causal"])
def test_attention_dropout_matches_hand_assembled(config, p, dtype):
    """Training with attention_dropout: output and gradients (x and every parameter, the global
    tokens included) equal the hand-assembled computation through the oracle with the same dropout
    seed (torch.manual_seed) -- compressed keys included (n = 29 > 2 * block_size)."""
    layer = _layer(dtype=dtype, backend="fallback", sparse_block_size=2, attention_dropout=p, **config).train()
    layer64 = copy.deepcopy(layer).double()
    x, kpm = _x(2, 29, dtype=dtype), _padding(2, 29, 4)

    def step(fn, module, xi):
        xi = xi.clone().requires_grad_()
        torch.manual_seed(3)
        out = fn(module, xi)
        dout = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        return out.detach(), torch.autograd.grad(out, [xi] + list(module.parameters()), dout)

    got, got_grads = step(lambda m, xi: m(xi, kpm), layer, x)
    want, want_grads = step(lambda m, xi: _by_hand(m, xi, kpm, p), layer, x)
    want64, want64_grads = step(lambda m, xi: _by_hand(m, xi, kpm, p), layer64, x.double())
    assert_close_to_oracle("output", got, want, want64)
    names = ["x"] + [name for name, _ in layer.named_parameters()]
    for name, g, r, r64 in zip(names, got_grads, want_grads, want64_grads):
        assert_close_to_oracle(f"d({name})", g, r, r64)
    with torch.no_grad():
        assert (got - layer.eval()(x, kpm)).abs().max() > 1e-2, "no attention dropout in training"


def test_float64_and_long_sequence_shapes():
    layer = _layer(dtype=torch.float64, backend="fallback", block_size=16, sparsity_factor=4)
    out = layer(_x(1, 200, dtype=torch.float64))
    assert out.shape == (1, 200, 16) and out.dtype == torch.float64 and torch.isfinite(out).all()


# ---- bad arguments ------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, match", [
    pytest.param(dict(embed_dim=30, num_heads=4), ValueError, r"embed_dim \(30\) must be divisible by num_heads",
                 id="embed-not-divisible"),
    pytest.param(dict(embed_dim=0), ValueError, r"embed_dim must be >= 1", id="embed-0"),
    pytest.param(dict(embed_dim=32.0), TypeError, r"embed_dim must be an int", id="embed-float"),
    pytest.param(dict(num_heads=0), ValueError, r"num_heads must be >= 1", id="heads-0"),
    pytest.param(dict(dropout=1.0), ValueError, r"dropout must be a float in \[0, 1\)", id="dropout-1"),
    pytest.param(dict(attention_dropout=1.0), ValueError, r"attention_dropout must be a float in \[0, 1\)",
                 id="attention-dropout-1"),
    pytest.param(dict(attention_dropout=True), ValueError, r"attention_dropout must be a float",
                 id="attention-dropout-bool"),
    pytest.param(dict(bias=1), TypeError, r"bias must be a bool", id="bias-int"),
    pytest.param(dict(backend="cuda"), ValueError, r"backend must be one of", id="backend"),
    pytest.param(dict(block_size=0), ValueError, r"block_size", id="block-size-0"),
    pytest.param(dict(block_size=6, sparsity_factor=4), ValueError, r"sparsity_factor", id="factor-not-dividing"),
    pytest.param(dict(sparsity_type="random"), ValueError, r"sparsity_type", id="sparsity-type"),
    pytest.param(dict(num_global_tokens=-1), ValueError, r"num_global_tokens", id="globals-negative"),
    pytest.param(dict(causal="yes"), TypeError, r"causal", id="causal-str"),
])
def test_bad_constructor_arguments(kwargs, error, match):
    kwargs = {"embed_dim": 32, "num_heads": 4, **kwargs}
    with pytest.raises(error, match=match):
        lnn.LSGSelfAttention(**kwargs)


@pytest.mark.parametrize("call, error, match", [
    pytest.param(lambda m: m(torch.randn(2, 10, 8)), ValueError, r"x must be \[B, N, E=16\]", id="x-embed"),
    pytest.param(lambda m: m(torch.randn(10, 16)), ValueError, r"x must be \[B, N, E=16\]", id="x-rank"),
    pytest.param(lambda m: m([[0.0] * 16]), TypeError, r"x must be a torch.Tensor", id="x-list"),
    pytest.param(lambda m: m(torch.randn(2, 10, 16), torch.zeros(2, 9, dtype=torch.bool)), ValueError,
                 r"key_padding_mask must be \[B, N\] = \(2, 10\)", id="mask-shape"),
    pytest.param(lambda m: m(torch.randn(2, 10, 16), torch.zeros(2, 10)), TypeError,
                 r"key_padding_mask must be a bool tensor", id="mask-float"),
])
def test_bad_forward_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call(_layer())
