"""HAT: the cross-segment step (gather -> dense attention among representatives -> scatter),
HATLayer / HATEncoder, and segment-local attention = dense SDPA per segment."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lhattn
import lhattn.nn as lnn
from lhattn.nn.hat import cross_segment_attention, representative_index

from tolerance import assert_close_to_oracle


pytestmark = pytest.mark.usefixtures("one_thread")

def _ids_from_lengths(lengths):
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


def _loop_cross_segment(q, k, v, seg_ids, kpm, gm, scale):
    """Plain PyTorch, one batch row and one head at a time: representatives = first token of each
    segment + global tokens, minus padding; each attends to all representatives of its row."""
    b, h, n, d = q.shape
    out = torch.zeros_like(q)
    group = h // k.shape[1]
    for bi in range(b):
        reps = [i for i in range(n)
                if (i == 0 or seg_ids[bi, i] != seg_ids[bi, i - 1] or (gm is not None and gm[bi, i]))
                and not (kpm is not None and kpm[bi, i])]
        for hi in range(h):
            qr, kr, vr = q[bi, hi, reps], k[bi, hi // group, reps], v[bi, hi // group, reps]
            out[bi, hi, reps] = torch.softmax(qr @ kr.T * scale, dim=-1) @ vr
    return out


N = 23
CASES = {
    "fixed-S5": dict(segment_size=5),
    "fixed-S1": dict(segment_size=1),
    "one-segment": dict(segment_size=64),
    "ids-variable": dict(lengths=[[1, 4, 1, 1, 9, 7], [12, 11], [23]]),
    "ids-padding": dict(lengths=[[3, 3, 3, 14], [5, 1, 17], [2, 21]], padding=True),
    "fixed-globals-padding": dict(segment_size=4, padding=True, globals=True),
    "ids-globals-gqa": dict(lengths=[[6, 6, 11], [1] * 23, [20, 3]], globals=True, h_kv=1),
}


def _inputs(case, dtype=torch.float32, b=3, h=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    h_kv = case.get("h_kv", h)
    q = torch.randn(b, h, N, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, h_kv, N, d, generator=g, dtype=torch.float64) for _ in range(2))
    kw, seg_ids = {}, None
    if "segment_size" in case:
        kw["segment_size"] = case["segment_size"]
        seg_ids = (torch.arange(N) // case["segment_size"]).expand(b, N)
    else:
        seg_ids = torch.stack([_ids_from_lengths(ls) for ls in case["lengths"]]) + 7  # ids need not start at 0
        kw["segment_ids"] = seg_ids
    if case.get("padding"):
        kpm = torch.zeros(b, N, dtype=torch.bool)
        kpm[1, 15:] = True  # the first token of row 1's last segment (if any) is padding
        kpm[2, 1:] = True   # one valid token
        kw["key_padding_mask"] = kpm
    if case.get("globals"):
        gm = torch.zeros(b, N, dtype=torch.bool)
        gm[0, [2, 3, 17]] = True
        gm[1, 0] = True  # already a representative: counted once
        gm[2, 22] = True
        kw["global_mask"] = gm
    q, k, v = (t.to(dtype).requires_grad_(True) for t in (q, k, v))
    return q, k, v, kw, seg_ids


@pytest.mark.parametrize("name", list(CASES))
def test_cross_segment_matches_loop(name):
    q, k, v, kw, seg_ids = _inputs(CASES[name])
    out = cross_segment_attention(q, k, v, **kw)
    ref = _loop_cross_segment(q.double(), k.double(), v.double(), seg_ids, kw.get("key_padding_mask"),
                              kw.get("global_mask"), q.shape[-1] ** -0.5)
    assert (out.double() - ref).abs().max() < 1e-5
    # only representative rows are written
    idx = representative_index(q.shape[0], N, **kw)
    written = torch.zeros(q.shape[0], N, dtype=torch.bool)
    for bi in range(q.shape[0]):
        written[bi, idx[bi][idx[bi] >= 0]] = True
    assert (out.detach()[~written[:, None].expand(-1, q.shape[1], -1)] == 0).all()
    # gradients against the loop's
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.double())
    for gname, g, r in zip("qkv", grads, ref_grads):
        assert (g.double() - r).abs().max() < 1e-5, f"d{gname}"


def test_representative_index():
    ids = torch.tensor([[0, 0, 1, 2, 2, 2], [5, 5, 5, 5, 6, 6]])
    kpm = torch.tensor([[False] * 6, [False, False, False, False, True, True]])
    gm = torch.tensor([[False, True, False, False, False, False], [False] * 6])
    idx = representative_index(2, 6, segment_ids=ids, key_padding_mask=kpm, global_mask=gm)
    assert idx.tolist() == [[0, 1, 2, 3], [0, -1, -1, -1]]
    assert representative_index(1, 7, segment_size=3).tolist() == [[0, 3, 6]]


@pytest.mark.parametrize("name", ["ids-padding", "fixed-globals-padding", "ids-globals-gqa"])
def test_cross_segment_gradcheck(name):
    q, k, v, kw, _ = _inputs(CASES[name], dtype=torch.float64, b=3, h=2, d=4)
    # fast_mode: checks random projections of the Jacobian (the full one takes ~20 s per case here)
    assert torch.autograd.gradcheck(lambda q, k, v: cross_segment_attention(q, k, v, **kw), (q, k, v),
                                    fast_mode=True)


def test_cross_segment_gradcheck_full():
    """The full Jacobian on a tiny input: variable segments, padding, globals, GQA."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 2, 7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 1, 7, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    kw = dict(segment_ids=torch.tensor([[0, 0, 1, 2, 2, 2, 3], [4, 5, 5, 5, 5, 6, 6]]),
              key_padding_mask=torch.tensor([[False] * 7, [False] * 5 + [True] * 2]),
              global_mask=torch.tensor([[False, True] + [False] * 5, [False] * 7]))
    assert torch.autograd.gradcheck(lambda q, k, v: cross_segment_attention(q, k, v, **kw), (q, k, v))


