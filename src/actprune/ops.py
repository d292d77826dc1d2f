"""actprune's layers as registered PyTorch operators (torch.library), so torch.compile and the meta
device see opaque ops with known output shapes instead of tracing into the block selection.

Compression is an op of its own, and each layer op takes the compressed tensors as inputs and
keeps them for its backward. So one compressed copy of a tensor can serve several layers that read
it (``layers`` deduplicates in eager mode), and autograd saves exactly those tensors.

- ``actprune::compress_rows`` — the tensors of ``compress(as_rows(x))``: values, row_indices,
  ccol_indices, scales (int8), low_codes and low_scales (the low-bit remainder), empty when not
  used; shapes depend only on the input shape and the config.
- ``actprune::pruned_linear`` — F.linear; backward dx = dy·W and db exact, dW = dyᵀ·X̃.
- ``actprune::pruned_channel_scale`` — x ⊙ scale (+ shift) per channel (Affine, LayerScale);
  backward dx = dy ⊙ scale and d shift exact, d scale = Σ_rows dy ⊙ X̃.
- ``actprune::gelu_code`` / ``actprune::coded_gelu`` — the packed derivative code of a GELU input
  (``derivative_code``) and GELU itself, whose backward is dy ⊙ q(x).
- ``actprune::block_sparse_grad`` — a parameter gradient from compressed tensors (``kernels``):
  dyᵀ·X̃ for a weight, Σ_rows dy ⊙ X̃ for a per-channel scale.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import kernels
from .blocksparse import BlockSparse, LowBitBlocks, as_rows, compress
from .config import PruneConfig
from .derivative_code import gelu_derivative_code

Packed = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def config_args(config: PruneConfig) -> tuple:
    """The PruneConfig fields compress_rows takes, in its argument order."""
    c = config
    return (
        c.sparsity, *c.block_shape, c.criterion, c.row_order, c.selection, c.int8,
        c.remainder_bits,
    )  # fmt: skip


def _config(sparsity, block_rows, block_cols, criterion, row_order, selection, int8, bits):  # noqa: ANN001, ANN202
    return PruneConfig(
        sparsity, (block_rows, block_cols), criterion, row_order, selection, int8=int8,
        remainder_bits=bits,
    )  # fmt: skip


@torch.library.custom_op("actprune::compress_rows", mutates_args=())
def compress_rows(
    x: torch.Tensor, sparsity: float, block_rows: int, block_cols: int, criterion: str,
    row_order: str, selection: str, int8: bool, remainder_bits: int,
) -> Packed:  # fmt: skip
    """The tensors of ``compress(as_rows(x))``: values, row_indices, ccol_indices, scales,
    low_codes, low_scales (the last three empty unless int8 / remainder_bits)."""
    config = _config(
        sparsity, block_rows, block_cols, criterion, row_order, selection, int8, remainder_bits
    )
    packed = compress(as_rows(x.detach(), row_order), config)

    def empty(dtype: torch.dtype) -> torch.Tensor:  # a fresh one each: outputs may not alias
        return x.new_empty(0, dtype=dtype)

    scales = packed.scales if packed.scales is not None else empty(torch.float32)
    rem = packed.remainder
    low = (rem.codes, rem.scales) if rem is not None else (empty(torch.uint8), empty(torch.float32))
    return packed.values, packed.row_indices, packed.ccol_indices, scales, *low


@compress_rows.register_fake
def _(x, sparsity, block_rows, block_cols, criterion, row_order, selection, int8, remainder_bits):  # noqa: ANN001
    config = _config(
        sparsity, block_rows, block_cols, criterion, row_order, selection, int8, remainder_bits
    )
    k = x.shape[-1]
    n_br, n_bc = math.ceil(x.numel() // k / block_rows), math.ceil(k / block_cols)
    nnz = config.kept_grid_blocks(n_br, n_bc)
    values = x.new_empty(nnz, block_rows, block_cols, dtype=torch.int8 if int8 else x.dtype)
    rows = x.new_empty(nnz, dtype=torch.int32)
    scales = x.new_empty(nnz if int8 else 0, dtype=torch.float32)
    n_codes = -(-n_br * block_rows * n_bc * block_cols * remainder_bits // 8)
    low_codes = x.new_empty(n_codes, dtype=torch.uint8)
    low_scales = x.new_empty((n_br, n_bc) if remainder_bits else (0,), dtype=torch.float32)
    ccol = x.new_empty(n_bc + 1, dtype=torch.int32)
    return values, rows, ccol, scales, low_codes, low_scales


def _unpack(values, row_indices, ccol_indices, scales, low_codes, low_scales, bits, shape):  # noqa: ANN001
    remainder = LowBitBlocks(low_codes, low_scales, bits) if bits else None
    return BlockSparse(
        values, row_indices, ccol_indices, tuple(shape), scales if scales.numel() else None,
        remainder,
    )  # fmt: skip


def _dy_rows(ctx, dy: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    return as_rows(dy, ctx.row_order).contiguous()


def _require_saved(ctx, op: str) -> None:  # noqa: ANN001
    if not ctx.compressed:
        raise RuntimeError(
            f"actprune::{op} got no compressed input (empty values), so it kept nothing to "
            "compute the parameter gradient from; pass compress_rows' outputs when the "
            "parameter needs grad"
        )


def _save_compressed(ctx, x, packed, row_order, bits, *params):  # noqa: ANN001
    ctx.x_shape, ctx.row_order, ctx.bits = x.shape, row_order, bits
    ctx.compressed = packed[0].numel() > 0
    ctx.save_for_backward(*params, *packed)


# --- Linear ---------------------------------------------------------------------------------------


@torch.library.custom_op("actprune::pruned_linear", mutates_args=())
def pruned_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],  # noqa: UP045
    values: torch.Tensor, row_indices: torch.Tensor, ccol_indices: torch.Tensor,
    scales: torch.Tensor, low_codes: torch.Tensor, low_scales: torch.Tensor, row_order: str,
    remainder_bits: int,
) -> torch.Tensor:  # fmt: skip
    """F.linear(x, weight, bias); backward reads x only as the compressed tensors given."""
    return F.linear(x, weight, bias)


@pruned_linear.register_fake
def _(x, weight, bias, *packed_and_args):  # noqa: ANN001
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _linear_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    x, weight, bias, *packed, row_order, bits = inputs
    ctx.has_bias = bias is not None
    _save_compressed(ctx, x, packed, row_order, bits, weight)


def _linear_backward(ctx, dy):  # noqa: ANN001
    weight, *packed = ctx.saved_tensors
    dy2d = dy.reshape(-1, dy.shape[-1])
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = dy2d.mm(weight).view(ctx.x_shape)
    if ctx.needs_input_grad[1]:
        _require_saved(ctx, "pruned_linear")
        dw = block_sparse_grad(
            _dy_rows(ctx, dy), *packed, ctx.bits, dy2d.shape[0], ctx.x_shape[-1], "matmul"
        )
    if ctx.has_bias and ctx.needs_input_grad[2]:
        db = dy2d.sum(0)
    return dx, dw, db, *[None] * 8


pruned_linear.register_autograd(_linear_backward, setup_context=_linear_setup)


# --- per-channel scale (Affine, LayerScale) -------------------------------------------------------


@torch.library.custom_op("actprune::pruned_channel_scale", mutates_args=())
def pruned_channel_scale(
    x: torch.Tensor, scale: torch.Tensor, shift: Optional[torch.Tensor],  # noqa: UP045
    values: torch.Tensor, row_indices: torch.Tensor, ccol_indices: torch.Tensor,
    scales: torch.Tensor, low_codes: torch.Tensor, low_scales: torch.Tensor, row_order: str,
    remainder_bits: int,
) -> torch.Tensor:  # fmt: skip
    """x ⊙ scale (+ shift), scale and shift holding one value per channel (last dim of x)."""
    return x * scale if shift is None else torch.addcmul(shift, scale, x)


@pruned_channel_scale.register_fake
def _(x, scale, shift, *packed_and_args):  # noqa: ANN001
    return torch.empty_like(x)


def _scale_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    x, scale, shift, *packed, row_order, bits = inputs
    ctx.shift_shape = None if shift is None else shift.shape
    ctx.scale_shape = scale.shape
    _save_compressed(ctx, x, packed, row_order, bits, scale)


def _scale_backward(ctx, dy):  # noqa: ANN001
    scale, *packed = ctx.saved_tensors
    dx = dscale = dshift = None
    channels = ctx.x_shape[-1]
    if ctx.needs_input_grad[0]:
        dx = dy * scale
    if ctx.needs_input_grad[1]:
        _require_saved(ctx, "pruned_channel_scale")
        rows = dy.numel() // channels
        dscale = block_sparse_grad(_dy_rows(ctx, dy), *packed, ctx.bits, rows, channels, "rows")
        dscale = dscale.view(ctx.scale_shape)
    if ctx.shift_shape is not None and ctx.needs_input_grad[2]:
        dshift = dy.reshape(-1, channels).sum(0).view(ctx.shift_shape)
    return dx, dscale, dshift, *[None] * 8


pruned_channel_scale.register_autograd(_scale_backward, setup_context=_scale_setup)


# --- the parameter gradient from a compressed tensor ----------------------------------------------


_GRADIENTS = {"matmul": kernels.weight_grad, "rows": kernels.channel_grad}


@torch.library.custom_op("actprune::block_sparse_grad", mutates_args=())
def block_sparse_grad(
    dy: torch.Tensor, values: torch.Tensor, row_indices: torch.Tensor, ccol_indices: torch.Tensor,
    scales: torch.Tensor, low_codes: torch.Tensor, low_scales: torch.Tensor, remainder_bits: int,
    rows: int, cols: int, reduce: str,
) -> torch.Tensor:  # fmt: skip
    """The gradient of a parameter that multiplied X [rows, cols], given dy [rows, N] and X̃, the
    BlockSparse of compress_rows' tensors: ``reduce="matmul"`` gives dW [N, cols] = dyᵀ·X̃ (Linear),
    ``reduce="rows"`` gives [cols] = Σ_m dy[m, :] ⊙ X̃[m, :] (a per-channel scale; N = cols)."""
    packed = _unpack(
        values, row_indices, ccol_indices, scales, low_codes, low_scales, remainder_bits,
        (rows, cols),
    )  # fmt: skip
    return _GRADIENTS[reduce](dy, packed)


@block_sparse_grad.register_fake
def _(dy, *packed_and_args):  # noqa: ANN001
    *_, cols, reduce = packed_and_args
    return dy.new_empty((dy.shape[1], cols) if reduce == "matmul" else (cols,))


# --- GELU with a low-bit derivative code ---------------------------------------------------------


@torch.library.custom_op("actprune::gelu_code", mutates_args=())
def gelu_code(x: torch.Tensor, bits: int, approximate: str) -> torch.Tensor:
    """uint8: the packed ``bits``-bit derivative code of every element of x."""
    return gelu_derivative_code(bits, approximate).encode(x.detach())


@gelu_code.register_fake
def _(x, bits, approximate):  # noqa: ANN001
    return x.new_empty(-(-x.numel() * bits // 8), dtype=torch.uint8)


@torch.library.custom_op("actprune::coded_gelu", mutates_args=())
def coded_gelu(x: torch.Tensor, codes: torch.Tensor, bits: int, approximate: str) -> torch.Tensor:
    """F.gelu(x); backward reads only ``codes`` (dx = dy ⊙ q(x))."""
    return F.gelu(x, approximate=approximate)


@coded_gelu.register_fake
def _(x, codes, bits, approximate):  # noqa: ANN001
    return torch.empty_like(x)


def _gelu_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    x, codes, bits, approximate = inputs
    ctx.bits, ctx.approximate = bits, approximate
    ctx.save_for_backward(codes)


def _gelu_backward(ctx, dy):  # noqa: ANN001
    (codes,) = ctx.saved_tensors
    code = gelu_derivative_code(ctx.bits, ctx.approximate)
    dx = dy * code.derivative(codes, dy.numel(), dy.dtype).view(dy.shape)
    return dx, None, None, None


coded_gelu.register_autograd(_gelu_backward, setup_context=_gelu_setup)
