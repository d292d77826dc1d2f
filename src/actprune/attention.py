"""Attention that keeps per-head codes of q, k and v and recomputes itself in backward.

Scaled-dot-product attention saves q, k, v, its output and a log-sum-exp (flash and
memory-efficient kernels; the math path also the T×T probabilities). All are on the
input-gradient path. With ``attention_bits`` (4 or 8, an opt-in) each of q, k, v is kept as a
code with one scale per (token, head) row (``rowcode``), and backward runs the attention forward
again from q̃, k̃, ṽ and differentiates it: the output and the log-sum-exp are not kept at all
(one more attention forward per step, as flash attention's backward already recomputes the
probabilities). The forward output is dense attention's, bit for bit; dq, dk, dv are those of
attention at q̃, k̃, ṽ.

Attention is a function call inside a module's forward, not a module, so a converted attention
module (``CodedAttention``) runs its own forward with every ``F.scaled_dot_product_attention``
call routed here (a ``TorchFunctionMode`` scoped to that forward). With dropout the random state
is kept and restored for the recompute, as ``torch.utils.checkpoint`` does, so the mask is the
forward's. Under torch.compile attention stays dense and exact (the recompute differentiates
inside backward, which TorchDynamo does not trace): ``attention_bits`` saves memory in eager
mode only, which docs/design.md states with the compiled measurements.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from . import rng, rowcode
from .config import PruneConfig
from .layers import CompressedLayer, autocast_of, compressing


class AttentionFunction(torch.autograd.Function):
    """F.scaled_dot_product_attention(q, k, v, attn_mask, **options); saves q, k, v as ``bits``
    row codes (and the mask, and the random state when ``dropout_p`` > 0)."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, bits, options):
        ctx.options, ctx.autocast = options, autocast_of(q)
        ctx.rng = rng.torch_state(q.device) if options.get("dropout_p", 0.0) > 0 else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, **options)
        mask = () if attn_mask is None else (attn_mask,)
        rowcode.save_for_backward(ctx, ((q, bits), (k, bits), (v, bits)), *mask)
        return out

    @staticmethod
    def backward(ctx, dout):
        qkv, mask = rowcode.saved_tensors(ctx)
        qkv = [t.detach().requires_grad_(need) for t, need in zip(qkv, ctx.needs_input_grad)]
        if ctx.rng is None:
            out = _recompute(ctx, qkv, mask)
        else:  # the forward's dropout mask: its random state, restored around the recompute
            with rng.replaying(dout.device, ctx.rng):
                out = _recompute(ctx, qkv, mask)
        wanted = [t for t in qkv if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, dout))
        dq, dk, dv = (next(grads) if t.requires_grad else None for t in qkv)
        return dq, dk, dv, None, None, None


def _recompute(ctx, qkv: list[torch.Tensor], mask: list[torch.Tensor]) -> torch.Tensor:
    with torch.enable_grad(), ctx.autocast:
        return F.scaled_dot_product_attention(*qkv, *(mask or [None]), **ctx.options)


def coded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    *,
    bits: int,
    **options: object,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, **options)`` keeping ``bits``-bit
    per-(token, head) codes of q, k and v for backward, which recomputes the attention from them.

    Args:
        q, k, v, attn_mask: as ``F.scaled_dot_product_attention``.
        bits: 4 or 8 (``rowcode``); 0 calls the dense function.
        **options: ``dropout_p``, ``is_causal``, ``scale``, ``enable_gqa``.

    Returns:
        The attention output, equal to dense attention's bit for bit.

    Example:
        >>> import torch
        >>> from actprune.attention import coded_attention
        >>> q = torch.randn(2, 4, 16, 8, requires_grad=True)
        >>> coded_attention(q, q, q, bits=8, is_causal=True).shape
        torch.Size([2, 4, 16, 8])
    """
    needs = compressing() and any(t.requires_grad for t in (q, k, v))
    if bits == 0 or not needs:
        return F.scaled_dot_product_attention(q, k, v, attn_mask, **options)
    if torch.compiler.is_compiling():
        # The recompute differentiates inside backward (torch.autograd.grad), which TorchDynamo
        # does not trace (nor a warning): compiled code keeps dense, exact attention.
        return F.scaled_dot_product_attention(q, k, v, attn_mask, **options)
    return AttentionFunction.apply(q, k, v, attn_mask, bits, options)


class _RouteAttention(TorchFunctionMode):
    """Routes F.scaled_dot_product_attention to ``coded_attention`` while active."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return coded_attention(*args, bits=self.bits, **kwargs)
        return func(*args, **kwargs)


class CodedAttention(CompressedLayer):
    """Base of the attention modules whose ``F.scaled_dot_product_attention`` calls keep
    ``config.attention_bits``-bit codes of q, k, v (``coded_attention``); converted only when
    ``attention_bits`` > 0. A subclass names its dense class (second base), whose forward must
    compute attention through ``F.scaled_dot_product_attention``; its Linear children convert as
    usual. Attention computed otherwise in that forward (an eager softmax) stays dense.

    Attributes:
        prune_config: ``attention_bits`` picks the codes' bits.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from actprune import CodedAttention, PruneConfig, register_conversion
        >>> class SelfAttention(nn.Module):             # a user's own attention module
        ...     def __init__(self, dim, heads):
        ...         super().__init__()
        ...         self.heads, self.qkv = heads, nn.Linear(dim, 3 * dim)
        ...     def forward(self, x):
        ...         b, t, d = x.shape
        ...         qkv = self.qkv(x).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        ...         y = F.scaled_dot_product_attention(*qkv, is_causal=True)
        ...         return y.transpose(1, 2).reshape(b, t, d)
        >>> @register_conversion(SelfAttention, scopes=("linear", "all"))
        ... class CodedSelfAttention(CodedAttention, SelfAttention):
        ...     pass
        >>> config = PruneConfig.preset("transformer")
        >>> layer = CodedSelfAttention.from_module(SelfAttention(64, 4), config)
        >>> layer(torch.randn(2, 16, 64, requires_grad=True)).shape
        torch.Size([2, 16, 64])
    """

    saved_for = "queries, keys, values (attention recomputed in backward)"

    @classmethod
    def applies(cls, config: PruneConfig) -> bool:
        return config.attention_bits > 0

    def forward(self, *args, **kwargs):
        if not compressing():
            return super().forward(*args, **kwargs)
        with _RouteAttention(self.prune_config.attention_bits):
            return super().forward(*args, **kwargs)

    def describe(self) -> str:
        bits = self.prune_config.attention_bits
        return f"{bits}-bit per-(token, head) codes of q, k, v; recomputed"
