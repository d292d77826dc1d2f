"""The pruned linear as registered PyTorch operators (torch.library), so torch.compile and the meta
device see it as two opaque ops with known output shapes instead of tracing into the selection.

- ``actprune::pruned_linear`` — forward: F.linear and, when ``compress_input``, the block-sparse
  copy of the input (values, row indices, column offsets); shapes are static (k depends only on
  the input shape and the sparsity).
- ``actprune::block_sparse_weight_grad`` — dW = dyᵀ·X̃ from those tensors (``kernels.weight_grad``).
The autograd formula (``_backward``) uses the second op for dW and plain ops for dx and db.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import kernels
from .blocksparse import BlockSparse, as_rows, compress
from .config import PruneConfig


def _grid(m: int, k: int, bm: int, bk: int) -> tuple[int, int]:
    return math.ceil(m / bm), math.ceil(k / bk)


@torch.library.custom_op("actprune::pruned_linear", mutates_args=())
def pruned_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],  # noqa: UP045 - torch.library reads this annotation
    compress_input: bool,
    sparsity: float,
    block_rows: int,
    block_cols: int,
    criterion: str,
    row_order: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, values, row_indices, ccol_indices); the last three are empty without compress_input."""
    out = F.linear(x, weight, bias)
    if not compress_input:
        empty = x.new_empty(0)
        return out, empty, empty.int(), empty.int()
    config = PruneConfig(sparsity, (block_rows, block_cols), criterion, row_order)
    packed = compress(as_rows(x, row_order), config)
    return out, *packed.tensors


@pruned_linear.register_fake
def _(x, weight, bias, compress_input, sparsity, block_rows, block_cols, criterion, row_order):  # noqa: ANN001
    out = x.new_empty(*x.shape[:-1], weight.shape[0])
    if not compress_input:
        empty = x.new_empty(0)
        return out, empty, empty.int(), empty.int()
    k = x.shape[-1]
    n_br, n_bc = _grid(x.numel() // k, k, block_rows, block_cols)
    nnz = PruneConfig(sparsity, (block_rows, block_cols)).kept_blocks(n_br * n_bc)
    values = x.new_empty(nnz, block_rows, block_cols)
    rows = x.new_empty(nnz, dtype=torch.int32)
    return out, values, rows, x.new_empty(n_bc + 1, dtype=torch.int32)


@torch.library.custom_op("actprune::block_sparse_weight_grad", mutates_args=())
def block_sparse_weight_grad(
    dy: torch.Tensor, values: torch.Tensor, row_indices: torch.Tensor, ccol_indices: torch.Tensor,
    rows: int, cols: int,
) -> torch.Tensor:  # fmt: skip
    """dW [N, K] = dyᵀ [N, M] · X̃ [M, K], X̃ = BlockSparse(values, row_indices, ccol_indices)."""
    return kernels.weight_grad(dy, BlockSparse(values, row_indices, ccol_indices, (rows, cols)))


@block_sparse_weight_grad.register_fake
def _(dy, values, row_indices, ccol_indices, rows, cols):  # noqa: ANN001
    return dy.new_empty(dy.shape[1], cols)


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    x, weight, bias, compress_input, *_, row_order = inputs
    _, values, row_indices, ccol_indices = output
    ctx.x_shape, ctx.row_order, ctx.has_bias = x.shape, row_order, bias is not None
    ctx.compressed = compress_input
    ctx.save_for_backward(weight, values, row_indices, ccol_indices)


def _backward(ctx, dy, *_unused):  # noqa: ANN001
    weight, values, row_indices, ccol_indices = ctx.saved_tensors
    dy2d = dy.reshape(-1, dy.shape[-1])
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = dy2d.mm(weight).view(ctx.x_shape)
    if ctx.needs_input_grad[1]:
        if not ctx.compressed:
            raise RuntimeError(
                "actprune::pruned_linear ran with compress_input=False, so it kept nothing to "
                "compute the weight gradient from; pass compress_input=True when weight needs grad"
            )
        rows = dy2d.shape[0]
        dw = block_sparse_weight_grad(
            as_rows(dy, ctx.row_order).contiguous(), values, row_indices, ccol_indices, rows,
            ctx.x_shape[-1],
        )  # fmt: skip
    if ctx.has_bias and ctx.needs_input_grad[2]:
        db = dy2d.sum(0)
    return dx, dw, db, None, None, None, None, None, None


pruned_linear.register_autograd(_backward, setup_context=_setup_context)
