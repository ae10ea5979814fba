"""Context parallelism: attention over a sequence split across the ranks of a ``torch.distributed`` group.

Rank ``t`` of the group holds tokens ``[s_t, s_t + N_t)`` of every sequence in the batch (contiguous
shards in rank order; the ``N_t`` may differ).  :func:`context_parallel_attention` returns that rank's
rows of the single-process :func:`lhattn.attention` -- same values, same gradients w.r.t. the shards,
same dropped entries for the same ``dropout_seed`` (the rule of :mod:`lhattn._dropout` is by token
position).  What moves between ranks (NCCL on GPUs, gloo on CPU; count it with :func:`count_bytes`):

* **SlidingWindow** -- only the halo: the ``left·dilation`` keys before the shard and the
  ``right·dilation`` after it (k and v in one message, plus one byte per token of the padding/global
  mask), from as many neighbours as the window spans; the backward sends the halo's dk/dv back to
  its owners.
* **Segments** -- the keys of the segments that cross a shard boundary, from the neighbours that hold
  them (found from every rank's first/last segment id: ``4·B`` ints per rank).  Nothing is all-gathered.
* **Global tokens** -- each rank all-gathers only the global tokens' q/k/v rows; every rank attends
  all global rows to its own keys, and the partial ``(out, lse)`` are merged by all-reduce (log-sum-exp),
  so the traffic is O(G·D) per rank, never O(N·D).
* **LSG** -- the local blocks and the tokens that make the compressed keys a query needs, as a halo
  of whole blocks (at most ``(2 + ceil(sb·f / b))·b`` tokens per side, ``b`` = block_size, ``f`` =
  sparsity_factor, ``sb`` = sparse_block_size); each rank recomputes those compressed keys, so no
  pooling group or selection chunk is split.  The first ``num_global_tokens`` tokens are global
  tokens as above.  ``bos_pooling`` is not supported (NotImplementedError).

Every rank must call with the same kinds of arguments (checked with one small all-gather).
Each rank computes its part with the Triton kernels when its tensors are on CUDA (window and segment
bands, and the global rows' partials; attention dropout too, dropping the single-process call's
entries), else with the blocked fallback engine (:mod:`lhattn.fallback.engine`); LSG always uses the
fallback engine.  The switch and the extra work are described in :mod:`lhattn.distributed._local`.

The ``lhattn.nn`` modules run context-parallel inside :func:`context_parallel`::

    with lhattn.distributed.context_parallel(group):
        y = model(x_shard)   # this rank's shard in, its shard out

or, once for good, ``lhattn.distributed.parallelize(model, group)`` (forward hooks).
``MultiheadAttention`` (the drop-in, also inside ``nn.TransformerEncoderLayer`` and DDP), the
segment-wise part of ``HATLayer`` and ``LSGSelfAttention`` (its learned global tokens are prepended
on the group's rank 0 only) route their attention here; HAT's cross-segment encoder all-gathers the
representatives (:mod:`lhattn.distributed._hat`, O(R·E) per rank) and runs on all of them on
every rank.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List

from ._attention import context_parallel_attention
from ._comm import Traffic, count_bytes

__all__ = ["context_parallel_attention", "context_parallel", "parallelize", "is_active", "current_group", "group_rank", "attention",
           "count_bytes", "Traffic"]

_STACK: List[object] = []


@contextlib.contextmanager
def context_parallel(group=None) -> Iterator[None]:
    """Inside the block, the attention of the ``lhattn.nn`` modules runs through
    :func:`context_parallel_attention` over ``group`` (None = the default group): each rank passes
    its shard of the sequence to the module and gets its shard of the output back."""
    _STACK.append(group)
    try:
        yield
    finally:
        _STACK.pop()


def parallelize(module, group=None):
    """Make every forward of ``module`` (an ``lhattn.nn`` module, or a model containing them) run
    inside :func:`context_parallel` over ``group`` -- the module-level form of ``group=``: forward
    hooks, so the module's own signature and ``state_dict`` are unchanged.  Returns ``module``;
    ``handles = module._lhattn_context_parallel`` removes them (``for h in handles: h.remove()``)."""
    contexts = []

    def enter(_module, _args):
        ctx = context_parallel(group)
        ctx.__enter__()
        contexts.append(ctx)

    def leave(_module, _args, _out):
        contexts.pop().__exit__(None, None, None)

    module._lhattn_context_parallel = (module.register_forward_pre_hook(enter),
                                       module.register_forward_hook(leave, always_call=True))
    return module


def is_active() -> bool:
    """True inside a :func:`context_parallel` block."""
    return bool(_STACK)


def current_group():
    """The group of the innermost :func:`context_parallel` block (None = the default group)."""
    if not _STACK:
        raise RuntimeError("lhattn.distributed.current_group is only meaningful inside a context_parallel() block")
    return _STACK[-1]


def group_rank() -> int:
    """This process's rank in the group of the innermost :func:`context_parallel` block."""
    import torch.distributed as dist

    if not _STACK:
        raise RuntimeError("lhattn.distributed.group_rank is only meaningful inside a context_parallel() block")
    return dist.get_rank(_STACK[-1])


def attention(q, k, v, pattern, *, backend: str = "auto", global_qkv=None, **kwargs):
    """:func:`lhattn.attention`'s signature, run by :func:`context_parallel_attention` over the group of
    the innermost :func:`context_parallel` block (what the ``lhattn.nn`` modules call inside one).
    ``backend``: ``"auto"``, ``"triton"`` or ``"fallback"`` pick what computes each rank's part
    (:mod:`lhattn.distributed._local`); ``"reference"`` (the dense oracle) runs as ``"fallback"``.
    ``global_qkv`` is not supported."""
    if not _STACK:
        raise RuntimeError("lhattn.distributed.attention is only meaningful inside a context_parallel() block")
    if global_qkv is not None:
        raise ValueError("global_qkv is not supported by context-parallel attention, got global_qkv")
    backend = "fallback" if backend == "reference" else backend
    return context_parallel_attention(q, k, v, pattern, _STACK[-1], backend=backend, **kwargs)
