"""PrunedLinear: nn.Linear whose input is saved for backward in block-sparse form.

For y = x·Wᵀ + b, backward needs x only for dW = dyᵀ·x; dx = dy·W and db = Σ dy never read it. So
x is compressed (``actprune.compress``) when the forward runs: the output, dx and db stay exact and
only dW sees the pruned input, dW = dyᵀ·(x ⊙ M), M the mask of the kept blocks
(Barley & Fröning 2023, arXiv 2311.16883). The computation is the registered operator
``actprune::pruned_linear`` (``ops.py``), so torch.compile keeps it whole and saves only the
compressed tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .config import PruneConfig


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
        weight, bias = self.weight, self.bias
        kind = x.device.type
        if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
            # Cast as autocast casts linear's arguments, so the op computes, and the compressed
            # input is kept, in the autocast dtype (the op itself is opaque to autocast).
            dtype = torch.get_autocast_dtype(kind)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        c = self.config
        out, *_ = ops.pruned_linear(
            x, weight, bias, self.weight.requires_grad, c.sparsity, *c.block_shape, c.criterion,
            c.row_order,
        )  # fmt: skip
        return out

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
