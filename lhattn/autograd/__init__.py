"""Autograd wrappers of the Triton kernels, plugged into :mod:`lhattn.functional` dispatch.

Importing this package needs Triton: an ImportError here is caught by
``lhattn.functional`` and reported as the reason the Triton backend is unavailable.

One naming scheme for the three families ``F`` (``sliding_window``, ``segment``, ``lsg``):
``lhattn.kernels.F`` has the launchers ``F_fwd`` / ``F_bwd``; ``lhattn.autograd.F`` wraps them in the
custom ops ``lhattn::F_attn_fwd`` / ``lhattn::F_attn_bwd`` and has the entry point ``F_attention``
(the contract of ``lhattn.reference.F_attention`` and ``lhattn.fallback.F_attention``) and
``F_unsupported_reason``; ``impl`` and ``reason`` name that pair, which each family registers for
its pattern type here.
"""

import triton  # noqa: F401  (no Triton -> ImportError -> dispatch says so)

from ..functional import register_triton_backend
from ..patterns import LSG, Segments, SlidingWindow
from . import lsg, segment, sliding_window
from .lsg import lsg_attention, lsg_unsupported_reason
from .segment import segment_attention, segment_unsupported_reason
from .sliding_window import sliding_window_attention, sliding_window_unsupported_reason

for _pattern, _family in ((SlidingWindow, sliding_window), (Segments, segment), (LSG, lsg)):
    register_triton_backend(_pattern, _family.impl, _family.reason)
del _pattern, _family

__all__ = ["sliding_window_attention", "segment_attention", "lsg_attention", "sliding_window_unsupported_reason",
           "segment_unsupported_reason", "lsg_unsupported_reason"]
