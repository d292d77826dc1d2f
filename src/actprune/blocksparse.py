"""Compression: choose the highest-scoring blocks of a 2-D tensor and store them (``storage``), and
read parameter gradients back from what was stored.

``compress`` scores every (bm × bk) block and, with a remainder, codes the whole tensor at low
precision in the same pass (``kernels.score_blocks``), keeps the top k of each block-column or of
the whole tensor (``select_blocks``), gathers them (``kernels.pack_blocks``) and optionally
quantises them (int8). ``as_rows`` is how an N-D activation becomes the matrix that blocks are cut
from; ``row_source`` is the same matrix as the kernels read it, without a copy.

A layer's input has the same shape, dtype and device step after step, so a ``Codec`` makes every
decision that depends only on those and the config once (backend, sizes, absent parts, the weight
gradient's route) and a call then runs the launches and little Python around them: on a GPU, and
for small layers anywhere, host time is what a compressed layer costs (docs/design.md, "Host
cost, launches and the compiled path"). Every compression goes through one (``codec_for``).
"""

from __future__ import annotations

import math

import torch

from . import kernels, rng
from .config import PruneConfig
from .kernels import reference
from .storage import BlockSparse, Parts, absent_parts, empty_parts, quantize_int8


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
    if x3.numel() == 0:
        shape = tuple(x3.shape[1:]) if x3.shape[0] == 1 else tuple(x3.shape)
        raise ValueError(f"compress expects a non-empty tensor, got shape {shape}")
    codec = codec_for(config, x3.shape, x3.dtype, x3.device)
    return BlockSparse.from_parts(codec.compress(x3, stream), codec.shape, codec.bits)


def traced_compression(config: PruneConfig, x: torch.Tensor) -> bool:
    """Whether under torch.compile the compression of x with ``config`` is traced
    (``traced_compress``): uniform quantization where ``kernels.traced`` holds. Block selection
    stays an operator (``ops.compress_rows``): its kept blocks are data-dependent gathers."""
    return config.uniform and kernels.traced(x)


