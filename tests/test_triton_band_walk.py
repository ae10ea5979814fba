"""The band-walk helpers of ``kernels/_core.py`` (``attn_fwd_band``, ``attn_bwd_dq_band``,
``attn_bwd_dkdv_band``) at head dim 128, where the forward's masked tiles test the column offsets
against ``lo - j0`` (the other head dims test absolute columns; those run in every other Triton
test).  Clamped edge loads are exercised by bands narrower than a block, key chunks that start
inside a block, padding and dilation.  Triton against the oracle: outputs, lse and every gradient.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

import pytest  # noqa: E402

pytest.importorskip("triton")

import lhattn  # noqa: E402
from lhattn.patterns import Segments, SlidingWindow  # noqa: E402

from cases import Case, cast, make_inputs, run_with_grads  # noqa: E402
from tolerance import assert_close_to_oracle  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SW_KERNELS = pytest.importorskip("lhattn.kernels.sliding_window")
pytest.importorskip("lhattn.autograd.segment")  # registers the segment backend


def _attn(backend):
    def fn(q, k, v, key_padding_mask, global_mask, global_qkv, pattern):
        return lhattn.attention(q, k, v, pattern, key_padding_mask=key_padding_mask, global_mask=global_mask,
                                global_qkv=global_qkv, backend=backend, return_lse=True)
    return fn


def _compare(case, pattern, dtype=torch.float32):
    inputs = make_inputs(case, torch.float64, DEVICE)
    oracle = run_with_grads(_attn("reference"), inputs, pattern=pattern)
    ref_low = run_with_grads(_attn("reference"), cast(inputs, dtype), pattern=pattern)
    got = run_with_grads(_attn("triton"), cast(inputs, dtype), pattern=pattern)
    for name in oracle:
        assert_close_to_oracle(f"{name} ({case.id}, {pattern})", got[name], ref_low[name], oracle[name])


@pytest.mark.parametrize("pattern", [SlidingWindow((3, 2)), SlidingWindow((20, 13)), SlidingWindow((5, 4), dilation=2)],
                         ids=["narrow", "wide", "dilated"])
def test_sliding_window_band_walk_head_dim_128(pattern):
    _compare(Case(b=1, h=2, h_kv=1, n=41, d=128, n_global="many", padding=True, seed=11), pattern)


def test_sliding_window_band_walk_split_chunks_head_dim_128(monkeypatch):
    """Dense passes split into unaligned key chunks: masked tiles clamp their loads into the chunk."""
    if not SW_KERNELS.INTERPRET:
        pytest.skip("chunking is sized for the GPU there")
    monkeypatch.setattr(SW_KERNELS, "INTERPRET_SPLIT_CHUNK", 13)
    _compare(Case(b=1, h=2, h_kv=2, n=37, d=128, n_global="many", padding=True, seed=12), SlidingWindow((20, 13)))


def test_segment_band_walk_head_dim_128():
    _compare(Case(b=1, h=2, h_kv=1, n=41, d=128, n_global="many", padding=True, seed=13), Segments(12))
