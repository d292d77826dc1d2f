"""Dropout keeping its mask as bits: exact, 1 bit per element instead of 1 (CUDA, a bool) or 4
(CPU, a float mask) bytes.

dx = dy ⊙ mask / (1 − p) needs the mask and nothing else; a mask is one bit of information per
element. The mask is drawn by ``torch.native_dropout``, the op nn.Dropout runs, from the same
random state, so the output and dx are the dense module's bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

from . import kernels
from .layers import CompressedLayer, _needs_graph


class DropoutFunction(torch.autograd.Function):
    """``torch.native_dropout(x, p, True)``'s output; saves its mask packed 8 to a byte."""

    @staticmethod
    def forward(ctx, x, p):
        y, mask = torch.native_dropout(x, p, True)
        ctx.scale = 1.0 / (1.0 - p)
        ctx.save_for_backward(kernels.pack_mask(mask))
        return y

    @staticmethod
    def backward(ctx, dy):
        (packed,) = ctx.saved_tensors
        return kernels.dropout_grad(dy, packed, ctx.scale), None


class CodedDropout(CompressedLayer, nn.Dropout):
    """nn.Dropout keeping a 1-bit mask (scope "all"); exact. In-place dropout
    (``inplace=True``) computes out of place while training. A dropout with p = 0 (timm's and
    many models' default: an identity that saves nothing) is left as it is.

    Attributes:
        p, inplace: as ``nn.Dropout``.
        prune_config: the config it was converted with (no field changes what it keeps).

    Example:
        >>> import torch
        >>> from actprune import PruneConfig, saved_activation_bytes
        >>> from actprune.dropout import CodedDropout
        >>> drop = CodedDropout.from_module(torch.nn.Dropout(0.1), PruneConfig.preset("uniform"))
        >>> saved_activation_bytes(drop, torch.randn(64, 64, requires_grad=True))  # 1 bit each
        512
    """

    dense_class = nn.Dropout
    saved_for = "mask (for dx)"

    @classmethod
    def convertible(cls, module: nn.Module) -> bool:
        return module.p > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and 0.0 < self.p < 1.0 and _needs_graph(x)):
            return super().forward(x)
        return DropoutFunction.apply(x, self.p)

    def describe(self) -> str:
        return "1-bit mask (exact)"
