"""HAT (Chalkidis et al. 2022): segment-wise layers interleaved with cross-segment layers.

A HAT layer is a *segment-wise encoder* (SWE: a transformer layer whose attention is
segment-local -- :class:`lhattn.Segments` through :func:`lhattn.attention`, O(N·S)) followed by a
*cross-segment encoder* (CSE: a transformer layer over the segment representatives only -- each
segment's first token -- whose outputs replace the representatives).  Stacks are described in
HAT's layout notation, one ``|``-separated entry per layer: ``"SD"`` (SWE then CSE), ``"S"``
(SWE only), ``"D"`` (CSE only); e.g. interleaved ``"SD|SD|SD|SD"``, late ``"S|S|SD|SD"``.

Representatives.  For fixed ``segment_size S`` the segments are ``[s·S, (s+1)·S)``; with
``segment_ids [B, N]`` (contiguous, non-decreasing) a segment is a run of equal ids.  The
*representatives* of a batch row are, in sequence order, the first token of every segment plus
every global token (``global_mask``), minus the padding tokens (``key_padding_mask``): a segment
whose first token is padding has no representative.  A batch row with fewer representatives than
the longest row has empty slots (index -1).  Gathering and scattering use
:func:`lhattn._ops.gather_rows` / :func:`lhattn._ops.scatter_add_rows`, so it is differentiable.

All modules here are batch-first: ``x [B, N, E]``.  ``dropout`` acts on the residual branches and
the feed-forward, as in ``nn.TransformerEncoderLayer``.  ``attention_dropout`` drops attention
probabilities, in training only (HAT's Roberta layers call it ``attention_probs_dropout_prob``;
by default it is ``dropout``, as in ``nn.TransformerEncoderLayer``, which has one rate for both):
in the SWE inside :func:`lhattn.attention` (O(N·S); lhattn's counter-based rule,
:mod:`lhattn._dropout`, its seed drawn from torch's default generator), in the CSE inside
``F.scaled_dot_product_attention`` (dense over the representatives).  Sub-module names follow
``nn.TransformerEncoderLayer`` (``self_attn.in_proj_weight``, ``linear1``, ``norm1``, ...), so its
``state_dict`` loads into ``HATLayer.segment_encoder`` or ``HATLayer.cross_segment_encoder``.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _validation as V
from .._index import global_indices, segment_bounds
from ..patterns import Segments
from .mha import MultiheadAttention

__all__ = ["cross_segment_attention", "representative_index", "segment_ordinal", "HATLayer", "HATEncoder"]


# ---- representatives ---------------------------------------------------------------------------


def _segment_args(segment_ids: Optional[Tensor], segment_size: Optional[int]) -> None:
    if (segment_ids is None) == (segment_size is None):
        raise ValueError("exactly one of segment_ids and segment_size is needed, got "
                         f"segment_ids={'given' if segment_ids is not None else None} and segment_size={segment_size}")
    if segment_size is not None:
        Segments(segment_size)  # validates: an int >= 1


def _representatives(b: int, n: int, segment_ids: Optional[Tensor], segment_size: Optional[int],
                     key_padding_mask: Optional[Tensor], global_mask: Optional[Tensor],
                     device) -> Tuple[Tensor, Tensor]:
    """``(is_rep [B, N] bool, index [B, R] int64 with -1 = empty slot)``."""
    pos = torch.arange(n, device=device)
    if segment_ids is not None:
        start, _ = segment_bounds(segment_ids)
        is_rep = start == pos
    else:
        is_rep = (pos % segment_size == 0).expand(b, n)
    if global_mask is not None:
        is_rep = is_rep | global_mask
    if key_padding_mask is not None:
        is_rep = is_rep & ~key_padding_mask
    index = global_indices(is_rep)  # positions of the True entries per row, -1 padded
    if index is None:
        index = torch.empty(b, 0, dtype=torch.long, device=device)
    return is_rep, index


def _representatives_here(b: int, n: int, segment_ids: Optional[Tensor], segment_size: Optional[int],
                          key_padding_mask: Optional[Tensor], global_mask: Optional[Tensor], device):
    """:func:`_representatives`, or inside :func:`lhattn.distributed.context_parallel` this rank's part of
    the whole sequence's (a :class:`lhattn.distributed._hat.ShardedRepresentatives`)."""
    from .. import distributed

    if distributed.is_active():
        from ..distributed._hat import ShardedRepresentatives

        return ShardedRepresentatives(b, n, segment_ids, segment_size, key_padding_mask, global_mask, device,
                                      distributed.current_group())
    return _representatives(b, n, segment_ids, segment_size, key_padding_mask, global_mask, device)


