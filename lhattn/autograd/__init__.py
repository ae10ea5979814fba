"""Autograd wrappers of the Triton kernels, plugged into :mod:`lhattn.functional` dispatch.

Importing this package needs Triton: an ImportError here is caught by
``lhattn.functional`` and reported as the reason the Triton backend is unavailable.
Each kernel family registers ``(impl, reason)`` for its pattern type.
"""

import triton  # noqa: F401  (no Triton -> ImportError -> dispatch says so)

from ..functional import register_triton_backend
from ..patterns import LSG, Segments, SlidingWindow
from . import lsg, segment
from .segment import segment_attention
from .sliding_window import sliding_window_attention, triton_unsupported_reason

register_triton_backend(SlidingWindow, sliding_window_attention, triton_unsupported_reason)
register_triton_backend(Segments, segment.impl, segment.reason)
register_triton_backend(LSG, lsg.impl, lsg.reason)

__all__ = ["sliding_window_attention", "segment_attention", "triton_unsupported_reason"]
