"""timm: ResMLP's ``Affine``, its blocks' layer scales and the ``LayerScale`` module: per-channel
scales whose input is read only by the scale's gradient, kept compressed (scope "all"); and, with
the opt-in codes of the input-gradient path, ViT's ``Attention`` (``attention_bits``: q, k, v) and
timm's ``LayerNorm`` (``norm_bits``).

timm's ResMLP block (``ResBlock``) multiplies by two bare Parameters (``ls1``, ``ls2``) inside its
forward: ``PrunedResBlock`` computes that forward with those products compressed (the block's own
layers convert as usual). A ``LayerScale`` built with ``inplace=True`` is computed out of place once
converted (same values; the compressed copy replaces the tensor autograd would have held).
"""

from __future__ import annotations

import torch
from timm.layers import Attention, LayerNorm, LayerScale
from timm.models.mlp_mixer import Affine, ResBlock
from torch import nn

from ..attention import CodedAttention
from ..config import SCOPES
from ..convert import register_conversion
from ..layers import CompressedLayer, PrunedChannelScale, scale_channels
from ..norms import CodedLayerNorm

__all__ = [
    "CodedTimmAttention",
    "CodedTimmLayerNorm",
    "PrunedResBlock",
    "PrunedTimmAffine",
    "PrunedTimmLayerScale",
]


@register_conversion(Affine)
class PrunedTimmAffine(PrunedChannelScale, Affine):
    """timm's ResMLP Affine (alpha ⊙ x + beta) keeping x compressed for d alpha."""

    param_names = ("alpha", "beta")


@register_conversion(LayerScale)
class PrunedTimmLayerScale(PrunedChannelScale, LayerScale):
    """timm's LayerScale (x ⊙ gamma) keeping x compressed for d gamma."""

    param_names = ("gamma", None)


@register_conversion(ResBlock)
class PrunedResBlock(CompressedLayer, ResBlock):
    """timm's ResMLP block whose layer scales ``ls1``, ``ls2`` (bare Parameters) keep their inputs
    compressed for their gradients. The forward is timm's ``ResBlock.forward`` operation for
    operation (ls ⊙ z is z ⊙ ls: the same product), so outputs are bit-identical; the tests
    compare them with timm's own."""

    saved_for = "inputs of ls1 and ls2 (for their gradients)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.linear_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        config, stream = self.prune_config, self.stream_id
        x = x + self.drop_path(scale_channels(tokens, self.ls1, None, config, stream))
        channels = self.mlp_channels(self.norm2(x))
        return x + self.drop_path(scale_channels(channels, self.ls2, None, config, stream))


@register_conversion(LayerNorm, scopes=SCOPES)
class CodedTimmLayerNorm(CodedLayerNorm, LayerNorm):
    """timm's LayerNorm keeping a ``norm_bits`` code of x̂; converted only without timm's fast-norm
    option (which calls another kernel: its outputs could differ)."""

    dense_class = LayerNorm

    @classmethod
    def convertible(cls, module: nn.Module) -> bool:
        return super().convertible(module) and not module._fast_norm


@register_conversion(Attention, scopes=SCOPES)
class CodedTimmAttention(CodedAttention, Attention):
    """timm's ViT attention keeping ``attention_bits`` codes of q, k, v; converted only when it
    computes attention with ``F.scaled_dot_product_attention`` (``fused_attn``, timm's default):
    its other path is a softmax that stays dense."""

    @classmethod
    def convertible(cls, module: nn.Module) -> bool:
        return bool(module.fused_attn)
