"""Useful-tile fraction of the LSG launchers: how much of the work of the tiles they execute is
(query, key) pairs the pattern asks for.

    python -m bench.tiles [--n 16384] [--block-size 128] [--sparsity-factor 2] [--global-tokens 1]

Definition.  A kernel executes *tiles*: one inner-loop iteration, ``BLOCK_M`` query rows x
``BLOCK_N`` keys (forward, dq, the dense passes) or ``BLOCK_N`` keys x ``BLOCK_M`` rows (dk/dv), for
one query head.  Its *capacity* is ``BLOCK_M · BLOCK_N`` (query, key) pairs.  Its *useful* pairs are the pairs
inside it that the pattern asks for (:mod:`lhattn.reference.lsg`: the direct mask
``lsg_direct_mask`` plus the two compressed-key windows ``lsg_sparse_masks``; a compressed key in
both windows of a row counts once per tile that computes it; padding and the selection's validity
are data, not modelled: every key counts as valid).  The useful-tile fraction of a launch set is
``sum(useful) / sum(capacity)`` over every tile of every program of every launch.

Which tiles run is taken from the launches themselves: :func:`count` walks, for each recorded
launch (kernel, keyword arguments, block sizes), the same programs and loop bounds as the kernel
(the grid the launcher builds, :func:`kernels._core.block_range`, the compressed-key windows and
row spans, the dense passes' key chunks).  :func:`record_lsg` records the launches of
:func:`kernels.lsg.lsg_fwd` / :func:`kernels.lsg.lsg_bwd` (under the interpreter: the interpreter's
block sizes; compiled: the autotuner's first kept config, which ``bench.sm90`` also reports).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import types
from typing import Iterable, List, Optional, Tuple

import torch


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass
class Count:
    tiles: int = 0
    capacity: int = 0
    useful: int = 0

    def add(self, other: "Count", times: int = 1) -> None:
        self.tiles += other.tiles * times
        self.capacity += other.capacity * times
        self.useful += other.useful * times

    @property
    def fraction(self) -> float:
        return self.useful / self.capacity if self.capacity else 1.0

    def as_dict(self) -> dict:
        return dict(tiles=self.tiles, capacity=self.capacity, useful=self.useful, fraction=round(self.fraction, 4))


# --------------------------------------------------------------------------------------
# the kernels' host-visible arithmetic, in Python
# --------------------------------------------------------------------------------------


def block_range(start, before, after, k_begin, k_end, bs, bo):
    """:func:`kernels._core.block_range`."""
    lo = max(start - before, k_begin) // bo * bo
    hi = max(min(start + bs + after, k_end), lo)
    hi_up = _cdiv(hi, bo) * bo
    full_lo = _cdiv(max(start + bs - 1 - before, k_begin), bo) * bo
    full_lo = min(max(full_lo, lo), hi_up)
    full_hi = min(start + after + 1, k_end) // bo * bo
    full_hi = max(full_hi, full_lo)
    return lo, full_lo, full_hi, hi


def _steps(lo: int, hi: int, step: int) -> range:
    return range(lo, hi, step) if hi > lo else range(0)


def _overlap(a0: int, a1: int, b0: int, b1: int) -> int:
    return max(0, min(a1, b1) - max(a0, b0))


def _window(base, lo, hi, n_c):
    c_begin = min(max(base + lo, 0), n_c)
    return c_begin, max(min(base + hi, n_c), c_begin)


def _block_span(p_first, p_last, w_lo, w_hi, s, n_blocks):
    """:func:`kernels.lsg._block_span` (Python's ``//`` floors: no wrap needed)."""
    t_lo = max((p_first - w_hi) // s + 1, 0)
    t_hi = min((p_last - w_lo) // s + 1, n_blocks)
    if t_hi <= t_lo or w_hi <= w_lo:
        return 0, 0
    return t_lo, t_hi


def _band_rows_keys(i0, i1, j0, j1, left, right):
    """Pairs ``(i, j)``, ``i0 <= i < i1``, ``j0 <= j < j1``, with ``i - left <= j <= i + right``."""
    total = 0
    for i in range(i0, i1):
        total += _overlap(j0, j1, i - left, i + right + 1)
    return total


# --------------------------------------------------------------------------------------
# per kernel: the tiles of one (batch, head) slice of the grid
# --------------------------------------------------------------------------------------


def _rows_cols(bm, bn, kw):
    return kw.get("BLOCK_M", bm), kw.get("BLOCK_N", bn)


def _lsg_rows_kernel(kw, bm, bn) -> Count:
    """``_lsg_fwd_kernel`` / ``_lsg_bwd_dq_kernel``: one program = BM rows of one LSG block; the global
    keys on ``BLOCK_N`` tiles like the other key sources."""
    n, g, o, bs = kw["n"], kw["n_global"], kw["block_offset"], kw["block_size"]
    causal, big = kw["CAUSAL"], kw["big"]
    n_blocks = _cdiv(n - o, bs)
    c = Count()
    for i_blk in range(n_blocks * _cdiv(bs, bm)):
        i_t, sub = divmod(i_blk, _cdiv(bs, bm))
        t_start = o + i_t * bs
        start = t_start + sub * bm
        r_begin, r_end = max(t_start, g), min(t_start + bs, n)
        if start >= r_end or start + bm <= r_begin:
            continue
        rows = (max(start, r_begin), min(start + bm, r_end))
        n_rows = rows[1] - rows[0]
        k_begin = max(t_start - bs, g)
        g_end = g
        if kw.get("BLOCK_ALIGN", 0) >= bn:  # the aligned band: its first tile takes the global keys [g_end, g)
            g_end = g // bn * bn if t_start - bs < g else g
            k_begin = max(t_start - bs, g_end)
        if causal:
            k_end, after = max(min(t_start + bs, n), k_begin), 0
        else:
            k_end, after = max(min(t_start + 2 * bs, n), k_begin), big
        lo, flo, fhi, hi = block_range(start, big, after, k_begin, k_end, bm, bn)
        for a, b in ((lo, flo), (flo, fhi), (fhi, hi)):
            for j0 in _steps(a, b, bn):
                c.tiles += 1
                c.capacity += bm * bn
                if causal:  # j <= i
                    c.useful += _band_rows_keys(rows[0], rows[1], max(j0, k_begin), min(j0 + bn, k_end), big, 0)
                else:
                    c.useful += n_rows * _overlap(j0, j0 + bn, k_begin, k_end)
        if kw["HAS_SPARSE"]:
            s = kw["sparse_step"]
            sides = [(kw["left_lo"], kw["left_hi"])] + ([] if causal else [(kw["right_lo"], kw["right_hi"])])
            for w_lo, w_hi in sides:
                c_begin, c_end = _window(i_t * s, w_lo, w_hi, kw["n_c"])
                for j0 in _steps(c_begin, c_end, bn):
                    c.tiles += 1
                    c.capacity += bm * bn
                    c.useful += n_rows * _overlap(j0, j0 + bn, c_begin, c_end)
        for j0 in _steps(0, g_end, bn):
            c.tiles += 1
            c.capacity += bm * bn
            c.useful += n_rows * _overlap(j0, j0 + bn, 0, g_end)
    return c


def _lsg_dkdv_local(kw, bm, bn) -> Count:
    """``_lsg_bwd_dkdv_local_kernel``: one program = BN keys of one block, per query head BM rows a step."""
    n, g, o, bs = kw["n"], kw["n_global"], kw["block_offset"], kw["block_size"]
    causal, big, heads = kw["CAUSAL"], kw["big"], kw["heads_per_kv"]
    n_blocks = _cdiv(n - o, bs)
    c = Count()
    for i_blk in range(n_blocks * _cdiv(bs, bn)):
        i_u, sub = divmod(i_blk, _cdiv(bs, bn))
        u_start = o + i_u * bs
        start = u_start + sub * bn
        c_begin, c_end = max(u_start, g), min(u_start + bs, n)
        if start >= c_end or start + bn <= c_begin:
            continue
        keys = (max(start, c_begin), min(start + bn, c_end))
        if causal:
            r_begin, after = max(u_start, g), 0
        else:
            r_begin, after = max(u_start - bs, g), big
        r_end = min(u_start + 2 * bs, n)
        lo, flo, fhi, hi = block_range(start, after, big, r_begin, r_end, bn, bm)
        for a, b in ((lo, flo), (flo, fhi), (fhi, hi)):
            for i0 in _steps(a, b, bm):
                c.tiles += heads
                c.capacity += heads * bm * bn
                i1 = min(i0 + bm, r_end)
                i0c = max(i0, r_begin)
                if causal:  # rows i >= j
                    u = _band_rows_keys(i0c, i1, keys[0], keys[1], big, 0) if i1 > i0c else 0
                else:
                    u = max(0, i1 - i0c) * (keys[1] - keys[0])
                c.useful += heads * u
    return c


def _lsg_dkdv_sparse(kw, bm, bn) -> Count:
    """``_lsg_bwd_dkdv_sparse_kernel``: one program = BN compressed keys, two row spans."""
    n, g, o, bs, n_c = kw["n"], kw["n_global"], kw["block_offset"], kw["block_size"], kw["n_c"]
    causal, heads, s = kw["CAUSAL"], kw["heads_per_c"], kw["sparse_step"]
    wins = [(kw["left_lo"], kw["left_hi"])] + ([] if causal else [(kw["right_lo"], kw["right_hi"])])
    n_blocks = _cdiv(n - o, bs)
    c = Count()
    for i_n in range(_cdiv(n_c, bn)):
        p_first, p_last = i_n * bn, min(i_n * bn + bn, n_c) - 1
        ta = _block_span(p_first, p_last, wins[0][0], wins[0][1], s, n_blocks)
        tb = ta if causal else _block_span(p_first, p_last, wins[1][0], wins[1][1], s, n_blocks)
        if causal:
            tb = (ta[0], ta[0])
        t1, t2 = (tb, ta) if tb[0] < ta[0] else (ta, tb)
        t2 = (max(t2[0], t1[1]), max(t2[1], max(t2[0], t1[1])))
        spans = []
        for t_lo, t_hi in (t1, t2)[:1 if causal else 2]:
            r_lo = max(o + t_lo * bs, g)
            spans.append((r_lo, max(min(o + t_hi * bs, n), r_lo)))
        for r_lo, r_hi in spans:
            for i0 in _steps(r_lo, r_hi, bm):
                c.tiles += heads
                c.capacity += heads * bm * bn
                u = 0
                for i in range(i0, min(i0 + bm, r_hi)):  # |tile ∩ (left ∪ right)| of the row's block
                    t = (i - o) // bs
                    iv = [_window(t * s, w_lo, w_hi, n_c) for w_lo, w_hi in wins]
                    for a, b in iv:
                        u += _overlap(a, b, p_first, p_last + 1)
                    if len(iv) == 2:
                        u -= _overlap(max(iv[0][0], iv[1][0]), min(iv[0][1], iv[1][1]), p_first, p_last + 1)
                c.useful += heads * u
    return c


def _sw_rows_kernel(kw, bm, bn) -> Count:
    """``_sw_fwd_kernel`` / ``_sw_bwd_dq_kernel`` (dilation 1, as LSG's dense passes call them)."""
    assert kw["dilation"] == 1
    n_q, n_k, left, right, chunk, n_split = kw["n_q"], kw["n_k"], kw["left"], kw["right"], kw["chunk"], kw["n_split"]
    c = Count()
    for i_m in range(_cdiv(n_q, bm)):
        for i_s in range(n_split):
            k_begin, k_end = i_s * chunk, min(n_k, i_s * chunk + chunk)
            lo, flo, fhi, hi = block_range(i_m * bm, left, right, k_begin, k_end, bm, bn)
            for a, b in ((lo, flo), (flo, fhi), (fhi, hi)):
                for j0 in _steps(a, b, bn):
                    c.tiles += 1
                    c.capacity += bm * bn
                    c.useful += _band_rows_keys(i_m * bm, min(i_m * bm + bm, n_q), max(j0, k_begin),
                                                min(j0 + bn, k_end), left, right)
            n_glob = kw.get("n_glob", 0)
            for _ in _steps(0, n_glob if kw.get("HAS_GLOBAL") else 0, bn):
                raise NotImplementedError("global key lists of the sliding-window kernels")
    return c


def _sw_dkdv(kw, bm, bn) -> Count:
    """``_sw_bwd_dkdv_kernel`` (dilation 1)."""
    assert kw["dilation"] == 1
    n_q, n_k, left, right, heads = kw["n_q"], kw["n_k"], kw["left"], kw["right"], kw["heads_per_kv"]
    c = Count()
    for i_n in range(_cdiv(n_k, bn)):
        j0, j1 = i_n * bn, min(i_n * bn + bn, n_k)
        lo, flo, fhi, hi = block_range(i_n * bn, right, left, 0, n_q, bn, bm)
        for a, b in ((lo, flo), (flo, fhi), (fhi, hi)):
            for i0 in _steps(a, b, bm):
                c.tiles += heads
                c.capacity += heads * bm * bn
                c.useful += heads * _band_rows_keys(i0, min(i0 + bm, n_q), j0, j1, left, right)
    return c


def _sw_dkdv_global(kw, bm, bn) -> Count:
    """``_sw_bwd_dkdv_global_kernel``: BN listed keys x one chunk of rows, BM rows a step."""
    n_q, n_glob, chunk, n_split, heads = kw["n_q"], kw["n_glob"], kw["chunk"], kw["n_split"], kw["heads_per_kv"]
    c = Count()
    for i_n in range(_cdiv(n_glob, bn)):
        slots = _overlap(i_n * bn, i_n * bn + bn, 0, n_glob)
        for i_s in range(n_split):
            r_begin, r_end = i_s * chunk, min(n_q, i_s * chunk + chunk)
            for i0 in _steps(r_begin, r_end, bm):
                c.tiles += heads
                c.capacity += heads * bm * bn
                c.useful += heads * slots * (min(i0 + bm, r_end) - i0)
    return c


def _lsg_global_rows(kw, bm, bn) -> Count:
    """``_lsg_global_rows_fwd_kernel`` / ``_dq_kernel``: the g global rows (one BM tile) x one key chunk."""
    n, g, chunk = kw["n"], kw["n_global"], kw["chunk"]
    c = Count()
    for i_s in range(_cdiv(n, chunk)):
        k_begin, k_end = i_s * chunk, min(n, i_s * chunk + chunk)
        k_full = k_begin + (k_end - k_begin) // bn * bn
        for a, b in ((k_begin, k_full), (k_full, k_end)):
            for j0 in _steps(a, b, bn):
                c.tiles += 1
                c.capacity += bm * bn
                c.useful += g * _overlap(j0, j0 + bn, k_begin, k_end)
    return c


def _lsg_global_rows_dkdv(kw, bm, bn) -> Count:
    """``_lsg_global_rows_dkdv_kernel``: BN keys x the g global rows (one BM step per query head)."""
    n, g, heads = kw["n"], kw["n_global"], kw["heads_per_kv"]
    c = Count()
    for i_n in range(_cdiv(n, bn)):
        for i0 in _steps(0, g, bm):
            c.tiles += heads
            c.capacity += heads * bm * bn
            c.useful += heads * _overlap(i0, i0 + bm, 0, g) * _overlap(i_n * bn, i_n * bn + bn, 0, n)
    return c


KERNELS = {
    "_lsg_global_rows_fwd_kernel": ("fwd", _lsg_global_rows, lambda kw: kw["Q"].shape[:2]),
    "_lsg_global_rows_dq_kernel": ("bwd", _lsg_global_rows, lambda kw: kw["Q"].shape[:2]),
    "_lsg_global_rows_dkdv_kernel": ("bwd", _lsg_global_rows_dkdv, lambda kw: kw["K"].shape[:2]),
    "_lsg_fwd_kernel": ("fwd", _lsg_rows_kernel, lambda kw: kw["Q"].shape[:2]),
    "_lsg_bwd_dq_kernel": ("bwd", _lsg_rows_kernel, lambda kw: kw["Q"].shape[:2]),
    "_lsg_bwd_dkdv_local_kernel": ("bwd", _lsg_dkdv_local, lambda kw: kw["K"].shape[:2]),
    "_lsg_bwd_dkdv_sparse_kernel": ("bwd", _lsg_dkdv_sparse, lambda kw: kw["KC"].shape[:2]),
    "_sw_fwd_kernel": ("fwd", _sw_rows_kernel, lambda kw: kw["Q"].shape[:2]),
    "_sw_bwd_dq_kernel": ("bwd", _sw_rows_kernel, lambda kw: kw["Q"].shape[:2]),
    "_sw_bwd_dkdv_kernel": ("bwd", _sw_dkdv, lambda kw: kw["K"].shape[:2]),
    "_sw_bwd_dkdv_global_kernel": ("bwd", _sw_dkdv_global, lambda kw: kw["K"].shape[:2]),
}
"""kernel name -> (pass, tile walker of one (batch, head) slice, (B, heads of the grid))."""


def count(launches: Iterable[Tuple[str, dict, Tuple[int, int]]]) -> dict:
    """``{"fwd": Count, "bwd": Count, "total": Count, "kernels": {name: Count}, "other": [names]}`` over
    ``(kernel name, launch keywords, (BLOCK_M, BLOCK_N))`` launches (the keywords' own
    ``BLOCK_M`` / ``BLOCK_N`` win, as in a plain launch)."""
    out = {"fwd": Count(), "bwd": Count(), "total": Count(), "kernels": {}, "other": []}
    for name, kw, (bm, bn) in launches:
        if name not in KERNELS:  # merges / partial sums: no attention tiles
            out["other"].append(name)
            continue
        pas, walk, grid_heads = KERNELS[name]
        bm, bn = _rows_cols(bm, bn, kw)
        b, h = grid_heads(kw)
        one = walk(kw, bm, bn)
        per = out["kernels"].setdefault(name, Count())
        per.add(one, b * h)
        out[pas].add(one, b * h)
        out["total"].add(one, b * h)
    return out


def as_json(result: dict) -> dict:
    return {"definition": "useful (query, key) pairs / (BLOCK_M x BLOCK_N) capacity of every executed tile",
            **{k: result[k].as_dict() for k in ("fwd", "bwd", "total")},
            "kernels": {k: v.as_dict() for k, v in result["kernels"].items()}, "not_counted": result["other"]}


# --------------------------------------------------------------------------------------
# recording the LSG launchers' launches
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def recording():
    """Replace Triton's launch entry points (compiled, autotuned and interpreted) by a recorder;
    yields the list of ``(kernel name, keywords, (BLOCK_M, BLOCK_N) or None, kept configs)``."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction
    launches: list = []

    def tuned_run(self, *args, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        self.nargs = dict(zip(self.arg_names, args))
        kept = list(self.prune_configs(kwargs))
        self.nargs = None
        c0 = kept[0].kwargs
        launches.append((self.fn.__name__, kwargs, (c0.get("BLOCK_M", 0), c0.get("BLOCK_N", 0)), kept))

    def plain_run(self, *args, grid, warmup, **kwargs):
        name = getattr(self, "__name__", None)
        name = name if isinstance(name, str) else self.fn.__name__
        launches.append((name, kwargs, (kwargs.get("BLOCK_M", 0), kwargs.get("BLOCK_N", 0)), None))

    saved = [(Autotuner, "run", Autotuner.run), (JITFunction, "run", JITFunction.run)]
    Autotuner.run = tuned_run
    JITFunction.run = plain_run
    try:
        from triton.runtime.interpreter import InterpretedFunction
        saved.append((InterpretedFunction, "run", InterpretedFunction.run))
        InterpretedFunction.run = plain_run
    except ImportError:  # pragma: no cover
        pass
    props = torch.cuda.get_device_properties
    torch.cuda.get_device_properties = lambda *a, **k: types.SimpleNamespace(multi_processor_count=132)
    try:
        yield launches
    finally:
        for cls, name, fn in saved:
            setattr(cls, name, fn)
        torch.cuda.get_device_properties = props


def record_lsg(n: int, *, batch: int = 4, heads: int = 16, head_dim: int = 64, dtype=torch.bfloat16,
               block_size: int = 128, sparse_block_size: int = 128, sparsity_factor: int = 2,
               num_global_tokens: int = 1, block_offset: int = 0, causal: bool = False,
               device: str = "meta") -> List[Tuple[str, dict, Tuple[int, int]]]:
    """The launches of one :func:`kernels.lsg.lsg_fwd` + :func:`kernels.lsg.lsg_bwd` call (regular
    windows, all compressed keys valid, no padding), as :func:`count` takes them."""
    from kernels.lsg import lsg_bwd, lsg_fwd
    q = torch.empty((batch, heads, n, head_dim), dtype=dtype, device=device)
    n_c = _cdiv(n - block_offset, block_size) * (block_size // sparsity_factor)
    kc = torch.empty((batch, heads, n_c, head_dim), dtype=dtype, device=device)
    sv = torch.ones((batch, 1, n_c), dtype=torch.bool, device=device)
    lse = torch.empty((batch, heads, n), dtype=torch.float32, device=device)
    kw = dict(block_size=block_size, sparse_block_size=sparse_block_size, sparsity_factor=sparsity_factor,
              num_global_tokens=num_global_tokens, block_offset=block_offset, causal=causal,
              sparse_windows=((-(block_size // sparsity_factor) - sparse_block_size, -(block_size // sparsity_factor)),
                              (2 * (block_size // sparsity_factor),
                               2 * (block_size // sparsity_factor) + sparse_block_size)))
    with recording() as launches:
        lsg_fwd(q, q, q, kc, kc, sv, **kw)
        lsg_bwd(q, q, q, q, q, lse, kc, kc, sv, **kw)
    return [(name, kwargs, blocks) for name, kwargs, blocks, _ in launches]


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--sparse-block-size", type=int, default=128)
    p.add_argument("--sparsity-factor", type=int, default=2)
    p.add_argument("--global-tokens", type=int, default=1)
    p.add_argument("--causal", action="store_true")
    a = p.parse_args(argv)
    res = count(record_lsg(a.n, batch=a.batch, heads=a.heads, head_dim=a.head_dim, block_size=a.block_size,
                           sparse_block_size=a.sparse_block_size, sparsity_factor=a.sparsity_factor,
                           num_global_tokens=a.global_tokens, causal=a.causal))
    print(json.dumps(as_json(res), indent=1))


if __name__ == "__main__":
    main()
