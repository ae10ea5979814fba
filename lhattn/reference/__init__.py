"""The numerical oracle: dense masks, obviously correct, O(N²) memory. For tests only.

Every function returns ``(out, lse)`` and takes the arguments of
:func:`lhattn.attention` for its pattern.
"""

from .core import masked_attention
from .segment import segment_attention
from .sliding_window import sliding_window_attention

__all__ = ["masked_attention", "sliding_window_attention", "segment_attention", "lsg_attention"]


def lsg_attention(*args, **kwargs):
    from .lsg import lsg_attention as impl

    return impl(*args, **kwargs)