def traced_compress(x: torch.Tensor, config: PruneConfig, key: torch.Tensor) -> Parts:
    """The ``Parts`` of a uniform compression of x (..., K) as ``reference``'s PyTorch ops, for
    torch.compile to trace and fuse (``traced_compression``): the same codes as every backend
    writes under the same key, given here as a 0-d int64 tensor (``ops.next_key``), so that a
    new key each call is a new input, not a recompilation."""
    x3 = row_source(x.detach(), config.row_order)
    ccol = x3.new_empty(-(-x3.shape[-1] // config.block_shape[1]) + 1, dtype=torch.int32)
    _, codes, low_scales = reference.score_blocks(
        x3, config.block_shape, "max", config.remainder_bits, key, ccol
    )
    values, rows, _, scales, _, _ = empty_parts(x.device, x.dtype, config.block_shape)
    return values, rows, ccol, scales, codes, low_scales


def traced_param_grad(
    dy: torch.Tensor, parts: Parts, config: PruneConfig, x_shape: torch.Size, param: str
) -> torch.Tensor:
    """The parameter gradient read back from ``traced_compress``' parts of an input of
    ``x_shape``, as ``reference``'s PyTorch ops: dyᵀ·X̃ (``param="weight"``) or Σ_rows dy ⊙ X̃
    (``"channel_scale"``), X̃ decoded one tile of rows at a time (``reference.row_tiles``)."""
    shape = (math.prod(x_shape[:-1]), x_shape[-1])
    x = BlockSparse.from_parts(parts, shape, config.remainder_bits).dequantized(dy.dtype)
    grad = reference.weight_grad if param == "weight" else reference.channel_scale_grad
    return grad(row_source(dy, config.row_order), x)


class Codec:
    """The compression of one kind of input (shape, dtype, device) under one config, and the
    parameter gradients read back from its parts, with every decision made when it is built.

    An input x (..., K) is compressed as its row source [B, T, K] (``row_source``: the config's
    row order), that is as the [B·T, K] matrix ``as_rows`` gives. Built by ``codec_for``.

    Attributes:
        config: the ``PruneConfig``.
        source_shape: (B, T, K), the row source of the inputs it takes.
        shape: (B·T, K), the matrix compressed.
        bits: the remainder's bits (0: none).
        nothing_saved: the ``Parts`` of nothing kept (every part absent), for an input whose
            parameter needs no gradient.
    """

    def __init__(
        self, config: PruneConfig, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> None:
        if not dtype.is_floating_point:
            raise ValueError(f"compress expects a floating-point tensor, got dtype {dtype}")
        probe = torch.empty(shape, dtype=dtype, device="meta")
        self.config, self.bits = config, config.remainder_bits
        self.source_shape = tuple(row_source(probe, config.row_order).shape)
        batch, tokens, k = self.source_shape
        self.shape = (batch * tokens, k)
        (bm, bk), self.block_shape = config.block_shape, config.block_shape
        self.grid = (-(-batch * tokens // bm), -(-k // bk))
        n_br, n_bc = self.grid
        per_column = config.selection == "column"
        self.kept = config.kept_blocks(n_br if per_column else n_br * n_bc)
        self.kernels = kernels.backend_module(torch.empty(0, dtype=dtype, device=device))
        # The reference reads rows in place only batch-major: the token-major rows are copied
        # once per compression, not once per kernel.
        self.copy_rows = self.kernels is reference
        self.nothing_saved = absent_parts(torch.device(device), dtype, self.block_shape)
        # The weight gradient as one decoded tile and one product (``reference.one_tile``); the
        # backend's route (tiles, per-block products or kernels) otherwise.
        elements, self.dtype = n_br * bm * n_bc * bk, dtype
        self.one_tile = self.bits > 0 and reference.one_tile(elements, torch.device(device), dtype)
        # A backend may offer uniform quantization as an (encode, weight_grad) pair with
        # everything fixed (``cpu_blocks.uniform_coders``): then a compression is one call, and
        # a small weight gradient too.
        coders = getattr(self.kernels, "uniform_coders", None)
        self.coders = coders(self.source_shape, self.block_shape, self.bits) if (
            coders and config.uniform) else None  # fmt: skip
        # A backend may score, select and pack in one launch (``triton_blocks.fused_compression``).
        fused = getattr(self.kernels, "fused_compression", None)
        self.compress_blocks = fused(self.block_shape, self.bits) if (
            fused and not config.uniform) else None  # fmt: skip

    def compress(self, x: torch.Tensor, stream: rng.Stream | None = None) -> Parts:
        """The ``Parts`` of x (this codec's kind, any view of its row source), its rounding
        drawn from ``stream`` (default: the calling thread's)."""
        c, (bm, bk), bits = self.config, self.block_shape, self.bits
        key = (stream or rng.thread_stream()).next_key() if bits else 0
        values, rows, ccol, scales, codes, low_scales = self.nothing_saved
        if self.coders is not None:  # they take x as it is (a numpy reshape is cheaper)
            ccol, codes, low_scales = self.coders[0](x, key)
            return values, rows, ccol, scales, codes, low_scales
        x3 = x.detach().reshape(self.source_shape)
        if self.copy_rows:
            x3 = reference.rows_of(x3).unsqueeze(0)
        if c.uniform:
            # No block is kept: the selection is empty, and its offsets are zeroed by the pass
            # that codes the tensor (one launch in all). Its scores need only the block max,
            # which the scales need anyway (an l2 or l1 score would be a sum computed for nothing).
            ccol = torch.empty(self.grid[1] + 1, dtype=torch.int32, device=x3.device)
            _, codes, low_scales = self.kernels.score_blocks(x3, self.block_shape, "max", bits,
                                                             key, ccol)  # fmt: skip
            return values, rows, ccol, scales, codes, low_scales
        # at least one block is kept (``PruneConfig.kept_blocks``): the backend's kernels
        per_column = c.selection == "column"
        if self.compress_blocks is not None:
            values, rows, ccol, found_codes, found_scales = self.compress_blocks(
                x3, self.block_shape, c.criterion, bits, key, self.kept, per_column)  # fmt: skip
        else:
            scores, found_codes, found_scales = self.kernels.score_blocks(
                x3, self.block_shape, c.criterion, bits, key
            )
            rows, cols, ccol = self.kernels.select_blocks(scores, self.kept, per_column=per_column)
            values = self.kernels.pack_blocks(x3, rows, cols, (bm, bk))
        if c.int8:
            values, scales = quantize_int8(values)
        if bits:
            codes, low_scales = found_codes, found_scales
        return values, rows, ccol, scales, codes, low_scales

    def _source(self, dy: torch.Tensor) -> torch.Tensor:
        """dy (the gradient of an output of the input's rows) as a row source [B, T, N]."""
        return dy.reshape(self.source_shape[0], self.source_shape[1], dy.shape[-1])

    def weight_grad(self, dy: torch.Tensor, parts: Parts) -> torch.Tensor:
        """dW [N, K] = dyᵀ·X̃, X̃ the input ``parts`` hold and dy (..., N) the output's gradient
        (``kernels.weight_grad``); contiguous."""
        one_tile = self.one_tile and dy.dtype == self.dtype
        if one_tile and self.coders is not None:
            return self.coders[1](dy, parts[4], parts[5])
        dy3 = self._source(dy)
        x = BlockSparse.from_parts(parts, self.shape, self.bits).dequantized(dy.dtype)
        if one_tile:
            tile = self.kernels.decode_rows(x, 0, self.grid[0], self.source_shape[0])
            return reference.one_tile_weight_grad(dy3, tile, self.shape[1])
        return self.kernels.weight_grad(dy3, x).contiguous()

    def channel_scale_grad(self, dy: torch.Tensor, parts: Parts) -> torch.Tensor:
        """[K] = Σ_rows dy ⊙ X̃, the gradient of a per-channel scale whose input ``parts`` hold
        (``kernels.channel_scale_grad``); contiguous."""
        x = BlockSparse.from_parts(parts, self.shape, self.bits).dequantized(dy.dtype)
        return self.kernels.channel_scale_grad(self._source(dy), x).contiguous()


_codecs: dict[tuple, Codec] = {}
# Codecs kept at most (the oldest built goes first): inputs whose shape changes every step (a
# language model's sequence length) would otherwise add one per shape for the whole process.
MAX_CODECS = 1024


def codec_for(
    config: PruneConfig, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> Codec:
    """The ``Codec`` of inputs of ``shape``, ``dtype`` and ``device`` under ``config``: built on
    the first call, one dict lookup after that (also keyed by ``kernels.backend_choice()``, which
    picks the backend); the ``MAX_CODECS`` most recently built are kept.

    Example:
        >>> import torch
        >>> from actprune import PruneConfig
        >>> from actprune.blocksparse import codec_for
        >>> x = torch.randn(4, 16, 64)
        >>> codec = codec_for(PruneConfig.preset("recommended"), x.shape, x.dtype, x.device)
        >>> codec.source_shape, codec.shape
        ((4, 16, 64), (64, 64))
        >>> [tuple(t.shape) for t in codec.compress(x)][4:]   # 4-bit codes, a scale per block
        [(2048,), (2, 2)]
    """
    key = (config.to_json(), shape, dtype, device, kernels.backend_choice())
    found = _codecs.get(key)
    if found is None:
        if len(_codecs) >= MAX_CODECS:
            del _codecs[next(iter(_codecs))]
        found = _codecs[key] = Codec(config, shape, dtype, device)
    return found
