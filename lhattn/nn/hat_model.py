"""HAT models: embeddings + :class:`~lhattn.nn.HATEncoder`, their heads, and a loader for
checkpoints written by the HAT authors' code (``save_pretrained`` of its ``HATModel``,
``HATForMaskedLM`` or ``HATForSequenceClassification``: ``config.json`` + weights).

What is HAT's exactly (README "Loading HAT checkpoints"): every output at a non-padding token, the
logits of the masked-LM head there, and the sequence-classification logits when every segment
starts with a real token.  Not the same: outputs at padding tokens (HAT computes them from masked
scores, lhattn zeroes padding rows), and classification pooling over padded segments (HAT pools
their padding outputs too; lhattn pools the segments that start with a real token only).

Segment positions.  HAT's cross-segment encoders add a learned segment-position embedding to
their inputs; which row depends on the code version the checkpoint ran with
(``segment_positions``): ``"absolute"`` -- the current code (commit b5d0470 of
coastalcph/hierarchical-transformers, January 2024, on): segment ``s`` reads row ``s + 1``, padded
segments row 0; ``"none"`` -- earlier code added the positions to the token states and then
overwrote them with the cross-segment outputs, so they had no effect; ``"rank"`` -- lhattn's
numbering (the representative's rank in its row; with no padded segment it equals "absolute").
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._index import segment_bounds
from .hat import SEGMENT_POSITIONS, HATEncoder, representative_index

__all__ = ["HATConfig", "HATModel", "HATForMaskedLM", "HATForSequenceClassification", "HATOutput",
           "HAT_POOLINGS"]

HAT_POOLINGS = ("max", "attentive", "first", "last")

_ACTIVATIONS: Dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


@dataclass
class HATConfig:
    """The sizes of a :class:`HATModel` (HAT's config names in brackets).

    ``layout``: HAT's notation (``"SD|SD"``; [encoder_layout], layers with neither encoder left
    out); ``segment_size`` [max_sentence_length]; ``max_segments`` [max_sentences];
    ``segment_positions``: ``"absolute"`` / ``"rank"`` / ``"none"`` (module docstring).
    """

    vocab_size: int
    hidden_size: int = 768
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    layout: str = "SD|SD|SD|SD"
    segment_size: int = 128
    max_segments: int = 64
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    type_vocab_size: int = 2
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    classifier_dropout: Optional[float] = None
    tie_word_embeddings: bool = True
    segment_positions: str = "absolute"
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {sorted(_ACTIVATIONS)}, got {self.hidden_act!r}")
        if self.segment_positions not in SEGMENT_POSITIONS:
            raise ValueError(f"segment_positions must be one of {SEGMENT_POSITIONS}, got {self.segment_positions!r}")

    @classmethod
    def from_hat_config(cls, config: dict, segment_positions: str = "absolute") -> "HATConfig":
        """From the ``config.json`` dict the HAT code writes; refuses what lhattn cannot map."""
        def need(key):
            if key not in config:
                raise ValueError(f"the HAT config has no {key!r} (keys: {sorted(config)})")
            return config[key]

        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only position_embedding_type='absolute' can be mapped, got "
                             f"{config['position_embedding_type']!r}")
        if config.get("is_decoder") or config.get("add_cross_attention"):
            raise ValueError("a decoder HAT config (is_decoder / add_cross_attention) cannot be mapped")
        layout = hat_layout(need("encoder_layout"), need("num_hidden_layers"))
        if not layout:
            raise ValueError("the HAT config's encoder_layout has no layer with a sentence or document encoder")
        return cls(vocab_size=need("vocab_size"), hidden_size=need("hidden_size"),
                   num_attention_heads=need("num_attention_heads"), intermediate_size=need("intermediate_size"),
                   layout="|".join(layout), segment_size=need("max_sentence_length"),
                   max_segments=need("max_sentences"), hidden_act=config.get("hidden_act", "gelu"),
                   layer_norm_eps=config.get("layer_norm_eps", 1e-12), pad_token_id=config.get("pad_token_id", 0),
                   type_vocab_size=config.get("type_vocab_size", 2),
                   hidden_dropout=config.get("hidden_dropout_prob", 0.1),
                   attention_dropout=config.get("attention_probs_dropout_prob", 0.1),
                   classifier_dropout=config.get("classifier_dropout"),
                   tie_word_embeddings=config.get("tie_word_embeddings", True),
                   segment_positions=segment_positions, extra=dict(config))


def hat_layout(encoder_layout: dict, num_layers: int) -> List[str]:
    """HAT's ``encoder_layout`` (``{"0": {"sentence_encoder": bool, "document_encoder": bool}, ...}``)
    as layout entries ``"S"`` / ``"D"`` / ``"SD"``, one per layer that has an encoder."""
    items = []
    for i in range(num_layers):
        entry = encoder_layout.get(str(i)) if isinstance(encoder_layout, dict) else None
        if not isinstance(entry, dict):
            raise ValueError(f"encoder_layout has no entry {str(i)!r} for layer {i} of num_hidden_layers={num_layers}")
        item = ("S" if entry.get("sentence_encoder") else "") + ("D" if entry.get("document_encoder") else "")
        if item:
            items.append(item)
    return items


@dataclass
class HATOutput:
    """``last_hidden_state [B, N, E]``; ``logits`` (heads: ``[B, N, V]`` masked LM, ``[B, L]``
    classification); ``loss`` when labels were given."""

    last_hidden_state: Tensor
    logits: Optional[Tensor] = None
    loss: Optional[Tensor] = None


# ---- modules -----------------------------------------------------------------------------------


class HATEmbeddings(nn.Module):
    """HAT's embeddings: word + token type + position, then LayerNorm and dropout.  Positions
    restart in every segment at ``pad_token_id + 1``; padding tokens (``input_ids == pad_token_id``)
    get position 0, as in HAT."""

    def __init__(self, config: HATConfig) -> None:
        super().__init__()
        d, pad = config.hidden_size, config.pad_token_id
        self.pad_token_id = pad
        self.segment_size = config.segment_size
        self.word_embeddings = nn.Embedding(config.vocab_size, d, padding_idx=pad)
        self.position_embeddings = nn.Embedding(config.segment_size + pad + 1, d, padding_idx=pad)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, d)
        self.layer_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, input_ids: Tensor, token_type_ids: Optional[Tensor] = None,
                segment_ids: Optional[Tensor] = None) -> Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        if segment_ids is None:
            within = (pos % self.segment_size).expand_as(input_ids)
        else:
            within = pos - segment_bounds(segment_ids)[0]
        position_ids = (within + self.pad_token_id + 1) * (input_ids != self.pad_token_id)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(position_ids)
        return self.dropout(self.layer_norm(x))


class HATModel(nn.Module):
    """Embeddings + :class:`HATEncoder`, HAT's ``HATModel``.

    ``forward(input_ids [B, N], attention_mask=None, token_type_ids=None, segment_ids=None)``
    -> :class:`HATOutput` with ``last_hidden_state [B, N, E]``.

    Input length: without ``segment_ids``, ``N`` must be a multiple of ``segment_size`` and at
    most ``segment_size * max_segments`` (with segment positions), else ValueError -- HAT fails on
    such inputs too; pad them (with ``pad_token_id`` and ``attention_mask`` 0) to a multiple.  With
    ``segment_ids [B, N]`` (runs of equal ids, non-decreasing) segments may be shorter, never longer
    than ``segment_size``.  ``attention_mask [B, N]``: 1 / True = real token, 0 / False = padding.
    """

    def __init__(self, config: HATConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = HATEmbeddings(config)
        self.encoder = HATEncoder(
            config.hidden_size, config.num_attention_heads, config.layout, config.intermediate_size,
            config.hidden_dropout, _ACTIVATIONS[config.hidden_act], config.layer_norm_eps, norm_first=False,
            attention_dropout=config.attention_dropout, segment_size=None,  # segment_ids per call: forward
            max_segments=None if config.segment_positions == "none" else config.max_segments,
            segment_positions=config.segment_positions,
            segment_padding_idx=config.pad_token_id if config.segment_positions == "absolute" else 0,
            final_norm=False)
        for layer in self.encoder.layers:  # HAT (Roberta layers) has no dropout inside the feed-forward
            for block in (layer.segment_encoder, layer.cross_segment_encoder):
                if block is not None:
                    block.dropout = nn.Identity()

    @classmethod
    def from_hat_checkpoint(cls, path: Union[str, Path], *, segment_positions: Optional[str] = None,
                            dtype: Optional[torch.dtype] = None, device=None) -> "HATModel":
        """Load a directory written by the HAT code's ``save_pretrained`` (module docstring): the
        base model of any HAT head class (the head's weights are not read).

        ``segment_positions``: ``"absolute"`` / ``"none"`` / ``"rank"`` (module docstring); None = the
        checkpoint's code version (:func:`detect_segment_positions`), else a warning and "absolute".
        ``dtype`` / ``device``: where the loaded model goes (default float32 on the CPU)."""
        config, state = _read_checkpoint(path, segment_positions)
        model = cls(config)
        _load(model, _base_state(state, config), strict_extra=[], allowed_extra=())
        return model.to(device=device, dtype=dtype)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, segment_ids: Optional[Tensor] = None) -> HATOutput:
        kpm = self._check_inputs(input_ids, attention_mask, token_type_ids, segment_ids)
        x = self.embeddings(input_ids, token_type_ids, segment_ids)
        if segment_ids is None:  # fixed segments, as ids: the encoder also takes user-given ones
            n = input_ids.shape[1]
            segment_ids = torch.arange(n, device=input_ids.device) // self.config.segment_size
            segment_ids = segment_ids.expand(input_ids.shape[0], n)
        return HATOutput(last_hidden_state=self.encoder(x, segment_ids=segment_ids, key_padding_mask=kpm))

    def _check_inputs(self, input_ids, attention_mask, token_type_ids, segment_ids) -> Optional[Tensor]:
        cfg = self.config
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError(f"input_ids must be an integer tensor [B, N], got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__}")
        shape = tuple(input_ids.shape)
        for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids),
                        ("segment_ids", segment_ids)):
            if t is not None and (not isinstance(t, Tensor) or tuple(t.shape) != shape):
                raise ValueError(f"{name} must be a tensor of input_ids' shape {shape}, got "
                                 f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        n, s = shape[1], cfg.segment_size
        if segment_ids is None:
            if n % s:
                raise ValueError(f"input_ids has length {n}, not a multiple of the segment size {s} "
                                 f"(HAT's max_sentence_length): pad it to {-(-n // s) * s} with pad_token_id="
                                 f"{cfg.pad_token_id} and attention_mask 0, or pass segment_ids")
        else:
            start, end = segment_bounds(segment_ids)
            longest = int((end - start).max()) if n else 0
            if longest > s:
                raise ValueError(f"segment_ids has a segment of {longest} tokens, longer than the segment size {s}")
        return _key_padding_mask(attention_mask)


def _key_padding_mask(attention_mask: Optional[Tensor]) -> Optional[Tensor]:
    """HF's ``attention_mask`` (1 / True = real token) as lhattn's ``key_padding_mask`` (True = padding)."""
    if attention_mask is None:
        return None
    return ~attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0


class _MaskedLMHead(nn.Module):
    """HAT's LM head: dense, gelu, LayerNorm, decoder to the vocabulary (+ bias)."""

    def __init__(self, config: HATConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.dense = nn.Linear(d, d)
        self.layer_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(d, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.layer_norm(F.gelu(self.dense(x)))) + self.bias


class HATForMaskedLM(nn.Module):
    """:class:`HATModel` + HAT's masked-LM head (decoder tied to the word embeddings when
    ``config.tie_word_embeddings``).  ``forward(..., labels=None)``: ``logits [B, N, V]``; with
    ``labels [B, N]`` (-100 = ignored) also the cross-entropy ``loss``."""

    def __init__(self, config: HATConfig) -> None:
        super().__init__()
        self.hat = HATModel(config)
        self.lm_head = _MaskedLMHead(config)
        if config.tie_word_embeddings:
            self.lm_head.decoder.weight = self.hat.embeddings.word_embeddings.weight

    @classmethod
    def from_hat_checkpoint(cls, path: Union[str, Path], *, segment_positions: Optional[str] = None,
                            dtype: Optional[torch.dtype] = None, device=None) -> "HATForMaskedLM":
        """Load a ``HATForMaskedLM`` checkpoint of the HAT code (see :meth:`HATModel.from_hat_checkpoint`)."""
        config, state = _read_checkpoint(path, segment_positions)
        model = cls(config)
        head = {k: v for k, v in state.items() if k.startswith("lm_head.")}
        if not head:
            raise ValueError(f"{path} has no masked-LM head (no 'lm_head.*' weights)")
        mapped = {f"hat.{k}": v for k, v in _base_state(state, config).items()}
        for name in ("dense.weight", "dense.bias", "layer_norm.weight", "layer_norm.bias"):
            mapped[f"lm_head.{name}"] = _take(head, f"lm_head.{name}")
        bias = head.pop("lm_head.bias", None)
        decoder_bias = head.pop("lm_head.decoder.bias", None)
        mapped["lm_head.bias"] = bias if bias is not None else _missing(decoder_bias, "lm_head.bias", path)
        decoder = head.pop("lm_head.decoder.weight", None)
        if config.tie_word_embeddings:
            mapped["lm_head.decoder.weight"] = mapped["hat.embeddings.word_embeddings.weight"]
        else:
            mapped["lm_head.decoder.weight"] = _missing(decoder, "lm_head.decoder.weight", path)
        consumed = {k for k in state if k.startswith("lm_head.")} - set(head)  # leftovers are refused
        _load(model, mapped, strict_extra=[k for k in state if not _is_base_key(k)],
              allowed_extra=("pooler.", "classifier."), consumed=consumed)
        return model.to(device=device, dtype=dtype)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, segment_ids: Optional[Tensor] = None,
                labels: Optional[Tensor] = None) -> HATOutput:
        hidden = self.hat(input_ids, attention_mask, token_type_ids, segment_ids).last_hidden_state
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        return HATOutput(last_hidden_state=hidden, logits=logits, loss=loss)


class _AttentivePooling(nn.Module):
    """HAT's attentive pooling: softmax over ``tanh(v(lin_proj(x)))`` of the pooled rows."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin_proj = nn.Linear(d, d)
        self.v = nn.Linear(d, 1, bias=False)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        score = torch.tanh(self.v(self.lin_proj(x))).squeeze(-1).masked_fill(~valid, float("-inf"))
        weight = torch.softmax(score, dim=-1).nan_to_num(0.0)  # a row with no segment pools to 0
        return (weight.unsqueeze(-1) * x).sum(dim=1)


class _Pooler(nn.Module):
    def __init__(self, d: int, pooling: str) -> None:
        super().__init__()
        self.dense = nn.Linear(d, d)
        self.attentive_pooling = _AttentivePooling(d) if pooling == "attentive" else None


class HATForSequenceClassification(nn.Module):
    """:class:`HATModel` + HAT's sequence-classification head: pool the segment representatives,
    ``tanh(dense(.))``, dropout, linear classifier.

    ``pooling`` (HAT's options): ``"max"`` (default) -- element-wise max over the segments;
    ``"attentive"`` -- HAT's attentive pooling (its own weights); ``"first"`` -- the first token;
    ``"last"`` -- the last segment's first token (HAT takes position ``-128``, its segment size in
    every released model).  Only segments whose first token is real are pooled ("max",
    "attentive", "last"): HAT also pools the padding outputs of padded segments, so its logits
    differ from these exactly when a segment starts with padding.

    ``forward(..., labels=None)``: ``logits [B, num_labels]``; with ``labels``: ``loss`` -- mean
    squared error when ``num_labels == 1``, cross-entropy for integer labels, else binary
    cross-entropy with logits (multi-label), HAT's rule.
    """

    def __init__(self, config: HATConfig, num_labels: int = 2, pooling: str = "max") -> None:
        super().__init__()
        if pooling not in HAT_POOLINGS:
            raise ValueError(f"pooling must be one of {HAT_POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        self.num_labels = num_labels
        self.hat = HATModel(config)
        self.pooler = _Pooler(config.hidden_size, pooling)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, num_labels)

    @classmethod
    def from_hat_checkpoint(cls, path: Union[str, Path], *, pooling: Optional[str] = None,
                            segment_positions: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                            device=None) -> "HATForSequenceClassification":
        """Load a ``HATForSequenceClassification`` checkpoint of the HAT code.  ``pooling`` is not
        in HAT's config: None = "attentive" when the checkpoint has attentive-pooling weights,
        else "max" (HAT's default); "first" / "last" must be asked for."""
        config, state = _read_checkpoint(path, segment_positions)
        attentive = any(k.startswith("pooler.attentive_pooling.") for k in state)
        if pooling is None:
            pooling = "attentive" if attentive else "max"
        if (pooling == "attentive") != attentive:
            raise ValueError(f"pooling={pooling!r} but the checkpoint {'has' if attentive else 'has no'} "
                             "attentive-pooling weights (pooler.attentive_pooling.*)")
        if "classifier.weight" not in state:
            raise ValueError(f"{path} has no classification head (no 'classifier.weight')")
        model = cls(config, num_labels=state["classifier.weight"].shape[0], pooling=pooling)
        head = {k: v for k, v in state.items() if k.startswith(("pooler.", "classifier."))}
        mapped = {f"hat.{k}": v for k, v in _base_state(state, config).items()}
        mapped.update(head)
        _load(model, mapped, strict_extra=[k for k in state if not _is_base_key(k)],
              allowed_extra=("lm_head.",), consumed=set(head))
        return model.to(device=device, dtype=dtype)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, segment_ids: Optional[Tensor] = None,
                labels: Optional[Tensor] = None) -> HATOutput:
        hidden = self.hat(input_ids, attention_mask, token_type_ids, segment_ids).last_hidden_state
        pooled = torch.tanh(self.pooler.dense(self._pool(hidden, attention_mask, segment_ids)))
        logits = self.classifier(self.dropout(pooled))
        return HATOutput(last_hidden_state=hidden, logits=logits, loss=self._loss(logits, labels))

    def _pool(self, hidden: Tensor, attention_mask: Optional[Tensor], segment_ids: Optional[Tensor]) -> Tensor:
        if self.pooling == "first":
            return hidden[:, 0]
        b, n, _ = hidden.shape
        seg = dict(segment_size=self.hat.config.segment_size) if segment_ids is None else dict(segment_ids=segment_ids)
        index = representative_index(b, n, key_padding_mask=_key_padding_mask(attention_mask), device=hidden.device,
                                     **seg)  # [B, R], -1 = empty slot
        valid = index >= 0
        reps = hidden.gather(1, index.clamp(min=0)[..., None].expand(-1, -1, hidden.shape[-1]))
        if self.pooling == "attentive":
            return self.pooler.attentive_pooling(reps, valid)
        if self.pooling == "last":
            last = valid.long().cumsum(dim=1).argmax(dim=1)  # the last valid slot
            return reps[torch.arange(b, device=hidden.device), last] * valid.any(dim=1, keepdim=True)
        pooled = reps.masked_fill(~valid[..., None], float("-inf")).amax(dim=1)
        return pooled.masked_fill(~valid.any(dim=1, keepdim=True), 0.0)

    def _loss(self, logits: Tensor, labels: Optional[Tensor]) -> Optional[Tensor]:
        if labels is None:
            return None
        if self.num_labels == 1:
            return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).reshape(-1))
        if not labels.is_floating_point():
            return F.cross_entropy(logits, labels.reshape(-1))
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


