"""The oracle itself, checked independently of every backend."""

import math

import pytest
import torch
import torch.nn.functional as F

import lhattn
from lhattn import reference
from lhattn.patterns import Segments, SlidingWindow


def _qkv(b=2, h=3, n=6, d=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=dtype) for _ in range(3)]


def _naive(q, k, v, visible, scale, qkv_global=None, global_rows=()):
    """Loop over (b, h, i): softmax over the hand-written key set ``visible[b][i]``."""
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i, keys in enumerate(visible[b]):
                if not keys:
                    continue
                qq, kk, vv = (qkv_global if (qkv_global and i in global_rows) else (q, k, v))
                s = torch.stack([qq[b, h, i] @ kk[b, h, j] * scale for j in keys])
                p = torch.softmax(s, 0)
                out[b, h, i] = sum(p[t] * vv[b, h, j] for t, j in enumerate(keys))
    return out


def test_full_window_equals_sdpa():
    q, k, v = _qkv(n=29)
    out, lse = reference.sliding_window_attention(q, k, v, SlidingWindow((28, 28)))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-12, rtol=0)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), atol=1e-12, rtol=0)


def test_causal_window_equals_sdpa_causal():
    q, k, v = _qkv(n=17)
    out, _ = reference.sliding_window_attention(q, k, v, SlidingWindow(16, causal=True))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-12, rtol=0)


def test_gqa_equals_sdpa_gqa():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 6, 11, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 11, 8, generator=g, dtype=torch.float64) for _ in range(2))
    out, _ = reference.sliding_window_attention(q, k, v, SlidingWindow((10, 10)))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, enable_gqa=True), atol=1e-12, rtol=0)


def test_hand_example_sliding_window_globals_padding():
    # 6 tokens, window (1, 1); token 2 is global, token 5 is padding.
    q, k, v = _qkv(b=1)
    qg, kg, vg = _qkv(b=1, seed=1)
    gm = torch.tensor([[False, False, True, False, False, False]])
    kpm = torch.tensor([[False, False, False, False, False, True]])
    visible = [[[0, 1, 2], [0, 1, 2], [0, 1, 2, 3, 4], [2, 3, 4], [2, 3, 4], []]]
    expect = _naive(q, k, v, visible, 8 ** -0.5, (qg, kg, vg), global_rows=(2,))
    out, lse = reference.sliding_window_attention(q, k, v, SlidingWindow(1), key_padding_mask=kpm,
                                                  global_mask=gm, global_qkv=(qg, kg, vg))
    torch.testing.assert_close(out, expect, atol=1e-12, rtol=0)
    assert torch.isneginf(lse[..., 5]).all() and torch.isfinite(lse[..., :5]).all()


def test_hand_example_dilated_window():
    q, k, v = _qkv(b=1)
    visible = [[[0, 2], [1, 3], [0, 2, 4], [1, 3, 5], [2, 4], [3, 5]]]
    out, _ = reference.sliding_window_attention(q, k, v, SlidingWindow(1, dilation=2))
    torch.testing.assert_close(out, _naive(q, k, v, visible, 8 ** -0.5), atol=1e-12, rtol=0)


def test_hand_example_asymmetric_window():
    q, k, v = _qkv(b=1)
    visible = [[[0, 1], [0, 1, 2], [0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5], [3, 4, 5]]]
    out, _ = reference.sliding_window_attention(q, k, v, SlidingWindow((2, 1)))
    torch.testing.assert_close(out, _naive(q, k, v, visible, 8 ** -0.5), atol=1e-12, rtol=0)


def test_hand_example_segments_with_global():
    # segments [0, 0 | 1, 1, 1 | 2]; token 0 is global.
    q, k, v = _qkv(b=1)
    ids = torch.tensor([[0, 0, 1, 1, 1, 2]])
    gm = torch.tensor([[True, False, False, False, False, False]])
    visible = [[[0, 1, 2, 3, 4, 5], [0, 1], [0, 2, 3, 4], [0, 2, 3, 4], [0, 2, 3, 4], [0, 5]]]
    out, _ = reference.segment_attention(q, k, v, Segments(), segment_ids=ids, global_mask=gm)
    torch.testing.assert_close(out, _naive(q, k, v, visible, 8 ** -0.5), atol=1e-12, rtol=0)


