"""lhattn inside Hugging Face ``transformers`` models.

One module per integration; this package re-exports their public names:

* :mod:`.longformer` -- ``LongformerSelfAttention`` patched onto :func:`lhattn.attention`
  (:func:`patch_longformer` / :func:`unpatch_longformer`).
* :mod:`.lsg` -- LSG-RoBERTa / LSG-XLM-R / LSG-BERT checkpoints (``lsg_converter``) as
  transformers models on lhattn (:func:`from_lsg_checkpoint`).
* :mod:`.backend` -- ``attn_implementation="lhattn"`` for any model on transformers' attention
  interface (:func:`register`, :func:`use_pattern`, :func:`to_long`); importing this package
  registers it when ``transformers`` is installed.

``transformers`` is imported lazily by each function, so importing this package works
without it.
"""

from .backend import clear_pattern, register, to_long, use_pattern
from .backend import _register_if_available as _register_backend
from .longformer import (is_patched, longformer_window, patch_longformer, patch_self_attention, unpatch,
                         unpatch_longformer, unpatch_self_attention)
from .lsg import from_lsg_checkpoint

__all__ = ["patch_longformer", "unpatch_longformer", "unpatch", "patch_self_attention",
           "unpatch_self_attention", "is_patched", "longformer_window", "from_lsg_checkpoint",
           "register", "use_pattern", "clear_pattern", "to_long"]

_register_backend()
