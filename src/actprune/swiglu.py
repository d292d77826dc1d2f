"""A SwiGLU MLP, down(silu(gate(x)) ⊙ up(x)), keeping only g = gate(x) and u = up(x).

Dense autograd keeps g (for silu'), silu(g) and u (each factor of the product for the other's
gradient) and the product h (for the down projection's weight gradient): four tensors of the
hidden width. Backward needs only g and u: silu(g), silu'(g) and h are one elementwise pass from
them (Liger-Kernel's SwiGLU recomputes silu(g) the same way), and dW_down = dyᵀ·h reads the
recomputed h exactly, with no compressed copy of it. So the MLP keeps two tensors, exact (scope
"all"), or ``swiglu_bits`` per-token codes of both (an opt-in: dx then reads g̃ and ũ).

Forward, dx and every gradient run the ops dense autograd runs, in the same order (F.linear,
silu_backward, the products), so exact mode is bit-identical to the dense module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import rowcode
from .config import PruneConfig
from .layers import CompressedLayer, _needs_graph, autocast_of


class SwiGLUDownFunction(torch.autograd.Function):
    """F.linear(silu(g) ⊙ u, weight, bias); saves g and u (``bits``: 0 exact, else row codes)."""

    @staticmethod
    def forward(ctx, g, u, weight, bias, bits):
        ctx.autocast, ctx.has_bias = autocast_of(g), bias is not None
        rowcode.save_for_backward(ctx, ((g, bits), (u, bits)), weight)
        return F.linear(F.silu(g) * u, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        (g, u), (weight,) = rowcode.saved_tensors(ctx)
        a, dw, db = F.silu(g), None, None
        dy2 = dy.reshape(-1, dy.shape[-1])
        with ctx.autocast:  # the dtypes of the forward's F.linear
            dh = dy2.mm(weight).view(*g.shape)
            if ctx.needs_input_grad[2]:
                dw = (a * u).reshape(-1, a.shape[-1]).t().mm(dy2).t().to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            db = dy2.sum(0).to(weight.dtype)
        du = dh * a if ctx.needs_input_grad[1] else None
        dg = torch.ops.aten.silu_backward(dh * u, g) if ctx.needs_input_grad[0] else None
        return dg, du, dw, db, None


class FusedSwiGLU(CompressedLayer):
    """Base of the SwiGLU MLPs keeping only gate(x) and up(x) (``SwiGLUDownFunction``). A
    subclass names its dense class (second base), whose forward must compute exactly
    ``down(F.silu(gate(x)) * up(x))``, and the attribute names of the three projections
    (``projections``) and of the SiLU module (``activation``). The gate and up projections
    convert as usual; the down projection's weight is used directly and the SiLU module is not
    called (their own forwards, and forward hooks on them, do not run: ``bypassed``).

    Attributes:
        projections: (gate, up, down) attribute names of the nn.Linear children.
        activation: attribute name of the SiLU child.
        prune_config: ``swiglu_bits`` picks exact (0) or the codes' bits.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from actprune import FusedSwiGLU, PruneConfig, register_conversion
        >>> class GatedMLP(nn.Module):                  # a user's own SwiGLU
        ...     def __init__(self, dim, hidden):
        ...         super().__init__()
        ...         self.w1, self.w3 = nn.Linear(dim, hidden), nn.Linear(dim, hidden)
        ...         self.w2, self.silu = nn.Linear(hidden, dim), nn.SiLU()
        ...     def forward(self, x):
        ...         return self.w2(self.silu(self.w1(x)) * self.w3(x))
        >>> @register_conversion(GatedMLP, scopes=("linear", "all"))
        ... class CompactGatedMLP(FusedSwiGLU, GatedMLP):
        ...     projections, activation = ("w1", "w3", "w2"), "silu"
        >>> mlp = CompactGatedMLP.from_module(GatedMLP(64, 172), PruneConfig.preset("uniform"))
        >>> mlp(torch.randn(8, 64, requires_grad=True)).shape
        torch.Size([8, 64])
    """

    projections: tuple[str, str, str] = ("gate", "up", "down")
    activation: str = "act"
    saved_for = "gate and up (silu, its derivative and the product recomputed)"

    @classmethod
    def applies(cls, config: PruneConfig) -> bool:
        return config.scope == "all" or config.swiglu_bits > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, name) for name in self.projections)
        if not _needs_graph(x, down.weight):
            return super().forward(x)
        g, u = gate(x), up(x)
        return SwiGLUDownFunction.apply(g, u, down.weight, down.bias, self.prune_config.swiglu_bits)

    def bypassed(self) -> tuple[nn.Module, ...]:
        """The children whose forward never runs here (the down projection, the SiLU)."""
        return getattr(self, self.projections[2]), getattr(self, self.activation)

    def describe(self) -> str:
        bits = self.prune_config.swiglu_bits
        kept = f"{bits}-bit per-token codes of gate and up" if bits else "gate and up (exact)"
        return kept + "; the down projection's dW reads the recomputed product exactly"
