"""timm: ResMLP's ``Affine`` and the ``LayerScale`` module, per-channel scales whose input is read
only by the scale's gradient, kept compressed (scope "all").

timm's ResMLP blocks multiply by two bare Parameters (``ls1``, ``ls2``) inside their forward, not
through a module: those products stay dense (``describe_compression`` says so). A ``LayerScale``
built with ``inplace=True`` is computed out of place once converted (same values; the compressed
copy replaces the tensor autograd would have held).
"""

from __future__ import annotations

from timm.layers import LayerScale
from timm.models.mlp_mixer import Affine

from ..convert import register_conversion
from ..layers import PrunedChannelScale

__all__ = ["PrunedTimmAffine", "PrunedTimmLayerScale"]


@register_conversion(Affine)
class PrunedTimmAffine(PrunedChannelScale, Affine):
    """timm's ResMLP Affine (alpha ⊙ x + beta) keeping x compressed for d alpha."""

    param_names = ("alpha", "beta")


@register_conversion(LayerScale)
class PrunedTimmLayerScale(PrunedChannelScale, LayerScale):
    """timm's LayerScale (x ⊙ gamma) keeping x compressed for d gamma."""

    param_names = ("gamma", None)
