"""A GPT-2-style causal language model (Radford et al. 2019), byte-level: the zoo's second
workload, for ``actprune compare --task lm``. Layout follows nanoGPT and timm: config, blocks,
model, entry points. Plain PyTorch modules throughout (Linear, GELU, LayerNorm, and attention
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
from ._registry import register_model


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256  # bytes
    block_size: int = 256  # the longest sequence (positions)
    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        for field in ("vocab_size", "block_size", "width", "depth", "heads", "mlp_ratio"):
            if getattr(self, field) <= 0:
                raise ValueError(f"GPT {field} must be positive, got {getattr(self, field)}")
        if self.width % self.heads:
            raise ValueError(f"GPT width {self.width} must be a multiple of heads {self.heads}")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: one Linear for q, k, v, one for the output."""

    def __init__(self, c: GPTConfig, device=None, dtype=None) -> None:
        super().__init__()
        self.heads = c.heads
        self.qkv = nn.Linear(c.width, 3 * c.width, device=device, dtype=dtype)
        self.proj = nn.Linear(c.width, c.width, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d)
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


@register_conversion(CausalSelfAttention, scopes=SCOPES)
class CodedCausalSelfAttention(CodedAttention, CausalSelfAttention):
    """CausalSelfAttention keeping ``attention_bits`` codes of q, k, v (``CodedAttention``)."""


class GPTBlock(nn.Module):
    """Pre-norm block: x + attn(ln(x)), then x + mlp(ln(x)) with a GELU MLP."""

    def __init__(self, c: GPTConfig, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.ln1 = nn.LayerNorm(c.width, **kw)
        self.attn = CausalSelfAttention(c, **kw)
        self.ln2 = nn.LayerNorm(c.width, **kw)
        self.fc1 = nn.Linear(c.width, c.mlp_ratio * c.width, **kw)
        self.gelu = nn.GELU()
        self.fc2 = nn.Linear(c.mlp_ratio * c.width, c.width, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(self.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    """Token + position embeddings → depth × GPTBlock → LayerNorm → linear head (its own weight:
    tying it to the embedding would make the head's input share a Parameter with the embedding)."""

    def __init__(self, config: GPTConfig, device=None, dtype=None) -> None:
        super().__init__()
        c = self.config = config
        kw = {"device": device, "dtype": dtype}
        self.tok = nn.Embedding(c.vocab_size, c.width, **kw)
        self.pos = nn.Embedding(c.block_size, c.width, **kw)
        self.blocks = nn.Sequential(*[GPTBlock(c, **kw) for _ in range(c.depth)])
        self.norm = nn.LayerNorm(c.width, **kw)
        self.head = nn.Linear(c.width, c.vocab_size, bias=False, **kw)
        self.apply(_init)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) tokens -> (B, T, vocab) logits; with ``targets`` (B, T) (-100: no loss) the mean
        cross-entropy instead, computed without the logits (``linear_cross_entropy``)."""
        t = tokens.shape[1]
        if t > self.config.block_size:
            raise ValueError(f"sequence of {t} tokens is longer than block_size "
                             f"{self.config.block_size}")  # fmt: skip
        positions = torch.arange(t, device=tokens.device)
        x = self.norm(self.blocks(self.tok(tokens) + self.pos(positions)))
        if targets is None:
            return self.head(x)
        return linear_cross_entropy(x, self.head.weight, targets, self.head.bias)


def _init(module: nn.Module) -> None:
    """GPT-2's initialisation: N(0, 0.02) weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def _build(defaults: dict, overrides: dict) -> GPT:
    device, dtype = overrides.pop("device", None), overrides.pop("dtype", None)
    return GPT(GPTConfig(**{**defaults, **overrides}), device=device, dtype=dtype)


@register_model
def gpt_tiny(**overrides: object) -> GPT:
    """Not from a paper: byte-level, width 256, depth 4, 4 heads, 256 positions (3.3 M
    parameters); the CPU-sized model of ``actprune compare --task lm``."""
    return _build({}, overrides)


@register_model
def gpt2_small(**overrides: object) -> GPT:
    """GPT-2 small's shape (width 768, depth 12, 12 heads, 1024 positions) over bytes: 86 M
    parameters (GPT-2's own 50257-token vocabulary adds 38 M in embeddings and head)."""
    return _build({"width": 768, "depth": 12, "heads": 12, "block_size": 1024}, overrides)
