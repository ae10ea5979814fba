"""Random inputs for pattern tests: q/k/v, padding, global tokens, segment ids.

Inputs are always fresh random numbers (never zeros); every case is reproducible
from its seed.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch


@dataclass
class Case:
    b: int = 2
    h: int = 4
    h_kv: int = 4
    n: int = 37
    d: int = 16
    n_global: str = "none"  # none | one | many (different counts per batch row)
    padding: bool = False
    global_proj: bool = False  # separate (q_g, k_g, v_g)
    strided: bool = False  # non-contiguous q/k/v
    seed: int = 0

    @property
    def id(self) -> str:
        s = f"B{self.b}-H{self.h}-Hkv{self.h_kv}-N{self.n}-D{self.d}-g{self.n_global}"
        return s + ("-pad" if self.padding else "") + ("-gproj" if self.global_proj else "") + (
            "-strided" if self.strided else "")


def _rand(shape, dtype, device, strided: bool, gen):
    b, h, n, d = shape
    if strided:  # a [B, N, H, D] buffer seen as [B, H, N, D]: the layout of a fused projection
        x = torch.randn(b, n, h, 2 * d, generator=gen, dtype=torch.float64)[..., ::2].transpose(1, 2)
    else:
        x = torch.randn(b, h, n, d, generator=gen, dtype=torch.float64)
    return x.to(device=device, dtype=dtype)


def make_inputs(case: Case, dtype=torch.float32, device="cpu"):
    """Returns dict(q, k, v, key_padding_mask, global_mask, global_qkv) in float64 leaf form
    converted to ``dtype`` (each tensor a leaf with requires_grad=True)."""
    gen = torch.Generator().manual_seed(case.seed)
    b, n = case.b, case.n
    shapes = [(b, case.h, n, case.d), (b, case.h_kv, n, case.d), (b, case.h_kv, n, case.d)]
    q, k, v = (_rand(s, dtype, device, case.strided, gen) for s in shapes)
    kpm = None
    if case.padding:
        kpm = torch.zeros(b, n, dtype=torch.bool)
        lengths = torch.randint(max(1, n // 2), n, (b,), generator=gen)
        if b > 1:
            lengths[0] = n  # one full row (with b = 1 the only row is padded: padding=True always pads)
        for i, ln in enumerate(lengths.tolist()):
            kpm[i, ln:] = True
        kpm = kpm.to(device)
    gm = None
    if case.n_global != "none":
        gm = torch.zeros(b, n, dtype=torch.bool)
        for i in range(b):
            count = 1 if case.n_global == "one" else min(n, 2 + 3 * i)
            gm[i, torch.randperm(n, generator=gen)[:count]] = True
        gm = gm.to(device)
    gqkv = None
    if case.global_proj:
        gqkv = tuple(_rand(s, dtype, device, False, gen) for s in shapes)
    tensors = [q, k, v] + (list(gqkv) if gqkv else [])
    for t in tensors:
        t.requires_grad_(True)
    return dict(q=q, k=k, v=v, key_padding_mask=kpm, global_mask=gm, global_qkv=gqkv)


def cast(inputs: dict, dtype) -> dict:
    """A detached copy of ``inputs`` in another dtype (fresh leaves)."""
    out = {}
    for key, val in inputs.items():
        if isinstance(val, torch.Tensor) and val.is_floating_point():
            out[key] = val.detach().to(dtype).requires_grad_(True)
        elif isinstance(val, tuple):
            out[key] = tuple(t.detach().to(dtype).requires_grad_(True) for t in val)
        else:
            out[key] = val
    return out


def leaves(inputs: dict) -> dict:
    """Named differentiable inputs: q, k, v (+ q_g, k_g, v_g)."""
    named = {"q": inputs["q"], "k": inputs["k"], "v": inputs["v"]}
    if inputs.get("global_qkv"):
        named.update(zip(("q_g", "k_g", "v_g"), inputs["global_qkv"]))
    return named


def run_with_grads(fn, inputs: dict, dout_seed: int = 1, **kwargs):
    """``out, lse = fn(**inputs, **kwargs)``, then backward of a random projection of out.
    Returns dict of out, lse and the gradient of every leaf (zeros where unused)."""
    out, lse = fn(**inputs, **kwargs)
    gen = torch.Generator().manual_seed(dout_seed)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    named = leaves(inputs)
    grads = torch.autograd.grad(out, list(named.values()), dout, allow_unused=True)
    res = {"out": out.detach(), "lse": lse.detach()}
    for (name, t), g in zip(named.items(), grads):
        res["d" + name] = torch.zeros_like(t) if g is None else g
    return res