def _width(reps) -> int:
    """Representative slots: ``R`` of the index (or of the whole sequence, context-parallel)."""
    return reps[1].shape[1] if isinstance(reps, tuple) else reps.width


def representative_index(b: int, n: int, *, segment_ids: Optional[Tensor] = None, segment_size: Optional[int] = None,
                         key_padding_mask: Optional[Tensor] = None, global_mask: Optional[Tensor] = None,
                         device=None) -> Tensor:
    """Positions of the representatives (module docstring) of each batch row: ``[B, R]`` int64,
    ascending, ``R`` = the largest count over the batch, shorter rows padded with -1.

    ``segment_ids``, ``key_padding_mask``, ``global_mask``: ``[B, N]``; exactly one of
    ``segment_ids`` and ``segment_size``; ``device`` defaults to theirs.  Feed ``index[:, None]`` to ``lhattn._ops.gather_rows``
    to pool segment representations (e.g. for document classification)."""
    _segment_args(segment_ids, segment_size)
    for t in (segment_ids, key_padding_mask, global_mask):
        if device is None and t is not None:
            device = t.device
    return _representatives(b, n, segment_ids, segment_size, key_padding_mask, global_mask, device)[1]


# ---- the cross-segment step --------------------------------------------------------------------


def _attend_slots(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, scale: Optional[float],
                  dropout_p: float = 0.0) -> Tensor:
    """Dense attention among gathered rows ``[B, H(_kv), R, D]``: every valid slot sees every valid
    slot; rows of empty slots (``valid`` False) come out 0.  ``dropout_p``: SDPA's dropout on the
    attention probabilities (applied whenever > 0)."""
    if q.shape[2] == 0:
        return q
    if k.shape[1] != q.shape[1]:  # GQA: query head h reads kv head h // (H / H_kv)
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    # Empty query slots see every slot (keeps the softmax finite); they are zeroed below.
    mask = valid[:, None, None, :] | ~valid[:, None, :, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return out.masked_fill(~valid[:, None, :, None], 0.0)


def cross_segment_attention(q: Tensor, k: Tensor, v: Tensor, *, segment_ids: Optional[Tensor] = None,
                            segment_size: Optional[int] = None, key_padding_mask: Optional[Tensor] = None,
                            global_mask: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
    """HAT's cross-segment step: the representatives attend densely to each other.

    The representatives (module docstring: each segment's first non-padding token plus every
    non-padding global token) are gathered with ``gather_rows``; each sees every representative
    of its batch row (itself included); the results are written back with ``scatter_add_rows``.

    Args:
        q: ``[B, H, N, D]``; k, v: ``[B, H_kv, N, D]`` with ``H % H_kv == 0``.
        segment_ids: ``[B, N]`` integer, non-decreasing; or ``segment_size`` (int >= 1): exactly one.
        key_padding_mask, global_mask: ``[B, N]`` bool (True = padding / global).
        scale: softmax scale, default ``D ** -0.5``.

    Returns:
        ``[B, H, N, D]`` in q's dtype: row ``i`` holds the attention output when ``i`` is a
        representative of its batch row, and is exactly 0 otherwise.  Differentiable in q, k, v.
    """
    V.check_qkv(q, k, v)
    V.check_token_mask("key_padding_mask", key_padding_mask, q)
    V.check_token_mask("global_mask", global_mask, q)
    V.check_scale(scale)
    _segment_args(segment_ids, segment_size)
    if segment_ids is not None:
        V.check_segment_ids(segment_ids, q)
    from .. import _ops

    b, _, n, _ = q.shape
    _, idx = _representatives(b, n, segment_ids, segment_size, key_padding_mask, global_mask, q.device)
    index = idx[:, None, :]  # [B, 1, R]: the same rows for every head
    q_r, k_r, v_r = (_ops.gather_rows(t, index) for t in (q, k, v))
    out_r = _attend_slots(q_r, k_r, v_r, idx >= 0, scale)
    return _ops.scatter_add_rows(out_r, index, n)


# ---- layers ------------------------------------------------------------------------------------


class _SlotAttention(nn.Module):
    """Multi-head self-attention over gathered representatives ``[B, R, E]`` with a slot mask and
    attention-probability ``dropout`` in training.  Parameters named as ``nn.MultiheadAttention``'s
    (``in_proj_weight``, ``in_proj_bias``, ``out_proj``)."""

    def __init__(self, d_model: int, nhead: int, bias: bool, dropout: float = 0.0, **factory) -> None:
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"d_model ({d_model}) must be divisible by nhead ({nhead})")
        self.nhead = nhead
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model, **factory))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model, **factory)) if bias else None
        self.out_proj = nn.Linear(d_model, d_model, bias=bias, **factory)
        nn.init.xavier_uniform_(self.in_proj_weight)
        if bias:
            nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        b, r, e = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, r, 3, self.nhead, e // self.nhead)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, H, R, hd]
        out = _attend_slots(q, k, v, valid, None, self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, r, e))


