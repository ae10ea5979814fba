"""``attn_implementation="lhattn"``: lhattn as a Hugging Face ``transformers`` (5.x) attention backend.

::

    import lhattn.integrations.huggingface as lhf
    lhf.register()                        # "lhattn"; idempotent; importing the package does it too
    model = AutoModel.from_pretrained(path, attn_implementation="lhattn")
    # or: model.set_attn_implementation("lhattn")

How it plugs in (read from ``transformers/masking_utils.py`` and ``integrations/sdpa_attention.py``):

* :func:`lhattn_mask` is registered in ``AttentionMaskInterface``.  The model's mask builders
  (``create_causal_mask``, ``create_sliding_window_causal_mask``,
  ``create_bidirectional_sliding_window_mask``, ...) call it with the sizes, the 2D padding mask and
  an index-based ``mask_function``, as they call FlexAttention's mask builder.  It builds nothing
  of size N²: it returns an :class:`LhattnMask` holding the padding ``[B, kv_len]`` and, for the
  sliding-window builders, the band ``(left, right)`` read off the model's own ``mask_function``
  (:func:`band_of`), so the window is exactly the model's definition, both bounds inclusive:

  ==========================================  =======================  ========================
  builder (models)                            model's rule             lhattn window
  ==========================================  =======================  ========================
  sliding causal (Mistral, Qwen2, Gemma 2/3)  ``q - sw < kv <= q``     ``(sw - 1, 0)``
  bidirectional sliding (ModernBERT local)    ``|q - kv| <= sw``       ``(sw, sw)``, ``sw = local_attention // 2``
  Gemma 3 ``use_bidirectional_attention``     ``|q - kv| < sw``        ``(sw - 1, sw - 1)``
  ==========================================  =======================  ========================

* :func:`lhattn_attention_forward` is registered in ``AttentionInterface``.  A layer whose mask
  carries a band (a native sliding-window layer) runs :func:`lhattn.attention` with
  ``SlidingWindow(band)`` and ``key_padding_mask`` (padding zeros of ``attention_mask``, left or
  right).  Every other layer (full attention) gets the exact mask ``"sdpa"`` would have built and
  runs HF's own ``sdpa_attention_forward``: same semantics as ``attn_implementation="sdpa"``.
* With a KV cache: a prefill (queries = the last keys) runs on lhattn; a single-token decode step
  runs SDPA over the cached keys with the model's own mask, built for that one query (O(window)),
  so a cache longer than the window is never attended beyond it.
* Training: the module's ``dropout`` argument is lhattn's ``dropout_p`` (0 in eval mode).
  ``torch.compile`` runs lhattn eagerly (``torch.compiler.disable``, one graph break per layer).

Encoders without a native window (BERT, RoBERTa, XLM-R, ModernBERT's global layers):
:func:`use_pattern` puts an lhattn pattern (``SlidingWindow``, ``LSG``, ``Segments``) on their
attention layers; :func:`to_long` extends absolute position embeddings by copying.

Errors rather than silent differences (all ``NotImplementedError``):
``output_attentions=True`` on an lhattn layer (no probabilities are formed); cross-attention and
KV caches on :func:`use_pattern` layers; attention-logit soft-capping (``softcap``, Gemma 2's
``attn_logit_softcapping``) and attention sinks (``s_aux``, GPT-OSS) on any layer -- neither is
implemented by lhattn's kernels (nor by SDPA, which the full layers use).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch
from torch import Tensor, nn

from ...functional import BACKENDS, attention
from ...patterns import LSG, Pattern, Segments, SlidingWindow

__all__ = ["register", "IMPLEMENTATION", "LhattnMask", "lhattn_mask", "lhattn_attention_forward", "band_of",
           "use_pattern", "clear_pattern", "to_long"]

IMPLEMENTATION = "lhattn"
_PATTERN_ATTR = "_lhattn_pattern"  # set on an attention module by use_pattern: a _PatternState
_HOOKS_ATTR = "_lhattn_pattern_hooks"  # set on the model by use_pattern: its hook handles
_settings = {"backend": "auto"}

# torch.compile runs lhattn eagerly (one graph break per layer), as lhattn.nn does: the fallback's
# autograd.Function builds its block masks inside the function, which dynamo cannot capture.
_attention = torch.compiler.disable(attention)


def _transformers():
    try:
        import transformers  # noqa: F401
        from transformers import masking_utils
        from transformers.integrations import sdpa_attention
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("lhattn.integrations.huggingface needs the `transformers` package (5.x) "
                          f"(pip install transformers): {exc}") from exc
    return masking_utils, sdpa_attention


def register(backend: str = "auto") -> str:
    """Register ``"lhattn"`` in ``transformers``' ``AttentionInterface`` and
    ``AttentionMaskInterface``; returns ``"lhattn"``.  Idempotent (registering again only
    updates ``backend``).

    backend: which lhattn backend the window layers use -- ``"auto"`` (Triton on CUDA when it
        can run the call, else the blocked fallback), ``"triton"``, ``"fallback"``, ``"reference"``.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    masking_utils, _ = _transformers()
    from transformers import AttentionInterface
    _settings["backend"] = backend
    AttentionInterface.register(IMPLEMENTATION, lhattn_attention_forward)
    masking_utils.AttentionMaskInterface.register(IMPLEMENTATION, lhattn_mask)
    return IMPLEMENTATION