# ---- checkpoint reading and mapping ------------------------------------------------------------

_POSITIONS_ADDED_TO_CSE_INPUT = re.compile(r"^\s*sentence_global_tokens\s*\+=\s*self\.position_embeddings\(", re.M)
_POSITIONS_OVERWRITTEN = re.compile(r"^\s*outputs\[\s*:\s*,\s*::\s*self\.max_sentence_length\s*\]\s*\+=\s*"
                                    r"self\.position_embeddings\(", re.M)


def detect_segment_positions(path: Union[str, Path]) -> Optional[str]:
    """The segment-position semantics of the HAT code saved next to a checkpoint
    (``modelling_hat.py``, as Hub repositories of HAT models carry it for ``trust_remote_code``):
    ``"absolute"`` when it adds the positions to the cross-segment inputs (commit b5d0470 on),
    ``"none"`` when it adds them to the token states that the cross-segment outputs then overwrite
    (earlier code); None when there is no such file or it shows neither."""
    for name in ("modelling_hat.py", "modeling_hat.py"):
        f = Path(path) / name
        if f.is_file():
            code = f.read_text(errors="replace")
            if _POSITIONS_ADDED_TO_CSE_INPUT.search(code):
                return "absolute"
            if _POSITIONS_OVERWRITTEN.search(code):
                return "none"
    return None


