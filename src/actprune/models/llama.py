"""A Llama-style causal language model (Touvron et al. 2023), byte-level: RMSNorm, rotary
position embeddings (RoPE, Su et al. 2021) and a SwiGLU MLP (Shazeer 2020), no biases — the
layout most language models are trained with today, beside the GPT-2-style ``gpt`` family, for
``actprune compare --task lm``. Plain PyTorch modules throughout (Linear, SiLU, RMSNorm, attention
through ``F.scaled_dot_product_attention``), so actprune converts it like any user's model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import CodedAttention
from ..config import SCOPES
from ..convert import register_conversion
from ..loss import linear_cross_entropy
from ..swiglu import FusedSwiGLU
from ._registry import register_model


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 256  # bytes
    block_size: int = 256  # the longest sequence (positions RoPE is tabulated for)
    width: int = 256
    depth: int = 4
    heads: int = 4
    hidden: int = 688  # SwiGLU width: about 8/3 · width, a multiple of 16
    rope_base: float = 10000.0

    def __post_init__(self) -> None:
        for field in ("vocab_size", "block_size", "width", "depth", "heads", "hidden"):
            if getattr(self, field) <= 0:
                raise ValueError(f"Llama {field} must be positive, got {getattr(self, field)}")
        if self.width % self.heads or (self.width // self.heads) % 2:
            raise ValueError(f"Llama width {self.width} must be a multiple of heads "
                             f"{self.heads} with an even head size (RoPE turns pairs)")  # fmt: skip


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (B, heads, T, head_dim): each pair (x1, x2) of the halves turned by its angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class RotaryAttention(nn.Module):
    """Multi-head causal self-attention with RoPE on q and k; q, k, v and output projections."""

    def __init__(self, c: LlamaConfig, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype, "bias": False}
        self.heads = c.heads
        self.q, self.k, self.v = (nn.Linear(c.width, c.width, **kw) for _ in range(3))
        self.o = nn.Linear(c.width, c.width, **kw)
        half = c.width // c.heads // 2
        freq = c.rope_base ** (-torch.arange(half, device=device, dtype=torch.float32) / half)
        angle = torch.arange(c.block_size, device=device, dtype=torch.float32)[:, None] * freq
        self.register_buffer("cos", angle.cos(), persistent=False)  # (block_size, half)
        self.register_buffer("sin", angle.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d)
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2)
                   for p in (self.q, self.k, self.v))  # fmt: skip
        cos, sin = self.cos[:t].to(q.dtype), self.sin[:t].to(q.dtype)
        y = F.scaled_dot_product_attention(_rotate(q, cos, sin), _rotate(k, cos, sin), v,
                                           is_causal=True)  # fmt: skip
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) ⊙ up(x))."""

    def __init__(self, c: LlamaConfig, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype, "bias": False}
        self.gate = nn.Linear(c.width, c.hidden, **kw)
        self.up = nn.Linear(c.width, c.hidden, **kw)
        self.act = nn.SiLU()
        self.down = nn.Linear(c.hidden, c.width, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.gate(x)) * self.up(x))


@register_conversion(RotaryAttention, scopes=SCOPES)
class CodedRotaryAttention(CodedAttention, RotaryAttention):
    """RotaryAttention keeping ``attention_bits`` codes of the rotated q, k and v
    (``CodedAttention``)."""


@register_conversion(SwiGLU, scopes=SCOPES)
class CompactSwiGLU(FusedSwiGLU, SwiGLU):
    """SwiGLU keeping gate(x) and up(x) only (``FusedSwiGLU``)."""


class LlamaBlock(nn.Module):
    """Pre-norm block: x + attn(rmsnorm(x)), then x + swiglu(rmsnorm(x))."""

    def __init__(self, c: LlamaConfig, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.norm1 = nn.RMSNorm(c.width, eps=1e-5, **kw)
        self.attn = RotaryAttention(c, **kw)
        self.norm2 = nn.RMSNorm(c.width, eps=1e-5, **kw)
        self.mlp = SwiGLU(c, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Llama(nn.Module):
    """Token embedding → depth × LlamaBlock → RMSNorm → linear head (untied, as ``GPT``'s)."""

    def __init__(self, config: LlamaConfig, device=None, dtype=None) -> None:
        super().__init__()
        c = self.config = config
        kw = {"device": device, "dtype": dtype}
        self.tok = nn.Embedding(c.vocab_size, c.width, **kw)
        self.blocks = nn.Sequential(*[LlamaBlock(c, **kw) for _ in range(c.depth)])
        self.norm = nn.RMSNorm(c.width, eps=1e-5, **kw)
        self.head = nn.Linear(c.width, c.vocab_size, bias=False, **kw)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) tokens -> (B, T, vocab) logits; with ``targets`` (B, T) (-100: no loss) the mean
        cross-entropy instead, computed without the logits (``linear_cross_entropy``)."""
        if tokens.shape[1] > self.config.block_size:
            raise ValueError(f"sequence of {tokens.shape[1]} tokens is longer than block_size "
                             f"{self.config.block_size}")  # fmt: skip
        x = self.norm(self.blocks(self.tok(tokens)))
        if targets is None:
            return self.head(x)
        return linear_cross_entropy(x, self.head.weight, targets)


@register_model
def llama_tiny(**overrides: object) -> Llama:
    """Not from a paper: byte-level, width 256, depth 4, 4 heads, SwiGLU 688, 256 positions
    (3.3 M parameters, as ``gpt_tiny``); the Llama-layout model of ``compare --task lm``."""
    device, dtype = overrides.pop("device", None), overrides.pop("dtype", None)
    return Llama(LlamaConfig(**overrides), device=device, dtype=dtype)
