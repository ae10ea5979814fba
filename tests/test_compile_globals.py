"""torch.compile(fullgraph=True) through a call with global tokens: the global index list is a
custom op with a data-dependent size, so the graph has no break -- also when a batch has none."""

import pytest
import torch

import lhattn

from cases import Case, make_inputs


@pytest.mark.parametrize("pattern", [lhattn.SlidingWindow((4, 2)), lhattn.Segments(8)], ids=["window", "segments"])
@pytest.mark.parametrize("with_globals", [True, False], ids=["globals", "no-globals"])
def test_fullgraph_compile_with_global_mask(pattern, with_globals):
    """One batch row of 24 tokens (two interpreter tiles), two global tokens (or none) and a padded
    tail: compiled and eager are compared bit for bit, out and gradients."""
    inputs = make_inputs(Case(b=1, h=2, h_kv=2, n=24, n_global="many", seed=5), torch.float32)
    q, k, v, gm = (inputs[key] for key in ("q", "k", "v", "global_mask"))
    kpm = torch.zeros_like(gm)
    kpm[0, 19:] = True  # make_inputs pads no row when B = 1
    if not with_globals:
        gm = torch.zeros_like(gm)
    if lhattn.triton_unavailable_reason(q, pattern) is not None:
        pytest.skip(lhattn.triton_unavailable_reason(q, pattern))

    def f(q, k, v, gm, kpm):
        return lhattn.attention(q, k, v, pattern, global_mask=gm, key_padding_mask=kpm, backend="triton")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if q.device.type == "cpu" else "inductor")
    eager = f(q, k, v, gm, kpm)
    traced = compiled(q, k, v, gm, kpm)
    torch.testing.assert_close(traced, eager, rtol=0, atol=0)
    g_eager = torch.autograd.grad(eager.sum(), (q, k, v))
    g_traced = torch.autograd.grad(traced.sum(), (q, k, v))
    for name, a, b in zip("qkv", g_traced, g_eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"d{name} differs under torch.compile")