def _read_weights(path: Path) -> Dict[str, Tensor]:
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (path / single).is_file():
            return _load_file(path / single)
        if (path / index_name).is_file():
            files = sorted(set(json.loads((path / index_name).read_text())["weight_map"].values()))
            state = {}
            for f in files:
                state.update(_load_file(path / f))
            return state
    raise ValueError(f"{path} has no HAT weights (model.safetensors or pytorch_model.bin, or a sharded index)")


def _load_file(f: Path) -> Dict[str, Tensor]:
    if f.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(f))
    return torch.load(f, map_location="cpu", weights_only=True)


def _read_checkpoint(path: Union[str, Path], segment_positions: Optional[str]) -> Tuple[HATConfig, Dict[str, Tensor]]:
    """``(config, state with the base model's prefix removed)``."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"path must be a directory written by HAT's save_pretrained (config.json + weights), "
                         f"got {str(path)!r} (no config.json)")
    raw = json.loads((path / "config.json").read_text())
    if raw.get("model_type") not in (None, "hierarchical-transformer"):
        raise ValueError(f"{path} holds a {raw.get('model_type')!r} model, not a HAT "
                         "(model_type 'hierarchical-transformer')")
    if segment_positions is None:
        segment_positions = detect_segment_positions(path)
        if segment_positions is None:
            segment_positions = "absolute"
            warnings.warn(f"{path}: the HAT code version is unknown (no modelling_hat.py next to the weights); "
                          "using segment_positions='absolute' (HAT's code from commit b5d0470, 2024, on). "
                          "Checkpoints trained with earlier code never used their segment positions: "
                          "pass segment_positions='none' for them", stacklevel=3)
    config = HATConfig.from_hat_config(raw, segment_positions)
    state = {}
    for key, t in _read_weights(path).items():
        for prefix in ("hi_transformer.", "hat."):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        state[key] = t
    return config, state


def _is_base_key(key: str) -> bool:
    return key.startswith(("embeddings.", "encoder."))


_BLOCK = {"attention.output.dense": "self_attn.out_proj", "attention.output.LayerNorm": "norm1",
          "intermediate.dense": "linear1", "output.dense": "linear2", "output.LayerNorm": "norm2"}
_EMB = {"word_embeddings.weight": "word_embeddings.weight", "position_embeddings.weight": "position_embeddings.weight",
        "token_type_embeddings.weight": "token_type_embeddings.weight", "LayerNorm.weight": "layer_norm.weight",
        "LayerNorm.bias": "layer_norm.bias"}


def _take(state: dict, key: str) -> Tensor:
    if key not in state:
        raise ValueError(f"the checkpoint has no {key!r}")
    return state.pop(key)


def _missing(t: Optional[Tensor], key: str, path) -> Tensor:
    if t is None:
        raise ValueError(f"{path}: the checkpoint has no {key!r}")
    return t


def _base_state(state: Dict[str, Tensor], config: HATConfig) -> Dict[str, Tensor]:
    """HAT's base-model weights under :class:`HATModel`'s names; refuses unknown or unmappable ones."""
    src = {k: v for k, v in state.items() if _is_base_key(k)}
    for buffer in ("embeddings.position_ids", "embeddings.token_type_ids"):
        src.pop(buffer, None)
    out = {f"embeddings.{ours}": _take(src, f"embeddings.{theirs}") for theirs, ours in _EMB.items()}
    tables = {}
    j = 0  # lhattn's layer index: HAT layers with neither encoder are left out
    for i in range(config.extra["num_hidden_layers"]):
        entry = config.extra["encoder_layout"][str(i)]
        parts = [(flag, name) for flag, name in (("sentence_encoder", "segment_encoder"),
                                                  ("document_encoder", "cross_segment_encoder")) if entry.get(flag)]
        if not parts:
            continue
        for flag, ours in parts:
            out.update(_block_state(src, f"encoder.layer.{i}.{flag}", f"encoder.layers.{j}.{ours}"))
        table = src.pop(f"encoder.layer.{i}.position_embeddings.weight", None)
        if table is not None:
            tables[i] = table
        j += 1
    if src:
        raise ValueError(f"HAT weights that lhattn cannot map: {sorted(src)}")
    table = _segment_table(tables, config)
    if table is not None:
        out["encoder.segment_position.weight"] = table
    return out


def _block_state(src: dict, theirs: str, ours: str) -> Dict[str, Tensor]:
    out = {}
    for kind in ("weight", "bias"):
        out[f"{ours}.self_attn.in_proj_{kind}"] = torch.cat(
            [_take(src, f"{theirs}.attention.self.{qkv}.{kind}") for qkv in ("query", "key", "value")])
        for t, o in _BLOCK.items():
            out[f"{ours}.{o}.{kind}"] = _take(src, f"{theirs}.{t}.{kind}")
    return out


def _segment_table(tables: Dict[int, Tensor], config: HATConfig) -> Optional[Tensor]:
    """HAT's segment-position table (tied over layers: any copies must be equal) as lhattn's."""
    if config.segment_positions == "none":
        return None
    if not tables:
        raise ValueError(f"segment_positions={config.segment_positions!r} but the checkpoint has no segment-position "
                         "table (encoder.layer.<i>.position_embeddings.weight)")
    layers = sorted(tables)
    first = tables[layers[0]]
    differ = [i for i in layers[1:] if not torch.equal(tables[i], first)]
    if differ:
        raise ValueError(f"the segment-position tables of HAT layers {layers[0]} and {differ} differ (untied tables, "
                         "as transformers 5 loads HAT); lhattn shares one table across the cross-segment "
                         "encoders and cannot map them")
    rows = config.max_segments + 1
    if tuple(first.shape) != (rows, config.hidden_size):
        raise ValueError(f"the segment-position table has shape {tuple(first.shape)}, expected (max_sentences + 1 = "
                         f"{rows}, {config.hidden_size})")
    return first if config.segment_positions == "absolute" else first[1:]


def _load(model: nn.Module, mapped: Dict[str, Tensor], strict_extra: List[str], allowed_extra: Tuple[str, ...],
          consumed: frozenset = frozenset()) -> None:
    """``load_state_dict(strict=True)`` of the mapped weights, after refusing checkpoint keys that
    are neither mapped (``consumed``) nor another head's (``allowed_extra`` prefixes)."""
    unknown = [k for k in strict_extra if k not in consumed and not k.startswith(allowed_extra)]
    if unknown:
        raise ValueError(f"HAT weights that lhattn cannot map: {sorted(unknown)}")
    with torch.no_grad():
        model.load_state_dict(mapped, strict=True)
