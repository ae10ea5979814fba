"""lhattn.nn.Hourglass / HourglassLM: causality and prefix consistency of every shortening x upsampling
pair (with and without a SlidingWindow), the attention-based resamplings against dense oracles, labml's
HourGlass on the same weights (golden outputs in tests/fixtures/hourglass/), fp64 gradcheck, argument
errors, and a copy task learned by a small HourglassLM next to a vanilla baseline of the same size."""

import itertools
import os

import pytest
import torch
import torch.nn.functional as F

import lhattn
import lhattn.nn as lnn
from lhattn.nn.hourglass import SHORTENINGS, UPSAMPLINGS

from tolerance import max_err

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "hourglass", "labml_hourglass.pt")
PAIRS = list(itertools.product(SHORTENINGS, UPSAMPLINGS))
PATTERNS = {"full": None, "window3": lhattn.SlidingWindow(3, causal=True)}
D, H, N = 16, 2, 13  # N is not a multiple of 2, 3 or 6


def _model(shortening, upsampling, pattern, factors=(2, 3), seed=0, **kw):
    torch.manual_seed(seed)
    return lnn.Hourglass(D, H, list(factors), 32, dropout=0.0, shortening=shortening, upsampling=upsampling,
                         pattern=pattern, **kw).double().eval()


@pytest.mark.parametrize("pattern", list(PATTERNS), ids=list(PATTERNS))
@pytest.mark.parametrize("shortening,upsampling", PAIRS, ids=[f"{s}-{u}" for s, u in PAIRS])
def test_causal_and_prefix_consistent(shortening, upsampling, pattern):
    m = _model(shortening, upsampling, PATTERNS[pattern])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, N, D, dtype=torch.float64, generator=g)
    with torch.no_grad():
        y = m(x)
        for t in (1, 5, 7, 11):
            x2 = x.clone()
            x2[:, t:] += torch.randn(x2[:, t:].shape, dtype=torch.float64, generator=g)
            y2 = m(x2)
            assert torch.equal(y[:, :t], y2[:, :t]), f"t={t}: outputs before t depend on inputs at >= t"
            assert max_err(y[:, t], y2[:, t]) > 1e-3, f"t={t}: output t does not see input t"
            # prefix consistency: the model run on the prefix alone (its own padding) gives the same outputs
            assert max_err(m(x[:, :t]), y[:, :t]) <= 1e-12, f"t={t}: m(x[:, :t]) != m(x)[:, :t]"


@pytest.mark.parametrize("pattern", list(PATTERNS), ids=list(PATTERNS))
def test_fallback_equals_reference_backend(pattern):
    """The default backend (the blocked fallback on CPU) and the dense reference give the same model."""
    m = _model("attention", "attention", PATTERNS[pattern])
    ref = _model("attention", "attention", PATTERNS[pattern], backend="reference")
    x = torch.randn(2, N, D, dtype=torch.float64, requires_grad=True)
    y = m(x)
    y_ref = ref(x)
    assert max_err(y, y_ref) <= 1e-12
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (gx_ref,) = torch.autograd.grad(y_ref, x, g)
    assert max_err(gx, gx_ref) <= 1e-12


def test_training_dropout_is_causal_and_active():
    """In training, attention dropout (lhattn's counter-based rule) and residual dropout keep causality;
    the same seed gives the same step, another seed another one."""
    torch.manual_seed(0)
    m = lnn.Hourglass(D, H, [2, 3], 32, dropout=0.2, shortening="attention", upsampling="attention",
                      pattern=PATTERNS["window3"]).double().train()
    x = torch.randn(2, N, D, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 7:] += torch.randn_like(x2[:, 7:])

    def step(inp, seed):
        torch.manual_seed(seed)
        return m(inp)
    y = step(x, 5)
    assert torch.equal(y, step(x, 5))
    assert torch.equal(y[:, :7], step(x2, 5)[:, :7])
    assert max_err(y, step(x, 6)) > 1e-3


