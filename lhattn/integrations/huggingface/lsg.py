"""LSG checkpoints (``lsg_converter``'s LSG-RoBERTa / LSG-XLM-R / LSG-BERT) as transformers-5 models on lhattn.

:func:`from_lsg_checkpoint` loads a checkpoint directory written by ``lsg_converter`` (the
``LSG*Model`` / ``LSG*For...`` classes, e.g. ``ccdv/lsg-xlm-roberta-base-4096`` once downloaded),
or a *plain* RoBERTa / XLM-R / BERT checkpoint that it converts the way ``LSGConverter`` does,
and returns a model built from transformers' own classes (``RobertaModel``,
``BertForSequenceClassification``, ...) in which

* the embeddings prepend ``num_global_tokens`` learned global tokens (rows of the checkpoint's
  ``embeddings.global_embeddings`` table, passed through the embeddings' LayerNorm and dropout,
  without position or token-type embeddings, as LSG does);
* every self-attention runs :func:`lhattn.attention` with
  ``LSG(block_size, sparse_block_size, sparsity_factor, sparsity_type, num_global_tokens,
  lsh_num_pre_rounds, global_layout="prepended")`` -- the model files' ``LSGSelfAttention``, whose
  blocks start right after the global tokens; the query / key / value linears are the
  checkpoint's, scale ``head_dim ** -0.5``;
* padding (``attention_mask == 0``) becomes lhattn's ``key_padding_mask``; with
  ``mask_first_token`` the first real token is masked as a key too;
* the encoder output drops the global rows again; with ``pool_with_global`` the first token's
  output is replaced by the first global token's (so the pooler and the classification heads read
  the global token), as LSG does.

Parameter names are LSG's, so ``state_dict()`` / ``save_pretrained`` give a checkpoint that
:func:`from_lsg_checkpoint` (and ``lsg_converter``'s own classes) load again.

What holds (tests/test_lsg_checkpoint.py, against outputs of lsg_converter 0.1.9 under
transformers 4.44.2 committed in tests/fixtures/lsg/): on non-padding tokens, ``last_hidden_state``,
``pooler_output`` and the sequence-classification logits equal the reference's to fp32 relative
error <= 1e-5, for every sparsity type, short (full-attention) inputs, ``sparse_block_size`` below
and above ``block_size``, the model files' irregular windows (``block_size / sparsity_factor == 1``,
``sparse_block_size < 3/4 * block_size / sparsity_factor``: the pattern's default
``sparse_geometry="reference"``), ``mask_first_token`` and ``pool_with_global=False``.  Differences, by
design:

* padding rows: lhattn's attention output there is 0, LSG's is a value nobody reads;
* ``lsh``: LSG draws its random projections from the global RNG at every call (its outputs change
  from call to call); here layer ``i`` draws them from a generator seeded with ``lsh_seed + i``,
  so a model is deterministic (equal to LSG with ``torch.manual_seed(lsh_seed + i)`` before layer
  ``i``'s selection);
* ``bos_pooling``: a group of ``sparsity_factor`` tokens that are all padding stays masked (LSG's
  fp32 mask average overflows there and un-masks the group);
* ``adaptive=False`` with a length that is not a multiple of ``block_size``: LSG fails (assert);
  here such inputs run as with ``adaptive=True``;
* intermediate ``hidden_states`` have ``num_global_tokens + N`` rows (LSG's also include its
  padding to a multiple of ``block_size``); attention probabilities are never formed
  (``output_attentions=True`` gives an empty tuple).

Not supported (``ValueError`` naming the setting): decoders (``is_decoder=True``: LSG's causal
global rows output the query itself), cross-attention, non-absolute position embeddings, unknown
sparsity types, ``block_size / sparsity_factor`` odd and above 1 (LSG's model code fails there),
and ``mask_first_token`` with ``bos_pooling`` (whose pooling query is the masked first token).
``transformers`` is imported only when :func:`from_lsg_checkpoint` runs.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import math
import os
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ... import functional as _functional
from ...patterns import LSG

__all__ = ["from_lsg_checkpoint", "LSG_DEFAULTS", "LSG_TASKS", "lsg_pattern"]

# As in lhattn.nn.lsg: the fallback's autograd.Function builds masks that dynamo cannot capture.
_attention = torch.compiler.disable(_functional.attention)

# The LSG config fields and their defaults in lsg_converter's LSG*Config.
LSG_DEFAULTS: Dict[str, Any] = dict(adaptive=True, block_size=128, lsh_num_pre_rounds=1, mask_first_token=False,
                                    num_global_tokens=1, pool_with_global=True, sparse_block_size=128,
                                    sparsity_factor=2, sparsity_type="norm")
_SPARSITY_TYPES = (None, "none", "norm", "lsh", "pooling", "stride", "block_stride", "bos_pooling")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "sentencepiece.bpe.model",
                    "spiece.model")
_GLOBAL_TABLE = 512  # rows of LSG's global embedding table (fixed in its model files)

# model_type -> (transformers module, class prefix, offset of the first real position)
_FAMILIES = {"roberta": ("roberta", "Roberta", 2), "xlm-roberta": ("xlm_roberta", "XLMRoberta", 2),
             "bert": ("bert", "Bert", 0)}
# task -> class suffix
LSG_TASKS: Dict[str, str] = {"base": "Model", "masked-lm": "ForMaskedLM",
                             "sequence-classification": "ForSequenceClassification",
                             "token-classification": "ForTokenClassification",
                             "question-answering": "ForQuestionAnswering", "multiple-choice": "ForMultipleChoice",
                             "pretraining": "ForPreTraining"}


# ---- settings ------------------------------------------------------------------------------------


def _int_setting(name: str, value: Any, minimum: int, maximum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"LSG setting {name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum or (maximum is not None and value > maximum):
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"LSG setting {name} must be {allowed}, got {value}")
    return value


def _check_settings(config) -> None:
    """Raise for what LSG's config would reject and for what lhattn does not reproduce."""
    for name in ("adaptive", "mask_first_token", "pool_with_global"):
        if not isinstance(getattr(config, name), bool):
            raise TypeError(f"LSG setting {name} must be a bool, got {getattr(config, name)!r}")
    _int_setting("num_global_tokens", config.num_global_tokens, 1, _GLOBAL_TABLE)
    _int_setting("block_size", config.block_size, 1)
    _int_setting("sparse_block_size", config.sparse_block_size, 0)
    _int_setting("sparsity_factor", config.sparsity_factor, 0)
    _int_setting("lsh_num_pre_rounds", config.lsh_num_pre_rounds, 0)
    if config.sparsity_type not in _SPARSITY_TYPES:
        raise ValueError(f"LSG setting sparsity_type={config.sparsity_type!r} is not one of LSG's "
                         f"{_SPARSITY_TYPES} (LSG itself would silently drop the sparse keys)")
    if config.sparsity_factor > 0 and config.block_size % config.sparsity_factor:
        raise ValueError(f"LSG setting sparsity_factor={config.sparsity_factor} must divide "
                         f"block_size={config.block_size}")
    step = config.block_size // max(config.sparsity_factor, 1)  # compressed keys per block
    if _pattern_type(config) != "none" and step % 2 and step > 1:
        raise ValueError(f"block_size / sparsity_factor = {config.block_size} / {config.sparsity_factor} = {step} "
                         "is odd: LSG's model code fails there (its sparse windows need an even number of "
                         "compressed keys per block, or exactly 1)")
    if config.mask_first_token and not config.pool_with_global:
        raise ValueError("LSG setting mask_first_token=True needs pool_with_global=True (LSG's config forces it)")
    if config.mask_first_token and _pattern_type(config) in ("bos_pooling",):
        raise ValueError("mask_first_token=True with bos_pooling sparsity (sparsity_type="
                         f"{config.sparsity_type!r}) is not supported: the pooling query is the masked first "
                         "token, whose row lhattn treats as padding")
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise ValueError("causal LSG models (is_decoder=True / add_cross_attention=True) are not supported: "
                         "LSG's causal global rows output the query vector itself")
    pos_type = getattr(config, "position_embedding_type", "absolute")
    if pos_type not in (None, "absolute"):
        raise ValueError(f"position_embedding_type={pos_type!r} is not supported (LSG needs 'absolute')")