# ----------------------------------------------------------------------------------------------
# The mask interface: padding + band, never an N x N tensor for a window layer
# ----------------------------------------------------------------------------------------------

# mask_function leaves of transformers.masking_utils (and Gemma 3) that depend on (q_idx, kv_idx)
# only, through q_idx - kv_idx: a tree of them, combined by and_masks/or_masks, is a band.
_PURE_LEAVES = ("causal_mask_function", "bidirectional_mask_function", "sliding_window_overlay.<locals>.inner_mask",
                "sliding_window_bidirectional_overlay.<locals>.inner_mask",
                "_bidirectional_window_overlay.<locals>.inner_mask")
_COMBINERS = ("and_masks.<locals>.and_mask", "or_masks.<locals>.or_mask")


def _is_pure_index_function(fn: Callable) -> bool:
    """True if ``fn`` is one of transformers' translation-invariant index functions, or and/or of them."""
    name = getattr(fn, "__qualname__", "")
    if not getattr(fn, "__module__", "").startswith("transformers."):
        return False
    if name in _PURE_LEAVES:
        return True
    if name in _COMBINERS:
        cells = dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))
        children = cells.get("mask_functions")
        return isinstance(children, tuple) and all(_is_pure_index_function(f) for f in children)
    return False


def _allowed(mask_function: Callable, q: int, kv: Tensor) -> Tensor:
    zero = torch.zeros((), dtype=torch.long)
    return torch.as_tensor(mask_function(zero, zero, torch.tensor(q), kv)).expand(kv.shape)


def band_of(mask_function: Callable, local_size: int) -> Optional[Tuple[int, int]]:
    """The band ``(left, right)`` (query ``q`` sees keys ``q - left .. q + right``, inclusive) that
    ``mask_function`` describes, or None if it is not a band of half-width <= ``local_size`` + 1.

    Only transformers' own pure index functions are evaluated (:data:`_PURE_LEAVES`, combined with
    ``and_masks`` / ``or_masks``); they are probed on ``2·(local_size + 2) + 1`` keys around two
    queries. Functions that read tensors (padding, packed sequences, image blocks) give None.
    """
    if not _is_pure_index_function(mask_function):
        return None
    p = local_size + 2
    bands = []
    for shift in (0, 5):
        kv = torch.arange(shift, shift + 2 * p + 1)
        seen = _allowed(mask_function, p + shift, kv).nonzero().flatten()
        if seen.numel() == 0 or seen.numel() != int(seen[-1] - seen[0]) + 1:  # empty or not contiguous
            return None
        left, right = p - int(seen[0]), int(seen[-1]) - p
        if left < 0 or right < 0 or left >= p or right >= p:  # no diagonal, or wider than the probe
            return None
        bands.append((left, right))
    return bands[0] if bands[0] == bands[1] else None


