"""A few seeds of the differential fuzzer (:mod:`tests.fuzz`): random patterns, shapes and options, the
Triton kernels (the interpreter on CPU) and the fallback against the reference, output, lse and every
gradient.  Longer campaigns: ``python tests/fuzz.py --seeds 0:500`` (README, "Layout"; docs/ARCHITECTURE.md, "Testing rules")."""

import pytest
import torch

import lhattn

from fuzz import OUTPUTS, Call, check, draw, run

pytestmark = pytest.mark.usefixtures("one_thread")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("seed", range(8))
def test_fuzz_float64(seed):
    call = draw(seed)
    assert check(call, ("triton", "fallback"), torch.float64, DEVICE) == [], str(call)


@pytest.mark.parametrize("seed", [100, 101])
def test_fuzz_bfloat16(seed):
    call = draw(seed)
    assert check(call, ("triton",), torch.bfloat16, DEVICE) == [], str(call)


def test_fuzz_draws_every_pattern_and_option():
    """The draws cover what they claim to: every pattern, padding, global tokens and their projections,
    segment ids, dropout, a custom scale, strided inputs and the padded head dims."""
    calls = [draw(seed) for seed in range(300)]
    kinds = {type(c.pattern).__name__ for c in calls}
    assert kinds == {"SlidingWindow", "LSG", "Segments"}
    seen = set().union(*(c.kwargs for c in calls))
    assert seen >= {"key_padding_mask", "global_mask", "global_qkv", "segment_ids", "dropout_p", "scale"}
    assert any(c.strided for c in calls) and {8, 24, 16, 32, 64} <= {c.d for c in calls}
    assert any(getattr(c.pattern, "dilation", 1) > 1 for c in calls)
    assert any(getattr(c.pattern, "causal", False) for c in calls)
    first, again = draw(7), draw(7)  # reproducible, random masks included
    assert str(first) == str(again) and torch.equal(first.kwargs["global_mask"], again.kwargs["global_mask"])


def test_fuzz_check_catches_a_wrong_backend(monkeypatch):
    """The check is not vacuous: a backend whose output is off by a little, or which raises where the
    reference runs, is reported."""
    import fuzz

    call = Call(0, 1, 2, 1, 17, 16, lhattn.SlidingWindow(3), False, {})
    real = fuzz.run

    def off(c, backend, dtype, device="cpu"):
        res = real(c, backend, dtype, device)
        if backend == "fallback":
            res[0] = res[0] + 1e-6
        if backend == "triton":
            raise ValueError("refused")
        return res

    monkeypatch.setattr(fuzz, "run", off)
    problems = check(call, ("triton", "fallback"), torch.float64, "cpu")
    assert any(p.startswith("triton: ValueError where the reference ran") for p in problems), problems
    assert any(p.startswith("fallback: out error") for p in problems), problems
    assert len(run(call, "reference", torch.float64)) == len(OUTPUTS) - 3
