"""LayerNorm and RMSNorm keeping their normalized input x̂ and 1/rms instead of their input.

Backward needs x̂ = (x − mean)·rstd (RMSNorm: x·rstd) and rstd, nothing else (g = dy ⊙ γ):

    LayerNorm  dx = rstd · (g − mean(g) − x̂ · mean(g ⊙ x̂))
    RMSNorm    dx = rstd · (g − x̂ · mean(g ⊙ x̂))
    dγ = Σ_rows dy ⊙ x̂,   dβ = Σ_rows dy

- Exact (``norm_bits`` 0): an RMSNorm written as PyTorch ops (``nn.RMSNorm`` on CPU, Hugging
  Face's Llama) saves its input *and* the normalized product, two tensors of the input's size;
  kept as x̂ and rstd it saves one (scope "all"). A LayerNorm's fused op already saves one, so it
  stays as it is.
- Coded (``norm_bits`` 4 or 8, an opt-in): x̂ is kept as per-token row codes (``rowcode``), so dx
  and dγ read x̃ within the codes' bound; rstd stays exact.

The output is the dense module's own forward, bit for bit; dx and dγ are computed in float32 by
the formulas above, so exact mode equals dense to float rounding (not bit for bit: autograd's
kernels sum in another order).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from . import kernels, norm_input, rowcode
from .config import PruneConfig
from .layers import CompressedLayer, _needs_graph


class NormFunction(torch.autograd.Function):
    """y = ``dense(x)``; saves x̂ (exact or coded) and rstd. Args after x: weight (or None),
    bias (or None), what ``kernels.normalized_row_codes`` gave (x̂ or its codes, their scales,
    rstd), rms (True: RMSNorm), bits, dense (the module's dense forward)."""

    @staticmethod
    def forward(ctx, x, weight, bias, saved, scales, rstd, rms, bits, dense):
        ctx.rms, ctx.has_bias = rms, bias is not None
        params = () if weight is None else (weight,)
        rowcode.save_encoded(ctx, x.shape, x.dtype, bits, saved, scales, rstd, *params)
        return dense(x)

    @staticmethod
    def backward(ctx, dy):
        ((_, x_dtype, bits),) = ctx.row_codes
        saved, *rest = ctx.saved_tensors
        scales, (rstd, *params) = (rest[0], rest[1:]) if bits else (saved, rest)
        weight = params[0] if params else None
        dx, dw, db = kernels.norm_grad(dy, saved, scales, rstd, weight, ctx.rms, bits,
                                       ctx.has_bias, x_dtype)  # fmt: skip
        dw = dw.to(weight.dtype) if dw is not None and ctx.needs_input_grad[1] else None
        db = db.to(weight.dtype) if db is not None and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None, None, None, None


class CodedNorm(CompressedLayer):
    """Base of the normalizations over the last dimension that keep x̂ and rstd
    (``NormFunction``). A subclass names its dense class (second base) and says where its
    parameters and eps are (``weight_name``, ``bias_name``, ``eps``) and whether it is an RMSNorm.

    Attributes:
        rms: True for an RMSNorm (no mean subtracted, no bias).
        weight_name, bias_name: attribute names of γ and β (None: absent).
        prune_config: ``norm_bits`` picks exact (0) or the code's bits.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from actprune import CodedNorm, PruneConfig, register_conversion
        >>> class ScaleNorm(nn.Module):                 # a user's own RMSNorm
        ...     def __init__(self, dim):
        ...         super().__init__()
        ...         self.gain = nn.Parameter(torch.ones(dim))
        ...     def forward(self, x):
        ...         return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.gain
        >>> @register_conversion(ScaleNorm, scopes=("linear", "all"))
        ... class CodedScaleNorm(CodedNorm, ScaleNorm):
        ...     rms, weight_name = True, "gain"
        ...     def eps_for(self, x):
        ...         return 1e-6
        >>> norm = CodedScaleNorm.from_module(ScaleNorm(64), PruneConfig.preset("transformer"))
        >>> norm(torch.randn(8, 64, requires_grad=True)).shape
        torch.Size([8, 64])
    """

    rms: bool
    weight_name: str | None = "weight"
    bias_name: str | None = None
    saved_for = "normalized input and 1/rms (for dx and the weight gradient)"

    @classmethod
    def applies(cls, config: PruneConfig) -> bool:
        """RMSNorms convert with scope "all" (keeping x̂ saves a tensor) or ``norm_bits``;
        LayerNorms only with ``norm_bits`` (exact, their fused op already saves one)."""
        return config.norm_bits > 0 or (cls.rms and config.scope == "all")

    @classmethod
    def convertible(cls, module: nn.Module) -> bool:
        return len(getattr(module, "normalized_shape", (None,))) == 1

    def eps_for(self, x: torch.Tensor) -> float:
        """The eps added to the mean square (or variance) for input ``x``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_name and getattr(self, self.weight_name)
        bias = self.bias_name and getattr(self, self.bias_name)
        dense = functools.partial(self.dense_class.forward, self)  # not super(): torch 2.11
        if not _needs_graph(x, weight, bias):
            return dense(x)
        bits = self.prune_config.norm_bits
        saved, scales, rstd = kernels.normalized_row_codes(x.detach(), self.eps_for(x), self.rms,
                                                           bits)  # fmt: skip
        y = NormFunction.apply(x, weight, bias, saved, scales, rstd, self.rms, bits, dense)
        if not torch.compiler.is_compiling():  # the Linear layers reading y use x̂ for their dW
            norm_input.keep(y, norm_input.NormOutput(saved, scales, weight, bias, bits, x.dtype))
        return y

    def describe(self) -> str:
        bits = self.prune_config.norm_bits
        return f"{bits}-bit per-token code of x̂, rstd exact" if bits else "x̂ and rstd (exact)"


class CodedLayerNorm(CodedNorm, nn.LayerNorm):
    """nn.LayerNorm over the last dimension keeping a ``norm_bits`` code of x̂ (converted only
    when ``norm_bits`` > 0: exact, it saves what the dense op saves).

    Attributes:
        normalized_shape, eps, weight, bias: as ``nn.LayerNorm`` (one normalized dimension).
        prune_config: ``norm_bits`` picks the code's bits.

    Example:
        >>> import torch
        >>> from actprune import PruneConfig
        >>> from actprune.norms import CodedLayerNorm
        >>> config = PruneConfig.preset("uniform", norm_bits=8)
        >>> ln = CodedLayerNorm.from_module(torch.nn.LayerNorm(64), config)
        >>> ln(torch.randn(8, 64, requires_grad=True)).shape
        torch.Size([8, 64])
    """

    dense_class = nn.LayerNorm
    rms = False
    bias_name = "bias"

    def eps_for(self, x: torch.Tensor) -> float:
        return self.eps


class CodedRMSNorm(CodedNorm, nn.RMSNorm):
    """nn.RMSNorm over the last dimension keeping x̂ and rstd: one tensor of the input's size
    instead of two (exact, scope "all"), or a ``norm_bits`` code of x̂.

    Attributes:
        normalized_shape, eps, weight: as ``nn.RMSNorm`` (one normalized dimension).
        prune_config: ``norm_bits`` picks exact (0) or the code's bits.

    Example:
        >>> import torch
        >>> from actprune import PruneConfig, saved_activation_bytes
        >>> from actprune.norms import CodedRMSNorm
        >>> norm = CodedRMSNorm.from_module(torch.nn.RMSNorm(64), PruneConfig.preset("uniform"))
        >>> saved_activation_bytes(norm, torch.randn(8, 64, requires_grad=True))  # x̂ and rstd
        2080
    """

    dense_class = nn.RMSNorm
    rms = True

    def eps_for(self, x: torch.Tensor) -> float:
        return torch.finfo(x.dtype).eps if self.eps is None else self.eps
