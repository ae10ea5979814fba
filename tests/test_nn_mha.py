"""lhattn.nn.MultiheadAttention: a drop-in torch.nn.MultiheadAttention on lhattn patterns.

With a pattern that covers the whole sequence it must reproduce nn.MultiheadAttention (same
weights) to fp32 rounding over the option matrix; with a sparse pattern its two paths
(explicit weights, lhattn.attention) must agree; unsupported combinations raise naming the
argument; replace_attention must really route nn.TransformerEncoder through lhattn.
"""

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lhattn
import lhattn.nn as lnn
from lhattn import LSG, Segments, SlidingWindow, _dropout

from tolerance import assert_close_to_oracle


pytestmark = pytest.mark.usefixtures("one_thread")

E, H, N, B = 32, 4, 13, 3
ATOL = 2e-6  # fp32 rounding: the same ops in another order


def _close(a, b, what, atol=ATOL):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert err <= atol, f"{what}: max abs error {err:.2e} > {atol:.0e}"


def _torch_mha(batch_first=True, seed=0, **kw):
    torch.manual_seed(seed)
    m = nn.MultiheadAttention(E, H, batch_first=batch_first, **kw)
    with torch.no_grad():  # nonzero biases, so that a wrong bias would show
        for name, p in m.named_parameters():
            if "bias" in name:
                p.normal_()
    return m


def _padding(b=B, n=N):
    kpm = torch.zeros(b, n, dtype=torch.bool)
    kpm[1, n - 4:] = True
    kpm[2, 3:] = True
    return kpm


def _x(batch_first, b=B, n=N, e=E, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, e, generator=g)
    return x if batch_first else x.transpose(0, 1).contiguous()


FULL = {"window": SlidingWindow(N), "segments": Segments(N), "lsg-short": LSG(block_size=8)}


@pytest.mark.parametrize("pattern", list(FULL.values()), ids=list(FULL))
@pytest.mark.parametrize("batch_first, need_weights, average, padded",
                         list(itertools.product([True, False], repeat=4)),
                         ids=lambda v: str(int(v)))
def test_matches_torch(pattern, batch_first, need_weights, average, padded):
    ref = _torch_mha(batch_first)
    mha = lnn.MultiheadAttention.from_torch(copy.deepcopy(ref), pattern=pattern)
    x = _x(batch_first).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    kpm = _padding() if padded else None
    out_t, w_t = ref(x, x, x, key_padding_mask=kpm, need_weights=need_weights, average_attn_weights=average)
    out_l, w_l = mha(x2, x2, x2, key_padding_mask=kpm, need_weights=need_weights, average_attn_weights=average)
    _close(out_l, out_t, "attn_output")  # padding rows included (padded_rows="torch")
    if need_weights:
        _close(w_l, w_t, "attn_weights")
    else:
        assert w_l is None
    dout = torch.randn_like(out_t)
    out_t.backward(dout)
    out_l.backward(dout)
    _close(x2.grad, x.grad, "d(input)", atol=1e-5)
    for (name, p_t), p_l in zip(ref.named_parameters(), mha.parameters()):
        _close(p_l.grad, p_t.grad, f"d({name})", atol=2e-5)