def test_hand_example_fixed_segments_padding():
    q, k, v = _qkv(b=1)
    kpm = torch.tensor([[False, False, False, False, True, True]])
    visible = [[[0, 1, 2], [0, 1, 2], [0, 1, 2], [3], [], []]]
    out, lse = reference.segment_attention(q, k, v, Segments(3), key_padding_mask=kpm)
    torch.testing.assert_close(out, _naive(q, k, v, visible, 8 ** -0.5), atol=1e-12, rtol=0)
    assert torch.isneginf(lse[..., 4:]).all()


def test_fixed_segments_equal_sdpa_on_reshape():
    b, h, n, d, s = 2, 3, 24, 8, 6
    q, k, v = _qkv(b=b, h=h, n=n, d=d)
    out, _ = reference.segment_attention(q, k, v, Segments(s))

    def split(x):
        return x.view(b, h, n // s, s, d).permute(0, 2, 1, 3, 4).reshape(b * n // s, h, s, d)
    dense = F.scaled_dot_product_attention(split(q), split(k), split(v))
    dense = dense.view(b, n // s, h, s, d).permute(0, 2, 1, 3, 4).reshape(b, h, n, d)
    torch.testing.assert_close(out, dense, atol=1e-12, rtol=0)


def test_padding_rows_have_zero_output_and_gradient():
    q, k, v = (t.requires_grad_() for t in _qkv(n=10))
    kpm = torch.zeros(2, 10, dtype=torch.bool)
    kpm[1, 6:] = True
    out, lse = reference.sliding_window_attention(q, k, v, SlidingWindow(2), key_padding_mask=kpm)
    out.sum().backward()
    assert (out[1, :, 6:] == 0).all() and torch.isneginf(lse[1, :, 6:]).all()
    assert (q.grad[1, :, 6:] == 0).all() and (k.grad[1, :, 6:] == 0).all() and (v.grad[1, :, 6:] == 0).all()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_reference_gradcheck():
    q, k, v = (t[..., :4].clone().requires_grad_() for t in _qkv(b=1, h=2, n=7))
    gm = torch.tensor([[False, True, False, False, False, False, False]])
    kpm = torch.tensor([[False, False, False, False, False, False, True]])
    torch.autograd.gradcheck(
        lambda q, k, v: reference.sliding_window_attention(q, k, v, SlidingWindow(1), key_padding_mask=kpm,
                                                           global_mask=gm)[0], (q, k, v))


# --- Hugging Face Longformer: the reference fed LongformerSelfAttention's own projections ---

@pytest.mark.parametrize("with_global", [False, True], ids=["local", "global"])
def test_sliding_window_reference_matches_hf_longformer(with_global):
    modeling = pytest.importorskip("transformers.models.longformer.modeling_longformer")
    from transformers import LongformerConfig

    torch.manual_seed(0)
    heads, hidden, window, n, b = 4, 32, 8, 32, 2
    cfg = LongformerConfig(hidden_size=hidden, num_attention_heads=heads, attention_window=[window],
                           attention_probs_dropout_prob=0.0)
    attn = modeling.LongformerSelfAttention(cfg, layer_id=0).eval()
    x = torch.randn(b, n, hidden)
    # HF's extended mask: -10000 padding, 0 local, +10000 global.
    mask = torch.zeros(b, n)
    mask[1, 25:] = -10000.0
    if with_global:
        mask[0, [0, 7, 19]] = 10000.0
        mask[1, 3] = 10000.0
    with torch.no_grad():
        hf = attn(x, attention_mask=mask, is_index_masked=mask < 0,
                  is_index_global_attn=mask > 0, is_global_attn=bool((mask > 0).any()))[0]

        def heads_of(lin):
            return lin(x).view(b, n, heads, hidden // heads).transpose(1, 2)
        q, k, v = heads_of(attn.query), heads_of(attn.key), heads_of(attn.value)
        qkv_g = (heads_of(attn.query_global), heads_of(attn.key_global), heads_of(attn.value_global))
        out, _ = reference.sliding_window_attention(
            q, k, v, SlidingWindow((window // 2, window // 2)), key_padding_mask=mask < 0,
            global_mask=mask > 0, global_qkv=qkv_g)
    ours = out.transpose(1, 2).reshape(b, n, hidden)
    torch.testing.assert_close(ours, hf, rtol=1e-5, atol=1e-5)
    assert (ours[1, 25:] == 0).all()


def test_public_reference_backend_is_the_oracle():
    q, k, v = _qkv(n=12)
    out = lhattn.sliding_window_attention(q, k, v, (2, 3), backend="reference")
    expect, _ = reference.sliding_window_attention(q, k, v, SlidingWindow((2, 3)))
    assert torch.equal(out, expect)