def _activation(activation: Union[str, Callable[[Tensor], Tensor]]) -> Callable[[Tensor], Tensor]:
    if callable(activation):
        return activation
    if activation not in ("relu", "gelu"):
        raise ValueError(f"activation must be 'relu', 'gelu' or a callable, got {activation!r}")
    return F.relu if activation == "relu" else F.gelu


class _Block(nn.Module):
    """A transformer layer laid out as ``nn.TransformerEncoderLayer`` (same sub-module names),
    around the attention module ``self_attn`` called through ``attend(self_attn, x)``."""

    def __init__(self, self_attn: nn.Module, d_model: int, dim_feedforward: int, dropout: float, activation,
                 layer_norm_eps: float, norm_first: bool, bias: bool, **factory) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **factory)
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = _activation(activation)

    def _ff(self, x: Tensor) -> Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(self, x: Tensor, attend: Callable[[nn.Module, Tensor], Tensor]) -> Tensor:
        if self.norm_first:
            x = x + self.dropout1(attend(self.self_attn, self.norm1(x)))
            return x + self._ff(self.norm2(x))
        x = self.norm1(x + self.dropout1(attend(self.self_attn, x)))
        return self.norm2(x + self._ff(x))


class HATLayer(nn.Module):
    """One HAT layer: SWE (segment-local transformer layer) then CSE (transformer layer over the
    representatives, whose outputs replace them).  Either part may be switched off.

    Args (as ``nn.TransformerEncoderLayer``): d_model, nhead, dim_feedforward, dropout,
    activation, layer_norm_eps, norm_first, bias, device, dtype; keyword-only:
        attention_dropout: probability of dropping an attention probability in training, in SWE and
            CSE alike, in ``[0, 1)``; None (default) = ``dropout``, as in ``nn.TransformerEncoderLayer``.
        segment_size: fixed segments of this size; None = ``segment_ids`` given per call.
        segment_encoder / cross_segment_encoder: include the SWE / the CSE.
        backend: :func:`lhattn.attention` backend of the SWE.

    ``forward(x [B, N, E], *, segment_ids=None, key_padding_mask=None, global_mask=None,
    segment_embeddings=None) -> [B, N, E]``.  ``segment_embeddings`` (``[R, E]`` or ``[B, R, E]``)
    is added to the representatives at the CSE input (HAT's segment position embeddings).
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: Union[str, Callable[[Tensor], Tensor]] = "relu", layer_norm_eps: float = 1e-5,
                 norm_first: bool = False, bias: bool = True, *, attention_dropout: Optional[float] = None,
                 segment_size: Optional[int] = None, segment_encoder: bool = True,
                 cross_segment_encoder: bool = True, backend: str = "auto", device=None, dtype=None) -> None:
        super().__init__()
        if not (segment_encoder or cross_segment_encoder):
            raise ValueError("a HATLayer needs segment_encoder=True or cross_segment_encoder=True (got both False)")
        p_attn = dropout if attention_dropout is None else attention_dropout
        if isinstance(p_attn, bool) or not isinstance(p_attn, (int, float)) or not 0.0 <= p_attn < 1.0:
            raise ValueError(f"the attention dropout must be a float in [0, 1), got {p_attn!r} "
                             f"(attention_dropout={attention_dropout!r}, dropout={dropout!r})")
        factory = dict(device=device, dtype=dtype)
        block = dict(d_model=d_model, dim_feedforward=dim_feedforward, dropout=dropout, activation=activation,
                     layer_norm_eps=layer_norm_eps, norm_first=norm_first, bias=bias, **factory)
        self.d_model = d_model
        self.segment_size = segment_size
        self.segment_encoder = self.cross_segment_encoder = None
        if segment_encoder:
            attn = MultiheadAttention(d_model, nhead, float(p_attn), bias=bias, batch_first=True,
                                      pattern=Segments(segment_size), padded_rows="zero", backend=backend, **factory)
            self.segment_encoder = _Block(attn, **block)
        if cross_segment_encoder:
            self.cross_segment_encoder = _Block(_SlotAttention(d_model, nhead, bias, float(p_attn), **factory),
                                                **block)

    def forward(self, x: Tensor, *, segment_ids: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None,
                global_mask: Optional[Tensor] = None, segment_embeddings: Optional[Tensor] = None) -> Tensor:
        self._check_input(x, segment_ids)
        reps = None
        if self.cross_segment_encoder is not None:
            reps = _representatives_here(x.shape[0], x.shape[1], segment_ids, self.segment_size, key_padding_mask,
                                         global_mask, x.device)
        return self._forward(x, reps, segment_ids, key_padding_mask, global_mask, segment_embeddings)

    def _check_input(self, x: Tensor, segment_ids: Optional[Tensor]) -> None:
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be [B, N, E={self.d_model}] (batch first), got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        _segment_args(segment_ids, self.segment_size)

    def _forward(self, x: Tensor, reps: Optional[Tuple[Tensor, Tensor]], segment_ids, key_padding_mask, global_mask,
                 segment_embeddings) -> Tensor:
        if self.segment_encoder is not None:
            def swe(attn: nn.Module, h: Tensor) -> Tensor:
                return attn(h, h, h, key_padding_mask=key_padding_mask, need_weights=False, global_mask=global_mask,
                            segment_ids=segment_ids)[0]
            x = self.segment_encoder(x, swe)
        if self.cross_segment_encoder is None or _width(reps) == 0:
            return x
        from .. import _ops

        sharded = not isinstance(reps, tuple)  # lhattn.distributed: this rank's part of the representatives
        is_rep, idx = (reps.is_rep, reps.index) if sharded else reps
        index = idx[:, None, :]  # [B, 1, R]
        h = _ops.gather_rows(x[:, None], index)[:, 0]  # [B, R, E]
        if sharded:  # every rank's representatives, in sequence order
            h, valid = reps.gather(h), reps.valid
        else:
            valid = idx >= 0
        if segment_embeddings is not None:
            h = h + segment_embeddings
        h = self.cross_segment_encoder(h, lambda attn, t: attn(t, valid))
        if sharded:
            h = reps.mine(h)
        return x.masked_fill(is_rep[..., None], 0.0) + _ops.scatter_add_rows(h[:, None], index, x.shape[1])[:, 0]


def _parse_layout(layout: Union[str, List[str]]) -> List[str]:
    items = layout.split("|") if isinstance(layout, str) else list(layout)
    if not items or any(item not in ("S", "D", "SD") for item in items):
        raise ValueError(f"layout must be HAT's notation, '|'-separated entries 'S', 'D' or 'SD' "
                         f"(e.g. 'SD|SD|S|S'), got {layout!r}")
    return items


class HATEncoder(nn.Module):
    """A stack of :class:`HATLayer` in HAT's layout notation (module docstring).

    Args: those of :class:`HATLayer`, plus
        layout: e.g. ``"SD|SD|SD|SD"`` (default; interleaved, 4 layers), ``"S|S|SD|SD"`` (late).
        max_segments: the number of segments the segment-position table covers (with
            ``segment_positions`` "rank" or "absolute"); one table, shared by every CSE and added to
            its input (HAT's tied segment positions).
        segment_positions: which row a representative reads --
            ``"rank"`` (default when ``max_segments`` is set): its rank (0, 1, ...) among its row's
            representatives, from a table of ``max_segments`` rows;
            ``"absolute"`` (HAT's numbering): ``s + 1`` for the first token of segment ``s``
            (0-based, padded segments counted), from a table of ``max_segments + 1`` rows whose row
            ``segment_padding_idx`` is an ``nn.Embedding`` padding row (no gradient: frozen in
            training; HAT gives it to padded segments, which have no representative here, so it is
            never read unless ``segment_padding_idx`` is also a segment's number, as when a HAT
            checkpoint has ``pad_token_id`` 1); no ``global_mask`` (global tokens have no segment
            number);
            ``"none"`` (default without ``max_segments``): no segment positions.
        segment_padding_idx: the padding row of the "absolute" table (default 0).
        final_norm: a LayerNorm after the stack (default: ``norm_first``).

    ``forward(x [B, N, E], *, segment_ids=None, key_padding_mask=None, global_mask=None) -> [B, N, E]``.
    """

    def __init__(self, d_model: int, nhead: int, layout: Union[str, List[str]] = "SD|SD|SD|SD",
                 dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: Union[str, Callable[[Tensor], Tensor]] = "relu", layer_norm_eps: float = 1e-5,
                 norm_first: bool = False, bias: bool = True, *, attention_dropout: Optional[float] = None,
                 segment_size: Optional[int] = None, max_segments: Optional[int] = None,
                 segment_positions: Optional[str] = None, segment_padding_idx: int = 0,
                 final_norm: Optional[bool] = None, backend: str = "auto", device=None, dtype=None) -> None:
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.layout = _parse_layout(layout)
        self.segment_size = segment_size
        self.layers = nn.ModuleList([
            HATLayer(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, norm_first, bias,
                     attention_dropout=attention_dropout, segment_size=segment_size, segment_encoder="S" in item,
                     cross_segment_encoder="D" in item, backend=backend, **factory)
            for item in self.layout])
        self.segment_positions = _segment_positions_mode(segment_positions, max_segments, segment_padding_idx)
        self.segment_position = None
        if self.segment_positions == "rank":
            self.segment_position = nn.Embedding(max_segments, d_model, **factory)
        elif self.segment_positions == "absolute":
            self.segment_position = nn.Embedding(max_segments + 1, d_model, padding_idx=segment_padding_idx, **factory)
        final_norm = norm_first if final_norm is None else final_norm
        self.norm = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory) if final_norm else None

    def forward(self, x: Tensor, *, segment_ids: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None,
                global_mask: Optional[Tensor] = None) -> Tensor:
        self.layers[0]._check_input(x, segment_ids)
        reps, emb = None, None
        if any("D" in item for item in self.layout):
            reps = _representatives_here(x.shape[0], x.shape[1], segment_ids, self.segment_size, key_padding_mask,
                                         global_mask, x.device)
            if self.segment_positions == "rank":
                r = _width(reps)
                if r > self.segment_position.num_embeddings:
                    raise ValueError(f"a batch row has {r} representatives (segments + global tokens), more than "
                                     f"max_segments={self.segment_position.num_embeddings}")
                emb = self.segment_position(torch.arange(r, device=x.device))
            elif self.segment_positions == "absolute":
                emb = self._absolute_positions(reps, segment_ids, global_mask, x.shape[1])
        for layer in self.layers:
            x = layer._forward(x, reps, segment_ids, key_padding_mask, global_mask, emb)
        return x if self.norm is None else self.norm(x)

    def _absolute_positions(self, reps, segment_ids: Optional[Tensor], global_mask: Optional[Tensor],
                            n: int) -> Tensor:
        """HAT's segment positions ``[B, R, E]``: row ``s + 1`` for the representative of segment ``s``."""
        if global_mask is not None:
            raise ValueError("segment_positions='absolute' numbers segments and global tokens have none: "
                             "pass global_mask=None or build the encoder with segment_positions='rank'")
        table = self.segment_position
        sharded = not isinstance(reps, tuple)  # lhattn.distributed: numbers over the whole sequence
        index = reps.index if sharded else reps[1]
        if sharded:
            ordinal, count = reps.segment_numbers()
        else:
            ordinal = segment_ordinal(index.shape[0], n, segment_ids=segment_ids, segment_size=self.segment_size,
                                      device=index.device)
            count = int(ordinal[:, -1].max()) + 1 if n else 0
        if count > table.num_embeddings - 1:
            raise ValueError(f"a batch row has {count} segments (padded ones counted), more than "
                             f"max_segments={table.num_embeddings - 1}")
        rows = ordinal.gather(1, index.clamp(min=0)) + 1
        emb = table(rows.masked_fill(index < 0, table.padding_idx))
        return reps.gather(emb) if sharded else emb


SEGMENT_POSITIONS = ("rank", "absolute", "none")


def _segment_positions_mode(mode: Optional[str], max_segments: Optional[int], padding_idx: int) -> str:
    if mode is None:
        mode = "none" if max_segments is None else "rank"
    if mode not in SEGMENT_POSITIONS:
        raise ValueError(f"segment_positions must be one of {SEGMENT_POSITIONS} or None, got {mode!r}")
    if (mode == "none") != (max_segments is None):
        raise ValueError(f"segment_positions={mode!r} needs max_segments "
                         f"{'None' if mode == 'none' else 'set (an int >= 1)'}, got max_segments={max_segments!r}")
    if mode != "none" and (isinstance(max_segments, bool) or not isinstance(max_segments, int) or max_segments < 1):
        raise ValueError(f"max_segments must be an int >= 1, got {max_segments!r}")
    if mode == "absolute" and (isinstance(padding_idx, bool) or not isinstance(padding_idx, int)
                               or not 0 <= padding_idx <= max_segments):
        raise ValueError(f"segment_padding_idx must be an int in [0, max_segments={max_segments}], got {padding_idx!r}")
    return mode


def segment_ordinal(b: int, n: int, *, segment_ids: Optional[Tensor] = None, segment_size: Optional[int] = None,
                    device=None) -> Tensor:
    """``[B, N]`` int64: the 0-based number of each token's segment in its batch row (padded
    segments counted), for fixed ``segment_size`` or runs of equal ``segment_ids`` (exactly one)."""
    _segment_args(segment_ids, segment_size)
    if segment_ids is None:
        return (torch.arange(n, device=device) // segment_size).expand(b, n)
    first = torch.ones_like(segment_ids, dtype=torch.bool)
    first[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return first.long().cumsum(dim=1) - 1
