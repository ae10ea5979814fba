"""Triton kernels of lhattn (shipped as ``lhattn.kernels``).

One module per pattern family, each with plain launchers returning ``(out, lse)`` /
``(dq, dk, dv)``; no autograd in here (see ``lhattn.autograd``).  ``_core`` holds the
online-softmax pieces every family shares.
"""

from .lsg import lsg_bwd, lsg_fwd
from .segment import segment_bwd, segment_fwd
from .sliding_window import sliding_window_bwd, sliding_window_fwd

__all__ = ["sliding_window_fwd", "sliding_window_bwd", "segment_fwd", "segment_bwd", "lsg_fwd", "lsg_bwd"]