@dataclass
class LhattnMask:
    """What :func:`lhattn_mask` hands to the attention layers instead of an N x N mask.

    keep: ``[B, kv_length]`` bool, True = a real token (None: no padding).  window: the band
    ``(left, right)`` of a sliding-window layer, None for a full-attention layer.  The sizes and
    offsets are the ones transformers computed from the cache.  :meth:`dense` builds the exact mask
    ``"sdpa"`` would use (lazily, once), for the layers and steps that run on SDPA.
    """

    batch_size: int
    q_length: int
    kv_length: int
    q_offset: Any
    kv_offset: Any
    keep: Optional[Tensor]
    window: Optional[Tuple[int, int]]
    sdpa_kwargs: Dict[str, Any] = field(repr=False)
    _dense: Any = field(default=None, repr=False)
    _built: bool = field(default=False, repr=False)

    def dense(self) -> Optional[Tensor]:
        """The mask of ``transformers.masking_utils.sdpa_mask`` for the same call (or None)."""
        if not self._built:
            masking_utils, _ = _transformers()
            self._dense, self._built = masking_utils.sdpa_mask(**self.sdpa_kwargs), True
        return self._dense

    @property
    def key_padding_mask(self) -> Optional[Tensor]:
        """lhattn's convention: True = padding."""
        return None if self.keep is None else ~self.keep

    @property
    def is_prefill(self) -> bool:
        """Queries are the last ``q_length`` of the keys (no cache, or a prefill into a dynamic cache)."""
        ints = isinstance(self.q_offset, int) and isinstance(self.kv_offset, int)
        return ints and self.kv_offset + self.kv_length == self.q_offset + self.q_length


def lhattn_mask(batch_size: int, q_length: int, kv_length: int, q_offset: Any = 0, kv_offset: Any = 0,
                mask_function: Optional[Callable] = None, attention_mask: Optional[Tensor] = None,
                local_size: Optional[int] = None, **kwargs) -> LhattnMask:
    """The ``AttentionMaskInterface`` entry of ``"lhattn"`` (same arguments as ``sdpa_mask``)."""
    masking_utils, _ = _transformers()
    if mask_function is None:
        mask_function = masking_utils.causal_mask_function
    sdpa_kwargs = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                       kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                       local_size=local_size, **kwargs)
    keep = None
    if attention_mask is not None:
        padded = masking_utils.prepare_padding_mask(attention_mask.bool(), kv_length, kv_offset)
        keep = padded[:, kv_offset:kv_offset + kv_length] if isinstance(kv_offset, int) else None
        if keep is not None and bool(keep.all()):
            keep = None
        elif keep is None:  # a tensor offset (static cache): only the SDPA path can read this mask
            local_size = None
    window = band_of(mask_function, local_size) if local_size is not None else None
    return LhattnMask(batch_size, q_length, kv_length, q_offset, kv_offset, keep, window, sdpa_kwargs)


# ----------------------------------------------------------------------------------------------
# The attention interface
# ----------------------------------------------------------------------------------------------

def _check_supported(module: nn.Module, kwargs: Dict[str, Any]) -> None:
    softcap = kwargs.get("softcap")
    if softcap is not None:
        raise NotImplementedError(
            f"attn_implementation='lhattn' does not support attention-logit soft-capping (softcap={softcap} from "
            f"{type(module).__name__}, e.g. Gemma 2's config.attn_logit_softcapping): lhattn's kernels and SDPA do "
            "not implement it. Set config.attn_logit_softcapping=None (changes the model) or use attn_implementation='eager'.")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError(
            f"attn_implementation='lhattn' does not support attention sinks (s_aux from {type(module).__name__}): "
            "lhattn's kernels do not implement them. Use attn_implementation='eager' or a flash/flex implementation.")


def _to_hf_layout(out: Tensor) -> Tensor:
    return out.transpose(1, 2).contiguous()  # [B, H, N, D] -> [B, N, H, D], as sdpa_attention_forward returns


def _no_output_attentions(module: nn.Module, kwargs: Dict[str, Any]) -> None:
    if kwargs.get("output_attentions", False):
        raise NotImplementedError(
            f"output_attentions=True is not supported on the lhattn layers of attn_implementation='lhattn' "
            f"({type(module).__name__}, layer {getattr(module, 'layer_idx', '?')}): lhattn never forms the attention "
            "probabilities. Pass output_attentions=False, or use attn_implementation='eager' to get them.")


