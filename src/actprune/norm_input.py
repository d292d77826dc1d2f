"""A Linear that reads a normalization's output keeps nothing of its own: the norm's saved x̂ is it.

A converted norm (``norms.CodedNorm``) keeps x̂ (exact, or its per-token code) and its output is
y = x̂ ⊙ γ (+ β). The Linear layers that read y (attention's q, k, v; the MLP's gate and up) need
y only for dW = dyᵀ·y, and y is x̂ ⊙ γ + β again: so instead of a compressed copy of y of their
own they save the norm's tensors (the same storages: autograd holds them once) and rebuild y in
backward (Tempo, arXiv 2210.10246: a norm's saved tensor shared with the next Linear). dW then
reads the norm's x̂ — exact when the norm is (equal to dense to float rounding: y is rebuilt by
another rounding path), the norm's 8-bit code with ``norm_bits`` — instead of the Linear's own
copy (at ``remainder_bits``). Forward and dx are unchanged.

The norm registers its output tensor (``keep``); a Linear finds it by the tensor object and its
version counter (``find``), as the layers' compression cache does. Eager mode only: under
torch.compile the Linears compress their input as before (their dW then reads their own copy,
so compiled and eager gradients differ by that).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import kernels


@dataclass(frozen=True)
class NormOutput:
    """What a norm kept, of which its output y = x̂ ⊙ weight (+ bias) is a function.

    Attributes:
        saved: x̂ in the norm input's dtype (``bits`` 0), or its row codes.
        scales: the codes' per-row scales (empty when exact).
        weight, bias: γ and β (None when absent).
        bits: 0 (exact) or the codes' bits.
        dtype: the dtype x̂ is decoded to (the norm input's).
    """

    saved: torch.Tensor
    scales: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    bits: int
    dtype: torch.dtype

    def rebuilt(self, shape: torch.Size) -> torch.Tensor:
        """y = x̂ ⊙ γ + β, float32, of ``shape`` (the norm's output's)."""
        cols = shape[-1]
        x_hat = self.saved
        if self.bits:
            x_hat = kernels.decode_row_codes(self.saved, self.scales.reshape(-1), cols,
                                             self.dtype, self.bits)  # fmt: skip
        y = x_hat.reshape(math.prod(shape[:-1]), cols).float()
        if self.weight is not None:
            y = y * self.weight.float()
        return y if self.bias is None else y + self.bias.float()


_outputs: dict[int, tuple] = {}


def keep(y: torch.Tensor, norm: NormOutput) -> None:
    """Register the norm output y: y weakly (the entry goes with it), the norm's tensors for as
    long as y lives. Held, not weakly referenced: under saved-tensor hooks that drop what autograd
    saves (checkpointing's forward), a weak entry would die in the forward and live in the
    recompute, and the two would save different tensors."""
    ident = id(y)
    y_ref = weakref.ref(y, lambda _: _outputs.pop(ident, None))
    _outputs[ident] = (y_ref, y._version, norm)


def find(x: torch.Tensor) -> NormOutput | None:
    """The norm output x is, if x is unchanged since the norm made it; else None."""
    entry = _outputs.get(id(x))
    if entry is None:
        return None
    y_ref, version, norm = entry
    return norm if y_ref() is x and version == x._version else None


class NormInputLinearFunction(torch.autograd.Function):
    """F.linear(x, weight, bias) of a norm's output x; saves weight and the norm's tensors (no
    tensor on ctx itself: saved-tensor hooks see them all), and builds dW = dyᵀ·(x̂ ⊙ γ + β)
    from them in x's dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, norm: NormOutput):
        ctx.x_shape, ctx.x_dtype, ctx.has_bias = x.shape, x.dtype, bias is not None
        ctx.norm = (norm.bits, norm.dtype, norm.weight is not None, norm.bias is not None)
        affine = [t for t in (norm.weight, norm.bias) if t is not None]
        ctx.save_for_backward(weight, norm.saved, norm.scales, *affine)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        weight, saved, scales, *affine = ctx.saved_tensors
        bits, dtype, has_weight, has_bias = ctx.norm
        gamma = affine.pop(0) if has_weight else None
        beta = affine.pop(0) if has_bias else None
        dy2d = dy.reshape(math.prod(ctx.x_shape[:-1]), dy.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = dy2d.mm(weight).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            norm = NormOutput(saved, scales, gamma, beta, bits, dtype)
            dw = dy2d.t().mm(norm.rebuilt(ctx.x_shape).to(ctx.x_dtype))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2d.sum(0)
        return dx, dw, db, None
