"""lhattn: long-sequence attention in O(N·w) -- sliding window (Longformer), LSG and HAT segments.

>>> import torch, lhattn
>>> q = k = v = torch.randn(1, 4, 1000, 64)
>>> out = lhattn.sliding_window_attention(q, k, v, window=(64, 64))
"""

import os as _os

# In the source tree, kernels/ sits beside lhattn/ and is installed as lhattn.kernels;
# let `import lhattn.kernels` find it when lhattn is imported from a checkout.
_here = _os.path.dirname(_os.path.abspath(__file__))
if not _os.path.isdir(_os.path.join(_here, "kernels")) and _os.path.isdir(
        _os.path.join(_os.path.dirname(_here), "kernels")):
    __path__.append(_os.path.dirname(_here))  # type: ignore[name-defined]

from .functional import (BACKENDS, FallbackWarning, attention, lsg_attention, segment_attention,  # noqa: E402
                         sliding_window_attention, triton_unavailable_reason)
from .patterns import LSG, Segments, SlidingWindow  # noqa: E402

__version__ = "0.1.0"

__all__ = ["attention", "sliding_window_attention", "lsg_attention", "segment_attention",
           "SlidingWindow", "LSG", "Segments", "BACKENDS", "triton_unavailable_reason",
           "FallbackWarning"]
