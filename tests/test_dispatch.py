"""Backend dispatch in :mod:`lhattn.functional`: head dims the Triton kernels are not compiled for
(zero-padded to the next one), and ``auto``'s warning when it falls back on CUDA.

Without a GPU the Triton kernels run in Triton's interpreter (tiny shapes); the CUDA-only
branch of ``auto`` is reached by monkeypatching its device check.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

import warnings  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

import lhattn  # noqa: E402
from lhattn import functional  # noqa: E402
from lhattn.patterns import LSG, Segments, SlidingWindow  # noqa: E402

from cases import Case, cast, make_inputs, run_with_grads  # noqa: E402
from tolerance import assert_close_to_oracle  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _attn(backend, pattern):
    def fn(q, k, v, key_padding_mask, global_mask, global_qkv):
        kw = {} if isinstance(pattern, LSG) else dict(global_mask=global_mask)
        if global_qkv is not None:
            kw["global_qkv"] = global_qkv
        return lhattn.attention(q, k, v, pattern, key_padding_mask=key_padding_mask, backend=backend,
                                return_lse=True, **kw)
    return fn


# (case, pattern): D = 8 (below the smallest compiled head dim) and D = 24 (between two)
PADDED = {
    "window-D8-gproj": (Case(b=2, h=2, h_kv=1, n=20, d=8, n_global="one", padding=True, global_proj=True,
                             strided=True, seed=1), SlidingWindow((5, 3))),
    "segment-D8": (Case(b=1, h=2, h_kv=1, n=29, d=8, n_global="one", padding=True, seed=2), Segments(8)),
    "lsg-norm-D8": (Case(b=1, h=2, h_kv=1, n=25, d=8, padding=True, seed=3),
                    LSG(block_size=8, sparsity_factor=2, sparsity_type="norm", num_global_tokens=1)),
    "window-D24": (Case(b=1, h=2, h_kv=2, n=30, d=24, n_global="one", seed=4), SlidingWindow(4)),
}


@pytest.mark.parametrize("name", PADDED.keys())
def test_triton_runs_padded_head_dims_like_the_oracle(name):
    case, pattern = PADDED[name]
    assert lhattn.triton_unavailable_reason(torch.empty(1, 1, 8, case.d, device=DEVICE), pattern) is None
    inputs = make_inputs(case, torch.float64, DEVICE)
    oracle = run_with_grads(_attn("reference", pattern), inputs)
    ref_low = run_with_grads(_attn("reference", pattern), cast(inputs, torch.float32))
    got = run_with_grads(_attn("triton", pattern), cast(inputs, torch.float32))
    for key in oracle:
        assert got[key].shape == oracle[key].shape, f"{key}: shape {tuple(got[key].shape)}"
        assert_close_to_oracle(f"{key} ({name})", got[key], ref_low[key], oracle[key])
    assert got["out"].is_contiguous()


def test_padding_keeps_the_callers_scale():
    """The scale of a padded call is D ** -0.5 of the caller's D, and an explicit scale is passed on."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 1, 20, 8, generator=gen, dtype=torch.float64).to(DEVICE) for _ in range(3))
    for scale in (None, 0.7):
        got = lhattn.sliding_window_attention(q, k, v, 3, scale=scale, backend="triton")
        want = lhattn.sliding_window_attention(q, k, v, 3, scale=scale, backend="reference")
        assert float((got - want).abs().max()) < 1e-10, f"scale={scale}"


@pytest.mark.parametrize("d", [264, 512])
def test_head_dims_above_the_largest_are_refused_with_the_reason(d):
    q = torch.randn(1, 1, 8, d, device=DEVICE)
    why = lhattn.triton_unavailable_reason(q, SlidingWindow(2))
    assert why is not None and f"D={d}" in why and "256" in why
    with pytest.raises(NotImplementedError, match=f"D={d}"):
        lhattn.sliding_window_attention(q, q, q, 2, backend="triton")


def test_lsh_with_a_padded_head_dim_is_refused():
    """lsh draws D-shaped projections: padding would change which keys are selected."""
    q = torch.randn(1, 1, 40, 8, device=DEVICE)
    pattern = LSG(block_size=8, sparsity_factor=2, sparsity_type="lsh")
    why = lhattn.triton_unavailable_reason(q, pattern)
    assert why is not None and "lsh" in why and "D=8" in why
    assert lhattn.triton_unavailable_reason(torch.randn(1, 1, 40, 16, device=DEVICE), pattern) is None


# ---- auto on CUDA: warn once per reason -----------------------------------------------------------


@pytest.fixture
def auto_on_cuda(monkeypatch):
    """``auto`` treats every tensor as CUDA; warnings already given are forgotten (and restored)."""
    monkeypatch.setattr(functional, "_auto_tries_triton", lambda q: True)
    monkeypatch.setattr(functional, "_warned_reasons", set())


def _qkv(d=16, n=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, n, d, generator=gen).to(DEVICE) for _ in range(3)]


def test_auto_warns_once_per_reason_and_runs_the_fallback(auto_on_cuda, monkeypatch):
    reasons = iter(["reason A", "reason A", "reason B", "reason A"])
    monkeypatch.setattr(functional, "triton_unavailable_reason", lambda q, pattern: next(reasons))
    q, k, v = _qkv()
    want = lhattn.sliding_window_attention(q, k, v, 4, backend="fallback")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [lhattn.sliding_window_attention(q, k, v, 4) for _ in range(4)]
    messages = [str(w.message) for w in caught if issubclass(w.category, lhattn.FallbackWarning)]
    assert len(messages) == 2, messages
    assert "reason A" in messages[0] and "reason B" in messages[1]
    assert all("triton_unavailable_reason" in m for m in messages)
    assert caught[0].filename == __file__, "the warning should point at the caller"
    for out in outs:
        assert torch.equal(out, want)


def test_auto_warns_with_the_real_reason(auto_on_cuda):
    q, k, v = _qkv(d=264)
    with pytest.warns(lhattn.FallbackWarning, match="D=264"):
        out = lhattn.segment_attention(q, k, v, segment_size=8)
    assert torch.equal(out, lhattn.segment_attention(q, k, v, segment_size=8, backend="fallback"))


def test_auto_is_silent_when_triton_runs_and_on_cpu(auto_on_cuda, monkeypatch):
    q, k, v = _qkv(d=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lhattn.FallbackWarning)
        lhattn.sliding_window_attention(q, k, v, 4)  # "CUDA" and the (padded) kernels can run it
        monkeypatch.setattr(functional, "_auto_tries_triton", lambda q: False)
        monkeypatch.setattr(functional, "triton_unavailable_reason", lambda q, p: "would be a reason")
        lhattn.sliding_window_attention(q, k, v, 4)  # CPU: the fallback is the plan, not a fallback
