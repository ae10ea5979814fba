"""Benchmark providers: one function per implementation, all fed the same inputs.

Each provider is ``fn(w: Workload, grad: bool) -> Prepared``. It builds its inputs from the
workload's seed (so every provider sees the same numbers), does all of its set-up -- module
construction, FlexAttention's BlockMask, torch.compile wrapping -- and returns a ``forward``
closure that the harness times. Set-up is never timed. A provider that cannot run a workload
raises :class:`Skip` with the reason, which ends up in the JSON.

Two levels are compared:

* attention level (``q, k, v [B, H, N, D]`` in, ``[B, H, N, D]`` out): the lhattn backends,
  dense SDPA and FlexAttention.
* module level (``hidden [B, N, H·D]`` in, ``[B, N, H·D]`` out): HF's ``LongformerSelfAttention``
  (its projections + sliding-chunks attention + output reshaping) against the same module patched
  onto lhattn (the same projections + lhattn attention + the same reshaping). Same weights, same
  hidden states.

Dense SDPA computes *full* attention -- the O(n²) cost that the patterns avoid -- not the pattern.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import lhattn
from lhattn.patterns import LSG, Segments, SlidingWindow

__all__ = ["Workload", "Prepared", "Provider", "Skip", "PROVIDERS", "DTYPES"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


class Skip(Exception):
    """The provider cannot run this workload; the message says why."""


@dataclass
class Workload:
    """One attention problem. ``params`` by pattern:

    * ``sliding_window``: ``window [left, right]``, ``dilation``
    * ``lsg``: ``block_size``, ``sparsity_factor``, ``sparsity_type``, ``num_global_tokens``
    * ``segment``: ``segment_size``

    ``num_global``: the first ``num_global`` tokens are global (sliding_window, segment).
    ``dropout``: attention dropout p, as in training (a fresh mask every call).
    """

    pattern: str
    params: dict
    batch: int
    heads: int
    head_dim: int
    n: int
    dtype: str
    device: str
    num_global: int = 0
    seed: int = 0
    dropout: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def lhattn_pattern(self):
        p = self.params
        if self.pattern == "sliding_window":
            return SlidingWindow(tuple(p["window"]), dilation=p.get("dilation", 1))
        if self.pattern == "lsg":
            return LSG(block_size=p["block_size"], sparsity_factor=p["sparsity_factor"],
                       sparsity_type=p["sparsity_type"], num_global_tokens=p["num_global_tokens"])
        if self.pattern == "segment":
            return Segments(p["segment_size"])
        raise ValueError(f"unknown pattern {self.pattern!r}")

    def _gen(self, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1000 + salt)

    def randn(self, shape, salt: int, grad: bool) -> Tensor:
        """Seeded N(0, 1) on the workload's device/dtype (drawn on CPU, so every device sees the same numbers)."""
        x = torch.randn(shape, generator=self._gen(salt), dtype=torch.float32)
        return x.to(device=self.device, dtype=self.torch_dtype).requires_grad_(grad)

    def qkv(self, grad: bool):
        shape = (self.batch, self.heads, self.n, self.head_dim)
        return tuple(self.randn(shape, salt, grad) for salt in (1, 2, 3))

    def global_mask(self) -> Optional[Tensor]:
        if self.num_global <= 0 or self.pattern == "lsg":
            return None
        m = torch.zeros(self.batch, self.n, dtype=torch.bool, device=self.device)
        m[:, :self.num_global] = True
        return m


@dataclass
class Prepared:
    """What the harness times: ``forward()`` -> output tensor; ``leaves`` get ``.grad = None``
    before every timed backward; ``info`` goes into the JSON."""

    forward: Callable[[], Tensor]
    leaves: List[Tensor] = field(default_factory=list)
    info: Dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Provider:
    build: Callable[[Workload, bool], Prepared]
    family: str  # "lhattn" or "peer"
    level: str  # "attention" or "module"
    computes: str  # "pattern" or "dense"
    doc: str


# ---- lhattn ------------------------------------------------------------------------------------


def _lhattn(w: Workload, grad: bool, backend: str) -> Prepared:
    pattern = w.lhattn_pattern()
    q, k, v = w.qkv(grad)
    gm = w.global_mask()
    if backend == "triton":
        if q.device.type != "cuda":
            raise Skip("Triton kernels run on CPU only in Triton's interpreter, which is not timed")
        why = lhattn.triton_unavailable_reason(q, pattern)
        if why is not None:
            raise Skip(f"triton backend unavailable: {why}")
    if backend in ("fallback", "reference"):  # an unimplemented pattern says so at import time
        try:
            __import__(f"lhattn.{backend}.{w.pattern}")  # modules are named after the patterns
        except ImportError as exc:
            raise Skip(f"lhattn {backend} backend has no {w.pattern} implementation yet ({exc})") from exc

    def forward():
        return lhattn.attention(q, k, v, pattern, global_mask=gm, dropout_p=w.dropout, backend=backend)
    return Prepared(forward, [q, k, v] if grad else [], {"backend_used": backend})


