"""The storage format of a compressed activation: kept blocks grouped by block-column (BSC).

A 2-D tensor X [M, K] is cut into (bm × bk) blocks (``blocked_view``); ``BlockSparse`` holds the
kept ones block-column by block-column because the one consumer that matters, the weight gradient
dW[:, j-th block-column] = Σ_i dy[i-th block-row]ᵀ · X[i, j], then walks a contiguous run of
blocks per output tile, with no gather and no transposed index (docs/design.md). ``LowBitBlocks``
is the optional low-bit copy of the whole tensor that stands in for the dropped blocks.
This module knows the format only; choosing blocks is ``blocksparse``, computing with them
``kernels``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .bitpack import top_code, unpack_codes

# The tensors of a BlockSparse as the registered operators pass them: values, row_indices,
# ccol_indices, scales, low_codes, low_scales (the last three empty when unused).
Parts = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def empty_parts(device: torch.device, dtype: torch.dtype, block_shape: tuple[int, int]) -> Parts:
    """The ``Parts`` of nothing kept, every part a new tensor without elements, for an input of
    ``dtype`` compressed in blocks of ``block_shape``: what code that torch.compile traces
    builds (eager code shares one set, ``absent_parts``)."""
    return (
        torch.empty((0, *block_shape), dtype=dtype, device=device),  # values
        torch.empty(0, dtype=torch.int32, device=device),  # row_indices
        torch.empty(0, dtype=torch.int32, device=device),  # ccol_indices
        torch.empty(0, dtype=torch.float32, device=device),  # scales
        torch.empty(0, dtype=torch.uint8, device=device),  # low_codes
        torch.empty(0, dtype=torch.float32, device=device),  # low_scales
    )


@functools.cache
def absent_parts(device: torch.device, dtype: torch.dtype, block_shape: tuple[int, int]) -> Parts:
    """``empty_parts``, one set per (device, dtype, block shape) for the process. Nothing can be
    written to a tensor without elements, so every call may share it (an allocation per call
    cost host time on the hot path); the six stay different tensors, as an operator's outputs
    must not alias each other."""
    return empty_parts(device, dtype, block_shape)


def blocked_view(x: torch.Tensor, block_shape: tuple[int, int]) -> torch.Tensor:
    """View x [M, K] as [n_br, bm, n_bc, bk], zero-padding the edges (a copy only when needed)."""
    bm, bk = block_shape
    m, k = x.shape
    pad_m, pad_k = -m % bm, -k % bk
    if pad_m or pad_k:
        x = F.pad(x, (0, pad_k, 0, pad_m))
    return x.view((m + pad_m) // bm, bm, (k + pad_k) // bk, bk)


# int8 codes of the non-finite values of a kept block (its scale is stored negated as the mark).
INT8_NAN, INT8_POS_INF, INT8_NEG_INF = -128, 127, -127


def quantize_int8(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-block int8: (int8 [nnz, bm, bk], float32 [nnz] scale = max |block| / 127).

    Error per element <= scale / 2. A block holding NaN or ±Inf (such blocks are always kept:
    they score +inf) is scaled by its finite values over ±126 and codes its non-finite ones as
    ``INT8_NAN`` / ``INT8_POS_INF`` / ``INT8_NEG_INF``; its scale is stored negated to mark it.
    So non-finite values come back exactly (``dequantize_int8``) and reach the gradient where
    dense training would put them, and only there."""
    v = values.float()
    finite = torch.isfinite(v)
    marked = ~finite.all(dim=2).all(dim=1)  # [nnz]
    limit = torch.where(marked, 126.0, 127.0)
    absmax = torch.where(finite, v, 0.0).abs().amax(dim=(1, 2))
    scales = (absmax / limit).clamp_min_(1e-30)
    q = (torch.where(finite, v, 0.0) / scales.view(-1, 1, 1)).round_()
    q = torch.minimum(torch.maximum(q, -limit.view(-1, 1, 1)), limit.view(-1, 1, 1))
    q = torch.where(v.isnan(), INT8_NAN, q)
    q = torch.where(v == torch.inf, INT8_POS_INF, torch.where(v == -torch.inf, INT8_NEG_INF, q))
    return q.to(torch.int8), torch.where(marked, -scales, scales)


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 [nnz, bm, bk] of ``quantize_int8``'s output, non-finite values restored."""
    values = q.float() * scales.abs().view(-1, 1, 1)
    marked = (scales < 0).view(-1, 1, 1)
    specials = ((q == INT8_NAN, torch.nan), (q == INT8_POS_INF, torch.inf),
                (q == INT8_NEG_INF, -torch.inf))  # fmt: skip
    for where, value in specials:
        values = torch.where(marked & where, value, values)
    return values