def _pattern_type(config) -> str:
    """lhattn's sparsity_type for an LSG config (``lsh`` with one bucket per chunk is bos_pooling)."""
    kind = config.sparsity_type
    if kind in (None, "none") or config.sparse_block_size == 0 or config.sparsity_factor == 0:
        return "none"
    chunk = min(config.block_size, config.sparse_block_size)
    if kind == "lsh" and config.sparsity_factor > 1 and chunk // config.sparsity_factor == 1:
        return "bos_pooling"
    return kind


def lsg_pattern(config, *, seed: int = 0) -> LSG:
    """The :class:`~lhattn.LSG` pattern (``global_layout="prepended"``) of an LSG config."""
    kind = config.sparsity_type
    none = kind in (None, "none") or config.sparse_block_size == 0 or config.sparsity_factor == 0
    try:
        return LSG(block_size=config.block_size, sparse_block_size=config.sparse_block_size,
                   sparsity_factor=max(config.sparsity_factor, 1), sparsity_type="none" if none else kind,
                   num_global_tokens=config.num_global_tokens, lsh_num_pre_rounds=config.lsh_num_pre_rounds,
                   seed=seed, global_layout="prepended")
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"LSG settings not supported by lhattn: {exc}") from exc


# ---- modules (used as mixins over transformers' classes, which are imported lazily) ----------


