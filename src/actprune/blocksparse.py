"""The storage format of a pruned activation: kept blocks grouped by block-column (BSC).

A 2-D tensor X [M, K] is cut into (bm × bk) blocks; ``compress`` keeps the k highest-scoring ones.
They are stored block-column by block-column because the one consumer that matters, the weight
gradient dW[:, j-th block-column] = Σ_i dy[i-th block-row]ᵀ · X[i, j], then walks a contiguous run
of blocks per output tile, with no gather and no transposed index (../docs/design.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import kernels
from .bitpack import pack_codes, unpack_codes
from .config import PruneConfig
from .kernels.reference import blocked_view


def _random_bytes(shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Uniform random uint8 of ``shape``, drawn 8 at a time as int64 from the global generator."""
    numel = shape.numel()
    words = torch.empty(-(-numel // 8), dtype=torch.int64, device=device)
    words.random_(-(2**63), 2**63 - 1)
    return words.view(torch.uint8)[:numel].view(shape)


@dataclass(frozen=True)
class LowBitBlocks:
    """A whole (zero-padded) [M', K'] tensor at ``bits`` per element, one float32 scale per block.

    Element x of block b is coded as one of 2^bits evenly spaced levels over [−s_b, s_b],
    s_b = max |x| in the block, chosen by stochastic rounding between the two nearest levels, so
    the decoded value is an unbiased estimate of x (error < one level spacing, 2·s_b / (2^bits−1)).
    The rounding compares the fraction with a random byte (8× cheaper to draw than a float on
    CPU), which leaves a bias below 1/256 of a level. Codes are packed in the padded tensor's
    row-major order (``bitpack``).
    """

    codes: torch.Tensor  # uint8 [ceil(M'·K'·bits / 8)]
    scales: torch.Tensor  # float32 [n_br, n_bc]
    bits: int

    @staticmethod
    def quantize(blocks: torch.Tensor, bits: int) -> LowBitBlocks:
        """Code a blocked view [n_br, bm, n_bc, bk] (``reference.blocked_view``)."""
        levels = (1 << bits) - 1
        scales = blocks.abs().amax(dim=(1, 3)).float()  # [n_br, n_bc]
        unit = (blocks.float() / scales.clamp_min(1e-30)[:, None, :, None]).add_(1).mul_(levels / 2)
        low = unit.floor()
        up = unit.sub_(low).mul_(256) > _random_bytes(unit.shape, unit.device)
        codes = low.add_(up).clamp_(0, levels).to(torch.uint8)
        return LowBitBlocks(pack_codes(codes.view(-1), bits), scales, bits)

    def decode(self, block_shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """The blocked view [n_br, bm, n_bc, bk] of the decoded tensor, in ``dtype``."""
        (n_br, n_bc), (bm, bk) = self.scales.shape, block_shape
        levels = (1 << self.bits) - 1
        codes = unpack_codes(self.codes, self.bits, n_br * bm * n_bc * bk)
        unit = codes.view(n_br, bm, n_bc, bk).float().mul_(2 / levels).sub_(1)
        return unit.mul_(self.scales[:, None, :, None]).to(dtype)


@dataclass(frozen=True)
class BlockSparse:
    """A 2-D tensor with only some (bm × bk) blocks stored; absent blocks are zero.

    ``values[ccol_indices[j]:ccol_indices[j+1]]`` are the kept blocks of block-column j, in
    increasing block-row order given by ``row_indices``. Edge blocks of shapes that are not
    multiples of the block are stored zero-padded to the full block; the padding never shows in
    ``to_dense`` and is counted in ``nbytes`` (it is memory that is really held).
    """

    values: torch.Tensor  # [nnz, bm, bk], dtype of the compressed tensor (int8 with scales)
    row_indices: torch.Tensor  # int32 [nnz], block-row of each kept block
    ccol_indices: torch.Tensor  # int32 [n_bc + 1], offsets of each block-column's blocks
    shape: tuple[int, int]  # (M, K) of the dense tensor
    scales: torch.Tensor | None = None  # float32 [nnz]: block b is values[b] · scales[b] (int8)
    # The dropped blocks at low precision (PruneConfig.remainder_bits); None: dropped = zero.
    remainder: LowBitBlocks | None = None

    @property
    def block_shape(self) -> tuple[int, int]:
        return (self.values.shape[1], self.values.shape[2])

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(block-rows, block-cols) of the dense tensor, edge blocks included."""
        (m, k), (bm, bk) = self.shape, self.block_shape
        return (-(-m // bm), -(-k // bk))

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the stored values (int8 when quantised)."""
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nnz_blocks(self) -> int:
        return self.values.shape[0]

    @property
    def density(self) -> float:
        """Fraction of blocks kept."""
        n_br, n_bc = self.grid_shape
        return self.nnz_blocks / max(1, n_br * n_bc)

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors held, in constructor order (what autograd saves for backward)."""
        extra = () if self.scales is None else (self.scales,)
        if self.remainder is not None:
            extra += (self.remainder.codes, self.remainder.scales)
        return (self.values, self.row_indices, self.ccol_indices, *extra)

    def dequantized(self, dtype: torch.dtype) -> BlockSparse:
        """The same blocks with ``dtype`` values: self when they already are, else a transient
        copy (dequantised when int8). The remainder is kept as it is."""
        if self.scales is None and self.values.dtype == dtype:
            return self
        values = self.values
        if self.scales is not None:
            values = values.float() * self.scales.view(-1, 1, 1)
        return BlockSparse(
            values.to(dtype), self.row_indices, self.ccol_indices, self.shape,
            remainder=self.remainder,
        )  # fmt: skip

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor this object holds."""
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def col_indices(self) -> torch.Tensor:
        """int32 [nnz]: block-column of each kept block (expanded from ``ccol_indices``)."""
        return _expand_offsets(self.ccol_indices, self.nnz_blocks)

    def block_mask(self) -> torch.Tensor:
        """bool [n_br, n_bc]: True where a block is kept."""
        mask = torch.zeros(self.grid_shape, dtype=torch.bool, device=self.device)
        mask[self.row_indices.long(), self.col_indices().long()] = True
        return mask

    def to_dense(self) -> torch.Tensor:
        """The [M, K] tensor: kept blocks, and dropped blocks as zeros or, with a remainder, as
        their low-bit decoding (float32 when int8)."""
        if self.scales is not None:
            return self.dequantized(torch.float32).to_dense()
        (m, k), (bm, bk) = self.shape, self.block_shape
        n_br, n_bc = self.grid_shape
        if self.remainder is None:
            dense = self.values.new_zeros(n_br, bm, n_bc, bk)
        else:
            dense = self.remainder.decode(self.block_shape, self.values.dtype)
        dense[self.row_indices.long(), :, self.col_indices().long(), :] = self.values
        dense = dense.view(n_br * bm, n_bc * bk)
        return dense if dense.shape == (m, k) else dense[:m, :k].contiguous()

    def to_sparse_bsr(self) -> torch.Tensor:
        """The same tensor as a ``torch.sparse_bsr_tensor`` (needs M, K multiples of the block)."""
        (m, k), (bm, bk) = self.shape, self.block_shape
        if m % bm or k % bk:
            raise ValueError(
                f"to_sparse_bsr needs a shape divisible by the block: shape {self.shape}, "
                f"block {self.block_shape}"
            )
        if self.remainder is not None:
            raise ValueError("to_sparse_bsr: a BlockSparse with a low-bit remainder is not sparse")
        if self.scales is not None:
            return self.dequantized(torch.float32).to_sparse_bsr()
        rows, cols = self.row_indices.long(), self.col_indices().long()
        order = torch.argsort(rows * self.grid_shape[1] + cols)
        counts = torch.bincount(rows, minlength=self.grid_shape[0])
        crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return torch.sparse_bsr_tensor(
            crow.int(),
            cols[order].int(),
            self.values[order],
            size=self.shape,
            check_invariants=True,
        )


def _expand_offsets(offsets: torch.Tensor, total: int) -> torch.Tensor:
    """int32 [total]: j repeated offsets[j+1] - offsets[j] times (compressed index -> per entry)."""
    ids = torch.arange(offsets.numel() - 1, device=offsets.device, dtype=torch.int32)
    return ids.repeat_interleave(offsets[1:] - offsets[:-1], output_size=total)


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
    """The blocks with the largest scores, in BSC order: (rows, cols, ccol_indices), all int32.

    scores is [n_br, n_bc]. Keeps the k best of the whole grid, or with ``per_column`` the k best
    of every block-column. Ties are broken deterministically: among equal scores, the block that
    comes first in row-major order (block-row, then block-column) is kept first.
    """
    if per_column:
        return _select_per_column(scores, k)
    n_br, n_bc = scores.shape
    flat = scores.reshape(-1)  # row-major block ids: id = row * n_bc + col (a view, no copy)
    n = flat.numel()
    # Every block above the k-th largest score is kept; ties at it go to the lowest ids. topk and
    # fixed-size nonzero keep the transient memory well below a full sort (0.3× vs 3× the scores
    # for 1×1 blocks) and every shape static, so this also runs on the meta device.
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
    return t.reshape(-1, t.shape[-1])


def compress(x: torch.Tensor, config: PruneConfig) -> BlockSparse:
    """Keep the highest-scoring ceil((1 - sparsity) · n) blocks of a 2-D tensor, n the blocks of
    each block-column or of the whole tensor (``config.selection``).

    Scoring and packing run as Triton kernels on CUDA and as PyTorch ops elsewhere
    (``actprune.kernels``). Blocks holding NaN/Inf always rank first (see ``block_scores``).
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


def quantize_int8(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-block int8: (int8 [nnz, bm, bk], float32 [nnz] scale = max|block| / 127).

    Error per element <= scale / 2. Non-finite values do not survive (int8 has no NaN/Inf)."""
    scales = values.abs().amax(dim=(1, 2)).float().div_(127).clamp_min_(1e-30)
    quantized = (values.float() / scales.view(-1, 1, 1)).round_().clamp_(-127, 127)
    return quantized.to(torch.int8), scales