def test_window_limits_the_receptive_field():
    """With SlidingWindow(w) at every level, an input far enough back no longer reaches the output;
    with full attention it does."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 40, D, dtype=torch.float64, generator=g)
    x2 = x.clone()
    x2[:, 0] += torch.randn(D, dtype=torch.float64, generator=g)  # not a constant: LayerNorm removes those
    with torch.no_grad():
        for pattern, reaches in ((None, True), (lhattn.SlidingWindow(1, causal=True), False)):
            m = _model("avg", "naive", pattern, factors=(2,))
            # receptive field with window 1 and one level of k=2: a handful of tokens, far less than 39
            assert (max_err(m(x)[:, -1], m(x2)[:, -1]) > 1e-9) == reaches


# ---- attention shortening / upsampling against dense oracles ------------------------------------

def _heads(x, lin):
    b, n, _ = x.shape
    return lin(x).view(b, n, H, -1).transpose(1, 2)


def _dense_attn(attn, query, key, allowed):
    """Plain softmax attention of ``query`` on ``key`` with a ``[Lq, Lk]`` bool mask."""
    q, k, v = _heads(query, attn.q_proj), _heads(key, attn.k_proj), _heads(key, attn.v_proj)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
    out = (p @ v).transpose(1, 2).reshape(query.shape[0], query.shape[1], -1)
    return attn.out_proj(out)


def _ffn_residual(block, x):
    return x + block.linear2(F.relu(block.linear1(block.norm2(x))))


@pytest.mark.parametrize("n,k", [(13, 3), (8, 4)])
def test_attention_shortening_matches_dense_oracle(n, k):
    m = _model("attention", "naive", None, factors=(k,))
    sh = m.shorten
    x = torch.randn(2, n, D, dtype=torch.float64)
    mm = -(-n // k)
    # block j holds x[jk-k+1 .. jk], zeros before position 0 (written out token by token)
    tokens = torch.stack([x[:, p - k + 1] if p - k + 1 >= 0 else torch.zeros_like(x[:, 0]) for p in range(mm * k)], 1)
    pooled = tokens.view(2, mm, k, D).mean(2)
    allowed = torch.arange(mm * k)[None, :] // k == torch.arange(mm)[:, None]
    ref = pooled + _dense_attn(sh.block.self_attn, sh.block.norm1(pooled), sh.norm_kv(tokens), allowed)
    ref = _ffn_residual(sh.block, ref)
    with torch.no_grad():
        assert max_err(sh(x), ref) <= 1e-12


@pytest.mark.parametrize("n,k,window", [(13, 3, None), (14, 2, 2)])
def test_attention_upsampling_matches_dense_oracle(n, k, window):
    pattern = None if window is None else lhattn.SlidingWindow(window, causal=True)
    m = _model("avg", "attention", pattern, factors=(k,))
    up = m.upsample
    mm = -(-n // k)
    x, short = torch.randn(2, n, D, dtype=torch.float64), torch.randn(2, mm, D, dtype=torch.float64)
    u = x + up.proj(short).view(2, mm, k, D).reshape(2, mm * k, D)[:, :n]
    j, i = torch.arange(mm)[None, :], torch.arange(n)[:, None]
    allowed = (j <= i // k) & ((j >= i // k - window) if window is not None else True)
    ref = _ffn_residual(up.block, u + _dense_attn(up.block.self_attn, up.block.norm1(u), up.norm_kv(short), allowed))
    with torch.no_grad():
        assert max_err(up(x, short), ref) <= 1e-12


def test_linear_resampling_layout():
    """linear shortening concatenates the shifted block in order; linear upsampling gives token r of
    block j the r-th d-slice of ``W x'_j``."""
    m = _model("linear", "linear", None, factors=(3,))
    x = torch.randn(1, 7, D, dtype=torch.float64)
    s = torch.cat((torch.zeros(1, 2, D, dtype=torch.float64), x), 1)[:, :9]  # shift by k-1, 3 blocks
    with torch.no_grad():
        ref_short = m.shorten.proj(s.reshape(1, 3, 3 * D))
        assert max_err(m.shorten(x), ref_short) <= 1e-12
        short = torch.randn(1, 3, D, dtype=torch.float64)
        w = m.upsample.proj(short)  # [1, 3, 3D]
        ref_up = x + torch.stack([w[0, i // 3, (i % 3) * D:(i % 3 + 1) * D] for i in range(7)])[None]
        assert max_err(m.upsample(x, short), ref_up) <= 1e-12


# ---- labml ---------------------------------------------------------------------------------------

def _from_labml(sd):
    """labml HourGlass parameter names -> lhattn.nn.Hourglass(..., layers_per_level=1) names."""
    parts = {"self_attn.query.linear": "self_attn.q_proj", "self_attn.key.linear": "self_attn.k_proj",
             "self_attn.value.linear": "self_attn.v_proj", "self_attn.output": "self_attn.out_proj",
             "feed_forward.layer1": "linear1", "feed_forward.layer2": "linear2",
             "norm_self_attn": "norm1", "norm_ff": "norm2"}
    out = {}
    for name, val in sd.items():
        prefix = ""
        while name.startswith("hour_glass."):
            prefix, name = prefix + "inner.", name[len("hour_glass."):]
        where, rest = name.split(".", 1)
        where = {"pre": "pre.layers.0", "post": "post.layers.0", "shortened": "inner.pre.layers.0"}[where]
        for a, b in parts.items():
            if rest.startswith(a + "."):
                rest = b + rest[len(a):]
        out[f"{prefix}{where}.{rest}"] = val
    return out


@pytest.mark.parametrize("case", ["two_levels", "one_level_k4"])
def test_equals_labml_hourglass(case):
    """avg/naive, no positions, full causal attention: labml's HourGlass outputs (labml-nn 0.5.1), fp64."""
    c = torch.load(FIXTURE)[case]
    m = lnn.Hourglass(c["d_model"], c["n_heads"], c["shortening_factors"], c["d_ff"], dropout=0.0,
                      rotary=False, layers_per_level=1).double().eval()
    m.load_state_dict(_from_labml(c["state_dict"]), strict=True)
    with torch.no_grad():
        y = m(c["x"])
    assert max_err(y, c["y"]) <= 1e-10 * max(1.0, float(c["y"].abs().max()))
    # and the weights matter: a perturbed copy does not match
    with torch.no_grad():
        m.inner.pre.layers[0].linear1.bias.add_(0.1)
        assert max_err(m(c["x"]), c["y"]) > 1e-6


# ---- gradients -----------------------------------------------------------------------------------

@pytest.mark.parametrize("shortening,upsampling,pattern", [
    ("attention", "attention", lhattn.SlidingWindow(2, causal=True)),
    ("linear", "linear", None),
])
def test_gradcheck_fp64(shortening, upsampling, pattern):
    torch.manual_seed(3)
    m = lnn.Hourglass(8, 2, [2], 12, dropout=0.0, shortening=shortening, upsampling=upsampling,
                      pattern=pattern).double()
    x = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,), eps=1e-6, atol=1e-6)
    # parameters get gradients too
    m(x).pow(2).sum().backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in m.parameters())