@dataclass(frozen=True)
class LowBitBlocks:
    """A whole (zero-padded) [M', K'] tensor at ``bits`` per element, one float32 scale per block.

    Element x of block b is coded as one of 2^bits evenly spaced levels over [−s_b, s_b],
    s_b = max |x| in the block, chosen by stochastic rounding between the two nearest levels, so
    the decoded value is an unbiased estimate of x (error < one level spacing, 2·s_b / (2^bits−1)).
    The rounding adds a random byte (``rng.random_bytes``) to x's position in fixed point with 8
    fraction bits (``kernels.reference.low_bit_code``; one multiply-add, no division:
    docs/design.md, "Remainder"), which leaves a bias below 1/512 of a level. Codes are packed in
    the padded tensor's row-major order (``bitpack``); the kernels write them
    (``kernels.score_blocks``).
    """

    codes: torch.Tensor  # uint8 [ceil(M'·K'·bits / 8)]
    scales: torch.Tensor  # float32 [n_br, n_bc]
    bits: int

    def decode(
        self,
        block_shape: tuple[int, int],
        dtype: torch.dtype,
        start: int = 0,
        stop: int | None = None,
    ) -> torch.Tensor:
        """The blocked view [n, bm, n_bc, bk] of the decoded tensor's block-rows [start, stop)
        (all n_br by default; a range of block-rows reads only its own codes), in ``dtype``.
        (Two ints, not a slice: torch 2.11's dynamo cannot build a slice of symbolic ints.)"""
        (n_br, n_bc), (bm, bk) = self.scales.shape, block_shape
        stop = n_br if stop is None else min(stop, n_br)
        levels, per_row = top_code(self.bits), bm * n_bc * bk  # elements per block-row
        if (start * per_row * self.bits) % 8:
            raise ValueError(f"block-row {start} does not start on a byte of the packed codes")
        first, count = start * per_row * self.bits // 8, max(0, stop - start) * per_row
        end = first - (-count * self.bits // 8)
        codes = unpack_codes(self.codes[first:end], self.bits, count)
        unit = codes.view(-1, bm, n_bc, bk).float().mul_(2 / levels).sub_(1)
        return unit.mul_(self.scales[start:stop, None, :, None]).to(dtype)


@dataclass(frozen=True)
class BlockSparse:
    """A 2-D tensor with only some (bm × bk) blocks stored; absent blocks are zero.

    ``values[ccol_indices[j]:ccol_indices[j+1]]`` are the kept blocks of block-column j, in
    increasing block-row order given by ``row_indices``. Edge blocks of shapes that are not
    multiples of the block are stored zero-padded to the full block; the padding never shows in
    ``to_dense`` and is counted in ``nbytes`` (it is memory that is really held).

    Attributes:
        values: [nnz, bm, bk] kept blocks (int8 when ``scales`` is set).
        row_indices: int32 [nnz], the block-row of each kept block.
        ccol_indices: int32 [n_bc + 1], where each block-column's blocks start in ``values``.
        shape: (M, K) of the dense tensor.
        scales: float32 [nnz] per-block scales of int8 values, or None.
        remainder: the whole tensor at low precision (``LowBitBlocks``), or None.

    Example:
        >>> import torch
        >>> from actprune import PruneConfig, compress
        >>> x = torch.zeros(64, 64)
        >>> x[32:, :32] = 1.0                          # one loud 32x32 block
        >>> blocks = compress(x, PruneConfig(0.75, 32, selection="global"))
        >>> blocks.nnz_blocks, blocks.row_indices.tolist(), blocks.ccol_indices.tolist()
        (1, [1], [0, 1, 1])
        >>> torch.equal(blocks.to_dense(), x)
        True
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
            values = dequantize_int8(values, self.scales)
        return BlockSparse(
            values.to(dtype), self.row_indices, self.ccol_indices, self.shape,
            remainder=self.remainder,
        )  # fmt: skip

    def parts(self) -> Parts:
        """The six tensors the registered operators pass around (``Parts``): absent ones empty."""
        absent = absent_parts(self.values.device, self.values.dtype, self.block_shape)
        scales = absent[3] if self.scales is None else self.scales
        if self.remainder is None:
            low = absent[4:]
        else:
            low = (self.remainder.codes, self.remainder.scales)
        return self.values, self.row_indices, self.ccol_indices, scales, *low

    @staticmethod
    def from_parts(parts: Parts, shape: tuple[int, int], remainder_bits: int) -> BlockSparse:
        """The inverse of ``parts``, given the dense shape and the remainder's bits."""
        values, row_indices, ccol_indices, scales, low_codes, low_scales = parts
        remainder = LowBitBlocks(low_codes, low_scales, remainder_bits) if remainder_bits else None
        scales = scales if scales.numel() else None
        return BlockSparse(values, row_indices, ccol_indices, tuple(shape), scales, remainder)

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
