"""``lhattn.nn.LSGSelfAttention``: an LSG self-attention layer with learned global tokens.

LSG models (``LSG*Model`` of ``ccdv-ai/convert_checkpoint_to_lsg``) prepend ``num_global_tokens``
*learned* embeddings to the sequence (row ``i`` of a trained table, the same for every batch row)
and use them as LSG's global tokens: every query sees them, they see every key.  This layer does
the same around one attention: it prepends its own ``num_global_tokens`` learned vectors
(``global_embeddings [g, E]``) to ``x``, projects, runs :func:`lhattn.attention` with
``LSG(..., global_layout="prepended")`` -- blocks of ``block_size`` start right after the global
tokens -- and drops the global rows again, so ``forward(x [B, N, E]) -> [B, N, E]``.

Unlike an LSG model, whose global tokens flow through the whole stack (each layer reads the
global hidden states the previous layer wrote), the global tokens here live in the layer: each
``LSGSelfAttention`` has its own, and nothing of them leaves the layer.  LSG models take the table
from a converted checkpoint (the ``[CLS]`` embedding plus positions); here it starts as
``N(0, 0.02²)``, BERT's initializer range, and is trained with the rest.

Shapes are batch-first.  ``key_padding_mask [B, N]`` bool (True = padding): padding tokens are
never attended to and are excluded from the compressed (sparse) keys; a padding row's attention
output is 0, so the layer returns ``out_proj.bias`` there.  ``causal=True``: every query sees the
global tokens and the keys up to itself (global rows: the earlier global tokens only).

Dropout, in training only.  ``attention_dropout`` drops attention probabilities inside
:func:`lhattn.attention` (O(N·w); lhattn's counter-based rule, :mod:`lhattn._dropout`, its seed
drawn from torch's default generator, so ``torch.manual_seed`` reproduces a step): what
lsg_converter's ``LSGSelfAttention`` does with ``config.attention_probs_dropout_prob``.
``dropout`` drops elements of the attention output (before ``out_proj``).  Both default to 0.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional as _functional
from ..patterns import LSG
from . import mha as _mha

__all__ = ["LSGSelfAttention"]

# lhattn.attention, or context-parallel inside lhattn.distributed.context_parallel; as in lhattn.nn.mha,
# compiled code runs it eagerly (the fallback's autograd.Function builds masks that dynamo cannot capture).
_attention = _mha._attention


def _holds_sequence_start() -> bool:
    """Where the learned global tokens are prepended: always, or inside
    :func:`lhattn.distributed.context_parallel` on the group's rank 0 only (its shard starts the sequence)."""
    from .. import distributed

    return not distributed.is_active() or distributed.group_rank() == 0


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _check_probability(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")


class LSGSelfAttention(nn.Module):
    """Multi-head LSG self-attention (local + sparse + global) with learned global tokens.

    Args:
        embed_dim: ``E``, divisible by ``num_heads``.
        num_heads: ``H``; head dim ``E / H``.
        block_size, sparse_block_size, sparsity_factor, sparsity_type, num_global_tokens, causal:
            the :class:`~lhattn.LSG` pattern (``global_layout="prepended"``), validated there;
            ``num_global_tokens`` learned tokens are prepended (0 = none).
        attention_dropout: probability of dropping an attention probability in training, in ``[0, 1)``.
        dropout: probability of zeroing an element of the attention output in training, in ``[0, 1)``.
        bias: biases in the four projections.
        backend: :func:`lhattn.attention` backend (``"auto" | "triton" | "fallback" | "reference"``).
        device, dtype: of the parameters.

    Parameters: ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` (``nn.Linear(E, E)``) and
    ``global_embeddings [num_global_tokens, E]`` (None when ``num_global_tokens == 0``).

    ``forward(x [B, N, E], key_padding_mask [B, N] bool = None) -> [B, N, E]`` (module docstring).
    Sequences with ``N <= 2 * block_size`` get full attention (LSG's rule).
    """

    def __init__(self, embed_dim: int, num_heads: int, *, block_size: int = 128,
                 sparse_block_size: Optional[int] = None, sparsity_factor: int = 2, sparsity_type: str = "norm",
                 num_global_tokens: int = 1, causal: bool = False, attention_dropout: float = 0.0,
                 dropout: float = 0.0, bias: bool = True, backend: str = "auto", device=None, dtype=None) -> None:
        super().__init__()
        _check_positive_int("embed_dim", embed_dim)
        _check_positive_int("num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        _check_probability("attention_dropout", attention_dropout)
        _check_probability("dropout", dropout)
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {type(bias).__name__}")
        if not isinstance(backend, str) or backend not in _functional.BACKENDS:
            raise ValueError(f"backend must be one of {_functional.BACKENDS}, got {backend!r}")
        self.pattern = LSG(block_size=block_size, sparse_block_size=sparse_block_size,
                           sparsity_factor=sparsity_factor, sparsity_type=sparsity_type,
                           num_global_tokens=num_global_tokens, causal=causal, global_layout="prepended")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.attention_dropout = float(attention_dropout)
        self.dropout = float(dropout)
        self.backend = backend
        factory = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        if num_global_tokens > 0:
            self.global_embeddings = nn.Parameter(torch.empty(num_global_tokens, embed_dim, **factory))
        else:
            self.register_parameter("global_embeddings", None)
        self.reset_global_embeddings()

    @property
    def num_global_tokens(self) -> int:
        return self.pattern.num_global_tokens

    def reset_global_embeddings(self) -> None:
        """``N(0, 0.02²)``: the initializer range of BERT-style models (LSG's global table included)."""
        if self.global_embeddings is not None:
            nn.init.normal_(self.global_embeddings, mean=0.0, std=0.02)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"attention_dropout={self.attention_dropout}, dropout={self.dropout}, backend={self.backend!r}, "
                f"pattern={self.pattern}")

    def _check_input(self, x: Tensor, key_padding_mask: Optional[Tensor]) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be [B, N, E={self.embed_dim}] (batch first), got shape {tuple(x.shape)}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"x must have B >= 1 and N >= 1, got shape {tuple(x.shape)}")
        if key_padding_mask is None:
            return
        if not isinstance(key_padding_mask, Tensor):
            raise TypeError(f"key_padding_mask must be a torch.Tensor or None, got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be a bool tensor (True = padding), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != tuple(x.shape[:2]):
            raise ValueError(f"key_padding_mask must be [B, N] = {tuple(x.shape[:2])}, "
                             f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != x.device:
            raise ValueError(f"key_padding_mask must be on x's device ({x.device}), got {key_padding_mask.device}")

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """``x [B, N, E]``, ``key_padding_mask [B, N]`` bool (True = padding) -> ``[B, N, E]``."""
        self._check_input(x, key_padding_mask)
        b, n, e = x.shape
        g = self.num_global_tokens if _holds_sequence_start() else 0
        h = x
        if self.global_embeddings is not None:  # [B, g + N, E]: the learned global tokens first
            # (an empty slice off the first rank: a zero gradient rather than none, as DDP expects)
            h = torch.cat([self.global_embeddings[:g].to(x.dtype)[None].expand(b, -1, -1), x], dim=1)
        kpm = key_padding_mask
        if kpm is not None and g > 0:  # global tokens are never padding
            kpm = torch.cat([kpm.new_zeros(b, g), kpm], dim=1)

        def heads(t: Tensor) -> Tensor:  # [B, g + N, E] -> [B, H, g + N, hd]
            return t.view(b, g + n, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(h)), heads(self.k_proj(h)), heads(self.v_proj(h))
        out = _attention(q, k, v, self.pattern, key_padding_mask=kpm, scale=1.0 / math.sqrt(self.head_dim),
                         dropout_p=self.attention_dropout if self.training else 0.0,
                         backend=self.backend)  # [B, H, g + N, hd]
        out = out[:, :, g:].transpose(1, 2).reshape(b, n, e)
        out = F.dropout(out, p=self.dropout, training=self.training)
        return self.out_proj(out)