def lhattn_triton(w: Workload, grad: bool) -> Prepared:
    """lhattn's Triton kernels (CUDA)."""
    return _lhattn(w, grad, "triton")


def lhattn_fallback(w: Workload, grad: bool) -> Prepared:
    """lhattn's blocked pure-PyTorch backend: O(n·w) time, O(n·D) memory."""
    return _lhattn(w, grad, "fallback")


def lhattn_reference(w: Workload, grad: bool) -> Prepared:
    """lhattn's dense-mask oracle: O(n²) (small n only)."""
    return _lhattn(w, grad, "reference")


# ---- dense SDPA --------------------------------------------------------------------------------


def _sdpa(w: Workload, grad: bool, kernel: Optional[str]) -> Prepared:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = w.qkv(grad)
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "math": SDPBackend.MATH}

    p = w.dropout
    if kernel is None:
        def forward():
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p)
    else:
        chosen = backends[kernel]

        def forward():
            with sdpa_kernel([chosen]):
                return F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        try:  # a backend this device/dtype lacks: recorded as skipped, with torch's reason
            with torch.no_grad(), sdpa_kernel([chosen]):
                F.scaled_dot_product_attention(q[:, :, :16], k[:, :, :16], v[:, :, :16], dropout_p=p)
        except RuntimeError as exc:
            raise Skip(f"sdpa-{kernel} is not available here: {' '.join(str(exc).split())[:200]}") from None
    return Prepared(forward, [q, k, v] if grad else [], {"sdpa_kernel": kernel or "default"})


def sdpa_default(w: Workload, grad: bool) -> Prepared:
    """Dense ``F.scaled_dot_product_attention``, PyTorch's own kernel choice."""
    return _sdpa(w, grad, None)


def sdpa_flash(w: Workload, grad: bool) -> Prepared:
    """Dense SDPA, FlashAttention kernel (CUDA fp16/bf16; CPU: its flash-style kernel, O(n) memory)."""
    return _sdpa(w, grad, "flash")


def sdpa_efficient(w: Workload, grad: bool) -> Prepared:
    """Dense SDPA, memory-efficient kernel (CUDA only)."""
    return _sdpa(w, grad, "efficient")


def sdpa_math(w: Workload, grad: bool) -> Prepared:
    """Dense SDPA, math kernel: materialises the n×n scores, O(n²) memory."""
    return _sdpa(w, grad, "math")


# ---- FlexAttention -----------------------------------------------------------------------------

_FLEX = None