def _window_forward(module, query, key, value, mask: LhattnMask, dropout, scaling):
    """A native sliding-window layer on lhattn (prefill / no cache), the band read from the mask."""
    q_len, kv_len = query.shape[2], key.shape[2]
    pad = kv_len - q_len
    if pad:  # queries are the last q_len keys: run kv_len rows, the first `pad` of them zeros, keep the last q_len
        query = torch.cat([query.new_zeros(*query.shape[:2], pad, query.shape[3]), query], dim=2)
    out = _attention(query, key, value, SlidingWindow(mask.window), key_padding_mask=mask.key_padding_mask,
                    scale=scaling, dropout_p=dropout, backend=_settings["backend"])
    return _to_hf_layout(out[:, :, pad:] if pad else out), None


def lhattn_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                             attention_mask: Any, dropout: float = 0.0, scaling: Optional[float] = None,
                             **kwargs) -> Tuple[Tensor, None]:
    """The ``AttentionInterface`` entry of ``"lhattn"``: ``query [B, H, q_len, D]``,
    ``key / value [B, H_kv, kv_len, D]`` -> ``(out [B, q_len, H, D], None)``.

    * a :func:`use_pattern` layer: lhattn with that pattern;
    * a native sliding-window layer (its mask has a band) with queries = the last keys: lhattn
      ``SlidingWindow(band)``;
    * anything else (full-attention layers, single-token decode steps, masks lhattn cannot read):
      HF's ``sdpa_attention_forward`` with the mask ``"sdpa"`` would have built.
    """
    _check_supported(module, kwargs)
    state = getattr(module, _PATTERN_ATTR, None)
    if state is not None:
        return _pattern_forward(module, state, query, key, value, attention_mask, dropout, scaling, kwargs)
    if isinstance(attention_mask, LhattnMask):
        mask = attention_mask
        if (mask.q_length, mask.kv_length) != (query.shape[2], key.shape[2]):
            raise NotImplementedError(
                f"attn_implementation='lhattn' got query/key lengths ({query.shape[2]}, {key.shape[2]}) that do not "
                f"match the self-attention mask ({mask.q_length}, {mask.kv_length}) in {type(module).__name__}: "
                "cross-attention is not supported.")
        if mask.window is not None and mask.is_prefill and query.shape[2] > 1:
            _no_output_attentions(module, kwargs)
            return _window_forward(module, query, key, value, mask, dropout, scaling)
        attention_mask = mask.dense()
    _, sdpa_attention = _transformers()
    return sdpa_attention.sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                                 scaling=scaling, **kwargs)


# ----------------------------------------------------------------------------------------------
# use_pattern: an lhattn pattern on the attention layers of any model that uses the interface
# ----------------------------------------------------------------------------------------------

@dataclass
class _PatternState:
    pattern: Pattern
    global_token_ids: Optional[Tensor]
    global_mask: Optional[Tensor] = None  # [B, N], set by the model's forward pre-hook for one call


@functools.lru_cache(maxsize=None)
def _uses_interface(cls: type) -> bool:
    import inspect
    try:
        return "ALL_ATTENTION_FUNCTIONS.get_interface(" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


def _attention_modules(model: nn.Module):
    return [m for m in model.modules() if _uses_interface(type(m))]


def _is_cross_attention(module: nn.Module) -> bool:
    return bool(getattr(module, "is_cross_attention", False)) or "CrossAttention" in type(module).__name__


def _global_hook(state: _PatternState):
    def pre_hook(model, args, kwargs):
        if state.global_token_ids is None:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise ValueError("use_pattern(..., global_token_ids=...) needs input_ids to find the global tokens; "
                             "the model was called without input_ids (inputs_embeds only)")
        state.global_mask = torch.isin(ids, state.global_token_ids.to(ids.device))
        return None

    def post_hook(model, args, kwargs, output):
        state.global_mask = None
        return None
    return pre_hook, post_hook