@pytest.mark.parametrize("variant", ["kdim-vdim", "no-bias", "unbatched", "fp64"])
def test_matches_torch_variants(variant):
    kw = dict(kdim=12, vdim=20) if variant == "kdim-vdim" else dict(bias=False) if variant == "no-bias" else {}
    ref = _torch_mha(False, **kw)
    if variant == "fp64":
        ref = ref.double()
    mha = lnn.MultiheadAttention.from_torch(copy.deepcopy(ref), pattern=SlidingWindow(N))
    if variant == "kdim-vdim":  # same length, separate key/value tensors and projections
        q, k, v = torch.randn(N, B, E), torch.randn(N, B, 12), torch.randn(N, B, 20)
    elif variant == "unbatched":
        q = k = v = torch.randn(N, E)
    else:
        q = k = v = _x(False).to(ref.out_proj.weight.dtype)
    kpm = None if variant == "unbatched" else _padding()
    for need_weights in (True, False):
        out_t, w_t = ref(q, k, v, key_padding_mask=kpm, need_weights=need_weights)
        out_l, w_l = mha(q, k, v, key_padding_mask=kpm, need_weights=need_weights)
        _close(out_l, out_t, f"attn_output ({variant}, need_weights={need_weights})")
        if need_weights:
            _close(w_l, w_t, f"attn_weights ({variant})")


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_is_causal(need_weights, padded):
    """torch needs attn_mask with is_causal (and trusts it); lhattn also accepts is_causal alone."""
    ref = _torch_mha()
    x = _x(True)
    kpm = _padding() if padded else None
    causal = torch.ones(N, N, dtype=torch.bool).triu(1)  # True = not allowed, as key_padding_mask
    with pytest.raises(RuntimeError, match="attn_mask"):
        ref(x, x, x, is_causal=True)
    out_t, w_t = ref(x, x, x, key_padding_mask=kpm, attn_mask=causal, is_causal=True, need_weights=need_weights)
    for pattern in (SlidingWindow(N), LSG(block_size=8), None):
        mha = lnn.MultiheadAttention.from_torch(copy.deepcopy(ref), pattern=pattern)
        for mask in (causal, None):
            out_l, w_l = mha(x, x, x, key_padding_mask=kpm, attn_mask=mask, is_causal=True, need_weights=need_weights)
            what = f"{pattern}, attn_mask={'causal' if mask is not None else None}"
            _close(out_l, out_t, what)
            if need_weights:
                _close(w_l, w_t, what)


def test_dropout_like_torch():
    """need_weights=True (the explicit path) draws the same dropout mask as torch under the same
    seed; eval is exact."""
    ref = _torch_mha(dropout=0.3)
    mha = lnn.MultiheadAttention.from_torch(copy.deepcopy(ref), pattern=SlidingWindow(N))
    x, kpm = _x(True), _padding()
    torch.manual_seed(7)
    out_t, w_t = ref(x, x, x, key_padding_mask=kpm)
    torch.manual_seed(7)
    out_l, w_l = mha(x, x, x, key_padding_mask=kpm)
    _close(out_l, out_t, "attn_output (training, dropout)")
    _close(w_l, w_t, "attn_weights (training, dropout)")
    ref.eval(), mha.eval()
    _close(mha(x, x, x, key_padding_mask=kpm)[0], ref(x, x, x, key_padding_mask=kpm)[0], "eval output")


