"""Useful work of an attention pattern, counted exactly from the pattern (never an n×n tensor).

``visible_pairs(pattern, n, num_global)`` is ``Σ_i |keys visible to query i|`` for one
(batch row, head) of length ``n`` with no padding, where the global tokens are the first
``num_global`` positions (LSG: ``pattern.num_global_tokens``). Then, per docs/ARCHITECTURE.md ("Benchmarks"),

    W_eff       = visible_pairs / n                         (average visible keys per query)
    flops(fwd)  = 4 · B · H · N · W_eff · D                 (QKᵀ and PV: 2 flops per MAC each)
    flops(bwd)  = 2.5 · flops(fwd)                          (dQ, dK, dV, dP and the recomputed S)
    flops(fwd+bwd) = 3.5 · flops(fwd)

Dense attention (SDPA) executes ``W_eff = n``; its *useful* flops are still the pattern's.
"""

from __future__ import annotations

import torch

from lhattn.patterns import LSG, Segments, SlidingWindow

__all__ = ["visible_pairs", "w_eff", "attention_flops", "MODE_FACTOR"]

MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def _window_pairs(p: SlidingWindow, n: int, g: int) -> int:
    """Local queries ``i >= g`` see ``i + m·d`` (``-left <= m <= right``) inside ``[g, n)``, plus g globals."""
    i = torch.arange(g, n, dtype=torch.int64)
    d = p.dilation
    # m ranges over [max(-left, ceil((g - i) / d)), min(right, floor((n - 1 - i) / d))]
    lo = torch.clamp(-torch.div(i - g, d, rounding_mode="floor"), min=-p.left)
    hi = torch.clamp(torch.div(n - 1 - i, d, rounding_mode="floor"), max=p.right)
    local = (hi - lo + 1).clamp(min=0).sum().item()
    return int(local) + (n - g) * g + g * n


def _segment_pairs(p: Segments, n: int, g: int) -> int:
    """Local queries see the non-global keys of their own segment plus the g globals."""
    s = p.segment_size
    total = g * n  # global queries see every key
    for start in range(0, n, s):
        stop = min(n, start + s)
        queries = stop - max(start, g)
        if queries > 0:
            total += queries * (stop - max(start, g) + g)
    return total


def _lsg_pairs(p: LSG, n: int) -> int:
    """LSG (semantics: :mod:`lhattn.reference.lsg`), per block ``t`` of ``b`` rows starting at
    ``o = p.block_offset``: the local keys ``[max(o + (t-1)·b, g), min(o + (t+2)·b, n))`` (``t+1`` and
    ``j <= i`` when causal), the ``g`` globals, and the compressed keys ``[t·s + lo, t·s + hi)`` of
    each window of :meth:`~lhattn.LSG.sparse_windows` (``s = b / f``; either ``sparse_geometry``; a key
    in both windows is counted twice, as LSG computes it twice), counted when their group starts
    inside the sequence (``p < ceil((n - o) / f)``).  Global queries and ``n - o <= 2b`` (LSG's
    rule): every key (``j <= i`` when causal).  Compressed keys that padding or, inline, the global
    tokens make unusable are counted (the count is for unpadded rows; inline, at most ``g / f``
    keys per query too many)."""
    b, f, o, g = p.block_size, p.sparsity_factor, p.block_offset, min(p.num_global_tokens, n)
    if n - o <= 2 * b:
        return n * (n + 1) // 2 if p.causal else n * n
    total = g * (g + 1) // 2 if p.causal else g * n  # the global queries
    step, valid = b // f, -(-(n - o) // f)  # compressed keys per block; those whose group starts before n
    windows = [w for w in p.sparse_windows() if w[0] < w[1]]
    for t in range(-(-(n - o) // b)):
        q0, q1 = max(o + t * b, g), min(n, o + (t + 1) * b)
        if q1 <= q0:
            continue
        k0 = max(o + (t - 1) * b, g)
        if p.causal:  # row i sees [k0, i]
            local = (q1 - q0) * (q0 + q1 - 1) // 2 - (q1 - q0) * (k0 - 1)
        else:
            local = (q1 - q0) * (min(n, o + (t + 2) * b) - k0)
        sparse = sum(max(0, min(t * step + hi, valid) - max(t * step + lo, 0)) for lo, hi in windows)
        total += local + (q1 - q0) * (g + sparse)
    return total


def visible_pairs(pattern, n: int, num_global: int = 0) -> int:
    """``Σ_i |visible keys of query i|`` for one (batch row, head); globals = first positions."""
    if isinstance(pattern, LSG):
        return _lsg_pairs(pattern, n)
    g = min(num_global, n)
    if isinstance(pattern, SlidingWindow):
        return _window_pairs(pattern, n, g)
    if isinstance(pattern, Segments):
        if pattern.segment_size is None:
            raise ValueError("visible_pairs needs a fixed segment_size")
        return _segment_pairs(pattern, n, g)
    if pattern is None:  # dense
        return n * n
    raise TypeError(f"unknown pattern {type(pattern).__name__}")


def w_eff(pattern, n: int, num_global: int = 0) -> float:
    """Average number of keys each query sees."""
    return visible_pairs(pattern, n, num_global) / n


def attention_flops(pairs: int, batch: int, heads: int, head_dim: int, mode: str) -> float:
    """``4 · B · H · pairs · D`` times the mode factor (fwd 1, bwd 2.5, fwd+bwd 3.5)."""
    return 4.0 * batch * heads * pairs * head_dim * MODE_FACTOR[mode]
