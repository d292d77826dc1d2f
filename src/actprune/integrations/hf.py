"""Hugging Face transformers: GPT-2's ``Conv1D`` and the activation classes of ``ACT2CLS``.

- ``Conv1D`` is a Linear with a transposed weight (y = x·W + b, W of shape [in, out]): its input is
  read only by dW, so it is kept compressed like a Linear's (scopes "linear" and "all").
- ``GELUActivation`` (erf), ``GELUTanh`` (``gelu_pytorch_tanh``), ``NewGELUActivation``
  (``gelu_new``, GPT-2) and ``SiLUActivation`` keep a low-bit code of their derivative
  (``derivative_code``; scope "all"), computing the output exactly as the original does. Their
  ``use_gelu_python`` variants are left as they are (they round differently).
"""

from __future__ import annotations

import functools

import torch.nn.functional as F
from torch import nn
from transformers import activations
from transformers.pytorch_utils import Conv1D

from ..convert import register_conversion
from ..layers import CodedActivation, PrunedTransposedLinear

__all__ = ["CodedGELUActivation", "CodedGELUTanh", "CodedNewGELU", "CodedSiLUActivation",
           "PrunedConv1D"]  # fmt: skip


@register_conversion(Conv1D, scopes=("linear", "all"))
class PrunedConv1D(PrunedTransposedLinear, Conv1D):
    """GPT-2's Conv1D keeping a compressed copy of its input for the weight gradient only: a
    ``PrunedTransposedLinear`` (Conv1D's weight is [in, out]).

    Example:
        >>> import torch
        >>> from transformers.pytorch_utils import Conv1D
        >>> from actprune import PruneConfig
        >>> from actprune.integrations.hf import PrunedConv1D
        >>> layer = PrunedConv1D.from_module(Conv1D(32, 64), PruneConfig(0.5, 16))
        >>> layer(torch.randn(8, 64, requires_grad=True)).shape
        torch.Size([8, 32])
    """


class _CodedHF(CodedActivation):
    """A Hugging Face activation module whose ``act`` must be torch's own function."""

    @classmethod
    def convertible(cls, module: nn.Module) -> bool:
        return cls.function_of(module) is not None

    @staticmethod
    def function_of(module: nn.Module) -> str | None:
        act = getattr(module, "act", None)
        if act is F.gelu:
            return "gelu"
        if isinstance(act, functools.partial) and act.func is F.gelu:
            return "gelu_tanh" if act.keywords.get("approximate") == "tanh" else None
        return None

    def function(self) -> str:
        return self.function_of(self)


@register_conversion(activations.GELUActivation)
class CodedGELUActivation(_CodedHF, activations.GELUActivation):
    """Hugging Face's GELUActivation (BERT's "gelu") keeping a code of gelu'."""


@register_conversion(activations.GELUTanh)
class CodedGELUTanh(_CodedHF, activations.GELUTanh):
    """Hugging Face's GELUTanh ("gelu_pytorch_tanh") keeping a code of the tanh form's gelu'."""


@register_conversion(activations.NewGELUActivation)
class CodedNewGELU(CodedActivation, activations.NewGELUActivation):
    """Hugging Face's NewGELUActivation (GPT-2's "gelu_new") keeping a code of its derivative;
    the output is computed operation for operation as theirs (``derivative_code.ACTIVATIONS``)."""

    def function(self) -> str:
        return "gelu_new"


@register_conversion(activations.SiLUActivation)
class CodedSiLUActivation(CodedActivation, activations.SiLUActivation):
    """Hugging Face's SiLUActivation keeping a code of silu'."""

    def function(self) -> str:
        return "silu"
