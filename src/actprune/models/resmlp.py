"""ResMLP (Touvron et al. 2021, "ResMLP: Feedforward networks for image classification with
data-efficient training", arXiv 2105.03404): the seed paper's evaluation model.

Affine, LayerScale and GELU are modules of their own so that the tensors they save for backward can
be compressed separately (see docs/design.md). Layout follows timm: blocks, model, entry points.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..convert import register_conversion
from ..layers import PrunedChannelScale
from ._registry import register_model


class Affine(nn.Module):
    """Aff(x) = α ⊙ x + β per channel: ResMLP's replacement for LayerNorm."""

    def __init__(self, dim: int, device=None, dtype=None) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.beta = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.beta, self.alpha, x)


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (CaiT), initialised small so deep nets train."""

    def __init__(self, dim: int, init: float, device=None, dtype=None) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), init, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


@register_conversion(Affine)
class PrunedAffine(PrunedChannelScale, Affine):
    """Affine keeping a compressed x for dα; output, dx and dβ exact (``--scope all``).

    Attributes:
        alpha, beta: as Affine (the same Parameter objects when built with ``from_module``).
        prune_config: the ``PruneConfig`` the saved input is compressed with.

    Example:
        >>> import torch
        >>> from actprune import PruneConfig
        >>> from actprune.models.resmlp import Affine, PrunedAffine
        >>> aff = PrunedAffine.from_module(Affine(64), PruneConfig(0.9, 32, scope="all"))
        >>> aff(torch.randn(4, 16, 64)).shape
        torch.Size([4, 16, 64])
    """

    param_names = ("alpha", "beta")


@register_conversion(LayerScale)
class PrunedLayerScale(PrunedChannelScale, LayerScale):
    """LayerScale keeping a compressed x for ds; output and dx exact (``--scope all``).

    Attributes:
        scale: as LayerScale (the same Parameter object when built with ``from_module``).
        prune_config: the ``PruneConfig`` the saved input is compressed with.

    Example:
        >>> import torch
        >>> from actprune import PruneConfig
        >>> from actprune.models.resmlp import LayerScale, PrunedLayerScale
        >>> ls = PrunedLayerScale.from_module(LayerScale(64, 0.1), PruneConfig(0.9, scope="all"))
        >>> ls(torch.randn(4, 16, 64)).shape
        torch.Size([4, 16, 64])
    """

    param_names = ("scale", None)


class ResMLPBlock(nn.Module):
    """Token mixing (Linear over patches) then a channel MLP, each residual with LayerScale."""

    def __init__(
        self, dim: int, num_patches: int, mlp_ratio: int, init_scale: float, device=None, dtype=None
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.aff1 = Affine(dim, **kw)
        self.tok = nn.Linear(num_patches, num_patches, **kw)
        self.ls1 = LayerScale(dim, init_scale, **kw)
        self.aff2 = Affine(dim, **kw)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim, **kw)
        self.gelu = nn.GELU()
        self.fc2 = nn.Linear(mlp_ratio * dim, dim, **kw)
        self.ls2 = LayerScale(dim, init_scale, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, P, d)
        x = x + self.ls1(self.tok(self.aff1(x).transpose(1, 2)).transpose(1, 2))
        return x + self.ls2(self.fc2(self.gelu(self.fc1(self.aff2(x)))))


@dataclass(frozen=True)
class ResMLPConfig:
    width: int = 384
    depth: int = 12
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    mlp_ratio: int = 4
    init_scale: float | None = None  # None: the paper's 0.1 (depth <= 12), 1e-5 (<= 24), 1e-6

    def __post_init__(self) -> None:
        for field in ("width", "depth", "img_size", "patch_size", "in_chans", "num_classes"):
            if getattr(self, field) <= 0:
                raise ValueError(f"ResMLP {field} must be positive, got {getattr(self, field)}")
        if self.img_size % self.patch_size:
            raise ValueError(
                f"ResMLP img_size {self.img_size} must be a multiple of patch_size "
                f"{self.patch_size}"
            )

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def layer_scale_init(self) -> float:
        if self.init_scale is not None:
            return self.init_scale
        return 0.1 if self.depth <= 12 else 1e-5 if self.depth <= 24 else 1e-6


class ResMLP(nn.Module):
    """Patch embedding → depth × ResMLPBlock → Affine → mean over patches → linear classifier."""

    def __init__(self, config: ResMLPConfig, device=None, dtype=None) -> None:
        super().__init__()
        c = self.config = config
        kw = {"device": device, "dtype": dtype}
        self.patch_embed = nn.Conv2d(c.in_chans, c.width, c.patch_size, c.patch_size, **kw)
        self.blocks = nn.Sequential(
            *[
                ResMLPBlock(c.width, c.num_patches, c.mlp_ratio, c.layer_scale_init, **kw)
                for _ in range(c.depth)
            ]
        )
        self.norm = Affine(c.width, **kw)
        self.head = nn.Linear(c.width, c.num_classes, **kw)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, classes)
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, P, d)
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1))


def _build(defaults: dict, overrides: dict) -> ResMLP:
    device, dtype = overrides.pop("device", None), overrides.pop("dtype", None)
    return ResMLP(ResMLPConfig(**{**defaults, **overrides}), device=device, dtype=dtype)


@register_model
def resmlp_s12(**overrides: object) -> ResMLP:
    """ResMLP-S12: width 384, depth 12, 224 px, patch 16 (15 M parameters)."""
    return _build({"width": 384, "depth": 12}, overrides)


@register_model
def resmlp_s24(**overrides: object) -> ResMLP:
    """ResMLP-S24: width 384, depth 24 (30 M parameters)."""
    return _build({"width": 384, "depth": 24}, overrides)


@register_model
def resmlp_s36(**overrides: object) -> ResMLP:
    """ResMLP-S36: width 384, depth 36 (45 M parameters)."""
    return _build({"width": 384, "depth": 36}, overrides)


@register_model
def resmlp_b24(**overrides: object) -> ResMLP:
    """ResMLP-B24: width 768, depth 24 (116 M parameters at 224 px / patch 16)."""
    return _build({"width": 768, "depth": 24}, overrides)


@register_model
def resmlp_tiny(**overrides: object) -> ResMLP:
    """Not from the paper: width 128, depth 4, 28 px grayscale, patch 7, 10 classes (0.5 M
    parameters); the CPU-sized model of the default `actprune compare`."""
    defaults = {
        "width": 128,
        "depth": 4,
        "img_size": 28,
        "patch_size": 7,
        "in_chans": 1,
        "num_classes": 10,
    }
    return _build(defaults, overrides)
