"""Third-party models patched onto lhattn kernels.

* :mod:`lhattn.integrations.huggingface` -- Hugging Face ``transformers`` Longformer
  (:func:`~lhattn.integrations.huggingface.patch_longformer`).

Each integration imports its library lazily, so ``import lhattn.integrations`` works
without ``transformers`` installed.
"""

from .huggingface import patch_longformer, unpatch, unpatch_longformer

__all__ = ["patch_longformer", "unpatch_longformer", "unpatch"]
