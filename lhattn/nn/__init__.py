"""Modules: a drop-in ``nn.MultiheadAttention`` on lhattn patterns, model surgery, and HAT layers.

>>> import torch, lhattn
>>> enc = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(64, 4, batch_first=True), 2)
>>> enc = lhattn.nn.replace_attention(enc, pattern=lhattn.SlidingWindow(128))
"""

import importlib.util as _importlib_util

from .hat import HATEncoder, HATLayer, cross_segment_attention, representative_index, segment_ordinal
from .hat_model import HATConfig, HATForMaskedLM, HATForSequenceClassification, HATModel, HATOutput
from .mha import MultiheadAttention, replace_attention

__all__ = ["MultiheadAttention", "replace_attention", "HATLayer", "HATEncoder", "cross_segment_attention",
           "representative_index", "segment_ordinal", "HATConfig", "HATModel", "HATForMaskedLM",
           "HATForSequenceClassification", "HATOutput"]

if _importlib_util.find_spec(f"{__name__}.lsg") is not None:  # the LSG layer, once lhattn/nn/lsg.py exists
    from . import lsg  # noqa: E402
    from .lsg import *  # noqa: E402,F401,F403
    __all__ += list(getattr(lsg, "__all__", []))

from .hourglass import Hourglass, HourglassLM, HourglassLMOutput  # noqa: E402

__all__ += ["Hourglass", "HourglassLM", "HourglassLMOutput"]