class LSGSelfAttention(nn.Module):
    """An LSG self-attention in place of a BERT/RoBERTa ``*SelfAttention``: the same ``query`` /
    ``key`` / ``value`` linears, attention by :func:`lhattn.attention` (module docstring).

    ``forward(hidden_states [B, g + N, E], attention_mask)`` where ``attention_mask`` is the
    ``[B, g + N]`` bool key padding mask built by the LSG model (True = padding) or None;
    returns ``(out [B, g + N, E], None)``.
    """

    def __init__(self, config, layer_idx: int = 0) -> None:
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"hidden_size ({config.hidden_size}) must be divisible by num_attention_heads "
                             f"({config.num_attention_heads})")
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.all_head_size = config.hidden_size
        self.query = nn.Linear(config.hidden_size, self.all_head_size)
        self.key = nn.Linear(config.hidden_size, self.all_head_size)
        self.value = nn.Linear(config.hidden_size, self.all_head_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self.layer_idx = layer_idx
        self.backend = "auto"
        self.pattern = lsg_pattern(config, seed=layer_idx)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, pattern={self.pattern}"

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                encoder_hidden_states: Optional[Tensor] = None, **kwargs) -> Tuple[Tensor, None]:
        if encoder_hidden_states is not None:
            raise ValueError("LSG self-attention has no cross-attention (encoder_hidden_states must be None)")
        b, n, _ = hidden_states.shape

        def heads(x: Tensor) -> Tensor:  # [B, n, E] -> [B, H, n, hd]
            return x.view(b, n, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

        q, k, v = heads(self.query(hidden_states)), heads(self.key(hidden_states)), heads(self.value(hidden_states))
        out = _attention(q, k, v, self.pattern, key_padding_mask=attention_mask,
                         scale=1.0 / math.sqrt(self.attention_head_size),
                         dropout_p=self.dropout.p if self.training else 0.0, backend=self.backend)
        return out.transpose(1, 2).reshape(b, n, self.all_head_size), None


class _GlobalTokensEmbeddings:
    """Mixin over ``*Embeddings``: prepends ``num_global_tokens`` rows of ``global_embeddings``."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.num_global_tokens = config.num_global_tokens
        self.global_embeddings = nn.Embedding(_GLOBAL_TABLE, config.hidden_size)

    def forward(self, *args, **kwargs) -> Tensor:
        x = super().forward(*args, **kwargs)  # [B, N, E], after LayerNorm and dropout
        glob = self.global_embeddings.weight[: self.num_global_tokens]
        glob = self.dropout(self.LayerNorm(glob)).to(x.dtype)  # LayerNorm is per row: as LSG's on the concat
        return torch.cat([glob[None].expand(x.shape[0], -1, -1), x], dim=1)


class _LSGEncoder:
    """Mixin over ``*Encoder``: LSG self-attention in every layer; drops the global rows at the end."""

    def __init__(self, config) -> None:
        super().__init__(config)
        for i, layer in enumerate(self.layer):
            layer.attention.self = LSGSelfAttention(config, layer_idx=i)
        self.num_global_tokens = config.num_global_tokens
        self.pool_with_global = config.pool_with_global

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        out = super().forward(hidden_states, *args, **kwargs)
        h = out.last_hidden_state  # [B, g + N, E]
        seq = h[:, self.num_global_tokens:]
        if self.pool_with_global:  # the first token's output is the first global token's
            seq = torch.cat([h[:, :1], seq[:, 1:]], dim=1)
        out.last_hidden_state = seq
        return out


class _LSGBaseModel:
    """Mixin over ``*Model``: LSG embeddings and encoder; the mask becomes lhattn's key padding mask."""

    _lsg_embeddings: type
    _lsg_encoder: type

    def __init__(self, config, add_pooling_layer: bool = True) -> None:
        super().__init__(config, add_pooling_layer=add_pooling_layer)
        self.embeddings = self._lsg_embeddings(config)
        self.encoder = self._lsg_encoder(config)
        self.post_init()

    def _create_attention_masks(self, attention_mask=None, encoder_attention_mask=None, embedding_output=None,
                                **kwargs):
        """``[B, g + N]`` bool, True = padding (or None): what :class:`LSGSelfAttention` takes."""
        if encoder_attention_mask is not None:
            raise ValueError("LSG models have no cross-attention (encoder_attention_mask must be None)")
        b, total = embedding_output.shape[:2]
        g = self.config.num_global_tokens
        kpm = torch.zeros(b, total, dtype=torch.bool, device=embedding_output.device)
        if attention_mask is not None:
            if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != (b, total - g):
                shape = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask)
                raise ValueError(f"attention_mask must be a [batch, seq_len] = {(b, total - g)} tensor of 1 (token) "
                                 f"and 0 (padding) for an LSG model, got {shape}")
            kpm[:, g:] = attention_mask.to(kpm.device) == 0
        if self.config.mask_first_token:
            kpm[:, g] = True
        return (kpm if bool(kpm.any()) else None), None


