"""Compression: choose the highest-scoring blocks of a 2-D tensor and store them (``storage``).

``compress`` scores every (bm × bk) block (``kernels.block_scores``), keeps the top k of each
block-column or of the whole tensor (``select_blocks``), gathers them (``kernels.pack_blocks``)
and optionally quantises them (int8) and keeps a low-bit copy of everything (the remainder).
``as_rows`` is how an N-D activation becomes the matrix that blocks are cut from.
"""

from __future__ import annotations

import math

import torch

from . import kernels
from .config import PruneConfig
from .storage import BlockSparse, LowBitBlocks, blocked_view, quantize_int8


def _first_true(mask: torch.Tensor, size: int, fill: int) -> torch.Tensor:
    """int64 [size]: the first `size` indices where the 1-D mask is true, padded with `fill`."""
    try:
        return torch.nonzero_static(mask, size=size, fill_value=fill).squeeze(1)
    except NotImplementedError:  # CUDA before torch 2.6 has only the data-dependent nonzero
        found = torch.nonzero(mask).squeeze(1)[:size]
        return torch.nn.functional.pad(found, (0, size - found.numel()), value=fill)


def select_blocks(
    scores: torch.Tensor, k: int, *, per_column: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The blocks with the largest scores, in BSC order (by block-column, then block-row).

    Ties are broken deterministically: among equal scores, the block that comes first in
    row-major order (block-row, then block-column) is kept first.

    Args:
        scores: [n_br, n_bc] score of every block.
        k: blocks kept in all, or with ``per_column`` in every block-column.

    Keyword args:
        per_column: keep the k best of every block-column instead of the whole grid.

    Returns:
        (rows, cols, ccol_indices), int32: the kept blocks' block-rows and block-columns, and
        the offsets of each block-column's run.

    Example:
        >>> import torch
        >>> from actprune import select_blocks
        >>> rows, cols, ccol = select_blocks(torch.tensor([[1.0, 1, 1, 5]]), 2)
        >>> cols.tolist(), ccol.tolist()
        ([0, 3], [0, 1, 1, 1, 2])
    """
    if per_column:
        return _select_per_column(scores, k)
    n_br, n_bc = scores.shape
    flat = scores.reshape(-1)  # row-major block ids: id = row * n_bc + col (a view, no copy)
    n = flat.numel()
    # Every block above the k-th largest score is kept; ties at it go to the lowest ids. topk and
    # fixed-size nonzero keep the transient memory well below a full sort (docs/design.md,
    # "Selection") and every shape static, so this also runs on the meta device.
    threshold = torch.topk(flat, k, sorted=False).values.min()
    above = _first_true(flat > threshold, k, fill=n)
    tied = _first_true(flat == threshold, k, fill=n)
    n_above = (above < n).sum()
    tied = torch.where(torch.arange(k, device=flat.device) < k - n_above, tied, n)
    kept = torch.cat([above, tied]).sort().values[:k]  # the k valid ids sort before the fill
    rows, cols = kept // n_bc, kept % n_bc
    order = torch.sort(cols * n_br + rows).indices  # BSC: by block-column, then block-row
    rows, cols = rows[order], cols[order]
    # Offsets by binary search rather than bincount: static shapes, so this also runs on "meta".
    bounds = torch.arange(n_bc + 1, device=scores.device, dtype=cols.dtype)
    ccol = torch.searchsorted(cols, bounds, out_int32=True)
    return rows.int(), cols.int(), ccol


def _select_per_column(
    scores: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """select_blocks with ``per_column``: the same threshold-and-ties rule within each column."""
    n_br, n_bc = scores.shape
    threshold = torch.topk(scores, k, dim=0, sorted=False).values.amin(0)  # [n_bc]
    above = scores > threshold
    tied = scores == threshold
    room = k - above.sum(0)  # ties each column still takes, lowest block-rows first
    keep = above | (tied & (tied.cumsum(0) <= room))
    # Column-major ids (col * n_br + row) come out of nonzero already in BSC order.
    ids = _first_true(keep.t().reshape(-1), n_bc * k, fill=0)
    rows, cols = ids % n_br, ids // n_br
    ccol = torch.arange(0, n_bc * k + 1, k, device=scores.device, dtype=torch.int32)
    return rows.int(), cols.int(), ccol


def as_rows(t: torch.Tensor, row_order: str) -> torch.Tensor:
    """The 2-D (rows, features) matrix of an activation (..., features) that blocks are cut from.

    "batch-major": plain flatten. "token-major": dim 0 (the batch) becomes the fastest-varying
    row index, so row = token_index · batch + sample (a copy for inputs with 3+ dims).
    """
    if t.dim() >= 3 and row_order == "token-major":
        t = t.movedim(0, -2)
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])  # explicit rows: 0 columns work too


def compress(x: torch.Tensor, config: PruneConfig) -> BlockSparse:
    """Keep the highest-scoring ceil((1 - sparsity) · n) blocks of a 2-D tensor, n the blocks of
    each block-column or of the whole tensor (``config.selection``).

    Scoring and packing run as Triton kernels on CUDA and as PyTorch ops elsewhere
    (``actprune.kernels``). Blocks holding NaN/Inf always rank first (see ``block_scores``).

    Args:
        x: a non-empty 2-D floating-point tensor [M, K] (``as_rows`` makes one of an activation).
        config: sparsity, block shape, criterion, selection, int8 and remainder bits.

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
    if not x.is_floating_point():
        raise ValueError(f"compress expects a floating-point tensor, got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"compress expects a non-empty tensor, got shape {tuple(x.shape)}")
    block_shape = config.block_shape
    x = x.detach()
    scores = kernels.block_scores(x, block_shape, config.criterion)
    per_column = config.selection == "column"
    k = config.kept_blocks(scores.shape[0] if per_column else scores.numel())
    rows, cols, ccol = select_blocks(scores, k, per_column=per_column)
    values = kernels.pack_blocks(x, rows, cols, block_shape)
    scales = remainder = None
    if config.int8:
        values, scales = quantize_int8(values)
    if config.remainder_bits:
        remainder = LowBitBlocks.quantize(blocked_view(x, block_shape), config.remainder_bits)
    return BlockSparse(values, rows, ccol, tuple(x.shape), scales, remainder)
