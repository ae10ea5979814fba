"""Triton kernels of lhattn (shipped as ``lhattn.kernels``).

One module per pattern family, each with plain launchers returning ``(out, lse)`` /
``(dq, dk, dv)``; no autograd in here (see ``lhattn.autograd``).  ``_core`` holds the
online-softmax pieces every family shares, ``_launch`` the host-side launch plumbing
(docs/ARCHITECTURE.md, "Kernels").
"""

from . import lsg as _lsg, segment as _segment, sliding_window as _sliding_window
from ._core import limit_autotuners
from .lsg import lsg_bwd, lsg_fwd
from .segment import segment_bwd, segment_fwd
from .sliding_window import sliding_window_bwd, sliding_window_fwd

for _family in (_sliding_window, _segment, _lsg):  # $LHATTN_AUTOTUNE_CONFIGS: a short tuning set
    limit_autotuners(_family)
del _family

__all__ = ["sliding_window_fwd", "sliding_window_bwd", "segment_fwd", "segment_bwd", "lsg_fwd", "lsg_bwd"]
