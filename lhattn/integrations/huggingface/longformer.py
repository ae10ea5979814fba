"""Hugging Face Longformer on lhattn: :func:`patch_longformer` / :func:`unpatch_longformer`.

``patch_longformer(model)`` makes every ``LongformerSelfAttention`` of a ``transformers``
Longformer model (``LongformerModel``, ``LongformerForMaskedLM``, any model holding them)
compute its attention with :func:`lhattn.attention` instead of HF's sliding-chunks code.
Nothing about the model's weights changes: the module's own ``query / key / value`` and
``query_global / key_global / value_global`` linears are reused, so ``state_dict()``,
saving and loading are unaffected, and :func:`unpatch_longformer` restores HF's code.

What the patched self-attention computes (transformers 5.x conventions, read from
``transformers/models/longformer/modeling_longformer.py``):

* window: layer ``l`` uses ``config.attention_window[l] = 2·w`` (HF's full window) as
  ``SlidingWindow((w, w))`` -- ``attention_window=512`` is ``window=(256, 256)``.
* masks: ``LongformerModel.forward`` hands every layer a float ``attention_mask [B, N]``
  that is ``< 0`` for padding, ``0`` for local and ``> 0`` for global tokens, together with
  ``is_index_masked = attention_mask < 0`` (→ lhattn's ``key_padding_mask``) and
  ``is_index_global_attn = attention_mask > 0`` (→ ``global_mask``).
* global rows use ``query_global`` (applied to the global tokens only, as HF does) and
  ``key_global / value_global``; local rows use ``query / key / value``. Scale ``D**-0.5``.
* returns ``(attn_output,)`` with ``attn_output [B, N, hidden]``, exactly HF's return value
  when ``output_attentions=False``. Padding rows are 0, as in HF.
* attention-probability dropout: in training, ``dropout_p = config.attention_probs_dropout_prob``
  (the module's ``dropout``) is applied inside :func:`lhattn.attention`, in O(N·w), to the local
  and the global rows alike, as HF does (``F.dropout`` on its ``attn_probs`` and
  ``global_attn_probs``).  Which entries are dropped follows lhattn's counter-based rule
  (:mod:`lhattn._dropout`) with a seed drawn from torch's default generator on the inputs'
  device, so ``torch.manual_seed`` reproduces a training step; the mask is not the one HF
  would draw, only its distribution is the same.  In eval mode nothing is dropped.

Not supported: ``output_attentions=True`` raises ``NotImplementedError`` (rather than silently
doing something else): lhattn never forms the attention probabilities. HF's own forward cannot
be used as a fallback either, because a patched model no longer pads its input to a multiple of
the window. Call :func:`unpatch_longformer` first to get them.

Padding: HF's ``LongformerModel.forward`` pads ``input_ids`` / ``inputs_embeds`` to a multiple
of ``max(config.attention_window)`` through ``LongformerModel._pad_to_window_size`` because
its chunked kernel needs that. lhattn takes any length, so the patch also overrides
``_pad_to_window_size`` on every ``LongformerModel`` instance in ``model`` with a no-op
(``padding_len = 0``): the patched model runs on exactly the tokens it is given. Its
outputs on the real tokens equal the unpatched (padding) model's.

Example::

    from transformers import LongformerConfig, LongformerModel
    from lhattn.integrations.huggingface import patch_longformer, unpatch_longformer

    model = LongformerModel(LongformerConfig(attention_window=512)).eval()
    patch_longformer(model, backend="auto")   # Triton on CUDA, the blocked fallback on CPU
    out = model(input_ids, attention_mask=mask, global_attention_mask=glob).last_hidden_state
    unpatch_longformer(model)                 # HF's own code again
"""

from __future__ import annotations

import math
import types
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ...functional import BACKENDS, attention
from ...patterns import SlidingWindow

__all__ = ["patch_longformer", "unpatch_longformer", "unpatch", "patch_self_attention",
           "unpatch_self_attention", "is_patched", "longformer_window"]

_BACKEND_ATTR = "_lhattn_backend"  # set on a patched LongformerSelfAttention
_PADDING_ATTR = "_lhattn_no_padding"  # set on a LongformerModel whose padding step is skipped


def _longformer_classes():
    try:
        from transformers.models.longformer import modeling_longformer as hf
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("lhattn.integrations.huggingface needs the `transformers` package "
                          f"(pip install transformers): {exc}") from exc
    return hf.LongformerSelfAttention, hf.LongformerModel