def _check_pattern_args(pattern, global_token_ids, layers) -> Optional[Tensor]:
    if not isinstance(pattern, (SlidingWindow, LSG, Segments)):
        raise TypeError(f"pattern must be lhattn.SlidingWindow, LSG or Segments, got {type(pattern).__name__}")
    if isinstance(pattern, Segments) and pattern.segment_size is None:
        raise ValueError("use_pattern needs Segments(segment_size=...): per-call segment_ids cannot be passed "
                         "through a Hugging Face model")
    if layers not in ("all", "full"):
        raise ValueError(f"layers must be 'all' or 'full' (only the layers without a native window), got {layers!r}")
    if global_token_ids is None:
        return None
    if isinstance(pattern, LSG):
        raise ValueError("global_token_ids is not used by LSG (its global tokens are the first num_global_tokens "
                         "positions); got global_token_ids with an LSG pattern")
    ids = torch.as_tensor(list(global_token_ids) if not isinstance(global_token_ids, Tensor) else global_token_ids)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dim() != 1:
        raise TypeError(f"global_token_ids must be an iterable of int token ids, got {global_token_ids!r}")
    return ids.long()


def use_pattern(model: nn.Module, pattern: Pattern, global_token_ids: Optional[Iterable[int]] = None,
                layers: str = "all", backend: Optional[str] = None) -> nn.Module:
    """Run the attention layers of ``model`` on lhattn with ``pattern``; returns ``model`` (in place).

    model: a ``transformers`` model whose attention layers use the ``AttentionInterface``
        (BERT, RoBERTa, XLM-R, ModernBERT, ...); it is switched to ``attn_implementation="lhattn"``.
    pattern: ``SlidingWindow``, ``LSG`` or ``Segments(segment_size=...)``; see :func:`lhattn.attention`.
    global_token_ids: token ids that are global (SlidingWindow, Segments): every token with one of
        these ids in ``input_ids`` sees every key and is seen by every query (e.g. ``[cls_id]``).
    layers: ``"all"`` -- every self-attention layer; ``"full"`` -- only those without a native window
        (ModernBERT's global layers), the native sliding layers keep their own window.
    backend: lhattn backend (as in :func:`register`); None keeps the registered one.

    Padding (``attention_mask`` zeros) is lhattn's ``key_padding_mask``; dropout is the module's.
    Raises ``NotImplementedError`` for cross-attention layers and causal (decoder) layers.
    Undo with :func:`clear_pattern`.
    """
    ids = _check_pattern_args(pattern, global_token_ids, layers)
    register(backend if backend is not None else _settings["backend"])
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(f"model ({type(model).__name__}) has no attention layer that uses transformers' "
                         "AttentionInterface")
    cross = [m for m in modules if _is_cross_attention(m)]
    if cross:
        raise NotImplementedError(f"use_pattern does not support cross-attention ({type(cross[0]).__name__}): lhattn "
                                  "patterns are self-attention patterns")
    for m in modules:
        if getattr(m, "is_causal", False) or getattr(getattr(m, "config", None), "is_decoder", False):
            raise NotImplementedError(f"use_pattern is for encoders; {type(m).__name__} is causal (a decoder). "
                                      "Decoders with a native sliding window run on lhattn with "
                                      "attn_implementation='lhattn' alone.")
    clear_pattern(model)
    state = _PatternState(pattern, ids)
    for m in modules:
        if layers == "full" and getattr(m, "sliding_window", None) is not None:
            continue
        setattr(m, _PATTERN_ATTR, state)
    pre_hook, post_hook = _global_hook(state)
    setattr(model, _HOOKS_ATTR, (model.register_forward_pre_hook(pre_hook, with_kwargs=True),
                                 model.register_forward_hook(post_hook, with_kwargs=True)))
    model.set_attn_implementation(IMPLEMENTATION)
    return model


def clear_pattern(model: nn.Module) -> nn.Module:
    """Undo :func:`use_pattern` (the model stays on ``attn_implementation="lhattn"``); returns ``model``."""
    for m in model.modules():
        if hasattr(m, _PATTERN_ATTR):
            delattr(m, _PATTERN_ATTR)
    for handle in getattr(model, _HOOKS_ATTR, ()):
        handle.remove()
    if hasattr(model, _HOOKS_ATTR):
        delattr(model, _HOOKS_ATTR)
    return model


