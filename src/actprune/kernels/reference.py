"""PyTorch implementations of the block kernels: the contract every backend meets, and the CPU path.

Each works on a 2-D tensor viewed as a grid of (bm × bk) blocks; edge blocks of shapes that are
not multiples of the block are zero-padded internally and padding never reaches the caller.
No Python loop runs over blocks: each op is a handful of whole-tensor PyTorch calls.
"""

from __future__ import annotations

import math

import torch

from ..storage import BlockSparse, blocked_view

_REDUCE_COLS = {  # within each block row: [n_br, bm, n_bc, bk] -> [n_br, bm, n_bc] in dtype `acc`
    "l2": lambda b, acc: torch.linalg.vector_norm(b, 2, dim=3, dtype=acc),
    "l1": lambda b, acc: b.abs().sum(3, dtype=acc),
    "max": lambda b, acc: b.abs().amax(3).to(acc),
}
_REDUCE_ROWS = {  # then across the block's rows: -> [n_br, n_bc]
    "l2": lambda r: torch.linalg.vector_norm(r, 2, dim=1),
    "l1": lambda r: r.sum(1),
    "max": lambda r: r.amax(1),
}


def block_scores(x: torch.Tensor, block_shape: tuple[int, int], criterion: str) -> torch.Tensor:
    """Score every block of x [M, K]; returns float32 [n_br, n_bc].

    l2 / l1 / max = the block's Frobenius norm / sum of |x| / max |x|, accumulated in float32
    (float64 for float64 input).
    A block holding NaN or ±Inf scores +inf, so it always ranks first and is kept: a non-finite
    activation is never dropped silently, it reaches the weight gradient as it would in dense.
    """
    # Two single-dim reductions: faster on CPU than one over dims (1, 3) (docs/design.md).
    acc = torch.promote_types(x.dtype, torch.float32)
    per_row = _REDUCE_COLS[criterion](blocked_view(x, block_shape), acc)
    return _REDUCE_ROWS[criterion](per_row).float().nan_to_num_(nan=math.inf)


def pack_blocks(
    x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, block_shape: tuple[int, int]
) -> torch.Tensor:
    """Gather the blocks (rows[i], cols[i]) of x [M, K] into values [nnz, bm, bk] (x.dtype)."""
    return blocked_view(x, block_shape)[rows.long(), :, cols.long(), :]


def _weight_grad_by_blocks(dy: torch.Tensor, x: BlockSparse) -> torch.Tensor:
    """dW = dyᵀ·X̃ as one small matmul per kept block, summed per block-column (FLOPs ∝ density)."""
    bm, bk = x.block_shape
    n_br, n_bc = x.grid_shape
    n = dy.shape[1]
    dy_blocks = blocked_view(dy, (bm, n)).view(n_br, bm, n)  # [n_br, bm, N]
    rows, cols = x.row_indices.long(), x.col_indices().long()
    # Chunk so that the gathered dy blocks and the per-block partial products never take more than
    # a dense copy of the input would (the buffer the other path expands into).
    per_block = (bm * n + n * bk) * dy.element_size()
    chunk = max(1, x.shape[0] * x.shape[1] * dy.element_size() // per_block)
    grad = dy.new_zeros(n, n_bc * bk)
    grad_blocks = grad.view(n, n_bc, bk)
    for start in range(0, x.nnz_blocks, chunk):
        sl = slice(start, start + chunk)
        partial = torch.bmm(dy_blocks[rows[sl]].transpose(1, 2), x.values[sl])  # [c, N, bk]
        grad_blocks.index_add_(1, cols[sl], partial.transpose(0, 1))
    return grad[:, : x.shape[1]]


def use_block_matmul(x: BlockSparse) -> bool:
    """CPU cost model: per-block matmuls beat one dense matmul only for big blocks at low density.

    The per-block path runs at about c / density of dense speed with c = 0.2 · sqrt(bm·bk / 1024),
    fitted to measurements (docs/design.md, "Kernels and dispatch"). Otherwise the kept blocks are
    expanded into a transient dense buffer for this one layer (the saved activation stays
    compressed either way).
    """
    bm, bk = x.block_shape
    return x.density <= 0.2 * math.sqrt(bm * bk / 1024)


def weight_grad(dy: torch.Tensor, x: BlockSparse) -> torch.Tensor:
    """dW [N, K] = dyᵀ [N, M] · X̃ [M, K], X̃ the block-sparse x; result in dy.dtype."""
    if use_block_matmul(x):
        return _weight_grad_by_blocks(dy, x)
    return dy.t().mm(x.to_dense())


def channel_scale_grad(dy: torch.Tensor, x: BlockSparse) -> torch.Tensor:
    """[K] = Σ_m dy[m, k] · X̃[m, k] over kept blocks only; accumulated in float32, dy.dtype out."""
    bk = x.block_shape[1]
    n_bc = x.grid_shape[1]
    cols = x.col_indices().long()
    dy_blocks = blocked_view(dy, x.block_shape)[x.row_indices.long(), :, cols, :]  # [nnz, bm, bk]
    acc = torch.promote_types(dy.dtype, torch.float32)
    partial = (dy_blocks.to(acc) * x.values.to(acc)).sum(1)  # [nnz, bk]
    out = partial.new_zeros(n_bc, bk).index_add_(0, cols, partial)
    return out.view(-1)[: x.shape[1]].to(dy.dtype)
