"""Attention dropout: one counter-based rule that every backend computes bit for bit.

Dropout acts on the attention *probabilities*, after the softmax, exactly like
``F.dropout(softmax(s), p)`` in PyTorch's attention: a dropped probability becomes 0,
a kept one is multiplied by ``1 / (1 - p)``.  The softmax normaliser -- and so ``lse`` --
is that of the undropped scores.

Which entries are kept is a pure function of ``(seed, b, h, i, c)``, so the blocked
fallback, the Triton kernels and the dense oracle drop the *same* entries, the backward
regenerates them instead of storing an ``N × w`` mask, and tests compare backends exactly:

* ``K  = mix32(mix32(b·H + h) ^ seed)``   -- per (batch row, query head); ``H`` = query heads
* ``R  = mix32(K ^ i)``                   -- per query row, ``i`` = the query's token position
* ``U  = mix32(R ^ c)``                   -- per entry, ``c`` = the key's *column*
* kept  ⟺  ``U >= T``, ``T = floor(p · 2³²)``; so ``P(kept) = 1 - p`` up to 2⁻³².

``mix32`` is a 32-bit integer finaliser (xor-shift / multiply, ``lowbias32``); all arithmetic is
modulo 2³².  A key's column is its token position for every token key (local, global, segment);
for LSG's compressed keys it is ``N + p`` (``p`` = the compressed key's index), i.e. the column
of the ``[k ; compressed k]`` matrix of :mod:`lhattn.reference.lsg`.  Global rows use their token
position ``i`` as every other row does, also with ``global_qkv``.

The seed is a 32-bit value held in a tensor on the inputs' device (no host sync, no
recompilation under ``torch.compile`` when it changes).  Backends receive a *dropout state*,
``int64 [2] = (seed, T)``, and the float ``p``.
"""

from __future__ import annotations

import numbers
from typing import Optional, Union

import torch
from torch import Tensor

__all__ = ["MASK32", "MIX_MUL1", "MIX_MUL2", "mix32", "threshold", "check_dropout", "make_state",
           "head_keys", "row_keys", "keep", "keep_mask"]

MASK32 = 0xFFFFFFFF
MIX_MUL1 = 0x7FEB352D
MIX_MUL2 = 0x846CA68B


def _mul32(x: Tensor, c: int) -> Tensor:
    """``x · c mod 2³²`` for int64 ``x`` in ``[0, 2³²)`` without int64 overflow (16-bit halves)."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & MASK32


def mix32(x: Tensor) -> Tensor:
    """The 32-bit finaliser on int64 tensors holding values in ``[0, 2³²)``."""
    x = x ^ (x >> 16)
    x = _mul32(x, MIX_MUL1)
    x = x ^ (x >> 15)
    x = _mul32(x, MIX_MUL2)
    return x ^ (x >> 16)


def threshold(p: float) -> int:
    """``T = floor(p · 2³²)``: an entry is kept iff its 32-bit draw is ``>= T``."""
    return min(int(p * 4294967296.0), MASK32)


def check_dropout(dropout_p, dropout_seed) -> None:
    """``dropout_p``: a float in ``[0, 1)``; ``dropout_seed``: None, an int in ``[0, 2³²)`` or a
    one-element integer tensor."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {type(dropout_p).__name__} {dropout_p!r}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r} (p = 1 would drop every weight)")
    if dropout_seed is None:
        return
    if isinstance(dropout_seed, Tensor):
        if dropout_seed.numel() != 1 or dropout_seed.dtype not in (torch.int64, torch.int32):
            raise ValueError("dropout_seed as a tensor must hold one int64/int32 value, got shape "
                             f"{tuple(dropout_seed.shape)} and dtype {dropout_seed.dtype}")
        return
    if isinstance(dropout_seed, bool) or not isinstance(dropout_seed, numbers.Integral):
        raise TypeError(f"dropout_seed must be None, an int or a one-element integer tensor, got "
                        f"{type(dropout_seed).__name__}")
    if not 0 <= int(dropout_seed) <= MASK32:
        raise ValueError(f"dropout_seed must be in [0, 2**32), got {dropout_seed}")


def make_state(dropout_p: float, dropout_seed: Union[None, int, Tensor], device) -> Optional[Tensor]:
    """The dropout state ``int64 [2] = (seed mod 2³², T)`` on ``device``, or None when
    ``dropout_p == 0``.  A missing seed is drawn from torch's default generator (so
    ``torch.manual_seed`` makes a run reproducible), on the device, without a host sync."""
    if float(dropout_p) == 0.0:
        return None
    if dropout_seed is None:
        seed = torch.randint(0, MASK32 + 1, (), dtype=torch.int64, device=device)
    elif isinstance(dropout_seed, Tensor):
        seed = dropout_seed.reshape(()).to(device=device, dtype=torch.int64) & MASK32
    else:
        seed = torch.tensor(int(dropout_seed), dtype=torch.int64, device=device)
    return torch.stack([seed, torch.full_like(seed, threshold(float(dropout_p)))])


def head_keys(state: Tensor, batch: int, heads: int) -> Tensor:
    """``K [B, H]`` (int64 in ``[0, 2³²)``) for the dropout state ``(seed, T)``."""
    bh = torch.arange(batch * heads, dtype=torch.int64, device=state.device).view(batch, heads)
    return mix32(mix32(bh) ^ state[0])


def row_keys(k_bh: Tensor, rows: Tensor) -> Tensor:
    """``R = mix32(K ^ i)``: ``k_bh [B, H]`` and row positions ``rows`` (``[Nq]`` or ``[B, Nq]``)
    -> ``[B, H, Nq]``."""
    if rows.dim() == 1:
        rows = rows[None]
    return mix32(k_bh[:, :, None] ^ rows[:, None, :].to(torch.int64))


def keep(r: Tensor, cols: Tensor, state: Tensor) -> Tensor:
    """Kept entries: row keys ``r [..., Nq]`` and key columns ``cols`` (``[L]``, or ``[B, L]`` when
    ``r`` is ``[B, H, Nq]``) -> bool ``[..., Nq, L]``."""
    if cols.dim() == 2:
        cols = cols[:, None, None, :]
    return mix32(r[..., None] ^ cols.to(torch.int64)) >= state[1]


def keep_mask(state: Tensor, batch: int, heads: int, rows: Tensor, cols: Tensor) -> Tensor:
    """The dense ``[B, H, Nq, L]`` keep mask (the oracle's; O(Nq·L) memory)."""
    return keep(row_keys(head_keys(state, batch, heads), rows), cols, state)