def _visible(pattern, n, gm, seg_ids, kpm):
    """[B, N, N] the keys each row may see, written out by hand (torch semantics for padding rows)."""
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    if isinstance(pattern, SlidingWindow):
        rel = j - i
        local = ((rel % pattern.dilation == 0) & (rel >= -pattern.left * pattern.dilation)
                 & (rel <= pattern.right * pattern.dilation))[None]
    else:
        ids = seg_ids if seg_ids is not None else (torch.arange(n) // pattern.segment_size).expand(kpm.shape[0], n)
        local = ids[:, :, None] == ids[:, None, :]
    glob = torch.zeros_like(kpm) if gm is None else gm
    return (local | glob[:, :, None] | glob[:, None, :]) & ~kpm[:, None, :]


SPARSE = [
    ("window2-globals", SlidingWindow(2), True, None),
    ("window-dilated", SlidingWindow((3, 1), dilation=2), False, None),
    ("segments4-globals", Segments(4), True, None),
    ("segment-ids", Segments(), True, torch.tensor([[0] * 5 + [1] + [2] * 7, [0] * 9 + [1] * 4, [3] * 2 + [4] * 11])),
]


@pytest.mark.parametrize("name, pattern, with_globals, seg_ids", SPARSE, ids=[s[0] for s in SPARSE])
@pytest.mark.parametrize("padded_rows", ["torch", "zero"])
def test_sparse_paths_agree(name, pattern, with_globals, seg_ids, padded_rows):
    """Explicit weights: exact zeros outside the pattern, rows sum to 1; both paths give one output;
    padding rows are PyTorch-like ("torch") or carry only out_proj's bias ("zero")."""
    mha = lnn.MultiheadAttention.from_torch(_torch_mha(), pattern=pattern, padded_rows=padded_rows)
    x, kpm = _x(True), _padding()
    gm = None
    if with_globals:
        gm = torch.zeros(B, N, dtype=torch.bool)
        gm[0, [0, 6]] = True
        gm[1, [2, N - 1]] = True  # the second one is padding: not a global key
    kw = dict(key_padding_mask=kpm, global_mask=gm, segment_ids=seg_ids)
    out_w, w = mha(x, x, x, average_attn_weights=False, **kw)
    visible = _visible(pattern, N, gm, seg_ids, kpm)[:, None].expand_as(w)
    assert (w[~visible] == 0).all(), "nonzero attention weight outside the pattern"
    rows = visible[:, 0].any(-1)  # a row that sees no key has weights 0 (torch: NaN)
    if padded_rows == "zero":
        rows = rows & ~kpm
    assert (w[~rows[:, None].expand(B, H, N)] == 0).all(), "weights in a row that should be 0"
    _close(w.sum(-1)[rows[:, None].expand(B, H, N)], torch.ones(()).expand(int(rows.sum()) * H), "row sums")
    for backend in ("fallback", "reference"):
        mha.backend = backend
        out_fast, none = mha(x, x, x, need_weights=False, **kw)
        assert none is None
        _close(out_fast, out_w, f"need_weights=False ({backend}) vs need_weights=True")
    if padded_rows == "zero":
        _close(out_w[kpm], mha.out_proj.bias.expand(int(kpm.sum()), E), "padding rows = out_proj.bias")


# ---- attention dropout on the sparse path ---------------------------------------------------------


def _dense_dropout(mha, x, kpm, gm, seg_ids, state):
    """The definition, densely (batch-first x): per row the softmax over its visible keys (PyTorch's
    for padding rows with padded_rows="torch", none with "zero"), then lhattn's keep mask for
    ``state`` (rows and columns = token positions), kept weights scaled by 1 / (1 - p); out_proj."""
    b, n, e = x.shape
    h, hd = mha.num_heads, mha.head_dim
    q, k, v = (F.linear(x, w, bias).view(b, n, h, hd).transpose(1, 2)
               for w, bias in zip(mha.in_proj_weight.chunk(3), mha.in_proj_bias.chunk(3)))
    visible = _visible(mha.pattern, n, gm, seg_ids, kpm)[:, None]  # [B, 1, N, N]
    if mha.padded_rows == "zero":
        visible = visible & ~kpm[:, None, :, None]
    sees = visible.any(-1, keepdim=True)  # a row that sees no key outputs 0
    s = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(~visible, float("-inf")).masked_fill(~sees, 0.0)
    pos = torch.arange(n)
    keep = _dropout.keep_mask(state, b, h, pos, pos)  # [B, H, N, N]
    w = torch.softmax(s, dim=-1) * sees * keep / (1.0 - mha.dropout)
    out = (w @ v).transpose(1, 2).reshape(b, n, e)
    return F.linear(out, mha.out_proj.weight, mha.out_proj.bias)


def _sparse_case(name, with_globals):
    pattern = {s[0]: s[1] for s in SPARSE}[name]
    seg_ids = {s[0]: s[3] for s in SPARSE}[name]
    gm = None
    if with_globals:
        gm = torch.zeros(B, N, dtype=torch.bool)
        gm[0, [0, 6]] = True
        gm[1, [2, N - 1]] = True
    return pattern, gm, seg_ids


def _run(mha, x, seed, **kw):
    """Output and (d input, d parameters) of one training step under ``torch.manual_seed(seed)``."""
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = mha(x, x, x, need_weights=False, **kw)[0]
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad(out, [x] + list(mha.parameters()), dout)
    return out.detach(), grads


def _run_dense(mha, x, seed, kpm, gm, seg_ids):
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)  # the module draws its seed as make_state does, from the default generator
    out = _dense_dropout(mha, x, kpm, gm, seg_ids, _dropout.make_state(mha.dropout, None, x.device))
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad(out, [x] + list(mha.parameters()), dout)
    return out.detach(), grads


