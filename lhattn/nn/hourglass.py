"""Hourglass: hierarchical shortening transformers (Nawrot et al. 2021, "Hierarchical Transformers Are
More Efficient Language Models"), every attention through :func:`lhattn.attention`.

One level of ``Hourglass(d_model, nhead, shortening_factors=[k, ...])``::

    x  = pre layers (full resolution, causal)
    x' = Shortening(ShiftRight(x, k - 1), k)          # ceil(n / k) tokens
    x' = Hourglass(x', remaining factors)              # or the middle layers when no factor is left
    x  = Upsampling(x, x', k)                          # includes the residual from x
    x  = post layers (full resolution, causal)

Layers are pre-norm transformer layers (``LayerNorm -> attention -> residual``, ``LayerNorm -> FFN ->
residual``).  All shapes are batch-first ``[B, N, d_model]``.

Shortening (``shortening=``), on the blocks ``b_j = (s_{jk}, ..., s_{jk+k-1})`` of the shifted sequence s:

* ``"avg"``: ``x'_j = mean(b_j)``;
* ``"linear"``: ``x'_j = W [s_{jk}; ...; s_{jk+k-1}]`` (concatenate, then ``Linear(k·d, d)``);
* ``"attention"``: ``p_j = mean(b_j)``; ``x'_j = p_j + Attn(Q=LN(p_j), K=V=LN(b_j))`` (the pooled query
  sees its own k tokens only: :class:`lhattn.Segments` of size k), then ``x'_j += FFN(LN(x'_j))``.

Upsampling (``upsampling=``), for the full-resolution position ``i = jk + r``:

* ``"naive"``: ``x_i + x'_j`` (repeat k times);
* ``"linear"``: ``x_i + (W x'_j)[r]`` (``Linear(d, k·d)``, split into k tokens);
* ``"attention"``: ``u_i = x_i + (W x'_j)[r]``; ``u_i += Attn(Q=LN(u_i), K=V=LN(x'_{<=j}))`` -- causal over
  the shortened sequence (within the window when a pattern is given); then ``u_i += FFN(LN(u_i))``.

Causality is exact for every N.  The shift prepends ``k - 1`` zeros and does *not* truncate: block j holds
``x_{jk-k+1} .. x_{jk}`` and reaches position ``jk``, the first position it is upsampled to, so a level
never needs more than the input it got (``ceil(n/k)·k <= n + k - 1``); upsampled outputs past n are
trimmed.  Hence ``m(x)[:, :t] == m(x[:, :t])`` for every t.  (labml's ``HourGlass`` truncates the
shifted sequence to n and average-pools the last, shorter block over fewer tokens: identical to ours
when every level's length is divisible by its factor, different -- and not prefix-consistent -- else.)

Positions: rotary embeddings (RoPE, rotate-half, base 10000) on the queries and keys of every
self-attention, each level counting its own tokens (shortened token j is at position j); the
shortening and upsampling attentions use none.  ``rotary=False`` switches them off (labml's model
has no positions inside the hourglass).

Attention pattern: ``pattern=None`` is full causal attention (``SlidingWindow(n - 1, causal=True)``);
``pattern=SlidingWindow(w, causal=True)`` is used by the self-attention of *every* level and by the
upsampling attention, the window counted in that level's tokens -- so every level costs O(n_level·w)
and the whole model stays linear in N.
"""

from __future__ import annotations

import math
from typing import Callable, List, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional as _functional
from ..patterns import Segments, SlidingWindow
from .hat import _Block

__all__ = ["Hourglass", "HourglassLM", "HourglassLMOutput", "SHORTENINGS", "UPSAMPLINGS"]

SHORTENINGS = ("avg", "linear", "attention")
UPSAMPLINGS = ("naive", "linear", "attention")

Attend = Callable[[Tensor, Tensor, Tensor], Tensor]


# ---- helpers --------------------------------------------------------------------------------------

