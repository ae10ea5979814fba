"""Blocked pure-PyTorch backend: O(N·w) time, O(N·D) memory, any device, differentiable.

Every function returns ``(out, lse)`` and takes the arguments of
:func:`lhattn.attention` for its pattern, with attention dropout given as
``dropout_p, dropout_state`` (:mod:`lhattn._dropout`).
"""

from .engine import Dropout, blocked_attention
from .segment import segment_attention
from .sliding_window import sliding_window_attention

__all__ = ["Dropout", "blocked_attention", "sliding_window_attention", "segment_attention", "lsg_attention"]


def lsg_attention(*args, **kwargs):
    from .lsg import lsg_attention as impl

    return impl(*args, **kwargs)
