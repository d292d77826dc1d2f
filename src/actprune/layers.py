"""PrunedLinear: nn.Linear whose input is saved for backward in block-sparse form.

For y = x·Wᵀ + b, backward needs x only for dW = dyᵀ·x; dx = dy·W and db = Σ dy never read it. So
x is compressed (``actprune.compress``) when the forward runs: the output, dx and db stay exact and
only dW sees the pruned input, dW = dyᵀ·(x ⊙ M), M the mask of the kept blocks
(Barley & Fröning 2023, arXiv 2311.16883).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .blocksparse import BlockSparse, as_rows, compress
from .config import PruneConfig


class _PrunedLinearFunction(torch.autograd.Function):
    """F.linear forward; backward from the block-sparse input. Saves the weight (a Parameter, no
    extra memory) and, only when dW is needed, the compressed input's tensors."""

    @staticmethod
    def forward(ctx, x, weight, bias, config: PruneConfig):  # noqa: ANN001 - autograd signature
        out = F.linear(x, weight, bias)  # autocast applies here exactly as in nn.Linear
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        if ctx.needs_input_grad[1]:
            # Compress in the dtype the matmul ran in (the autocast dtype under autocast).
            packed = compress(as_rows(x.detach(), config.row_order).to(out.dtype), config)
            ctx.packed_shape, ctx.row_order = packed.shape, config.row_order
            ctx.save_for_backward(weight, *packed.tensors)
        else:
            ctx.save_for_backward(weight)
        return out

    @staticmethod
    def backward(ctx, dy):  # noqa: ANN001 - autograd signature
        weight, *packed_tensors = ctx.saved_tensors
        dy2d = dy.reshape(-1, dy.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = dy2d.mm(weight.to(dy.dtype)).view(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            packed = BlockSparse(*packed_tensors, shape=ctx.packed_shape)
            dw = kernels.weight_grad(as_rows(dy, ctx.row_order), packed).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            db = dy2d.sum(0).to(weight.dtype)
        return dx, dw, db, None


class PrunedLinear(nn.Linear):
    """nn.Linear that keeps only the top-magnitude blocks of its input for the weight gradient.

    Same parameters, state_dict and forward output as nn.Linear. The saved input costs about
    (1 - sparsity) of nn.Linear's, plus 4 bytes per kept block and per block-column of indices.
    Build one from an existing layer with ``PrunedLinear.from_linear`` (shares the Parameters) or
    convert a whole model with ``actprune.prune_activations_``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        config: PruneConfig,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.config = _check_config(config)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: PruneConfig) -> PrunedLinear:
        """A PrunedLinear holding the very same Parameter objects (and hooks) as ``linear``."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        new = rebuild_as(cls, linear)
        new.config = _check_config(config)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"PrunedLinear expects input of shape (..., {self.in_features}), "
                f"got {tuple(x.shape)}"
            )
        needs_graph = torch.is_grad_enabled() and (
            x.requires_grad
            or any(p.requires_grad for p in (self.weight, self.bias) if p is not None)
        )
        if not needs_graph or x.numel() == 0:
            return F.linear(x, self.weight, self.bias)
        return _PrunedLinearFunction.apply(x, self.weight, self.bias, self.config)

    def extra_repr(self) -> str:
        bm, bk = self.config.block_shape
        return (
            f"{super().extra_repr()}, sparsity={self.config.sparsity}, block_size=({bm}, {bk}), "
            f"criterion={self.config.criterion!r}"
        )


def rebuild_as(cls: type[nn.Module], module: nn.Module, drop: tuple[str, ...] = ()) -> nn.Module:
    """A ``cls`` instance with module's state: the same Parameters, buffers, children and hooks in
    fresh containers (so the two modules can diverge), minus the attributes named in ``drop``."""
    new = cls.__new__(cls)
    state = {k: v.copy() if isinstance(v, dict) else v for k, v in module.__dict__.items()}
    new.__dict__.update({k: v for k, v in state.items() if k not in drop})
    return new


def _check_config(config: object) -> PruneConfig:
    if not isinstance(config, PruneConfig):
        raise TypeError(f"config must be an actprune.PruneConfig, got {type(config).__name__}")
    return config