def _causal_pattern(pattern: Optional[SlidingWindow], n: int) -> SlidingWindow:
    """The pattern of a causal self-attention over n tokens: full causal when ``pattern`` is None."""
    return SlidingWindow(max(n - 1, 0), causal=True) if pattern is None else pattern


def _rotary(x: Tensor) -> Tensor:
    """Rotate-half RoPE on ``x [B, H, L, D]`` at positions ``0..L-1`` (base 10000)."""
    d, n = x.shape[-1], x.shape[-2]
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float64) / d))
    ang = torch.arange(n, device=x.device, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = (t.to(x.dtype).repeat(1, 2) for t in (ang.cos(), ang.sin()))
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _shifted_blocks(x: Tensor, k: int) -> Tensor:
    """``[B, n, d] -> [B, ceil(n/k), k, d]``: block j = ``x_{jk-k+1} .. x_{jk}`` (zeros before 0)."""
    b, n, d = x.shape
    m = -(-n // k)
    s = torch.cat((x.new_zeros(b, k - 1, d), x), dim=1)[:, : m * k]
    return s.reshape(b, m, k, d)


def _pad_to(x: Tensor, n: int) -> Tensor:
    """Zero-pad ``[B, L, d]`` at the end to length n."""
    return x if x.shape[1] == n else F.pad(x, (0, 0, 0, n - x.shape[1]))


def _check_choice(name: str, value, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


def _check_pattern(pattern) -> Optional[SlidingWindow]:
    if pattern is None:
        return None
    if not isinstance(pattern, SlidingWindow):
        raise TypeError(f"pattern must be None (full causal attention) or SlidingWindow(w, causal=True), "
                        f"got {type(pattern).__name__}")
    if pattern.right != 0:
        raise ValueError(f"pattern must be causal (SlidingWindow(w, causal=True), window right == 0); "
                         f"got window={pattern.window}")
    return pattern


def _check_factors(shortening_factors) -> List[int]:
    if not isinstance(shortening_factors, (list, tuple)):
        raise TypeError(f"shortening_factors must be a list of ints >= 1, got {shortening_factors!r}")
    for k in shortening_factors:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"shortening_factors must be a list of ints >= 1, got {list(shortening_factors)}")
    return list(shortening_factors)


def _check_layers(layers_per_level, levels: int) -> List[int]:
    if isinstance(layers_per_level, int) and not isinstance(layers_per_level, bool):
        layers_per_level = [layers_per_level] * levels
    if (not isinstance(layers_per_level, (list, tuple)) or len(layers_per_level) != levels
            or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in layers_per_level)):
        raise ValueError(f"layers_per_level must be an int >= 0 or a list of len(shortening_factors) + 1 = "
                         f"{levels} ints >= 0, got {layers_per_level!r}")
    return list(layers_per_level)


# ---- attention ------------------------------------------------------------------------------------

class _Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections; the attention itself is ``attend(q, k, v)``
    on ``[B, H, L, head_dim]`` tensors (queries and keys may have different lengths there), which applies
    ``dropout_p`` to the attention probabilities in training."""

    def __init__(self, d_model: int, nhead: int, dropout: float, bias: bool, **factory) -> None:
        super().__init__()
        self.nhead, self.dropout_p = nhead, float(dropout)
        self.q_proj = nn.Linear(d_model, d_model, bias=bias, **factory)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias, **factory)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias, **factory)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias, **factory)

    def _heads(self, x: Tensor, proj: nn.Linear) -> Tensor:
        b, n, _ = x.shape
        return proj(x).view(b, n, self.nhead, -1).transpose(1, 2)

    def forward(self, query: Tensor, key: Tensor, attend: Attend) -> Tensor:
        out = attend(self._heads(query, self.q_proj), self._heads(key, self.k_proj), self._heads(key, self.v_proj))
        b, h, n, hd = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * hd))


class _Layers(nn.Module):
    """Pre-norm causal self-attention layers at one resolution."""

    def __init__(self, count: int, make_block: Callable[[], _Block], pattern: Optional[SlidingWindow],
                 rotary: bool, backend: str) -> None:
        super().__init__()
        self.layers = nn.ModuleList(make_block() for _ in range(count))
        self.pattern, self.rotary, self.backend = pattern, rotary, backend

    def _attend(self, attn: _Attention, x: Tensor) -> Tensor:
        def causal(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            if self.rotary:
                q, k = _rotary(q), _rotary(k)
            p = attn.dropout_p if self.training else 0.0
            return _functional.attention(q, k, v, _causal_pattern(self.pattern, q.shape[2]), dropout_p=p,
                                         backend=self.backend)
        return attn(x, x, causal)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x, self._attend)
        return x


# ---- shortening -----------------------------------------------------------------------------------

class _Shortening(nn.Module):
    """``x [B, n, d] -> x' [B, ceil(n/k), d]`` (shift right by k-1 included)."""

    def __init__(self, kind: str, k: int, d_model: int, make_block: Callable[[], _Block], bias: bool,
                 backend: str, **factory) -> None:
        super().__init__()
        self.kind, self.k, self.backend = kind, k, backend
        if kind == "linear":
            self.proj = nn.Linear(k * d_model, d_model, bias=bias, **factory)
        elif kind == "attention":
            self.block = make_block()
            self.norm_kv = nn.LayerNorm(d_model, eps=self.block.norm1.eps, bias=bias, **factory)

    def forward(self, x: Tensor) -> Tensor:
        blocks = _shifted_blocks(x, self.k)  # [B, m, k, d]
        b, m, k, d = blocks.shape
        if self.kind == "linear":
            return self.proj(blocks.reshape(b, m, k * d))
        pooled = blocks.mean(dim=2)
        if self.kind == "avg":
            return pooled
        tokens = self.norm_kv(blocks.reshape(b, m * k, d))

        def own_block(q: Tensor, kk: Tensor, v: Tensor) -> Tensor:
            # each pooled query, repeated over its block, sees exactly the k tokens of its block
            q = q.repeat_interleave(k, dim=2)
            p = self.block.self_attn.dropout_p if self.training else 0.0
            out = _functional.attention(q, kk, v, Segments(k), dropout_p=p, backend=self.backend)
            return out[:, :, ::k]

        return self.block(pooled, lambda attn, q: attn(q, tokens, own_block))


# ---- upsampling -----------------------------------------------------------------------------------

class _Upsampling(nn.Module):
    """``(x [B, n, d], x' [B, ceil(n/k), d]) -> [B, n, d]``, the residual from x included."""

    def __init__(self, kind: str, k: int, d_model: int, make_block: Callable[[], _Block],
                 pattern: Optional[SlidingWindow], bias: bool, backend: str, **factory) -> None:
        super().__init__()
        self.kind, self.k, self.pattern, self.backend = kind, k, pattern, backend
        if kind in ("linear", "attention"):
            self.proj = nn.Linear(d_model, k * d_model, bias=bias, **factory)
        if kind == "attention":
            self.block = make_block()
            self.norm_kv = nn.LayerNorm(d_model, eps=self.block.norm1.eps, bias=bias, **factory)

    def forward(self, x: Tensor, short: Tensor) -> Tensor:
        b, n, d = x.shape
        m, k = short.shape[1], self.k
        if self.kind == "naive":
            return x + short.repeat_interleave(k, dim=1)[:, :n]
        up = self.proj(short).reshape(b, m * k, d)
        if self.kind == "linear":
            return x + up[:, :n]
        u = _pad_to(x, m * k) + up
        keys = self.norm_kv(short)

        def causal_to_short(q: Tensor, kk: Tensor, v: Tensor) -> Tensor:
            # position i = jk + r sees shortened tokens <= j: one causal attention of length m per phase r
            bh = q.shape[:2]
            q = q.reshape(*bh, m, k, -1).permute(0, 3, 1, 2, 4).reshape(b * k, bh[1], m, -1)
            kk, v = (t.unsqueeze(1).expand(b, k, *t.shape[1:]).reshape(b * k, *t.shape[1:]) for t in (kk, v))
            p = self.block.self_attn.dropout_p if self.training else 0.0
            out = _functional.attention(q, kk, v, _causal_pattern(self.pattern, m), dropout_p=p, backend=self.backend)
            return out.reshape(b, k, bh[1], m, -1).permute(0, 2, 3, 1, 4).reshape(*bh, m * k, -1)

        return self.block(u, lambda attn, q: attn(q, keys, causal_to_short))[:, :n]


# ---- the model ------------------------------------------------------------------------------------

class Hourglass(nn.Module):
    """Hourglass transformer: ``[B, N, d_model] -> [B, N, d_model]``, causal (module docstring).

    Args:
        d_model, nhead: width and heads (``d_model % nhead == 0``; head_dim even with ``rotary``).
        shortening_factors: ``[k1, k2, ...]``, one per level below the full resolution; ``[]`` is a
            vanilla causal transformer of ``layers_per_level`` layers.
        dim_feedforward: FFN hidden size (default ``4 * d_model``).
        dropout: on the attention probabilities, the FFN hidden layer and both residual branches.
        shortening: ``"avg" | "linear" | "attention"``; upsampling: ``"naive" | "linear" | "attention"``.
        pattern: None (full causal attention) or ``SlidingWindow(w, causal=True)`` (every level, its
            window counted in that level's tokens).
        layers_per_level: an int, or ``len(shortening_factors) + 1`` ints: entry i (< last) is the number
            of layers *before and again after* level i's shortening; the last is the number of middle
            layers at the shortest resolution.  labml's ``HourGlass`` is ``layers_per_level=1``; the
            paper's ``(2@1, 4@3, 2@1)`` is ``shortening_factors=[3], layers_per_level=[2, 4]``.
        activation: ``"relu"`` (default, as labml), ``"gelu"`` or a callable.
        rotary: rotary positions in every self-attention (default True).
        backend: passed to :func:`lhattn.attention`.
    """

    def __init__(self, d_model: int, nhead: int, shortening_factors: Sequence[int],
                 dim_feedforward: Optional[int] = None, dropout: float = 0.1, *, shortening: str = "avg",
                 upsampling: str = "naive", pattern: Optional[SlidingWindow] = None,
                 layers_per_level: Union[int, Sequence[int]] = 1,
                 activation: Union[str, Callable[[Tensor], Tensor]] = "relu", rotary: bool = True,
                 layer_norm_eps: float = 1e-5, bias: bool = True, backend: str = "auto", device=None,
                 dtype=None) -> None:
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        factors = _check_factors(shortening_factors)
        layers = _check_layers(layers_per_level, len(factors) + 1)
        for name, val in (("d_model", d_model), ("nhead", nhead)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be an int >= 1, got {val!r}")
        if d_model % nhead:
            raise ValueError(f"d_model ({d_model}) must be divisible by nhead ({nhead})")
        if rotary and (d_model // nhead) % 2:
            raise ValueError(f"rotary=True needs an even head_dim, got d_model // nhead = {d_model // nhead}")
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        if backend not in _functional.BACKENDS:
            raise ValueError(f"backend must be one of {_functional.BACKENDS}, got {backend!r}")
        self.shortening = _check_choice("shortening", shortening, SHORTENINGS)
        self.upsampling = _check_choice("upsampling", upsampling, UPSAMPLINGS)
        self.pattern = _check_pattern(pattern)
        self.shortening_factors, self.layers_per_level = factors, layers
        dim_feedforward = 4 * d_model if dim_feedforward is None else dim_feedforward

        def make_block() -> _Block:
            attn = _Attention(d_model, nhead, dropout, bias, **factory)
            return _Block(attn, d_model, dim_feedforward, dropout, activation, layer_norm_eps, True, bias, **factory)

        self.pre = _Layers(layers[0], make_block, self.pattern, rotary, backend)
        if not factors:
            return
        k = factors[0]
        self.shorten = _Shortening(shortening, k, d_model, make_block, bias, backend, **factory)
        self.inner = Hourglass(d_model, nhead, factors[1:], dim_feedforward, dropout, shortening=shortening,
                               upsampling=upsampling, pattern=pattern, layers_per_level=layers[1:],
                               activation=activation, rotary=rotary, layer_norm_eps=layer_norm_eps, bias=bias,
                               backend=backend, **factory)
        self.upsample = _Upsampling(upsampling, k, d_model, make_block, self.pattern, bias, backend, **factory)
        self.post = _Layers(layers[0], make_block, self.pattern, rotary, backend)

    def extra_repr(self) -> str:
        return (f"shortening_factors={self.shortening_factors}, layers_per_level={self.layers_per_level}, "
                f"shortening={self.shortening!r}, upsampling={self.upsampling!r}, pattern={self.pattern}")

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3:
            raise ValueError(f"x must be [B, N, d_model] (batch_first), got shape {tuple(x.shape)}")
        if x.shape[1] == 0:
            raise ValueError(f"x must have at least one token, got shape {tuple(x.shape)}")
        x = self.pre(x)
        if not self.shortening_factors:
            return x
        x = self.upsample(x, self.inner(self.shorten(x)))
        return self.post(x)


class HourglassLMOutput(NamedTuple):
    logits: Tensor                 #: ``[B, N, vocab_size]``
    loss: Optional[Tensor] = None  #: mean cross-entropy of ``logits[:, :-1]`` against ``labels[:, 1:]``


class HourglassLM(nn.Module):
    """Causal language model: token embedding, :class:`Hourglass`, final LayerNorm, output head tied to
    the embedding.  ``forward(input_ids [B, N], labels=None)`` returns :class:`HourglassLMOutput`; with
    ``labels`` the loss is on the shifted targets (position t predicts ``labels[:, t + 1]``; label
    ``ignore_index`` (-100) is skipped).  Keyword arguments after ``vocab_size`` are :class:`Hourglass`'s.
    """

    def __init__(self, vocab_size: int, d_model: int, nhead: int, shortening_factors: Sequence[int], **kwargs) -> None:
        super().__init__()
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be an int >= 1, got {vocab_size!r}")
        factory = {k: kwargs[k] for k in ("device", "dtype") if k in kwargs}
        self.embed = nn.Embedding(vocab_size, d_model, **factory)
        nn.init.normal_(self.embed.weight, std=d_model ** -0.5)
        self.hourglass = Hourglass(d_model, nhead, shortening_factors, **kwargs)
        self.norm = nn.LayerNorm(d_model, eps=kwargs.get("layer_norm_eps", 1e-5), **factory)

    def forward(self, input_ids: Tensor, labels: Optional[Tensor] = None) -> HourglassLMOutput:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor [B, N], got {input_ids.dtype} "
                             f"of shape {tuple(input_ids.shape)}")
        h = self.norm(self.hourglass(self.embed(input_ids) * math.sqrt(self.embed.embedding_dim)))
        logits = F.linear(h, self.embed.weight)
        if labels is None:
            return HourglassLMOutput(logits)
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return HourglassLMOutput(logits, loss)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 greedy: bool = False, generator: Optional[torch.Generator] = None) -> Tensor:
        """Append ``max_new_tokens`` sampled tokens (full-sequence recomputation at every step)."""
        if temperature <= 0 and not greedy:
            raise ValueError(f"temperature must be > 0 unless greedy=True, got {temperature}")
        out = input_ids
        for _ in range(max_new_tokens):
            last = self(out).logits[:, -1].float()
            nxt = (last.argmax(-1) if greedy else
                   torch.multinomial(torch.softmax(last / temperature, -1), 1, generator=generator).squeeze(-1))
            out = torch.cat((out, nxt[:, None].to(out.dtype)), dim=1)
        return out