# ---- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(shortening="max"), ValueError, "shortening"),
    (dict(upsampling="repeat"), ValueError, "upsampling"),
    (dict(pattern=lhattn.SlidingWindow(4)), ValueError, "causal"),
    (dict(pattern=lhattn.Segments(4)), TypeError, "pattern"),
    (dict(layers_per_level=[1, 1, 1]), ValueError, "layers_per_level"),
    (dict(shortening_factors=[2, 0]), ValueError, "shortening_factors"),
    (dict(nhead=3), ValueError, "nhead"),
    (dict(dropout=1.5), ValueError, "dropout"),
])
def test_bad_arguments(kwargs, exc, words):
    args = dict(d_model=16, nhead=2, shortening_factors=[2])
    args.update(kwargs)
    with pytest.raises(exc, match=words):
        lnn.Hourglass(**args)


def test_bad_inputs():
    m = lnn.Hourglass(16, 2, [2])
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(5, 16))
    lm = lnn.HourglassLM(10, 16, 2, [2])
    with pytest.raises(ValueError, match="input_ids"):
        lm(torch.randn(1, 5))
    with pytest.raises(ValueError, match="labels"):
        lm(torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))


# ---- language model ------------------------------------------------------------------------------

def test_lm_loss_is_shifted_and_generate_is_causal():
    torch.manual_seed(4)
    lm = lnn.HourglassLM(11, 16, 2, [2], dropout=0.0).eval()
    ids = torch.randint(0, 11, (2, 9))
    out = lm(ids, ids)
    assert torch.allclose(out.loss, F.cross_entropy(out.logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1)))
    assert lm.embed.weight is not None and out.logits.shape == (2, 9, 11)
    gen = lm.generate(ids[:, :4], 5, greedy=True)
    assert torch.equal(gen[:, :4], ids[:, :4]) and gen.shape == (2, 9)
    # greedy continuation: each new token is the argmax of the model on the sequence so far
    assert torch.equal(lm(gen[:, :-1]).logits[:, 3:].argmax(-1), gen[:, 4:])


def _copy_batch(g, b, length, vocab):
    a = torch.randint(0, vocab, (b, length), generator=g)
    ids = torch.cat((a, torch.full((b, 1), vocab), a), 1)  # a, SEP, a
    labels = ids.clone()
    labels[:, :length + 1] = -100  # only the copy is scored
    return ids, labels


def _train_copy(factors, layers, max_steps=200, length=8, vocab=8):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    lm = lnn.HourglassLM(vocab + 1, 32, 2, factors, dim_feedforward=64, dropout=0.0, layers_per_level=layers)
    opt = torch.optim.Adam(lm.parameters(), lr=3e-3)
    test_ids, test_labels = _copy_batch(torch.Generator().manual_seed(99), 128, length, vocab)
    for step in range(1, max_steps + 1):
        ids, labels = _copy_batch(g, 32, length, vocab)
        loss = lm(ids, labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0:
            with torch.no_grad():
                pred = lm(test_ids).logits[:, :-1].argmax(-1)
            tgt = test_labels[:, 1:]
            acc = float((pred == tgt)[tgt != -100].float().mean())
            if acc >= 0.95:
                return acc, step
    return acc, max_steps


def test_copy_task_hourglass_vs_vanilla():
    """A 3-layer HourglassLM (1@1, 1@2, 1@1) and a vanilla 3-layer LM of the same width learn to copy
    8 tokens to >= 95% held-out accuracy."""
    acc_h, steps_h = _train_copy([2], [1, 1])
    acc_v, steps_v = _train_copy([], [3])
    assert acc_v >= 0.95, f"vanilla baseline: {acc_v:.3f} after {steps_v} steps"
    assert acc_h >= 0.95, f"hourglass: {acc_h:.3f} after {steps_h} steps (vanilla: {steps_v} steps)"