@pytest.mark.parametrize("backend, dtype", [("fallback", torch.float32), ("fallback", torch.float64),
                                            ("reference", torch.float32)], ids=["fallback-fp32", "fallback-fp64",
                                                                                 "reference-fp32"])
@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("padded_rows", ["torch", "zero"])
@pytest.mark.parametrize("name, with_globals", [(s[0], s[2]) for s in SPARSE], ids=[s[0] for s in SPARSE])
def test_sparse_dropout_matches_dense(name, with_globals, padded_rows, p, backend, dtype):
    """Training, need_weights=False: the O(N·w) path with lhattn's dropout equals the dense definition
    (softmax over the visible keys, then keep_mask with the same seed) -- padding rows included,
    whose numerator is dropped and denominator not -- in output and every gradient."""
    pattern, gm, seg_ids = _sparse_case(name, with_globals)
    mha = lnn.MultiheadAttention.from_torch(_torch_mha(dropout=p), pattern=pattern, padded_rows=padded_rows,
                                            backend=backend).to(dtype)
    mha64 = copy.deepcopy(mha).double()
    x, kpm = _x(True).to(dtype), _padding()
    kw = dict(key_padding_mask=kpm, global_mask=gm, segment_ids=seg_ids)
    got, got_grads = _run(mha, x, 11, **kw)
    want, want_grads = _run_dense(mha, x, 11, kpm, gm, seg_ids)
    want64, want64_grads = _run_dense(mha64, x.double(), 11, kpm, gm, seg_ids)
    assert_close_to_oracle("attn_output", got, want, want64)
    names = ["input"] + [n for n, _ in mha.named_parameters()]
    for gname, g, r, r64 in zip(names, got_grads, want_grads, want64_grads):
        assert_close_to_oracle(f"d({gname})", g, r, r64)


@pytest.mark.parametrize("padded_rows", ["torch", "zero"])
def test_sparse_dropout_really_drops(padded_rows):
    """Dropout changes every row that sees a key by a clear margin (padding rows included with
    "torch"), another seed drops differently, the same seed reproduces the step, and eval drops nothing."""
    pattern, gm, seg_ids = _sparse_case("window2-globals", True)
    mha = lnn.MultiheadAttention.from_torch(_torch_mha(dropout=0.5), pattern=pattern, padded_rows=padded_rows,
                                            backend="fallback")
    x, kpm = _x(True), _padding()
    kw = dict(key_padding_mask=kpm, global_mask=gm, need_weights=False)
    with torch.no_grad():
        outs = []
        for seed in (1, 1, 2):
            torch.manual_seed(seed)
            outs.append(mha(x, x, x, **kw)[0])
        no_drop = mha.eval()(x, x, x, **kw)[0]
    assert torch.equal(outs[0], outs[1]), "torch.manual_seed does not reproduce the step"
    rows = _visible(pattern, N, gm, seg_ids, kpm).any(-1)  # rows that see some key (the others output 0)
    if padded_rows == "zero":
        rows = rows & ~kpm
    for what, other in (("p = 0.5 vs eval", no_drop), ("seed 1 vs seed 2", outs[2])):
        diff = (outs[0] - other).abs().amax(-1)
        assert diff[rows].min() > 1e-2, f"{what}: some row unchanged ({diff[rows].min():.2e})"
    if padded_rows == "torch":
        assert (outs[0][kpm] - no_drop[kpm]).abs().max() > 1e-1, "padding rows are not dropped"


