"""Model zoo: ``create(name, **overrides)`` and ``list_models(pattern)``, timm-style.

One file per family; each registers its entry points (``register_model``) and, where it defines
layers of its own that actprune can compress, their conversions (``register_conversion``).
"""

from . import gpt, llama, resmlp
from ._registry import create, list_models, register_model

__all__ = ["create", "gpt", "list_models", "llama", "register_model", "resmlp"]
