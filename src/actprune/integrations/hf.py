"""Hugging Face transformers: GPT-2's ``Conv1D`` and the activation classes of ``ACT2CLS``.

- ``Conv1D`` is a Linear with a transposed weight (y = x·W + b, W of shape [in, out]): its input is
  read only by dW, so it is kept compressed like a Linear's (scopes "linear" and "all").
- ``GELUActivation`` (erf), ``GELUTanh`` (``gelu_pytorch_tanh``), ``NewGELUActivation``
  (``gelu_new``, GPT-2) and ``SiLUActivation`` keep a low-bit code of their derivative
  (``derivative_code``; scope "all"), computing the output exactly as the original does. Their
  ``use_gelu_python`` variants are left as they are (they round differently).
- ``LlamaRMSNorm`` keeps x̂ and rstd (``norms``), ``LlamaMLP`` with a SiLU keeps gate and up only
  (``swiglu``), both exact with scope "all", or as codes with ``norm_bits`` / ``swiglu_bits``.
- ``GPT2Attention``, ``LlamaAttention`` and ``BertSelfAttention`` keep codes of q, k, v with
  ``attention_bits`` (``attention``): their SDPA attention interface calls
  ``F.scaled_dot_product_attention``; the eager interface is left dense.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from transformers import activations
from transformers.models.bert.modeling_bert import BertSelfAttention
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm
from transformers.pytorch_utils import Conv1D

from ..attention import CodedAttention
from ..config import SCOPES
from ..convert import register_conversion
from ..layers import CodedActivation, PrunedTransposedLinear
from ..norms import CodedNorm
from ..swiglu import FusedSwiGLU

__all__ = ["CodedBertSelfAttention", "CodedGELUActivation", "CodedGELUTanh", "CodedGPT2Attention",
           "CodedLlamaAttention", "CodedLlamaRMSNorm", "CodedNewGELU", "CodedSiLUActivation",
           "CompactLlamaMLP", "PrunedConv1D"]  # fmt: skip


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


@register_conversion(LlamaRMSNorm, scopes=SCOPES)
class CodedLlamaRMSNorm(CodedNorm, LlamaRMSNorm):
    """Llama's RMSNorm (float32 statistics, output in the input's dtype) keeping x̂ and rstd."""

    rms = True

    def eps_for(self, x: torch.Tensor) -> float:
        return self.variance_epsilon


@register_conversion(LlamaMLP, scopes=SCOPES)
class CompactLlamaMLP(FusedSwiGLU, LlamaMLP):
    """Llama's MLP with a SiLU keeping gate and up only (``FusedSwiGLU``)."""

    projections = ("gate_proj", "up_proj", "down_proj")
    activation = "act_fn"

    @classmethod
    def convertible(cls, module: nn.Module) -> bool:
        return isinstance(module.act_fn, (nn.SiLU, activations.SiLUActivation))


class _CodedHFAttention(CodedAttention):
    """A Hugging Face attention module; converted only when its model runs the SDPA interface
    (``attn_implementation="sdpa"``): the eager one computes a softmax that stays dense."""

    @classmethod
    def convertible(cls, module: nn.Module) -> bool:
        return getattr(module.config, "_attn_implementation", None) == "sdpa"


@register_conversion(GPT2Attention, scopes=SCOPES)
class CodedGPT2Attention(_CodedHFAttention, GPT2Attention):
    """GPT-2's attention keeping ``attention_bits`` codes of q, k, v (SDPA interface)."""


@register_conversion(LlamaAttention, scopes=SCOPES)
class CodedLlamaAttention(_CodedHFAttention, LlamaAttention):
    """Llama's attention keeping ``attention_bits`` codes of the rotated q, k and v."""


@register_conversion(BertSelfAttention, scopes=SCOPES)
class CodedBertSelfAttention(_CodedHFAttention, BertSelfAttention):
    """BERT's self-attention keeping ``attention_bits`` codes of q, k, v."""