def test_training_dropout_stays_sparse(monkeypatch):
    """Training with dropout and need_weights=False never builds the [N, N] mask: an LSG pattern with
    compressed keys (which the explicit path cannot express) runs and equals out_proj of
    lhattn.attention (reference backend, same seed); so does a swapped TransformerEncoder."""
    from lhattn.nn import mha as mha_module

    def no_dense(*args, **kwargs):
        raise AssertionError("the dense [N, N] mask was built in training with need_weights=False")
    monkeypatch.setattr(mha_module, "_pattern_mask", no_dense)
    n = 29
    pattern = LSG(block_size=4, sparse_block_size=2)
    mha = lnn.MultiheadAttention.from_torch(_torch_mha(dropout=0.3), pattern=pattern, backend="fallback")
    x = _x(True, n=n)
    torch.manual_seed(3)
    got = mha(x, x, x, need_weights=False)[0]
    q, k, v = (F.linear(x, w, bias).view(B, n, H, E // H).transpose(1, 2)
               for w, bias in zip(mha.in_proj_weight.chunk(3), mha.in_proj_bias.chunk(3)))
    torch.manual_seed(3)
    out = lhattn.attention(q, k, v, pattern, dropout_p=0.3, backend="reference")
    want = mha.out_proj(out.transpose(1, 2).reshape(B, n, E))
    _close(got, want, "LSG with compressed keys, training with dropout", atol=1e-5)
    assert (got - mha.eval()(x, x, x, need_weights=False)[0]).abs().max() > 1e-2

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 64, dropout=0.1, batch_first=True)
    enc = lnn.replace_attention(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), SlidingWindow(2),
                                backend="fallback").train()
    enc(_x(True), src_key_padding_mask=_padding()).square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in enc.parameters())


def test_sparse_pattern_differs_from_full():
    ref = _torch_mha()
    mha = lnn.MultiheadAttention.from_torch(copy.deepcopy(ref), pattern=SlidingWindow(1))
    x = _x(True)
    assert (mha(x, x, x)[0] - ref(x, x, x)[0]).abs().max() > 1e-2


def test_state_dict_round_trip():
    for kw in (dict(), dict(kdim=12, vdim=20), dict(bias=False), dict(add_bias_kv=True)):
        ref = _torch_mha(**kw)
        pattern = None if kw.get("add_bias_kv") else SlidingWindow(3)
        mha = lnn.MultiheadAttention(E, H, batch_first=True, pattern=pattern, **kw)
        assert list(mha.state_dict()) == list(ref.state_dict())
        mha.load_state_dict(ref.state_dict())  # torch -> lhattn
        back = nn.MultiheadAttention(E, H, batch_first=True, **kw)
        back.load_state_dict(mha.state_dict())  # lhattn -> torch
        for (name, a), b in zip(ref.state_dict().items(), back.state_dict().values()):
            assert torch.equal(a, b), f"{name} changed in the round trip ({kw})"


def test_from_torch_shares_parameters():
    ref = _torch_mha().eval()
    mha = lnn.MultiheadAttention.from_torch(ref, pattern=SlidingWindow(3))
    assert isinstance(mha, nn.MultiheadAttention) and not mha.training
    assert all(a is b for a, b in zip(ref.parameters(), mha.parameters()))
    assert [n for n, _ in ref.named_parameters()] == [n for n, _ in mha.named_parameters()]


# ---- TransformerEncoder -------------------------------------------------------------------------


def _encoder(seed=0, norm_first=False, n_layers=2):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(E, H, 64, dropout=0.0, batch_first=True, norm_first=norm_first)
    return nn.TransformerEncoder(layer, n_layers)


