"""Bad input raises ValueError/TypeError naming the argument -- never a bare assert or a NaN."""

import pytest
import torch

import lhattn
from lhattn.patterns import LSG, Segments, SlidingWindow


def _qkv(b=2, h=4, n=16, d=16, h_kv=None, dtype=torch.float32):
    h_kv = h if h_kv is None else h_kv
    return (torch.randn(b, h, n, d, dtype=dtype), torch.randn(b, h_kv, n, d, dtype=dtype),
            torch.randn(b, h_kv, n, d, dtype=dtype))


W = SlidingWindow(2)


@pytest.mark.parametrize("make, exc, words", [
    (lambda: SlidingWindow(-1), ValueError, "window"),
    (lambda: SlidingWindow((2, -3)), ValueError, "right"),
    (lambda: SlidingWindow((1, 2, 3)), TypeError, "window"),
    (lambda: SlidingWindow(2.5), TypeError, "window"),
    (lambda: SlidingWindow(2, dilation=0), ValueError, "dilation"),
    (lambda: SlidingWindow((2, 2), causal=True), ValueError, "causal"),
    (lambda: LSG(block_size=0), ValueError, "block_size"),
    (lambda: LSG(block_size=-4), ValueError, "block_size"),
    (lambda: LSG(sparsity_factor=0), ValueError, "sparsity_factor"),
    (lambda: LSG(sparsity_type="random"), ValueError, "sparsity_type"),
    (lambda: LSG(num_global_tokens=-1), ValueError, "num_global_tokens"),
    (lambda: Segments(0), ValueError, "segment_size"),
    (lambda: Segments(3.0), TypeError, "segment_size"),
], ids=["window<0", "right<0", "window-3", "window-float", "dilation0", "causal-right", "block0", "block<0",
        "factor0", "sparsity-type", "globals<0", "segment0", "segment-float"])
def test_bad_pattern(make, exc, words):
    with pytest.raises(exc, match=words):
        make()


def _call(q, k, v, **kw):
    return lhattn.attention(q, k, v, kw.pop("pattern", W), **kw)


@pytest.mark.parametrize("mutate, exc, words", [
    (lambda q, k, v: (q[0], k, v, {}), ValueError, "q must have 4 dims"),
    (lambda q, k, v: (q, k[:, :, :, :8], v, {}), ValueError, "k and v must have the same shape"),
    (lambda q, k, v: (q, k[:, :, :8], v[:, :, :8], {}), ValueError, "k/v must be"),
    (lambda q, k, v: (q, k[:, :3], v[:, :3], {}), ValueError, "multiple of k/v's heads"),
    (lambda q, k, v: (q, k.double(), v.double(), {}), TypeError, "k.dtype"),
    (lambda q, k, v: (q.int(), k, v, {}), TypeError, "q must be float"),
    (lambda q, k, v: (q.tolist(), k, v, {}), TypeError, "q must be a torch.Tensor"),
    (lambda q, k, v: (q, k, v, {"key_padding_mask": torch.zeros(2, 16)}), TypeError, "key_padding_mask"),
    (lambda q, k, v: (q, k, v, {"key_padding_mask": torch.zeros(2, 15, dtype=torch.bool)}), ValueError,
     "key_padding_mask must have shape"),
    (lambda q, k, v: (q, k, v, {"global_mask": torch.zeros(3, 16, dtype=torch.bool)}), ValueError,
     "global_mask must have shape"),
    (lambda q, k, v: (q, k, v, {"global_qkv": (q, k)}), TypeError, "global_qkv"),
    (lambda q, k, v: (q, k, v, {"global_qkv": (q, k, v[:, :, :4])}), ValueError, "v_global"),
    (lambda q, k, v: (q, k, v, {"scale": -1.0}), ValueError, "scale"),
    (lambda q, k, v: (q, k, v, {"scale": "big"}), TypeError, "scale"),
    (lambda q, k, v: (q, k, v, {"backend": "cuda"}), ValueError, "backend"),
    (lambda q, k, v: (q, k, v, {"pattern": "window"}), TypeError, "pattern"),
    (lambda q, k, v: (q, k, v, {"segment_ids": torch.zeros(2, 16, dtype=torch.long)}), ValueError, "segment_ids"),
    (lambda q, k, v: (q, k, v, {"pattern": Segments()}), ValueError, "segment_size"),
    (lambda q, k, v: (q, k, v, {"pattern": Segments(4), "segment_ids": torch.zeros(2, 16, dtype=torch.long)}),
     ValueError, "exactly one"),
    (lambda q, k, v: (q, k, v, {"pattern": Segments(), "segment_ids": torch.zeros(2, 16)}), TypeError,
     "segment_ids must be an integer"),
    (lambda q, k, v: (q, k, v, {"pattern": Segments(), "segment_ids": torch.zeros(2, 15, dtype=torch.long)}),
     ValueError, "segment_ids must have shape"),
    (lambda q, k, v: (q, k, v, {"pattern": Segments(), "segment_ids": torch.arange(16).flip(0).expand(2, 16)}),
     ValueError, "non-decreasing"),
    (lambda q, k, v: (q, k, v, {"pattern": Segments(4), "global_qkv": (q, k, v)}), ValueError, "global_qkv"),
    (lambda q, k, v: (q, k, v, {"pattern": LSG(block_size=4), "global_mask": torch.zeros(2, 16, dtype=torch.bool)}),
     ValueError, "global_mask"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bad_call(mutate, exc, words):
    q, k, v, kw = mutate(*_qkv())
    with pytest.raises(exc, match=words):
        _call(q, k, v, **kw)


def test_triton_backend_on_plain_cpu_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match="backend='triton'"):
        lhattn.attention(q, k, v, W, backend="triton")


def test_auto_on_cpu_is_the_fallback():
    q, k, v = _qkv(dtype=torch.float64)
    a = lhattn.attention(q, k, v, W)
    b = lhattn.attention(q, k, v, W, backend="fallback")
    assert torch.equal(a, b)
