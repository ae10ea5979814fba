"""HAT: the cross-segment step (gather -> dense attention among representatives -> scatter),
HATLayer / HATEncoder, and segment-local attention = dense SDPA per segment."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lhattn
import lhattn.nn as lnn
from lhattn.nn.hat import cross_segment_attention, representative_index



@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny shapes: one intra-op thread is as fast, and immune to a busy 2-core CI machine
    (where OpenMP threads waiting on each other made these tests ~50x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

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