@pytest.mark.filterwarnings("ignore:.*nested tensors is in prototype stage")
@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_swap(norm_first):
    """Full coverage: equal to stock in every mode (the eval + no_grad + padding mode goes through
    nested tensors and torch's fused fast path in stock); sparse: lhattn really runs."""
    enc = _encoder(norm_first=norm_first)
    full = lnn.replace_attention(copy.deepcopy(enc), pattern=SlidingWindow(N))
    sparse = lnn.replace_attention(copy.deepcopy(enc), pattern=SlidingWindow(1))
    assert all(type(layer.self_attn) is lnn.MultiheadAttention for layer in full.layers)
    x, kpm = _x(True), _padding()
    for training, grad, mask in itertools.product([True, False], [True, False], [None, kpm]):
        mode = f"training={training}, grad={grad}, padding={mask is not None}"
        for m in (enc, full, sparse):
            m.train(training)
        with torch.set_grad_enabled(grad):
            ref = enc(x, src_key_padding_mask=mask)
            _close(full(x, src_key_padding_mask=mask), ref, f"full coverage, {mode}", atol=5e-6)
            assert (sparse(x, src_key_padding_mask=mask) - ref).abs().max() > 1e-2, f"fast path taken? {mode}"


def test_transformer_encoder_runs_lhattn(monkeypatch):
    """Inference without grad (where torch's fused kernel would take over) calls lhattn.attention."""
    from lhattn.nn import mha as mha_module

    calls = []
    real = mha_module._attention
    monkeypatch.setattr(mha_module, "_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    enc = lnn.replace_attention(_encoder().eval(), pattern=SlidingWindow(2))
    with torch.no_grad():
        enc(_x(True))
    assert len(calls) == 2


def test_transformer_encoder_trains_sparse():
    """Toy task (copy the sign of the previous token) with a window (1, 0): loss goes down."""
    torch.manual_seed(0)
    enc = lnn.replace_attention(_encoder(n_layers=1), pattern=SlidingWindow((1, 0)))
    head = nn.Linear(E, 1)
    opt = torch.optim.Adam(list(enc.parameters()) + list(head.parameters()), lr=3e-3)
    x = torch.randn(8, 24, E)
    y = (x[:, :-1, 0] > 0).float()
    kpm = torch.zeros(8, 24, dtype=torch.bool)
    kpm[::2, 20:] = True
    losses = []
    for _ in range(25):
        out = head(enc(x, src_key_padding_mask=kpm))[:, 1:, 0]
        loss = nn.functional.binary_cross_entropy_with_logits(out[~kpm[:, 1:]], y[~kpm[:, 1:]])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], f"loss did not go down: {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_torch_compile_swapped_encoder():
    """torch.compile with backend="aot_eager" (inductor works too but takes ~25 s on 2 CPU cores)."""
    enc = lnn.replace_attention(_encoder(n_layers=1), pattern=SlidingWindow(2))
    x, kpm = _x(True), _padding()
    ref = enc(x, src_key_padding_mask=kpm)
    compiled = torch.compile(enc, backend="aot_eager")
    out = compiled(x, src_key_padding_mask=kpm)
    _close(out, ref, "compiled forward")
    out.sum().backward()
    assert all(p.grad is not None for p in enc.parameters())


def test_replace_attention_options():
    model = nn.ModuleDict({"a": nn.MultiheadAttention(E, H), "b": nn.Sequential(nn.MultiheadAttention(E, H))})
    model["c"] = model["a"]  # shared: stays shared
    lnn.replace_attention(model, SlidingWindow(2), include=lambda name, m: not name.startswith("b"))
    assert type(model["a"]) is lnn.MultiheadAttention and model["c"] is model["a"]
    assert type(model["b"][0]) is nn.MultiheadAttention
    lnn.replace_attention(model, Segments(4))  # re-patterns lhattn modules, swaps the rest
    assert model["a"].pattern == Segments(4) and type(model["b"][0]) is lnn.MultiheadAttention
    single = lnn.replace_attention(nn.MultiheadAttention(E, H), SlidingWindow(2))
    assert type(single) is lnn.MultiheadAttention