class _LSGHead:
    """Mixin over ``*For...`` heads: their base model becomes the LSG one (same prefix, same pooler)."""

    _lsg_base: type

    def __init__(self, config) -> None:
        super().__init__(config)
        stock = getattr(self, self.base_model_prefix)
        setattr(self, self.base_model_prefix, self._lsg_base(config, add_pooling_layer=stock.pooler is not None))
        self.post_init()


def _hf_module(family: str):
    try:
        return importlib.import_module(f"transformers.models.{_FAMILIES[family][0]}.modeling_{_FAMILIES[family][0]}")
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("lhattn.integrations.huggingface.from_lsg_checkpoint needs the `transformers` package "
                          f"(pip install transformers): {exc}") from exc


def _make_class(name: str, mixin: type, base: type, **attrs) -> type:
    return type(name, (mixin, base), dict(attrs, __module__=__name__, __qualname__=name))


@functools.lru_cache(maxsize=None)
def _lsg_class(family: str, task: str) -> type:
    """``LSG<Prefix><Suffix>``: transformers' class with the LSG mixin (cached per family and task)."""
    hf, prefix = _hf_module(family), _FAMILIES[family][1]
    suffix = LSG_TASKS[task]
    if task == "base":
        emb = _make_class(f"LSG{prefix}Embeddings", _GlobalTokensEmbeddings, getattr(hf, f"{prefix}Embeddings"))
        enc = _make_class(f"LSG{prefix}Encoder", _LSGEncoder, getattr(hf, f"{prefix}Encoder"))
        return _make_class(f"LSG{prefix}Model", _LSGBaseModel, getattr(hf, f"{prefix}Model"),
                           _lsg_embeddings=emb, _lsg_encoder=enc)
    if not hasattr(hf, prefix + suffix):
        raise ValueError(f"task={task!r} is not available for {family} (transformers has no {prefix}{suffix})")
    return _make_class(f"LSG{prefix}{suffix}", _LSGHead, getattr(hf, prefix + suffix),
                       _lsg_base=_lsg_class(family, "base"))


