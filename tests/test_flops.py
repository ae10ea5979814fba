"""bench/flops.py: the LSG pair count equals the reference's masks (lhattn.reference.lsg), both geometries."""

from __future__ import annotations

import pytest

import lhattn
from bench.flops import visible_pairs
from lhattn.reference.lsg import lsg_direct_mask, lsg_sparse_masks
from lhattn.selection import compressed_length

# (n, block, sparse block, factor, layout, globals, causal): regular, one-sided, shifted and overlapping windows
CASES = [(67, 8, 8, 2, "inline", 1, False), (67, 8, 8, 2, "prepended", 2, False),
         (61, 6, 6, 3, "inline", 2, False), (50, 4, 4, 4, "prepended", 1, False),
         (53, 6, 2, 1, "prepended", 1, False), (45, 8, 3, 1, "prepended", 2, False),
         (49, 8, 2, 2, "prepended", 3, True), (40, 3, 3, 3, "inline", 1, True), (20, 8, 8, 2, "prepended", 5, False)]


def _mask_pairs(p: lhattn.LSG, n: int) -> int:
    """Visible (query, key) pairs from the reference's dense masks, a compressed key in both
    windows counted twice; compressed keys whose group starts at or beyond n left out."""
    t_c = (n - p.block_offset) if p.sparsity_factor == 1 else compressed_length(n, p)
    valid = -(-(n - p.block_offset) // p.sparsity_factor)
    left, right = lsg_sparse_masks(n, t_c, p)
    return int(lsg_direct_mask(n, p).sum() + left[:, :valid].sum() + right[:, :valid].sum())


@pytest.mark.parametrize("geometry", ["reference", "regular"])
@pytest.mark.parametrize("n,b,sb,f,layout,g,causal", CASES)
def test_lsg_pairs_match_reference_masks(n, b, sb, f, layout, g, causal, geometry):
    p = lhattn.LSG(block_size=b, sparse_block_size=sb, sparsity_factor=f, sparsity_type="pooling", num_global_tokens=g,
                   causal=causal, global_layout=layout, sparse_geometry=geometry)
    assert visible_pairs(p, n) == _mask_pairs(p, n)