# ---- errors -------------------------------------------------------------------------------------

x3 = torch.randn(B, N, E)
W2 = SlidingWindow(2)


def _m(pattern=W2, **kw):
    return lnn.MultiheadAttention(E, H, batch_first=True, pattern=pattern, **kw)


@pytest.mark.parametrize("call, exc, words", [
    (lambda: _m()(x3, x3, x3, attn_mask=torch.zeros(N, N, dtype=torch.bool)), ValueError, "attn_mask"),
    (lambda: _m()(x3, x3[:, :5], x3[:, :5]), ValueError, "key/value must have the query's length"),
    (lambda: _m(add_bias_kv=True), ValueError, "add_bias_kv"),
    (lambda: _m(add_zero_attn=True), ValueError, "add_zero_attn"),
    (lambda: _m(Segments(4))(x3, x3, x3, is_causal=True), ValueError, "is_causal"),
    (lambda: _m()(x3, x3, x3, is_causal=True, global_mask=torch.ones(B, N, dtype=torch.bool)), ValueError,
     "global_mask"),
    (lambda: _m(None)(x3, x3, x3, global_mask=torch.ones(B, N, dtype=torch.bool)), ValueError, "global_mask"),
    (lambda: _m()(x3, x3, x3, segment_ids=torch.zeros(B, N, dtype=torch.long)), ValueError, "segment_ids"),
    (lambda: _m(Segments())(x3, x3, x3), ValueError, "segment_ids"),
    (lambda: _m(Segments())(x3, x3, x3, segment_ids=torch.arange(N).flip(0).expand(B, N)), ValueError,
     "segment_ids"),
    (lambda: _m(LSG(block_size=4))(x3, x3, x3, global_mask=torch.ones(B, N, dtype=torch.bool)), ValueError,
     "global_mask"),
    (lambda: _m()(x3, x3, x3, global_mask=torch.ones(B, N)), TypeError, "global_mask"),
    (lambda: _m()(x3, x3, x3, key_padding_mask=torch.randn(B, N)), ValueError, "key_padding_mask"),
    (lambda: _m()(x3, x3, x3, key_padding_mask=torch.zeros(B, N + 1, dtype=torch.bool)), ValueError,
     "key_padding_mask"),
    (lambda: _m(LSG(block_size=4))(x3, x3, x3), ValueError, "need_weights"),
    (lambda: _m(LSG(block_size=4))(x3, x3, x3, need_weights=False, key_padding_mask=_padding()), ValueError,
     "padded_rows"),
    (lambda: _m(padded_rows="nan"), ValueError, "padded_rows"),
    (lambda: _m(backend="cuda"), ValueError, "backend"),
    (lambda: _m(pattern=(2, 2)), TypeError, "pattern"),
    (lambda: lnn.MultiheadAttention.from_torch(nn.Linear(2, 2)), TypeError, "mha"),
], ids=["attn_mask", "cross-length", "bias_kv", "zero_attn", "causal-segments", "causal-globals",
        "globals-no-pattern", "segment_ids-window", "segments-no-ids", "segment_ids-decreasing", "lsg-globals",
        "global_mask-float", "kpm-float-bias", "kpm-shape", "lsg-weights", "lsg-padded-rows", "padded_rows",
        "backend", "pattern-type", "from_torch-type"])
def test_errors(call, exc, words):
    with pytest.raises(exc, match=words):
        call()


def test_float_padding_mask_accepted():
    mha = _m()
    kpm = _padding()
    as_float = torch.zeros(B, N).masked_fill(kpm, float("-inf"))
    _close(mha(x3, x3, x3, key_padding_mask=as_float)[0], mha(x3, x3, x3, key_padding_mask=kpm)[0], "float mask")
