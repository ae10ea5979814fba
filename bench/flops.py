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
    """LSG, non-causal. Query block t sees blocks t-1..t+1 (minus the g global tokens), the g
    globals, and ``sparse_block_size`` compressed keys on each side beyond its local blocks:
    compressed positions ``[(t-1)·b/f - sb, (t-1)·b/f)`` and ``[(t+2)·b/f, (t+2)·b/f + sb)`` of the
    compressed sequence (length ``ceil(n/b)·b/f``), counted when their source group starts
    inside the sequence. ``n <= 2b``: full attention (LSG's rule). Checked against the block
    masks of ccdv's ``LSGSelfAttention`` (sb = b): equal for ``norm``, ``pooling`` and ``none``
    when n is a multiple of b and f >= 3; for ``stride`` / ``block_stride`` within 0.4% (a
    compressed key taken from a global token is masked there). With f <= 2 ccdv's slicing
    yields no sparse keys at all, so the benchmarks use f >= 3."""
    b, f, g = p.block_size, p.sparsity_factor, min(p.num_global_tokens, n)
    if p.causal:
        raise NotImplementedError("useful-flop count for causal LSG is not implemented")
    if n <= 2 * b:
        return n * n
    blocks = -(-n // b)
    sparse = p.sparsity_type != "none" and p.sparse_block_size > 0
    step = b // f if f <= b else 0
    total = g * n
    for t in range(blocks):
        q0, q1 = max(t * b, g), min(n, (t + 1) * b)
        if q1 <= q0:
            continue
        k0, k1 = max(0, (t - 1) * b, g), min(n, (t + 2) * b)
        keys = max(0, k1 - k0) + g
        if sparse and step > 0:
            valid = -(-n // f)  # compressed positions whose group starts before n
            sb = p.sparse_block_size
            for c0, c1 in (((t - 1) * step - sb, (t - 1) * step), ((t + 2) * step, (t + 2) * step + sb)):
                keys += max(0, min(c1, valid) - max(c0, 0))
        total += (q1 - q0) * keys
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