# ---- conversion (a plain checkpoint, as lsg_converter's LSGConverter does it) ----------------------


def _order_positions(positions: Tensor, stride: int, generator: torch.Generator) -> Tensor:
    """The converter's global-token positions: 512 rows taken from ``positions`` (``[n, E]``)."""
    n, d = positions.shape
    if n % _GLOBAL_TABLE:
        if n > _GLOBAL_TABLE:
            positions = positions[: _GLOBAL_TABLE * (n // _GLOBAL_TABLE)]
        else:  # the converter fills the table with normal draws of the same mean and std per column
            mean = positions.mean(dim=0, keepdim=True).expand(_GLOBAL_TABLE - n, -1)
            std = positions.std(dim=0, keepdim=True).expand(_GLOBAL_TABLE - n, -1)
            positions = torch.cat([positions, torch.normal(mean, std, generator=generator)], dim=0)
        n = positions.shape[0]
    factor = n // _GLOBAL_TABLE
    positions = positions.reshape(-1, factor, d)[:, 0]  # every factor-th position
    if stride % factor or _GLOBAL_TABLE % (stride // factor):
        raise ValueError(f"global_positional_stride={stride} does not fit a position table of {n} rows: "
                         f"stride / {factor} must divide {_GLOBAL_TABLE}")
    return positions.reshape(-1, stride // factor, d).transpose(0, 1).reshape(-1, d)


@torch.no_grad()
def _init_global_embeddings(base, family: str, bos_id: int, mask_id: int, stride: int, use_token_ids: bool,
                            seed: int) -> None:
    """Global token ``i``: position ``order(i)`` + word ``<s>``/``[CLS]`` (i = 0) or ``<mask>`` (i > 0),
    + token type 0 for BERT with ``use_token_ids`` -- the converter's ``update_global``."""
    emb = base.embeddings
    offset = _FAMILIES[family][2]
    words = emb.word_embeddings.weight
    gen = torch.Generator(device=words.device).manual_seed(seed)
    table = _order_positions(emb.position_embeddings.weight[offset:].clone(), stride, gen)
    table[0] += words[bos_id]
    table[1:] += words[mask_id][None]
    if family == "bert" and use_token_ids:
        table += emb.token_type_embeddings.weight[0][None]
    emb.global_embeddings.weight.copy_(table)


@torch.no_grad()
def _extend_positions(base, family: str, max_sequence_length: int) -> None:
    """Tile the position table (RoBERTa: past its 2 offset rows) to ``max_sequence_length`` tokens --
    the converter's ``update_positions``; resizes the ``position_ids`` / ``token_type_ids`` buffers."""
    emb = base.embeddings
    offset = _FAMILIES[family][2]
    old = emb.position_embeddings.weight
    reps = max_sequence_length // old.shape[0] + 1
    new = torch.cat([old[:offset]] + [old[offset:]] * reps, dim=0)[: max_sequence_length + offset]
    table = nn.Embedding(new.shape[0], new.shape[1], padding_idx=emb.position_embeddings.padding_idx,
                         device=new.device, dtype=new.dtype)
    table.weight.copy_(new)
    emb.position_embeddings = table
    ids = torch.arange(new.shape[0], device=emb.position_ids.device).expand((1, -1))
    emb.register_buffer("position_ids", ids, persistent=False)
    emb.register_buffer("token_type_ids", torch.zeros_like(ids), persistent=False)
    base.config.max_position_embeddings = new.shape[0]


def _special_ids(path: str, config, bos_token_id: Optional[int], mask_token_id: Optional[int]) -> Tuple[int, int]:
    """bos (else cls, else config.bos_token_id) and mask token ids, from the arguments or the
    checkpoint's tokenizer, as the converter reads them."""
    if bos_token_id is None or mask_token_id is None:
        from transformers import AutoTokenizer

        need = (f"converting {os.fspath(path)!r} needs the ids of the <s>/[CLS] and <mask> tokens: pass "
                "bos_token_id= and mask_token_id=, or put the tokenizer in the checkpoint")
        # transformers 5 builds a default tokenizer (wrong ids) when there are no tokenizer files
        if not any(os.path.isfile(os.path.join(path, name)) for name in _TOKENIZER_FILES):
            raise ValueError(f"{need} (no tokenizer file there)")
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except Exception as exc:  # noqa: BLE001 - any failure means: no usable tokenizer there
            raise ValueError(f"{need} ({type(exc).__name__}: {exc})") from exc
        if bos_token_id is None:
            bos_token_id = next((i for i in (tok.bos_token_id, tok.cls_token_id, config.bos_token_id)
                                 if i is not None), None)
        if mask_token_id is None:
            mask_token_id = tok.mask_token_id
        if bos_token_id is None or mask_token_id is None:
            raise ValueError(f"the tokenizer of {path!r} has no bos/cls or no mask token: pass bos_token_id= "
                             "and mask_token_id=")
    for name, value in (("bos_token_id", bos_token_id), ("mask_token_id", mask_token_id)):
        _int_setting(name, value, 0, config.vocab_size - 1)
    return bos_token_id, mask_token_id


# ---- the entry point ----------------------------------------------------------------------------------


def _read_config_json(path: str) -> Dict[str, Any]:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a checkpoint directory (str or os.PathLike), got {type(path).__name__}")
    cfg_file = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(cfg_file):
        raise ValueError(f"path must be a local checkpoint directory with a config.json, got {os.fspath(path)!r}")
    with open(cfg_file) as fh:
        return json.load(fh)


def _task_from_architectures(raw: Dict[str, Any], prefix: str) -> str:
    archs = raw.get("architectures") or []
    if not archs:
        return "base"
    name = archs[0][3:] if archs[0].startswith("LSG") else archs[0]
    suffix = name[len(prefix):] if name.startswith(prefix) else name
    for task, known in LSG_TASKS.items():
        if suffix == known:
            return task
    raise ValueError(f"the checkpoint's architecture {archs[0]!r} is not supported; pass task= one of "
                     f"{tuple(LSG_TASKS)} (causal LM heads are not supported)")


def from_lsg_checkpoint(path, task: Optional[str] = None, *, backend: str = "auto", lsh_seed: int = 0,
                        dtype: Optional[torch.dtype] = None, max_sequence_length: Optional[int] = None,
                        global_positional_stride: int = 64, use_token_ids: bool = True,
                        bos_token_id: Optional[int] = None, mask_token_id: Optional[int] = None,
                        seed: int = 0, **lsg_settings):
    """Load an LSG checkpoint (or convert a plain one) into a transformers-5 model running on lhattn.

    Args:
        path: a local checkpoint directory (``config.json`` + weights) of an LSG-RoBERTa / LSG-XLM-R /
            LSG-BERT model written by ``lsg_converter``, or of a plain RoBERTa / XLM-R / BERT model.
        task: ``"base"`` (``*Model``), ``"sequence-classification"``, ``"masked-lm"``,
            ``"token-classification"``, ``"question-answering"``, ``"multiple-choice"`` or
            ``"pretraining"`` (BERT); default: from the checkpoint's ``architectures``.
        backend: :func:`lhattn.attention` backend of every layer.
        lsh_seed: ``lsh`` sparsity: layer ``i`` draws its projections with seed ``lsh_seed + i``.
        dtype: parameter dtype (default: the checkpoint's, as ``from_pretrained``).
        **lsg_settings: LSG config fields overriding the checkpoint's (as LSG's own
            ``from_pretrained(path, sparsity_type=..., ...)``): ``num_global_tokens``,
            ``block_size``, ``sparse_block_size``, ``sparsity_factor``, ``sparsity_type``,
            ``pool_with_global``, ``mask_first_token``, ``adaptive``, ``lsh_num_pre_rounds``.
            For a plain checkpoint, the missing ones take LSG's defaults (:data:`LSG_DEFAULTS`).

    Conversion of a plain checkpoint only (as ``LSGConverter(max_sequence_length,
    global_positional_stride=...)`` with its default, non-random global init):
        max_sequence_length: the position table is tiled to this many tokens (default 4096).
        global_positional_stride: global token ``i`` starts from the position the converter's
            ``order_positions`` gives it (stride between global tokens, default 64).
        use_token_ids: BERT: add token type 0 to the global tokens (default True, as the converter).
        bos_token_id, mask_token_id: default: from the checkpoint's tokenizer (``<s>``/``[CLS]``,
            ``<mask>``/``[MASK]``).  Global token 0 = ``bos`` + its position, the others ``mask``
            + theirs.
        seed: seeds the rows the converter draws at random when the position table has fewer than
            512 rows (the converter draws them unseeded).

    Returns the model in eval mode.  Raises ``ValueError`` for configurations lhattn does not
    reproduce (module docstring), ``TypeError`` for a wrong argument type.
    """
    raw = _read_config_json(path)
    model_type = raw.get("model_type")
    if model_type not in _FAMILIES:
        raise ValueError(f"model_type {model_type!r} of {os.fspath(path)!r} is not supported; supported: "
                         f"{tuple(_FAMILIES)} (LSG-RoBERTa, LSG-XLM-R, LSG-BERT)")
    if not isinstance(backend, str) or backend not in _functional.BACKENDS:
        raise ValueError(f"backend must be one of {_functional.BACKENDS}, got {backend!r}")
    _int_setting("lsh_seed", lsh_seed, 0)
    unknown = sorted(set(lsg_settings) - set(LSG_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown LSG setting(s) {unknown}; the LSG settings are {sorted(LSG_DEFAULTS)}")
    prefix = _FAMILIES[model_type][1]
    if task is None:
        task = _task_from_architectures(raw, prefix)
    if task not in LSG_TASKS:
        raise ValueError(f"task must be one of {tuple(LSG_TASKS)}, got {task!r}")
    is_lsg = raw.get("base_model_prefix") == "lsg" or any("LSG" in a for a in raw.get("architectures") or [])
    conversion = dict(max_sequence_length=max_sequence_length, bos_token_id=bos_token_id, mask_token_id=mask_token_id)
    if is_lsg and any(v is not None for v in conversion.values()):
        given = sorted(k for k, v in conversion.items() if v is not None)
        raise ValueError(f"{given} only apply to converting a plain checkpoint; {os.fspath(path)!r} is already LSG")

    hf = _hf_module(model_type)
    config = getattr(hf, f"{prefix}Config").from_pretrained(path)
    for name, default in LSG_DEFAULTS.items():
        setattr(config, name, lsg_settings.get(name, getattr(config, name, default)))
    _check_settings(config)
    lsg_pattern(config)  # lhattn's own validation, before any weight is read

    cls = _lsg_class(model_type, task)
    kwargs = {} if dtype is None else {"dtype": dtype}
    if is_lsg:
        model = cls.from_pretrained(path, config=config, **kwargs)
    else:  # the global table is missing by construction: no load report about it
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model = cls.from_pretrained(path, config=config, **kwargs)
        finally:
            hf_logging.set_verbosity(verbosity)
    base = getattr(model, model.base_model_prefix, model)
    if not is_lsg:
        bos, mask = _special_ids(path, config, bos_token_id, mask_token_id)
        _int_setting("global_positional_stride", global_positional_stride, 1)
        _int_setting("seed", seed, 0)
        _init_global_embeddings(base, model_type, bos, mask, global_positional_stride, bool(use_token_ids), seed)
        _extend_positions(base, model_type, _int_setting("max_sequence_length", max_sequence_length or 4096, 1))
    for module in model.modules():
        if isinstance(module, LSGSelfAttention):
            module.backend = backend
            module.pattern = dataclasses.replace(module.pattern, seed=lsh_seed + module.layer_idx)
    return model.eval()
