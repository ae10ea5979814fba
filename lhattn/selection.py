"""LSG sparse selection: the compressed keys and values that LSG attends to beyond the local blocks.

Every :data:`~lhattn.patterns.SPARSITY_TYPES` entry turns the *blocked sequence* -- tokens
``[o, N)`` with ``o = pattern.block_offset``, padded at the end to ``T_pad = ceil((N - o) / b) * b``
tokens -- into a compressed sequence of ``T_c = T_pad / f`` keys and values (``b`` = block_size,
``f`` = sparsity_factor, ``s = b / f`` compressed keys per block).  A token is *usable* when it is
neither padding (``key_padding_mask``), nor one of the ``g`` global tokens, nor past the end.
Per type, for compressed position ``p`` (``0 <= p < T_c``) and kv head ``h``:

* ``pooling``: the mean of the usable keys/values among tokens ``o + [p·f, (p+1)·f)``, computed
  as LSG does: ``sum / (count + 1e-6)``, the denominator rounded to float32 for the prepended
  layout (the model files add ``1e-6`` to an integer count: a float32 result, also for fp64 inputs)
  and in the accumulation dtype (fp32, fp64 for fp64) inline (``attention_layers``).  Valid iff
  ``count > 0``.
* ``stride``: token ``o + p·f + (h mod f)``.  Valid iff that token is usable.
* ``block_stride``: block ``β = p // s``, slot ``r = p % s``: token ``o + β·b + ((r + h·s) mod b)``.
* ``norm``: per chunk of ``c = min(b, sb)`` tokens, the ``c / f`` usable tokens with the largest
  ``‖k‖`` (unusable ones fill the remaining slots, masked), in ascending order of norm.  Exactly:
  the score is ``‖k‖²`` summed left to right over ``D`` in fp32 (fp64 for fp64), each product and
  sum rounded separately; ranks go by score descending, NaN first, ties to the *lower* position
  (LSG's ``torch.topk`` leaves tie order unspecified), and the kept ones are listed in reverse rank
  order.  ``impl="ops"`` runs it as one fused op, :func:`lhattn._lsg_ops.lsg_norm_select` (score,
  top-k and the gather of ``k`` and ``v``; same bits), for ``c <= 1024``.
* ``bos_pooling``: as ``pooling`` but a weighted sum, with weights ``softmax`` over the group's
  non-padding tokens (global ones included, as in LSG) of ``scale · q[o] · k_j``, per *query*
  head (the compressed keys then have ``H`` heads, not ``H_kv``).  Valid iff the group has a usable
  token.
* ``lsh``: per chunk of ``c`` tokens, usable keys/values are summed into buckets by
  ``lsh_num_pre_rounds`` rounds of ``c`` buckets then one round of ``m = c / f`` buckets; a bucket
  is ``argmax([x·R, -x·R])`` of the normalised (running-sum) key ``x`` and a Gaussian
  ``R [D, bins // 2]`` per kv head, drawn from ``torch.Generator().manual_seed(pattern.seed)`` in
  LSG's order.  Output: ``sum / (count + 1e-8)``; valid iff ``count > 0``.  When ``m == 1`` LSG uses
  ``bos_pooling`` instead, and so do we.
* ``f == 1`` (any type): the blocked sequence itself; ``none`` or ``sparse_block_size == 0``: None.

Only ``pooling``, ``bos_pooling`` and ``lsh`` mix rows; indices are computed without gradient and
rows are moved with :func:`lhattn._ops.gather_rows` / :func:`lhattn._ops.scatter_add_rows`
(``impl="ops"``) or their ``torch.gather`` / ``scatter_add`` equivalents (``impl="torch"``, used by
the oracle so that it does not depend on the C++ extension).  Everything is differentiable in
``k``, ``v`` (and ``q`` for ``bos_pooling``) exactly like LSG's own computation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .patterns import LSG

__all__ = ["SparseKV", "select_sparse", "usable_tokens", "compressed_length", "padded_length", "lsh_projections"]

IMPLS = ("ops", "torch")
_FUSED_MAX_CHUNK = 1024  # lhattn._lsg_ops.MAX_CHUNK (not imported here: the oracle needs no extension)


@dataclass
class SparseKV:
    """The compressed sequence.

    k, v: ``[B, Hc, Tc, D]`` with ``Hc = H_kv`` (``H`` for ``bos_pooling``);
    valid: ``[B, Hv, Tc]`` bool, ``Hv in {1, Hc}``; True = the compressed key may be attended to.
    """

    k: Tensor
    v: Tensor
    valid: Tensor


def padded_length(n: int, pattern: LSG) -> int:
    """``T_pad``: length of the blocked sequence ``[o, n)`` rounded up to a multiple of block_size."""
    t = max(n - pattern.block_offset, 0)
    return -(-t // pattern.block_size) * pattern.block_size


def compressed_length(n: int, pattern: LSG) -> int:
    """``T_c = T_pad / sparsity_factor`` (the rows of :class:`SparseKV` for ``f > 1``)."""
    return padded_length(n, pattern) // pattern.sparsity_factor


def usable_tokens(key_padding_mask: Optional[Tensor], pattern: LSG, batch: int, n: int, device) -> Tensor:
    """``[B, n]`` bool: not padding and not one of the first ``num_global_tokens`` tokens."""
    usable = torch.ones(batch, n, dtype=torch.bool, device=device)
    if key_padding_mask is not None:
        usable = usable & ~key_padding_mask
    usable[:, : pattern.num_global_tokens] = False
    return usable


# ---- row movers -------------------------------------------------------------------------------


def _movers(impl: str) -> tuple[Callable, Callable]:
    """``(gather(x, idx), scatter_add(src, idx, n))`` with the conventions of :mod:`lhattn._ops`:
    ``x [B, H, N, D]``, ``idx [B, Hi, M]`` int64 (``Hi in {1, H}``), -1 = empty (zero) slot."""
    if impl == "ops":
        from . import _ops

        return _ops.gather_rows, _ops.scatter_add_rows
    if impl != "torch":
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")

    def gather(x: Tensor, idx: Tensor) -> Tensor:
        b, h, _, d = x.shape
        safe = idx.clamp(min=0).expand(b, h, -1)
        out = torch.gather(x, 2, safe[..., None].expand(-1, -1, -1, d))
        return out * (idx >= 0)[..., None].to(x.dtype)

    def scatter_add(src: Tensor, idx: Tensor, n: int) -> Tensor:
        b, h, m, d = src.shape
        keep = (idx >= 0).expand(b, h, m)
        src = src * keep[..., None].to(src.dtype)
        safe = idx.clamp(min=0).expand(b, h, m)
        zero = src.new_zeros(b, h, n, d)
        return zero.scatter_add(2, safe[..., None].expand(-1, -1, -1, d), src)

    return gather, scatter_add


def _beyond_end(idx: Tensor, t: int) -> Tensor:
    """Indices ``>= t`` (the end padding of the blocked sequence) become -1 (empty slots)."""
    return torch.where(idx < t, idx, torch.full_like(idx, -1))


def _pick_usable(usable: Tensor, idx: Tensor) -> Tensor:
    """``usable [B, T]`` at ``idx [B|1, Hi, M]`` (-1 -> False) -> ``[B, Hi, M]``."""
    b = usable.shape[0]
    idx = idx.expand(b, -1, -1)
    u = torch.gather(usable[:, None, :].expand(-1, idx.shape[1], -1), 2, idx.clamp(min=0))
    return u & (idx >= 0)


# ---- the sparsity types -------------------------------------------------------------------------


def _stride(k, v, usable, pattern, gather, scatter_add, t_c, **_):
    f, h_kv, t = pattern.sparsity_factor, k.shape[1], k.shape[2]
    p = torch.arange(t_c, device=k.device)
    idx = p[None, :] * f + (torch.arange(h_kv, device=k.device) % f)[:, None]  # [H_kv, Tc]
    idx = _beyond_end(idx, t)[None].expand(k.shape[0], -1, -1)
    return SparseKV(gather(k, idx), gather(v, idx), _pick_usable(usable, idx))


def _block_stride(k, v, usable, pattern, gather, scatter_add, t_c, **_):
    b, f, h_kv, t = pattern.block_size, pattern.sparsity_factor, k.shape[1], k.shape[2]
    s = b // f
    p = torch.arange(t_c, device=k.device)
    hh = torch.arange(h_kv, device=k.device)[:, None]
    idx = (p // s)[None, :] * b + ((p % s)[None, :] + hh * s) % b  # [H_kv, Tc]
    idx = _beyond_end(idx, t)[None].expand(k.shape[0], -1, -1)
    return SparseKV(gather(k, idx), gather(v, idx), _pick_usable(usable, idx))


def _norm_score(k: Tensor) -> Tensor:
    """``[B, H_kv, T]``: the squared key norm ``Σ_d k[..., d]²``, summed left to right over ``d`` in
    fp32 (fp64 for fp64) with every product and sum rounded on its own -- the exact bits of the fused
    op's score, on any device (a reduction kernel's summation order is unspecified)."""
    acc = torch.float64 if k.dtype == torch.float64 else torch.float32
    kf = k.detach().to(acc)
    score = torch.zeros(kf.shape[:-1], dtype=acc, device=k.device)
    for d in range(kf.shape[-1]):
        x = kf[..., d]
        score.add_(x * x)  # two roundings: the product, then the sum
    return score


def _norm(k, v, usable, pattern, gather, scatter_add, t_c, t_pad, impl="torch", **_):
    f, t = pattern.sparsity_factor, k.shape[2]
    c = min(pattern.block_size, pattern.sparse_block_size)
    if impl == "ops" and c <= _FUSED_MAX_CHUNK:  # one fused op: scores + top-k + gather of k and v
        from . import _lsg_ops

        ks, vs, idx = _lsg_ops.lsg_norm_select(k, v, ~usable, chunk=c, keep=c // f, num_chunks=t_pad // c)
        return SparseKV(ks, vs, _pick_usable(usable, idx))
    with torch.no_grad():
        score = _norm_score(k)  # [B, H_kv, T]
        score = torch.where(usable[:, None, :], score, torch.full_like(score, -1.0))  # unusable last
        score = F.pad(score, (0, t_pad - t), value=-1.0).view(*score.shape[:2], t_pad // c, c)
        # The c / f best by (score descending, NaN first, position ascending): a stable sort, as
        # torch.topk's tie order is unspecified.  Then ascending score, LSG's order.
        top = score.sort(dim=-1, descending=True, stable=True).indices[..., : c // f].flip(-1)
        idx = top + torch.arange(0, t_pad, c, device=k.device)[:, None]
        idx = _beyond_end(idx.flatten(2), t)  # [B, H_kv, Tc]
    return SparseKV(gather(k, idx), gather(v, idx), _pick_usable(usable, idx))


def _group_index(t: int, f: int, device) -> Tensor:
    """``[1, 1, T]``: token j of the blocked sequence belongs to group ``j // f``."""
    return (torch.arange(t, device=device) // f)[None, None]


def _pooling(k, v, usable, pattern, gather, scatter_add, t_c, t_pad, **_):
    f, t = pattern.sparsity_factor, k.shape[2]
    w = usable[:, None, :, None].to(k.dtype)  # [B, 1, T, 1]
    grp = _group_index(t, f, k.device).expand(k.shape[0], -1, -1)
    count = F.pad(usable, (0, t_pad - t)).view(usable.shape[0], t_c, f).sum(-1)  # [B, Tc]
    acc = torch.float64 if k.dtype == torch.float64 else torch.float32
    # LSG's formula; fp32+ so that 1e-6 survives.  The model files (prepended) add it to an int64
    # count, which makes a float32 denominator even for fp64 inputs; attention_layers adds it in
    # the input's dtype.
    eps_dtype = torch.float32 if pattern.global_layout == "prepended" else acc
    denom = (count.to(eps_dtype) + 1e-6).to(acc)[:, None, :, None]
    kc = (scatter_add(k * w, grp, t_c).to(acc) / denom).to(k.dtype)
    vc = (scatter_add(v * w, grp, t_c).to(acc) / denom).to(v.dtype)
    return SparseKV(kc, vc, (count > 0)[:, None, :])


def _bos_pooling(k, v, usable, pattern, gather, scatter_add, t_c, t_pad, q0, nonpad, scale, **_):
    f, t = pattern.sparsity_factor, k.shape[2]
    bsz, h, _ = q0.shape
    h_kv = k.shape[1]
    acc = torch.float64 if k.dtype == torch.float64 else torch.float32
    kq = k.repeat_interleave(h // h_kv, dim=1) if h != h_kv else k  # [B, H, T, D]
    vq = v.repeat_interleave(h // h_kv, dim=1) if h != h_kv else v
    sc = torch.einsum("bhd,bhtd->bht", q0.to(acc), kq.to(acc)) * scale  # [B, H, T]
    sc = sc.masked_fill(~nonpad[:, None, :], float("-inf"))
    sc = F.pad(sc, (0, t_pad - t), value=float("-inf")).view(bsz, h, t_c, f)
    wts = torch.softmax(sc, dim=-1)
    wts = torch.where(torch.isinf(sc).all(-1, keepdim=True), torch.zeros_like(wts), wts)
    wts = wts.flatten(2)[..., :t, None].to(k.dtype)  # [B, H, T, 1]
    grp = _group_index(t, f, k.device).expand(bsz, -1, -1)
    count = F.pad(usable, (0, t_pad - t)).view(bsz, t_c, f).sum(-1)
    return SparseKV(scatter_add(kq * wts, grp, t_c), scatter_add(vq * wts, grp, t_c), (count > 0)[:, None, :])


def lsh_projections(pattern: LSG, h_kv: int, d: int, bins: list[int]) -> list[Tensor]:
    """The random projections of every ``lsh`` round: ``[1, H_kv, 1, D, bins_r // 2]`` float32 on
    the CPU, drawn in LSG's order from ``torch.Generator().manual_seed(pattern.seed)`` -- so
    ``torch.manual_seed(pattern.seed)`` right before an LSG ``lsh`` call reproduces them."""
    gen = torch.Generator().manual_seed(pattern.seed)
    return [torch.randn(1, h_kv, 1, d, m // 2, generator=gen) for m in bins]


def _lsh(k, v, usable, pattern, gather, scatter_add, t_c, t_pad, **kw):
    f, t = pattern.sparsity_factor, k.shape[2]
    c = min(pattern.block_size, pattern.sparse_block_size)
    m = c // f
    if m == 1:
        return _bos_pooling(k, v, usable, pattern, gather, scatter_add, t_c, t_pad, **kw)
    bsz, h_kv, _, d = k.shape
    acc = torch.float64 if k.dtype == torch.float64 else torch.float32
    w = usable[:, None, :, None].to(k.dtype)
    ks, vs = k * w, v * w  # running bucket sums, [B, H_kv, rows, D]; rows = chunks * slots
    count = usable[:, None, :].to(acc).expand(-1, h_kv, -1)  # [B, H_kv, T]
    chunk = torch.arange(t, device=k.device) // c  # chunk of each row
    bins = [c] * pattern.lsh_num_pre_rounds + [m]
    for size, proj in zip(bins, lsh_projections(pattern, h_kv, d, bins)):
        with torch.no_grad():
            x = F.normalize(ks.detach().to(acc), dim=-1) * count.clamp(0, 1)[..., None]
            hv = torch.matmul(x, proj[:, :, 0].to(device=k.device, dtype=acc))  # [B, H_kv, rows, size // 2]
            bucket = torch.cat([hv, -hv], dim=-1).argmax(dim=-1)
            idx = chunk[None, None] * size + bucket  # [B, H_kv, rows]
            n_out = (t_pad // c) * size
            count = torch.zeros(bsz, h_kv, n_out, dtype=acc, device=k.device).scatter_add(2, idx, count)
        ks, vs = scatter_add(ks, idx, n_out), scatter_add(vs, idx, n_out)
        chunk = torch.arange(n_out, device=k.device) // size
    denom = (count + 1e-8)[..., None]  # LSG's formula, in fp32+ (1e-8 is 0 in fp16: 0 / 0)
    return SparseKV((ks.to(acc) / denom).to(k.dtype), (vs.to(acc) / denom).to(v.dtype), count > 0)


_TYPES = {"stride": _stride, "block_stride": _block_stride, "norm": _norm, "pooling": _pooling,
          "bos_pooling": _bos_pooling, "lsh": _lsh}


def select_sparse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: LSG,
    *,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    impl: str = "ops",
) -> Optional[SparseKV]:
    """The compressed keys/values of LSG (module docstring), or None when there are none.

    q: ``[B, H, N, D]`` (only row ``o = pattern.block_offset`` is read, by ``bos_pooling``);
    k, v: ``[B, H_kv, N, D]``; key_padding_mask: ``[B, N]`` bool, True = padding;
    scale: of the ``bos_pooling`` scores, default ``D ** -0.5``; impl: ``"ops"`` (the C++ gather /
    scatter ops) or ``"torch"``.  Returns :class:`SparseKV` with ``Tc = T_pad / f`` rows
    (``N - o`` rows when ``f == 1``).  Only meaningful when ``N - o > 2 * block_size`` (shorter
    sequences use full attention), but defined for any ``N > o``.
    """
    gather, scatter_add = _movers(impl)
    if not pattern.has_sparse_keys:
        return None
    bsz, _, n, d = k.shape
    o = pattern.block_offset
    if n <= o:
        return None
    usable = usable_tokens(key_padding_mask, pattern, bsz, n, k.device)[:, o:]
    kx, vx = k[:, :, o:], v[:, :, o:]
    if pattern.sparsity_factor == 1:
        return SparseKV(kx, vx, usable[:, None, :])
    nonpad = torch.ones_like(usable) if key_padding_mask is None else ~key_padding_mask[:, o:]
    scale = d ** -0.5 if scale is None else scale
    fn = _TYPES[pattern.sparsity_type]
    return fn(kx, vx, usable, pattern, gather, scatter_add, t_c=compressed_length(n, pattern),
              t_pad=padded_length(n, pattern), q0=q[:, :, o], nonpad=nonpad, scale=scale, impl=impl)
