"""The block kernels on the meta device: what the fast backends allocate, and nothing else.

``actprune plan`` predicts a step's peak memory by running it on "meta" tensors
(docs/design.md, "Predicting memory"). The numba and Triton kernels allocate only their outputs
(plus row-sized scratch), while the PyTorch reference allocates whole-tensor transients on the way;
so on meta each kernel allocates what the fast path does: its outputs, and for the weight
gradient the decoded tile of ``reference.weight_grad_tiled``. Same contract as ``reference``.
"""

from __future__ import annotations

import torch

from ..derivative_code import DerivativeCode
from ..storage import BlockSparse
from . import reference


def score_blocks(
    x3: torch.Tensor,
    block_shape: tuple[int, int],
    criterion: str,
    bits: int,
    key: int,
    ccol: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    (bm, bk), (batch, t, k) = block_shape, x3.shape
    n_br, n_bc = -(-batch * t // bm), -(-k // bk)
    scores = x3.new_empty(n_br, n_bc, dtype=torch.float32)
    codes = x3.new_empty(n_br * bm * n_bc * bk * bits // 8, dtype=torch.uint8)
    return scores, codes, x3.new_empty((n_br, n_bc) if bits else (0,), dtype=torch.float32)


def select_blocks(
    scores: torch.Tensor, k: int, *, per_column: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the numba selection allocates: a copy of the scores and a keep map (transient), the
    kept blocks' rows and columns, the offsets. (On CUDA the selection still runs the reference's
    PyTorch ops, whose top-k transients are larger.)"""
    n_br, n_bc = scores.shape
    nnz = k * n_bc if per_column else k
    scores.new_empty(n_br * n_bc), scores.new_empty(n_br, n_bc, dtype=torch.bool)
    rows, cols = scores.new_empty(nnz, dtype=torch.int32), scores.new_empty(nnz, dtype=torch.int32)
    return rows, cols, scores.new_empty(n_bc + 1, dtype=torch.int32)


def pack_blocks(
    x3: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, block_shape: tuple[int, int]
) -> torch.Tensor:
    return x3.new_empty(rows.numel(), *block_shape)


def decode_rows(x: BlockSparse, start: int, stop: int, batch: int) -> torch.Tensor:
    (m, _), (bm, bk), n_bc = x.shape, x.block_shape, x.grid_shape[1]
    return x.values.new_empty(min(m, stop * bm) - start * bm, n_bc * bk)


def weight_grad(dy3: torch.Tensor, x: BlockSparse) -> torch.Tensor:
    return reference.weight_grad(dy3, x, decode_rows)


def channel_scale_grad(dy3: torch.Tensor, x: BlockSparse) -> torch.Tensor:
    n_br, k = x.grid_shape[0], x.shape[1]
    dy3.new_empty(n_br, k, dtype=torch.float64)  # the per-block-row partial sums
    return dy3.new_empty(k)


def activation_codes(x: torch.Tensor, code: DerivativeCode) -> tuple[torch.Tensor, torch.Tensor]:
    rows = x.numel() // x.shape[-1] if x.dim() else 1
    codes = x.new_empty(-(-x.numel() * code.bits // 8), dtype=torch.uint8)
    return codes, x.new_empty(-(-rows // 8), dtype=torch.uint8)


def activation_grad(
    dy: torch.Tensor, codes: torch.Tensor, nonfinite: torch.Tensor, code: DerivativeCode
) -> torch.Tensor:
    return torch.empty_like(dy)