def _compiled_flex():
    """``torch.compile(flex_attention)``, once per process, with room for one graph per shape."""
    global _FLEX
    if _FLEX is None:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                     "accumulated_recompile_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(256, getattr(torch._dynamo.config, name)))
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def _flex_mask_mod(w: Workload):
    """The pattern as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool``."""
    g = w.num_global
    if w.pattern == "sliding_window":
        left, right = w.params["window"]
        d = w.params.get("dilation", 1)

        def local(q_idx, kv_idx):
            rel = kv_idx - q_idx
            m = (rel >= -left * d) & (rel <= right * d)
            return m & (rel % d == 0) if d > 1 else m
    elif w.pattern == "segment":
        s = w.params["segment_size"]

        def local(q_idx, kv_idx):
            return (q_idx // s) == (kv_idx // s)
    else:
        raise Skip("LSG's sparse keys are pooled/selected from a compressed sequence, not a subset of the "
                   "input keys: no FlexAttention BlockMask computes the same function")

    if g == 0:
        def mask_mod(b, h, q_idx, kv_idx):
            return local(q_idx, kv_idx)
    else:  # a global key is seen by everyone, a global query sees everything
        def mask_mod(b, h, q_idx, kv_idx):
            return local(q_idx, kv_idx) | (q_idx < g) | (kv_idx < g)
    return mask_mod


def flex(w: Workload, grad: bool) -> Prepared:
    """FlexAttention, compiled, with the BlockMask of the pattern (mask built here, untimed)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except ImportError as exc:
        raise Skip(f"torch.nn.attention.flex_attention is not available ({exc})") from exc
    if w.dropout:
        raise Skip("FlexAttention has no attention dropout")
    mask_mod = _flex_mask_mod(w)
    q, k, v = w.qkv(grad)
    block_mask = create_block_mask(mask_mod, None, None, w.n, w.n, device=w.device, _compile=w.device == "cuda")
    fn = _compiled_flex()

    def forward():
        return fn(q, k, v, block_mask=block_mask)
    return Prepared(forward, [q, k, v] if grad else [], {"block_mask_sparsity_pct": round(block_mask.sparsity(), 3)})


# ---- Hugging Face Longformer (module level) ----------------------------------------------------


def _hf_module(w: Workload, grad: bool):
    if w.pattern != "sliding_window":
        raise Skip("HF LongformerSelfAttention implements only the sliding-window pattern")
    left, right = w.params["window"]
    if left != right or w.params.get("dilation", 1) != 1 or left == 0:
        raise Skip(f"HF LongformerSelfAttention needs a symmetric, undilated window, got {w.params}")
    if w.n % (2 * left):
        raise Skip(f"HF LongformerSelfAttention needs n a multiple of attention_window = {2 * left}, got n={w.n}")
    try:
        from transformers import LongformerConfig
        from transformers.models.longformer.modeling_longformer import LongformerSelfAttention
    except ImportError as exc:
        raise Skip(f"transformers is not installed ({exc})") from exc
    cfg = LongformerConfig(hidden_size=w.heads * w.head_dim, num_attention_heads=w.heads, num_hidden_layers=1,
                           attention_window=[2 * left], attention_probs_dropout_prob=w.dropout, intermediate_size=4,
                           vocab_size=8, max_position_embeddings=8)
    torch.manual_seed(w.seed)
    module = LongformerSelfAttention(cfg, layer_id=0).to(device=w.device, dtype=w.torch_dtype)
    module.train(w.dropout > 0)  # HF applies attention dropout in training mode only
    for p in module.parameters():
        p.requires_grad_(grad)
    hidden = w.randn((w.batch, w.n, w.heads * w.head_dim), 4, grad)
    # transformers' extended mask: < 0 padding (none here), 0 local, > 0 global (the first num_global tokens)
    mask = torch.zeros(w.batch, w.n, device=w.device, dtype=w.torch_dtype)
    mask[:, :w.num_global] = torch.finfo(w.torch_dtype).max
    kwargs = dict(attention_mask=mask, is_index_masked=mask < 0, is_index_global_attn=mask > 0,
                  is_global_attn=w.num_global > 0, output_attentions=False)
    leaves = [hidden, *module.parameters()] if grad else []
    return module, hidden, kwargs, leaves


def hf_longformer(w: Workload, grad: bool) -> Prepared:
    """HF ``LongformerSelfAttention`` as HF ships it: q/k/v projections, sliding-chunks
    attention, output reshaping (module level)."""
    module, hidden, kwargs, leaves = _hf_module(w, grad)

    def forward():
        return module(hidden, **kwargs)[0]
    return Prepared(forward, leaves, {"transformers_attention": "sliding_chunks"})


def lhattn_longformer(w: Workload, grad: bool) -> Prepared:
    """The same HF module patched by ``lhattn.integrations.huggingface`` (backend auto): the
    module's own projections + lhattn attention + the same output reshaping (module level)."""
    from lhattn.integrations.huggingface import longformer_window, patch_self_attention

    module, hidden, kwargs, leaves = _hf_module(w, grad)
    patch_self_attention(module, backend="auto")
    probe = hidden.new_empty(1, 1, 1, w.head_dim)
    used = "triton" if (probe.device.type == "cuda"
                        and lhattn.triton_unavailable_reason(probe, longformer_window(module)) is None) else "fallback"

    def forward():
        return module(hidden, **kwargs)[0]
    return Prepared(forward, leaves, {"backend_used": used})


PROVIDERS: Dict[str, Provider] = {
    "lhattn-triton": Provider(lhattn_triton, "lhattn", "attention", "pattern", lhattn_triton.__doc__),
    "lhattn-fallback": Provider(lhattn_fallback, "lhattn", "attention", "pattern", lhattn_fallback.__doc__),
    "lhattn-reference": Provider(lhattn_reference, "lhattn", "attention", "pattern", lhattn_reference.__doc__),
    "sdpa-default": Provider(sdpa_default, "peer", "attention", "dense", sdpa_default.__doc__),
    "sdpa-flash": Provider(sdpa_flash, "peer", "attention", "dense", sdpa_flash.__doc__),
    "sdpa-efficient": Provider(sdpa_efficient, "peer", "attention", "dense", sdpa_efficient.__doc__),
    "sdpa-math": Provider(sdpa_math, "peer", "attention", "dense", sdpa_math.__doc__),
    "flex": Provider(flex, "peer", "attention", "pattern", flex.__doc__),
    "hf-longformer": Provider(hf_longformer, "peer", "module", "pattern", hf_longformer.__doc__),
    "lhattn-longformer": Provider(lhattn_longformer, "lhattn", "module", "pattern", lhattn_longformer.__doc__),
}


def estimated_bytes(provider: str, w: Workload, mode: str) -> int:
    """A rough upper bound of the extra memory a provider needs, to skip hopeless cases up front.
    Only the O(n²) providers matter: the math kernel and the reference materialise n×n scores."""
    elt = torch.tensor([], dtype=w.torch_dtype).element_size()
    bhn2 = w.batch * w.heads * w.n * w.n
    grad = 2 if mode != "fwd" else 1
    if provider == "sdpa-math":
        return bhn2 * (4 + elt) * grad
    if provider == "lhattn-reference":
        return bhn2 * (4 + 4 + elt + 1) * grad
    return 4 * w.batch * w.heads * w.n * w.head_dim * elt * 4 + w.batch * w.n * 64


def executed_pairs(provider: str, w: Workload, pattern_pairs: int) -> int:
    """Query-key pairs the provider actually computes: n² for dense SDPA, else the pattern's."""
    return w.n * w.n if PROVIDERS[provider].computes == "dense" else pattern_pairs