def _check_backend(backend: str) -> None:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def longformer_window(module: nn.Module) -> SlidingWindow:
    """The lhattn pattern of one ``LongformerSelfAttention``: ``config.attention_window[layer]
    = 2·w`` keys around each query -> ``SlidingWindow((w, w))`` (both bounds inclusive)."""
    full = module.config.attention_window[module.layer_id]
    return SlidingWindow((full // 2, full // 2))


def _self_attention_forward(
    self,
    hidden_states: Tensor,
    attention_mask: Optional[Tensor] = None,
    is_index_masked: Optional[Tensor] = None,
    is_index_global_attn: Optional[Tensor] = None,
    is_global_attn: Optional[bool] = None,
    output_attentions: bool = False,
) -> Tuple[Tensor]:
    """``LongformerSelfAttention.forward`` on lhattn (same arguments and return value).

    hidden_states: ``[B, N, hidden]``, any N. attention_mask: ``[B, N]`` float, ``< 0``
    padding, ``0`` local, ``> 0`` global (only read when the ``is_index_*`` masks are None).
    In training the attention probabilities are dropped with ``p = self.dropout`` (module docstring).
    Returns ``(attn_output [B, N, hidden],)``.
    """
    if output_attentions:
        raise NotImplementedError(
            "output_attentions=True is not supported by the lhattn-patched LongformerSelfAttention: "
            "lhattn never forms the attention probabilities. Pass output_attentions=False, or call "
            "lhattn.integrations.huggingface.unpatch_longformer(model) to get HF's own attention back.")
    if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.embed_dim:
        raise ValueError(f"hidden_states must be [B, N, hidden={self.embed_dim}], got {tuple(hidden_states.shape)}")
    b, n, e = hidden_states.shape
    if is_index_masked is None and attention_mask is not None:
        is_index_masked = attention_mask < 0
    if is_index_global_attn is None and attention_mask is not None:
        is_index_global_attn = attention_mask > 0
    if is_global_attn is None:
        is_global_attn = is_index_global_attn is not None and bool(is_index_global_attn.any())

    def heads(x: Tensor) -> Tensor:  # [B, N, hidden] -> [B, H, N, D] (a strided view)
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    q = heads(self.query(hidden_states))
    k = heads(self.key(hidden_states))
    v = heads(self.value(hidden_states))
    global_mask = global_qkv = None
    if is_global_attn:
        global_mask = is_index_global_attn
        rows = global_mask.nonzero(as_tuple=True)  # (batch index, token index) of every global token
        qg_rows = self.query_global(hidden_states[rows])  # HF projects the global tokens only
        qg = torch.zeros(b, n, e, dtype=qg_rows.dtype, device=qg_rows.device).index_put(rows, qg_rows)
        global_qkv = (heads(qg), heads(self.key_global(hidden_states)), heads(self.value_global(hidden_states)))
    out = attention(q, k, v, longformer_window(self), key_padding_mask=is_index_masked, global_mask=global_mask,
                    global_qkv=global_qkv, scale=1.0 / math.sqrt(self.head_dim),
                    dropout_p=self.dropout if self.training else 0.0, backend=getattr(self, _BACKEND_ATTR))
    return (out.transpose(1, 2).reshape(b, n, e),)


def _no_window_padding(self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                       pad_token_id):
    """``LongformerModel._pad_to_window_size`` for a patched model: lhattn needs no padding."""
    return 0, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds


def is_patched(module: nn.Module) -> bool:
    """True if ``module`` (a ``LongformerSelfAttention``) runs on lhattn."""
    return hasattr(module, _BACKEND_ATTR)


def patch_self_attention(module: nn.Module, backend: str = "auto") -> nn.Module:
    """Make one ``LongformerSelfAttention`` run on lhattn (in place); returns it.

    Only the module's ``forward`` is replaced (an instance attribute), so its parameters,
    hooks and ``state_dict`` stay as they are. Patching an already patched module just
    changes its backend. The caller must not rely on HF's window padding (see
    :func:`patch_longformer`, which also removes it).
    """
    self_attention_cls, _ = _longformer_classes()
    _check_backend(backend)
    if not isinstance(module, self_attention_cls):
        raise TypeError(f"module must be a transformers LongformerSelfAttention, got {type(module).__name__}")
    setattr(module, _BACKEND_ATTR, backend)
    module.forward = types.MethodType(_self_attention_forward, module)
    return module


def unpatch_self_attention(module: nn.Module) -> nn.Module:
    """Undo :func:`patch_self_attention` (no-op on an unpatched module); returns it."""
    if is_patched(module):
        delattr(module, _BACKEND_ATTR)
        del module.forward  # the instance attribute: the class's forward shows through again
    return module


def patch_longformer(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Run every ``LongformerSelfAttention`` in ``model`` on lhattn; returns ``model`` (in place).

    model: any ``nn.Module`` holding Longformer self-attention layers -- ``LongformerModel``,
        ``LongformerForMaskedLM``, ``LongformerForSequenceClassification``, ...
    backend: ``"auto" | "triton" | "fallback" | "reference"``, as in :func:`lhattn.attention`
        (auto: Triton for CUDA tensors when it can run the call, else the blocked fallback).

    Also turns off the window padding of every ``LongformerModel`` inside ``model`` (module
    docstring). Raises ``ValueError`` if ``model`` holds no ``LongformerSelfAttention``.
    """
    self_attention_cls, longformer_model_cls = _longformer_classes()
    _check_backend(backend)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = [m for m in model.modules() if isinstance(m, self_attention_cls)]
    if not layers:
        raise ValueError(f"model ({type(model).__name__}) holds no transformers LongformerSelfAttention to patch")
    for layer in layers:
        patch_self_attention(layer, backend)
    for m in model.modules():
        if isinstance(m, longformer_model_cls):
            setattr(m, _PADDING_ATTR, True)
            m._pad_to_window_size = types.MethodType(_no_window_padding, m)
    return model


def unpatch_longformer(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_longformer`: HF's own attention and window padding again; returns ``model``."""
    for m in model.modules():
        unpatch_self_attention(m)
        if hasattr(m, _PADDING_ATTR):
            delattr(m, _PADDING_ATTR)
            del m._pad_to_window_size
    return model


unpatch = unpatch_longformer