def test_cross_segment_dtypes_and_empty():
    q, k, v, kw, _ = _inputs(CASES["fixed-S5"], dtype=torch.bfloat16)
    ref = cross_segment_attention(*(t.detach().float() for t in (q, k, v)), **kw)
    out = cross_segment_attention(q, k, v, **kw)
    assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max() < 5e-2
    everything_padded = torch.ones(3, N, dtype=torch.bool)
    out = cross_segment_attention(q, k, v, segment_size=5, key_padding_mask=everything_padded)
    assert out.shape == q.shape and (out == 0).all()


@pytest.mark.parametrize("call, exc, words", [
    (lambda q: cross_segment_attention(q, q, q), ValueError, "segment_ids"),
    (lambda q: cross_segment_attention(q, q, q, segment_size=4, segment_ids=torch.zeros(1, 8, dtype=torch.long)),
     ValueError, "segment_size"),
    (lambda q: cross_segment_attention(q, q, q, segment_size=0), ValueError, "segment_size"),
    (lambda q: cross_segment_attention(q, q, q, segment_ids=torch.arange(8).flip(0)[None]), ValueError,
     "segment_ids"),
    (lambda q: cross_segment_attention(q, q, q, segment_size=2, global_mask=torch.ones(1, 8)), TypeError,
     "global_mask"),
    (lambda q: cross_segment_attention(q[0], q[0], q[0], segment_size=2), ValueError, "q"),
], ids=["no-segments", "both", "size0", "ids-decreasing", "global-float", "rank"])
def test_cross_segment_errors(call, exc, words):
    with pytest.raises(exc, match=words):
        call(torch.randn(1, 2, 8, 4))


# ---- segment-local attention == dense SDPA per segment ------------------------------------------


