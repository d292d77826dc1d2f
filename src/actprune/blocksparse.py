"""Compression: choose the highest-scoring blocks of a 2-D tensor and store them (``storage``).

``compress`` scores every (bm × bk) block and, with a remainder, codes the whole tensor at low
precision in the same pass (``kernels.score_blocks``), keeps the top k of each block-column or of
the whole tensor (``select_blocks``), gathers them (``kernels.pack_blocks``) and optionally
quantises them (int8). ``as_rows`` is how an N-D activation becomes the matrix that blocks are cut
from; ``row_source`` is the same matrix as the kernels read it, without a copy.
"""

from __future__ import annotations

import math

import torch

from . import kernels, rng
from .config import PruneConfig
from .kernels import select_blocks
from .storage import BlockSparse, LowBitBlocks, absent_part, quantize_int8


def row_source(t: torch.Tensor, row_order: str) -> torch.Tensor:
    """An activation (..., features) as the [B, T, C] *row source* the kernels read: row
    t·B + b of ``as_rows(t, row_order)`` is ``row_source(...)[b, t]``. A view whenever
    ``t.reshape`` can give one (always for contiguous t): no copy, whatever the row order.
    """
    k = t.shape[-1]  # sizes spelled out: -1 is ambiguous when k is 0
    if t.dim() >= 3 and row_order == "token-major":
        return t.reshape(t.shape[0], math.prod(t.shape[1:-1]), k)
    return t.reshape(1, math.prod(t.shape[:-1]), k)


def as_rows(t: torch.Tensor, row_order: str) -> torch.Tensor:
    """The 2-D (rows, features) matrix of an activation (..., features) that blocks are cut from.

    "batch-major": plain flatten. "token-major": dim 0 (the batch) becomes the fastest-varying
    row index, so row = token_index · batch + sample (a copy for inputs with 3+ dims; the kernels
    read the same rows through ``row_source`` instead).
    """
    return kernels.reference.rows_of(row_source(t, row_order))


def compress(x: torch.Tensor, config: PruneConfig, stream: rng.Stream | None = None) -> BlockSparse:
    """Keep the highest-scoring ceil((1 - sparsity) · n) blocks of a 2-D tensor, n the blocks of
    each block-column or of the whole tensor (``config.selection``).

    Scoring, remainder coding and packing run as Triton kernels on CUDA, as numba kernels on CPU
    and as PyTorch ops otherwise (``actprune.kernels``). Blocks holding NaN/Inf always rank first
    (see ``kernels.score_blocks``). The remainder's stochastic rounding takes one key of one of
    actprune's own random streams (``actprune.rng``); torch's generators are never touched.

    Args:
        x: a non-empty 2-D floating-point tensor [M, K] (``as_rows`` makes one of an activation).
        config: sparsity, block shape, criterion, selection, int8 and remainder bits.
        stream: the ``rng.Stream`` to draw from (default: the calling thread's).

    Returns:
        The ``BlockSparse`` of x.

    Example:
        >>> import torch
        >>> from actprune import PruneConfig, compress
        >>> blocks = compress(torch.randn(256, 128), PruneConfig(0.9, 32))
        >>> blocks.nnz_blocks, blocks.density                  # 1 of 8 block-rows per column
        (4, 0.125)
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"compress expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"compress expects a 2-D tensor, got shape {tuple(x.shape)}")
    return compress_rows_of(x.unsqueeze(0), config, stream)


def compress_rows_of(
    x3: torch.Tensor, config: PruneConfig, stream: rng.Stream | None = None
) -> BlockSparse:
    """``compress`` of the rows of a row source x3 [B, T, C] (``row_source``), read in place."""
    if not x3.is_floating_point():
        raise ValueError(f"compress expects a floating-point tensor, got dtype {x3.dtype}")
    if x3.numel() == 0:
        shape = tuple(x3.shape[1:]) if x3.shape[0] == 1 else tuple(x3.shape)
        raise ValueError(f"compress expects a non-empty tensor, got shape {shape}")
    block_shape, bits = config.block_shape, config.remainder_bits
    x3 = kernels.readable(x3.detach())
    key = (stream or rng.thread_stream()).next_key() if bits else 0
    if config.uniform:
        # No block is kept: the selection is empty, and its offsets are zeroed by the pass that
        # codes the tensor (one launch in all). Its scores need only the block max, which the
        # scales need anyway (an l2 or l1 score would be a sum computed for nothing).
        ccol = torch.empty(-(-x3.shape[2] // block_shape[1]) + 1, dtype=torch.int32,
                           device=x3.device)  # fmt: skip
        _, codes, low_scales = kernels.score_blocks(x3, block_shape, "max", bits, key, ccol)
        rows = absent_part(x3.device, torch.int32, (0,), "row_indices")
        values = absent_part(x3.device, x3.dtype, (0, *block_shape), "values")
    else:
        scores, codes, low_scales = kernels.score_blocks(x3, block_shape, config.criterion, bits,
                                                         key)  # fmt: skip
        per_column = config.selection == "column"
        k = config.kept_blocks(scores.shape[0] if per_column else scores.numel())
        rows, cols, ccol = select_blocks(scores, k, per_column=per_column)
        values = kernels.pack_blocks(x3, rows, cols, block_shape)
    scales = None
    if config.int8:
        values, scales = quantize_int8(values)
    remainder = LowBitBlocks(codes, low_scales, bits) if bits else None
    shape = (x3.shape[0] * x3.shape[1], x3.shape[2])
    return BlockSparse(values, rows, ccol, shape, scales, remainder)