def _pattern_forward(module, state: _PatternState, query, key, value, mask, dropout, scaling, kwargs):
    _no_output_attentions(module, kwargs)
    n = query.shape[2]
    if key.shape[2] != n or (isinstance(mask, LhattnMask) and not (mask.q_offset == 0 and mask.kv_offset == 0)):
        raise NotImplementedError(
            f"use_pattern layers need self-attention without a KV cache: {type(module).__name__} got {n} queries "
            f"and {key.shape[2]} keys (cross-attention or a cache).")
    if mask is not None and not isinstance(mask, LhattnMask):
        raise ValueError(f"use_pattern layers read padding from the 2D attention_mask; {type(module).__name__} got "
                         f"a prepared {type(mask).__name__} of shape {tuple(getattr(mask, 'shape', ()))}: pass the "
                         "2D attention_mask [B, N] (1 = token, 0 = padding) instead")
    padding = mask.key_padding_mask if mask is not None else None
    extra = {} if isinstance(state.pattern, LSG) else {"global_mask": state.global_mask}
    out = _attention(query, key, value, state.pattern, key_padding_mask=padding, scale=scaling, dropout_p=dropout,
                    backend=_settings["backend"], **extra)
    return _to_hf_layout(out), None


# ----------------------------------------------------------------------------------------------
# to_long: longer absolute position embeddings, by copying
# ----------------------------------------------------------------------------------------------

def _position_tables(model: nn.Module):
    return [m for m in model.modules()
            if isinstance(getattr(m, "position_embeddings", None), nn.Embedding) and hasattr(m, "word_embeddings")]


def to_long(model: nn.Module, max_position_embeddings: int = 4096) -> nn.Module:
    """Extend the absolute position embeddings of ``model`` to ``max_position_embeddings`` rows by
    copying the trained ones end to end (the recipe of Longformer's and LSG's conversions); returns
    ``model`` (in place).

    RoBERTa-style tables (XLM-R, CamemBERT, ...: ``padding_idx = p``, positions start at ``p + 1``)
    keep their first ``p + 1`` rows and tile the rest; BERT-style tables tile every row.  The
    ``position_ids`` / ``token_type_ids`` buffers and ``config.max_position_embeddings`` follow.
    Models with rotary positions (ModernBERT, Mistral, ...) have no table to extend: ``ValueError``.
    """
    if isinstance(max_position_embeddings, bool) or not isinstance(max_position_embeddings, int):
        raise TypeError(f"max_position_embeddings must be an int, got {max_position_embeddings!r}")
    tables = _position_tables(model)
    if not tables:
        raise ValueError(f"model ({type(model).__name__}) has no absolute position embedding table "
                         "(an embeddings module with word_embeddings and position_embeddings) to extend")
    for emb in tables:
        old = emb.position_embeddings
        offset = 0 if old.padding_idx is None else old.padding_idx + 1
        if max_position_embeddings <= old.num_embeddings:
            raise ValueError(f"max_position_embeddings must exceed the current {old.num_embeddings}, "
                             f"got {max_position_embeddings}")
        new = nn.Embedding(max_position_embeddings, old.embedding_dim, padding_idx=old.padding_idx,
                           device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            new.weight[:offset] = old.weight[:offset]
            body = old.weight[offset:]
            reps = -(-(max_position_embeddings - offset) // body.shape[0])
            new.weight[offset:] = body.repeat(reps, 1)[:max_position_embeddings - offset]
        new.weight.requires_grad_(old.weight.requires_grad)
        emb.position_embeddings = new
        for name in ("position_ids", "token_type_ids"):
            buf = getattr(emb, name, None)
            if isinstance(buf, Tensor):
                fresh = (torch.arange(max_position_embeddings, device=buf.device) if name == "position_ids"
                         else torch.zeros(max_position_embeddings, dtype=buf.dtype, device=buf.device))
                emb.register_buffer(name, fresh.to(buf.dtype).expand(1, -1), persistent=False)
    config = getattr(model, "config", None)
    if config is not None:
        config.max_position_embeddings = max_position_embeddings
    return model


def _register_if_available() -> None:
    try:
        register(_settings["backend"])
    except ImportError:  # transformers missing or too old (no AttentionInterface): register() will say why
        pass
