"""``lhattn.nn.MultiheadAttention``: ``torch.nn.MultiheadAttention`` on lhattn's sparse patterns.

A subclass of :class:`torch.nn.MultiheadAttention` with the same constructor, parameters
(``in_proj_weight``, ``in_proj_bias``, ``q/k/v_proj_weight``, ``bias_k/bias_v``, ``out_proj``),
``state_dict`` and ``forward`` signature, plus a ``pattern``.  Without a pattern it *is*
``nn.MultiheadAttention``.  With one, each query sees only the keys of the pattern
(:mod:`lhattn.patterns`) and the attention runs through :func:`lhattn.attention` in O(N·w).

Three execution paths, chosen per call:

* **sparse** (``need_weights=False``): the projections, then :func:`lhattn.attention`
  (``backend``, default ``"auto"``), then ``out_proj``.  O(N·w).  In training with ``dropout > 0``
  the attention probabilities are dropped inside that call (``dropout_p=dropout``): lhattn's
  counter-based rule (:mod:`lhattn._dropout`), also O(N·w), its seed drawn from torch's default
  generator on the inputs' device -- ``torch.manual_seed`` reproduces a step, though the mask is
  not PyTorch's (PyTorch drops inside SDPA there: another mask, the same distribution).
* **explicit** (``need_weights=True``): the dense scores with the pattern's ``[N, N]`` mask,
  exactly the op sequence of ``F.multi_head_attention_forward``'s weights path.  **O(N²)
  memory**: it returns the ``[B, (H,) L, S]`` weights (exact zeros outside the pattern) and, in
  training, applies attention dropout like PyTorch (``F.dropout`` on the weights, so it draws the
  very same mask as PyTorch under the same seed).
* **pattern=None**: ``nn.MultiheadAttention.forward`` itself.

Padding.  PyTorch gives a padding query (``key_padding_mask`` True) an ordinary output over the
non-padding keys; lhattn's convention (Longformer) outputs 0 there.  ``padded_rows="torch"``
(default) reproduces PyTorch: the padding rows are computed from one more lhattn call on a
doubled batch, ``[Σ p_j·m_j·v_j ; Σ p_j·m_j] = attention(q, k, [v·m ; m])`` without the padding
mask (``m_j`` = 1 for non-padding keys), divided -- exact up to rounding unless padding keys
outweigh the visible ones by more than the dtype's range (about 1e30 in fp32, 1e4 in fp16).
With attention dropout a padding row is, like every row, the softmax over the non-padding keys,
then dropout: the numerator is dropped and the denominator is not (a dropped output keeps the
undropped normaliser), so they come from two calls, ``attention(q, k, v·m)`` with dropout and the
seed of the main call (one keep mask, :func:`lhattn._dropout.keep_mask`, for all rows) and
``attention(q, k, m)`` without.  ``padded_rows="zero"`` keeps lhattn's zeros and skips these
calls.  A row that sees no key at all outputs 0 (before ``out_proj``) and weights 0, where
PyTorch's weights path gives NaN.

What cannot be expressed raises ``ValueError`` naming the argument: a dense ``attn_mask`` with a
pattern (except as the causal hint, below), query and key of different lengths (the patterns
are positional self-attention patterns), ``add_bias_kv`` / ``add_zero_attn`` with a pattern (the
extra key has no position), ``is_causal`` with ``Segments`` or with global tokens, the explicit
path or ``padded_rows="torch"`` with an LSG pattern that has compressed keys at this length.

``is_causal=True``: as in PyTorch, a given ``attn_mask`` is trusted to be the causal mask (it is
not inspected); the pattern is made causal (``SlidingWindow(window=(left, 0))``,
``LSG(causal=True)``; pattern None: full causal).  PyTorch raises when ``attn_mask`` is None;
here that call means "causal" (an extension, never a different answer).

Inside ``nn.TransformerEncoderLayer``: the layer's fused inference fast path would call torch's
kernel with ``self_attn``'s weights and skip this module; every instance therefore carries a
no-op forward pre-hook, which the layer reads as "do not take the fast path".  Nested tensors
(the ``TransformerEncoder`` padding path) are unpadded around the call.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _dropout
from .. import _validation as V
from .. import functional as _functional
from ..patterns import LSG, Pattern, Segments, SlidingWindow

__all__ = ["MultiheadAttention", "replace_attention"]

PADDED_ROWS = ("torch", "zero")


def _keep_off_fused_path(module: nn.Module, args) -> None:
    """Forward pre-hook that does nothing.  Its presence makes ``nn.TransformerEncoderLayer``
    skip its fused fast path (which would bypass this module)."""
    return None


def _attention_or_context_parallel(q, k, v, pattern, **kwargs):
    """:func:`lhattn.attention`, or its context-parallel twin inside
    :func:`lhattn.distributed.context_parallel` (each rank then holds a shard of the sequence)."""
    from .. import distributed

    if distributed.is_active():
        return distributed.attention(q, k, v, pattern, **kwargs)
    return _functional.attention(q, k, v, pattern, **kwargs)


# torch.compile runs the attention itself eagerly (one graph break per call): the fallback's
# autograd.Function builds its block masks inside the function, which dynamo cannot capture.
# Drop this wrapper once lhattn.attention is traceable (e.g. registered with torch.library).
_attention = torch.compiler.disable(_attention_or_context_parallel)


def _every_rank_pads() -> bool:
    """Context parallel: the padding-rows branch must not depend on one rank's shard (the calls it makes
    are collective), so every rank that has a key_padding_mask takes it."""
    from .. import distributed

    return distributed.is_active()


def _lsg_has_compressed_keys(pattern: LSG, n: int) -> bool:
    return pattern.has_sparse_keys and n - pattern.block_offset > 2 * pattern.block_size


def _in_projection(query: Tensor, key: Tensor, value: Tensor, mha: nn.MultiheadAttention):
    """q, k, v projections, op for op as ``F.multi_head_attention_forward`` (same rounding)."""
    e = mha.embed_dim
    b = mha.in_proj_bias
    if not mha._qkv_same_embed_dim:
        bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
        return (F.linear(query, mha.q_proj_weight, bq), F.linear(key, mha.k_proj_weight, bk),
                F.linear(value, mha.v_proj_weight, bv))
    w = mha.in_proj_weight
    if key is value:
        if query is key:
            proj = F.linear(query, w, b)
            proj = proj.unflatten(-1, (3, e)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
            return proj[0], proj[1], proj[2]
        w_q, w_kv = w.split([e, 2 * e])
        b_q, b_kv = (None, None) if b is None else b.split([e, 2 * e])
        kv = F.linear(key, w_kv, b_kv)
        kv = kv.unflatten(-1, (2, e)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
        return F.linear(query, w_q, b_q), kv[0], kv[1]
    w_q, w_k, w_v = w.chunk(3)
    b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
    return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)


def _bool_padding(kpm: Optional[Tensor]) -> Optional[Tensor]:
    """key_padding_mask as bool (True = padding); a float mask is accepted if it is 0 / -inf."""
    if kpm is None or kpm.dtype == torch.bool:
        return kpm
    if not kpm.is_floating_point():
        raise TypeError(f"key_padding_mask must be bool (True = padding) or float, got {kpm.dtype}")
    pad = torch.isneginf(kpm)
    if not bool((pad | (kpm == 0)).all()):
        raise ValueError("key_padding_mask: with a pattern, a float mask must hold only 0 and -inf "
                         "(an additive bias per key cannot be expressed); pass a bool mask")
    return pad


def _pattern_mask(pattern: Pattern, n: int, global_mask: Optional[Tensor], segment_ids: Optional[Tensor],
                  b: int, device) -> Tensor:
    """``[B|1, N, N]`` bool: key j is visible from query i, padding aside (lhattn's contract)."""
    from ..reference.segment import segment_ids_of
    from ..reference.sliding_window import band_mask

    if isinstance(pattern, LSG):
        if _lsg_has_compressed_keys(pattern, n):
            raise ValueError(
                f"need_weights=True needs per-key weights, but {pattern} at length {n} attends to "
                "compressed keys (N - offset > 2 * block_size): pass need_weights=False")
        from ..reference.lsg import lsg_direct_mask
        return lsg_direct_mask(n, pattern, device)[None]
    if isinstance(pattern, SlidingWindow):
        local = band_mask(n, pattern, device)[None]
    else:
        seg = segment_ids_of(pattern, segment_ids, b, n, device)
        local = seg[:, :, None] == seg[:, None, :]
    if global_mask is None:
        return local
    return local | global_mask[:, :, None] | global_mask[:, None, :]


def _check_call_args(pattern: Pattern, q: Tensor, key_padding_mask: Optional[Tensor], global_mask: Optional[Tensor],
                     segment_ids: Optional[Tensor]) -> None:
    """The per-call arguments of ``pattern``, checked as :func:`lhattn.attention` does (the
    explicit path does not go through it).  q: ``[B, H, L, hd]``."""
    V.check_token_mask("key_padding_mask", key_padding_mask, q)
    V.check_token_mask("global_mask", global_mask, q)
    if isinstance(pattern, Segments):
        V.check_segments_call(pattern.segment_size, segment_ids, q)
        return
    if segment_ids is not None:
        raise ValueError(f"segment_ids is only meaningful for the Segments pattern, got it with {pattern}")
    if isinstance(pattern, LSG) and global_mask is not None:
        raise ValueError("global_mask is not used by LSG (its global tokens are the first num_global_tokens "
                         "positions); got global_mask with an LSG pattern")


class MultiheadAttention(nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` whose queries see only the keys of ``pattern``.

    Args: those of :class:`torch.nn.MultiheadAttention`, plus (keyword-only)
        pattern: :class:`~lhattn.SlidingWindow`, :class:`~lhattn.LSG`, :class:`~lhattn.Segments`,
            or None (full attention: exactly ``nn.MultiheadAttention``).
        padded_rows: ``"torch"`` -- padding query rows get PyTorch's output (one extra lhattn call
            when ``key_padding_mask`` has padding); ``"zero"`` -- lhattn's zeros (cheaper).
        backend: passed to :func:`lhattn.attention` on the sparse path.

    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False, *, global_mask=None, segment_ids=None)``: as
    PyTorch's; ``global_mask [B, L]`` bool (SlidingWindow, Segments) and ``segment_ids [B, L]``
    (Segments without ``segment_size``) are in batch-major order whatever ``batch_first`` is, like
    ``key_padding_mask``.  See the module docstring for the paths, padding and errors.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = False, device=None, dtype=None, *,
                 pattern: Optional[Pattern] = None, padded_rows: str = "torch", backend: str = "auto") -> None:
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim,
                         batch_first, device, dtype)
        self.pattern = pattern
        self.padded_rows = padded_rows
        self.backend = backend
        self._check_config()
        self.register_forward_pre_hook(_keep_off_fused_path)

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention, pattern: Optional[Pattern] = None, *,
                   padded_rows: str = "torch", backend: str = "auto") -> "MultiheadAttention":
        """An lhattn module that *shares* ``mha``'s parameters (no copy: an optimizer built on
        ``mha``'s parameters keeps training them) and copies its configuration and mode."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be a torch.nn.MultiheadAttention, got {type(mha).__name__}")
        ref = mha.out_proj.weight
        new = cls(mha.embed_dim, mha.num_heads, mha.dropout, bias=mha.in_proj_bias is not None,
                  add_bias_kv=mha.bias_k is not None, add_zero_attn=mha.add_zero_attn, kdim=mha.kdim,
                  vdim=mha.vdim, batch_first=mha.batch_first, device="meta", dtype=ref.dtype,
                  pattern=pattern, padded_rows=padded_rows, backend=backend)
        for name in ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                     "bias_k", "bias_v"):
            setattr(new, name, getattr(mha, name))
        new.out_proj = mha.out_proj
        return new.train(mha.training)

    def _check_config(self) -> None:
        p = self.pattern
        if p is not None and not isinstance(p, (SlidingWindow, LSG, Segments)):
            raise TypeError(f"pattern must be SlidingWindow, LSG, Segments or None, got {type(p).__name__}")
        if self.padded_rows not in PADDED_ROWS:
            raise ValueError(f"padded_rows must be one of {PADDED_ROWS}, got {self.padded_rows!r}")
        if self.backend not in _functional.BACKENDS:
            raise ValueError(f"backend must be one of {_functional.BACKENDS}, got {self.backend!r}")
        if p is not None and self.bias_k is not None:
            raise ValueError("add_bias_kv=True cannot be combined with a pattern: the extra key bias_k has no "
                             "position in the sequence; use pattern=None")
        if p is not None and self.add_zero_attn:
            raise ValueError("add_zero_attn=True cannot be combined with a pattern: the extra zero key has no "
                             "position in the sequence; use pattern=None")

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"batch_first={self.batch_first}, pattern={self.pattern}, padded_rows={self.padded_rows!r}")

    # ---- forward -----------------------------------------------------------------------------

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False, *, global_mask: Optional[Tensor] = None,
                segment_ids: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        self._check_config()
        if self.pattern is None:
            for name, val in (("global_mask", global_mask), ("segment_ids", segment_ids)):
                if val is not None:
                    raise ValueError(f"{name} needs a pattern (SlidingWindow/Segments); this module has pattern=None")
            if is_causal and attn_mask is None:
                seq = 1 if (self.batch_first and query.dim() == 3) else 0
                lq, lk = query.size(seq), key.size(seq)
                attn_mask = torch.ones(lq, lk, dtype=torch.bool, device=query.device).triu(1)
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        if query.is_nested or key.is_nested or value.is_nested:
            return self._forward_nested(query, key, value, key_padding_mask, attn_mask, is_causal,
                                        global_mask, segment_ids)
        return self._forward_pattern(query, key, value, key_padding_mask, need_weights, attn_mask,
                                     average_attn_weights, is_causal, global_mask, segment_ids)

    def _forward_pattern(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                         average_attn_weights, is_causal, global_mask, segment_ids):
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"query, key, value must all be 3-D (batched) or 2-D (unbatched), got "
                             f"{query.dim()}-D, {key.dim()}-D and {value.dim()}-D")
        is_batched = query.dim() == 3
        if self.batch_first and is_batched:  # to [L, B, E], keeping the `is` relations (as torch does)
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        if not is_batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask, global_mask, segment_ids = (
                None if t is None else t.unsqueeze(0) for t in (key_padding_mask, global_mask, segment_ids))
        lq, b, e = query.shape
        if e != self.embed_dim:
            raise ValueError(f"query must have embed_dim={self.embed_dim} features, got {e}")
        if key.shape[0] != lq or value.shape[0] != lq:
            raise ValueError(
                f"key/value must have the query's length ({lq}) with pattern {self.pattern}: the patterns are "
                f"positional self-attention patterns; got key length {key.shape[0]}, value length "
                f"{value.shape[0]} (use pattern=None for cross-attention)")
        if key.shape[1] != b or value.shape[1] != b:
            raise ValueError(f"key/value must have the query's batch size {b}, got {key.shape[1]} and {value.shape[1]}")
        kpm = _bool_padding(key_padding_mask)
        pattern = self._call_pattern(attn_mask, is_causal, global_mask)

        q, k, v = _in_projection(query, key, value, self)  # [L, B, E]
        h, hd = self.num_heads, self.head_dim
        q, k, v = (x.view(lq, b, h, hd).permute(1, 2, 0, 3) for x in (q, k, v))  # [B, H, L, hd]
        _check_call_args(pattern, q, kpm, global_mask, segment_ids)
        weights = None
        if need_weights:
            out, weights = self._explicit(q, k, v, pattern, kpm, global_mask, segment_ids)
        else:
            out = self._sparse(q, k, v, pattern, kpm, global_mask, segment_ids)
        out = out.permute(2, 0, 1, 3).reshape(lq * b, e)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias).view(lq, b, e)
        if not is_batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(1, 0)
        if not need_weights:
            return out, None
        if average_attn_weights:
            weights = weights.mean(dim=1)
        return out, (weights if is_batched else weights.squeeze(0))

    def _call_pattern(self, attn_mask: Optional[Tensor], is_causal: bool, global_mask: Optional[Tensor]) -> Pattern:
        """The pattern of this call: ``self.pattern``, made causal when ``is_causal``."""
        p = self.pattern
        if not is_causal:
            if attn_mask is not None:
                raise ValueError(
                    f"attn_mask cannot be combined with pattern {p}: a dense mask is not expressible in O(N·w). "
                    "Use pattern=None, or is_causal=True if attn_mask is the causal mask")
            return p
        if global_mask is not None:
            raise ValueError("is_causal=True cannot be combined with global_mask: global tokens see every key")
        if isinstance(p, SlidingWindow):
            return SlidingWindow((p.left, 0), dilation=p.dilation, causal=True)
        if isinstance(p, LSG):
            return dataclasses.replace(p, causal=True)
        raise ValueError(f"is_causal=True is not supported with pattern {p} (segment-local attention has no "
                         "causal variant); use SlidingWindow or LSG")

    def _explicit(self, q, k, v, pattern, kpm, global_mask, segment_ids):
        """Dense path, op for op as ``F.multi_head_attention_forward`` with need_weights=True."""
        from .. import distributed

        if distributed.is_active():
            raise ValueError("need_weights=True is not supported inside lhattn.distributed.context_parallel "
                             "(the weights are a dense N x N matrix); pass need_weights=False")
        b, h, n, hd = q.shape
        visible = _pattern_mask(pattern, n, global_mask, segment_ids, b, q.device)  # [B|1, N, N]
        if kpm is not None:
            visible = visible & ~kpm[:, None, :]
        empty = ~visible.any(dim=-1, keepdim=True)  # rows that see no key
        bias = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill_(~visible, float("-inf"))
        bias = bias.masked_fill_(empty, 0.0)[:, None].expand(b, h, n, n).reshape(b * h, n, n)
        q_scaled = q.reshape(b * h, n, hd) * math.sqrt(1.0 / float(hd))
        w = torch.baddbmm(bias, q_scaled, k.reshape(b * h, n, hd).transpose(-2, -1))
        w = torch.softmax(w, dim=-1).view(b, h, n, n)
        zero_rows = empty[:, None]
        if kpm is not None and self.padded_rows == "zero":
            zero_rows = zero_rows | kpm[:, None, :, None]
        w = w.masked_fill(zero_rows, 0.0).view(b * h, n, n)
        if self.training and self.dropout > 0.0:
            w = F.dropout(w, p=self.dropout)
        out = torch.bmm(w, v.reshape(b * h, n, hd))
        return out.view(b, h, n, hd), w.view(b, h, n, n)

    def _sparse(self, q, k, v, pattern, kpm, global_mask, segment_ids):
        """O(N·w) path through :func:`lhattn.attention`; attention dropout in training; padding rows
        as ``padded_rows`` says (module docstring)."""
        kw = dict(scale=1.0 / math.sqrt(self.head_dim), backend=self.backend)
        n = q.shape[2]
        pad_rows = kpm is not None and self.padded_rows == "torch" and (_every_rank_pads() or bool(kpm.any()))
        # context parallel: the shard length says nothing of the sequence's, so any compressed keys count
        if pad_rows and isinstance(pattern, LSG) and (_lsg_has_compressed_keys(pattern, n)
                                                      or (_every_rank_pads() and pattern.has_sparse_keys)):
            raise ValueError(
                f"padded_rows='torch' is not defined for {pattern} at length {n}: its compressed keys are "
                "built without the padding tokens, so a padding query has no PyTorch-like output; "
                "construct the module with padded_rows='zero'")
        drop = {}
        if self.training and self.dropout > 0.0:
            # One seed (drawn as lhattn.attention would) for the main call and the padding rows' numerator.
            seed = _dropout.make_state(self.dropout, None, q.device)[0] if pad_rows else None
            drop = dict(dropout_p=self.dropout, dropout_seed=seed)
        out = _attention(q, k, v, pattern, key_padding_mask=kpm, global_mask=global_mask,
                          segment_ids=segment_ids, **drop, **kw)
        if not pad_rows:
            return out

        # Padding rows: attention without the padding mask over values v·m and m, then divide.
        m = (~kpm).to(v.dtype)[:, None, :, None]  # [B, 1, N, 1]
        if not drop:  # one call on a doubled batch

            def twice(t: Optional[Tensor]) -> Optional[Tensor]:
                return None if t is None else torch.cat([t, t])

            both = _attention(twice(q), twice(k), torch.cat([v * m, m.expand_as(v)]), pattern,
                              global_mask=twice(global_mask), segment_ids=twice(segment_ids), **kw)
            b = q.shape[0]
            num, den = both[:b], both[b:, ..., :1]
        else:  # the numerator is dropped, the denominator is not: two calls
            kw.update(global_mask=global_mask, segment_ids=segment_ids)
            num = _attention(q, k, v * m, pattern, **drop, **kw)
            den = _attention(q, k, m.expand_as(v), pattern, **kw)[..., :1]
        pad_out = num / torch.where(den > 0, den, torch.ones_like(den))
        return torch.where(kpm[:, None, :, None], pad_out, out)

    def _forward_nested(self, query, key, value, key_padding_mask, attn_mask, is_causal, global_mask,
                        segment_ids):
        """A nested (jagged) batch, as ``nn.TransformerEncoder`` passes in inference: pad, run, unpad."""
        if not (query is key and key is value) or not self.batch_first:
            raise ValueError("nested-tensor input is supported for self-attention (query is key is value) with "
                             "batch_first=True only")
        for name, val in (("key_padding_mask", key_padding_mask), ("global_mask", global_mask),
                          ("segment_ids", segment_ids)):
            if val is not None:
                raise ValueError(f"{name} cannot be combined with a nested-tensor input")
        lengths = [t.shape[0] for t in query.unbind()]
        x = query.to_padded_tensor(0.0)
        pad = torch.arange(x.shape[1], device=x.device)[None, :] >= torch.tensor(lengths, device=x.device)[:, None]
        out, _ = self._forward_pattern(x, x, x, pad, False, attn_mask, False, is_causal, None, None)
        return torch.nested.as_nested_tensor([o[:n] for o, n in zip(out.unbind(), lengths)]), None


def replace_attention(model: nn.Module, pattern: Optional[Pattern] = None, *, padded_rows: str = "torch",
                      backend: str = "auto",
                      include: Optional[Callable[[str, nn.Module], bool]] = None) -> nn.Module:
    """Swap every ``torch.nn.MultiheadAttention`` inside ``model`` (in place) for
    :class:`MultiheadAttention` with ``pattern``, sharing its parameters; modules that are already
    lhattn's get the new ``pattern`` / ``padded_rows`` / ``backend``.  ``include(name, module)``
    (optional) picks which to swap.  Subclasses of ``nn.MultiheadAttention`` other than lhattn's
    are left alone (their ``forward`` may differ).  Returns ``model`` (``model`` itself is swapped
    when it is a ``nn.MultiheadAttention``).  Cross-attention with another length (e.g.
    ``nn.TransformerDecoderLayer.multihead_attn``) raises at call time under a pattern: leave it
    out, e.g. ``include=lambda name, m: "multihead_attn" not in name``."""
    swapped = {}  # id(old module) -> new one: a module shared by two parents stays shared

    def swap(name: str, mod: nn.Module) -> Optional[nn.Module]:
        if id(mod) in swapped:
            return swapped[id(mod)]
        if include is not None and not include(name, mod):
            return None
        if isinstance(mod, MultiheadAttention):
            mod.pattern, mod.padded_rows, mod.backend = pattern, padded_rows, backend
            mod._check_config()
            return None
        if type(mod) is nn.MultiheadAttention:
            swapped[id(mod)] = MultiheadAttention.from_torch(mod, pattern, padded_rows=padded_rows, backend=backend)
            return swapped[id(mod)]
        return None

    top = swap("", model)
    if top is not None:
        return top
    for name, parent in list(model.named_modules()):
        for child_name, child in list(parent._modules.items()):  # named_children() would skip repeats
            if child is None:
                continue
            new = swap(f"{name}.{child_name}" if name else child_name, child)
            if new is not None:
                setattr(parent, child_name, new)
    return model