@pytest.mark.parametrize("backend", ["fallback", "reference"])
def test_segments_equal_sdpa_per_segment(backend):
    b, h, n, d, s = 2, 3, 48, 16, 8
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=g, requires_grad=True) for _ in range(3))
    out = lhattn.attention(q, k, v, lhattn.Segments(s), backend=backend)

    def per_segment(t):  # [B, H, n, D] -> [B·n/S, H, S, D]
        return t.view(b, h, n // s, s, d).transpose(1, 2).reshape(b * n // s, h, s, d)

    ref = F.scaled_dot_product_attention(per_segment(q), per_segment(k), per_segment(v))
    ref = ref.view(b, n // s, h, s, d).transpose(1, 2).reshape(b, h, n, d)
    assert (out - ref).abs().max() < 1e-5
    dout = torch.randn_like(out)
    grads, ref_grads = torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)
    for name, g1, g2 in zip("qkv", grads, ref_grads):
        assert (g1 - g2).abs().max() < 1e-5, f"d{name}"


# ---- layers -------------------------------------------------------------------------------------

E, HEADS = 16, 2


def _torch_layer(seed, norm_first):
    torch.manual_seed(seed)
    return nn.TransformerEncoderLayer(E, HEADS, 32, dropout=0.0, batch_first=True, norm_first=norm_first).eval()


@pytest.mark.parametrize("norm_first", [False, True])
def test_hat_layer_equals_torch_layers(norm_first):
    """SWE = nn.TransformerEncoderLayer on each segment; CSE = nn.TransformerEncoderLayer on x[:, ::S]
    (the representatives), written back in place (same weights via load_state_dict)."""
    b, s, n = 2, 4, 20
    hat = lnn.HATLayer(E, HEADS, 32, dropout=0.0, norm_first=norm_first, segment_size=s).eval()
    swe, cse = _torch_layer(1, norm_first), _torch_layer(2, norm_first)
    hat.segment_encoder.load_state_dict(swe.state_dict())
    hat.cross_segment_encoder.load_state_dict(cse.state_dict())
    x = torch.randn(b, n, E)
    with torch.no_grad():
        ref = swe(x.view(b * n // s, s, E)).view(b, n, E)
        ref[:, ::s] = cse(ref[:, ::s].clone())
        out = hat(x)
    assert (out - ref).abs().max() < 1e-5


def test_hat_encoder_forward_backward():
    b, n = 2, 64
    lengths = [[5, 11, 1, 20, 27], [32, 16, 16]]
    seg_ids = torch.stack([_ids_from_lengths(ls) for ls in lengths])
    kpm = torch.zeros(b, n, dtype=torch.bool)
    kpm[1, 50:] = True
    gm = torch.zeros(b, n, dtype=torch.bool)
    gm[:, 0] = True
    for kw, enc in [
        (dict(segment_ids=seg_ids, key_padding_mask=kpm, global_mask=gm),
         lnn.HATEncoder(E, HEADS, "SD|S|SD", 32, max_segments=8)),
        (dict(key_padding_mask=kpm), lnn.HATEncoder(E, HEADS, "S|SD|D", 32, norm_first=True, segment_size=8)),
    ]:
        x = torch.randn(b, n, E, requires_grad=True)
        out = enc(x, **kw)
        assert out.shape == x.shape and torch.isfinite(out).all()
        out.square().sum().backward()
        assert torch.isfinite(x.grad).all()
        for name, p in enc.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        # a token influences other segments only through the CSE
        x2 = x.detach().clone()
        x2[0, -1] += 1.0
        with torch.no_grad():
            delta = (enc.eval()(x2, **kw) - enc(x.detach(), **kw)).abs().amax(-1)[0]
        assert delta[0] > 0, "no cross-segment mixing"


# ---- attention dropout --------------------------------------------------------------------------


def test_attention_dropout_arguments():
    """attention_dropout reaches the SWE and the CSE of every layer; None (default) = dropout, as
    nn.TransformerEncoderLayer does; it is validated."""
    def rates(layer):
        return layer.segment_encoder.self_attn.dropout, layer.cross_segment_encoder.self_attn.dropout

    assert rates(lnn.HATLayer(E, HEADS, 32, dropout=0.2, segment_size=4)) == (0.2, 0.2)
    assert rates(lnn.HATLayer(E, HEADS, 32, dropout=0.2, attention_dropout=0.0, segment_size=4)) == (0.0, 0.0)
    enc = lnn.HATEncoder(E, HEADS, "SD|SD", 32, dropout=0.0, attention_dropout=0.3, segment_size=4)
    assert all(rates(layer) == (0.3, 0.3) for layer in enc.layers)
    assert enc.layers[0].segment_encoder.dropout.p == 0.0  # the residual / feed-forward dropout stays apart
    for bad in (1.0, -0.1, True, "0.1"):
        with pytest.raises(ValueError, match="attention dropout"):
            lnn.HATLayer(E, HEADS, 32, attention_dropout=bad, segment_size=4)


def _swe_by_hand(layer, x, kpm, gm, s, p):
    """The SWE (post-norm, dropout 0 on the residuals) with its attention written as
    lhattn.segment_attention (reference backend) on the layer's projections, dropping with p."""
    blk = layer.segment_encoder
    attn = blk.self_attn
    b, n, e = x.shape
    q, k, v = (F.linear(x, w, bias).view(b, n, HEADS, e // HEADS).transpose(1, 2)
               for w, bias in zip(attn.in_proj_weight.chunk(3), attn.in_proj_bias.chunk(3)))
    o = lhattn.segment_attention(q, k, v, segment_size=s, key_padding_mask=kpm, global_mask=gm, dropout_p=p,
                                 backend="reference")
    h = blk.norm1(x + attn.out_proj(o.transpose(1, 2).reshape(b, n, e)))
    return blk.norm2(h + blk.linear2(F.relu(blk.linear1(h))))


def _step(fn, module, x, seed):
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = fn(x)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(out.dtype)
    return out.detach(), torch.autograd.grad(out, [x] + list(module.parameters()), dout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_swe_attention_dropout_equals_lhattn(p, dtype):
    """Training: the SWE drops attention probabilities exactly as lhattn.segment_attention with
    dropout_p=attention_dropout and the same seed (torch.manual_seed), output and gradients."""
    b, n, s = 2, 21, 4
    torch.manual_seed(0)
    layer = lnn.HATLayer(E, HEADS, 32, dropout=0.0, attention_dropout=p, segment_size=s, cross_segment_encoder=False,
                         backend="fallback").to(dtype).train()
    layer64 = copy.deepcopy(layer).double()
    x = torch.randn(b, n, E, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    kpm = torch.zeros(b, n, dtype=torch.bool)
    kpm[1, 15:] = True
    gm = torch.zeros(b, n, dtype=torch.bool)
    gm[0, [2, 9]] = True
    kw = dict(key_padding_mask=kpm, global_mask=gm)
    got, got_grads = _step(lambda t: layer(t, **kw), layer, x, 7)
    want, want_grads = _step(lambda t: _swe_by_hand(layer, t, kpm, gm, s, p), layer, x, 7)
    want64, want64_grads = _step(lambda t: _swe_by_hand(layer64, t, kpm, gm, s, p), layer64, x.double(), 7)
    assert_close_to_oracle("SWE output", got, want, want64)
    names = ["x"] + [name for name, _ in layer.named_parameters()]
    for name, g, r, r64 in zip(names, got_grads, want_grads, want64_grads):
        assert_close_to_oracle(f"d({name})", g, r, r64)
    with torch.no_grad():
        no_drop = layer.eval()(x, **kw)
    assert (got - no_drop).abs().max() > 1e-2, "the SWE did not drop anything in training"


def test_attention_dropout_in_training_only():
    """SWE and CSE: attention dropout changes a training step (another seed, another output; the
    same seed, the same output) and nothing in eval; with attention_dropout=0 (and dropout=0)
    training equals eval."""
    b, n, s = 2, 24, 4
    x = torch.randn(b, n, E, generator=torch.Generator().manual_seed(2))
    for parts in (dict(cross_segment_encoder=False), dict(segment_encoder=False)):
        def make(p):
            torch.manual_seed(0)  # the same weights for every p
            return lnn.HATLayer(E, HEADS, 32, dropout=0.0, attention_dropout=p, segment_size=s, backend="fallback",
                                **parts)
        layer = make(0.5)
        with torch.no_grad():
            no_drop = layer.eval()(x)
            layer.train()
            outs = []
            for seed in (1, 1, 2):
                torch.manual_seed(seed)
                outs.append(layer(x))
            undropped = make(0.0).train()(x)
        rows = slice(None) if parts.get("segment_encoder", True) else slice(None, None, s)  # CSE: representatives
        assert torch.equal(outs[0], outs[1]), f"{parts}: torch.manual_seed does not reproduce the step"
        assert (outs[0] - outs[2])[:, rows].abs().amax(-1).min() > 1e-3, f"{parts}: two seeds drop alike"
        assert (outs[0] - no_drop)[:, rows].abs().amax(-1).min() > 1e-3, f"{parts}: no dropout in training"
        torch.testing.assert_close(undropped, no_drop, rtol=0, atol=1e-6)


def test_hat_errors():
    with pytest.raises(ValueError, match="layout"):
        lnn.HATEncoder(E, HEADS, "SD|X")
    with pytest.raises(ValueError, match="segment_encoder"):
        lnn.HATLayer(E, HEADS, segment_size=4, segment_encoder=False, cross_segment_encoder=False)
    enc = lnn.HATEncoder(E, HEADS, "SD", 32, segment_size=4, max_segments=2)
    with pytest.raises(ValueError, match="max_segments"):
        enc(torch.randn(1, 12, E))
    with pytest.raises(ValueError, match="segment_ids"):
        enc(torch.randn(1, 12, E), segment_ids=torch.zeros(1, 12, dtype=torch.long))
    with pytest.raises(ValueError, match="x must be"):
        enc(torch.randn(1, 12, E + 1))


# ---- segment positions --------------------------------------------------------------------------


def _absolute_by_hand(enc, x, kpm, seg_ids, fixed):
    """One-layer encoder: its CSE input + table[s + 1] for the representative of segment s (s counted
    over padded segments too), written as a loop feeding HATLayer's segment_embeddings."""
    b, n, _ = x.shape
    reps = representative_index(b, n, segment_ids=seg_ids, key_padding_mask=kpm)
    emb = torch.zeros(b, reps.shape[1], E, dtype=x.dtype)
    for bi in range(b):
        starts = [i for i in range(n) if i == 0 or seg_ids[bi, i] != seg_ids[bi, i - 1]]
        for slot, pos in enumerate(reps[bi].tolist()):
            if pos >= 0:
                emb[bi, slot] = enc.segment_position.weight[starts.index(pos) + 1]
    seg_kw = {} if fixed else dict(segment_ids=seg_ids)
    return enc.layers[0](x, key_padding_mask=kpm, segment_embeddings=emb, **seg_kw)


@pytest.mark.parametrize("fixed", [True, False], ids=["segment_size", "segment_ids"])
def test_absolute_segment_positions_match_loop(fixed):
    """segment_positions='absolute' (HAT's numbering): a padded middle segment keeps the numbers of
    the segments after it; 'rank' renumbers them; both agree when no segment starts with padding."""
    torch.manual_seed(0)
    b, s = 3, 4
    lengths = [[4] * 5, [4] * 5, [4] * 5] if fixed else [[4, 4, 4, 4, 4], [3, 4, 5, 4, 4], [2, 6, 3, 5, 4]]
    seg_ids = torch.stack([_ids_from_lengths(ls) for ls in lengths])
    n = seg_ids.shape[1]
    kpm = torch.zeros(b, n, dtype=torch.bool)
    if fixed:
        kpm[1, 4:8] = True  # a padded middle segment
    else:
        kpm[1, 3:8] = True  # a padded middle segment, and the next one starts with padding
    kpm[2, 17:] = True    # padded last segments
    size, seg_kw = (dict(segment_size=s), {}) if fixed else ({}, dict(segment_ids=seg_ids))
    common = dict(dropout=0.0, max_segments=6, dtype=torch.float64, **size)
    enc = lnn.HATEncoder(E, HEADS, "SD", 32, segment_positions="absolute", **common).eval()
    rank = lnn.HATEncoder(E, HEADS, "SD", 32, **common).eval()
    with torch.no_grad():
        enc.segment_position.weight.normal_()
        rank.load_state_dict({**enc.state_dict(), "segment_position.weight": enc.segment_position.weight[1:]})
        x = torch.randn(b, n, E, dtype=torch.float64)
        out = enc(x, key_padding_mask=kpm, **seg_kw)
        ref = _absolute_by_hand(enc, x, kpm, seg_ids, fixed)
        out_rank = rank(x, key_padding_mask=kpm, **seg_kw)
    real = ~kpm
    assert (out - ref)[real].abs().max() < 1e-12
    assert (out - out_rank)[0].abs().max() < 1e-12         # no padded segment
    assert (out - out_rank)[1][real[1]].abs().max() > 1e-3  # a padded middle segment renumbers the rest


def test_segment_positions_errors_and_frozen_padding_row():
    with pytest.raises(ValueError, match="segment_positions must be one of"):
        lnn.HATEncoder(E, HEADS, "SD", segment_size=4, max_segments=2, segment_positions="relative")
    with pytest.raises(ValueError, match="needs max_segments set"):
        lnn.HATEncoder(E, HEADS, "SD", segment_size=4, segment_positions="absolute")
    with pytest.raises(ValueError, match="needs max_segments None"):
        lnn.HATEncoder(E, HEADS, "SD", segment_size=4, max_segments=2, segment_positions="none")
    with pytest.raises(ValueError, match="segment_padding_idx must be"):
        lnn.HATEncoder(E, HEADS, "SD", segment_size=4, max_segments=2, segment_positions="absolute",
                       segment_padding_idx=3)
    enc = lnn.HATEncoder(E, HEADS, "SD|SD", 32, segment_size=4, max_segments=3, segment_positions="absolute",
                         segment_padding_idx=1)
    assert enc.segment_position.num_embeddings == 4 and enc.segment_position.padding_idx == 1
    x = torch.randn(2, 12, E)
    with pytest.raises(ValueError, match="global tokens have none"):
        enc(x, global_mask=torch.zeros(2, 12, dtype=torch.bool))
    with pytest.raises(ValueError, match="4 segments .* more than max_segments=3"):
        enc(torch.randn(2, 13, E))
    enc(x).square().sum().backward()
    grad = enc.segment_position.weight.grad
    assert float(grad[1].abs().max()) == 0.0 and float(grad[2].abs().max()) > 0  # row 1 (segment 0) frozen
