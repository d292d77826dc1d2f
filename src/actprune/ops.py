"""actprune's layers as registered PyTorch operators (torch.library), so torch.compile and the meta
device see opaque ops with known output shapes instead of tracing into the block selection.

Compression is an op of its own, and each layer op takes the compressed tensors as inputs and
keeps them for its backward. So one compressed copy of a tensor can serve several layers that read
it (``layers`` deduplicates in eager mode), and autograd saves exactly those tensors.

Every op that compresses or reads compressed tensors takes the configuration as one string,
``PruneConfig.to_json()``: the config's own serialisation, so no field list is repeated here.

- ``actprune::compress_rows`` — the ``storage.Parts`` of ``compress(as_rows(x))``: values,
  row_indices, ccol_indices, scales (int8), low_codes and low_scales (the low-bit remainder),
  empty when not used; shapes depend only on the input shape and the config.
- ``actprune::pruned_linear`` — F.linear; backward dx = dy·W and db exact, dW = dyᵀ·X̃.
- ``actprune::pruned_channel_scale`` — x ⊙ scale (+ shift) per channel (Affine, LayerScale);
  backward dx = dy ⊙ scale and d shift exact, d scale = Σ_rows dy ⊙ X̃.
- ``actprune::activation_code`` / ``actprune::coded_activation`` — the packed derivative code of
  an activation's input (``derivative_code``; ReLU: an exact 1-bit mask) plus one bit per row
  marking non-finite inputs, and the activation itself, whose backward is dy ⊙ q(x) (NaN in the
  marked rows).
- ``actprune::activation_grad`` — the coded activation's input gradient, from its codes.
- ``actprune::block_sparse_grad`` — a parameter gradient from compressed tensors (``kernels``):
  dyᵀ·X̃ for a weight (``param="weight"``), Σ_rows dy ⊙ X̃ for a per-channel scale
  (``param="channel_scale"``).
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import kernels, rng
from .bitpack import pack_codes, unpack_codes
from .blocksparse import Codec, codec_for, row_source
from .config import PruneConfig
from .derivative_code import ACTIVATIONS, derivative_code
from .storage import Parts


@torch.library.custom_op("actprune::compress_rows", mutates_args=())
def compress_rows(x: torch.Tensor, config: str, stream: int) -> Parts:
    """The ``Parts`` of ``compress(as_rows(x), c)``, c = ``PruneConfig.from_json(config)``, its
    rounding drawn from ``rng.stream(stream)`` (0: the calling thread's): the ``Codec``'s
    compression as an operator (torch.compile and the meta device see its shapes; eager layers
    call the codec directly)."""
    codec = codec_for(PruneConfig.from_json(config), x.shape, x.dtype, x.device)
    return codec.compress(x, rng.stream(stream))


@compress_rows.register_fake
def _(x, config, stream):
    c = PruneConfig.from_json(config)
    (bm, bk), k = c.block_shape, x.shape[-1]
    n_br, n_bc = math.ceil(x.numel() // k / bm), math.ceil(k / bk)
    nnz = c.kept_grid_blocks(n_br, n_bc)
    values = x.new_empty(nnz, bm, bk, dtype=torch.int8 if c.int8 else x.dtype)
    rows = x.new_empty(nnz, dtype=torch.int32)
    ccol = x.new_empty(n_bc + 1, dtype=torch.int32)
    scales = x.new_empty(nnz if c.int8 else 0, dtype=torch.float32)
    bits = c.remainder_bits
    low_codes = x.new_empty(-(-n_br * bm * n_bc * bk * bits // 8), dtype=torch.uint8)
    low_scales = x.new_empty((n_br, n_bc) if bits else (0,), dtype=torch.float32)
    return values, rows, ccol, scales, low_codes, low_scales


def _save_compressed(ctx, x, parts, codec_or_config, *params) -> None:
    """Saves the parameters and parts; keeps what the parameter gradient needs: the ``Codec``
    (eager) or the config string (the operators', which call ``block_sparse_grad``)."""
    ctx.x_shape = x.shape
    if isinstance(codec_or_config, Codec):
        ctx.codec = codec_or_config
        ctx.compressed = parts is not codec_or_config.nothing_saved
    else:
        ctx.codec, ctx.config = None, codec_or_config
        ctx.row_order = PruneConfig.from_json(codec_or_config).row_order
        ctx.compressed = parts[0].numel() > 0 or parts[4].numel() > 0  # kept blocks or codes
    ctx.save_for_backward(*params, *parts)


def _param_grad(ctx, dy: torch.Tensor, parts: list, param: str, op: str) -> torch.Tensor:
    """The gradient of the parameter that multiplied the compressed input: dW for a Linear
    (``param="weight"``), d scale for a per-channel scale (``"channel_scale"``)."""
    if not ctx.compressed:
        raise RuntimeError(
            f"actprune::{op} got no compressed input (empty values and codes), so it kept "
            "nothing to compute the parameter gradient from; pass compress_rows' outputs when "
            "the parameter needs grad"
        )
    if ctx.codec is not None:  # eager: the codec's kernels, no operator dispatch
        return _CODEC_GRADIENTS[param](ctx.codec, dy, parts)
    rows, cols = math.prod(ctx.x_shape[:-1]), ctx.x_shape[-1]
    dy3 = row_source(dy, ctx.row_order)  # a view: no token-major copy
    return block_sparse_grad(dy3, *parts, ctx.config, rows, cols, param)


# --- Linear ---------------------------------------------------------------------------------------


@torch.library.custom_op("actprune::pruned_linear", mutates_args=())
def pruned_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],  # noqa: UP045 - older torch.library reads only Optional
    values: torch.Tensor, row_indices: torch.Tensor, ccol_indices: torch.Tensor,
    scales: torch.Tensor, low_codes: torch.Tensor, low_scales: torch.Tensor, config: str,
) -> torch.Tensor:  # fmt: skip
    """F.linear(x, weight, bias); backward reads x only as the compressed tensors given."""
    return F.linear(x, weight, bias)


@pruned_linear.register_fake
def _(x, weight, bias, *parts_and_config):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _linear_setup(ctx, inputs, output) -> None:
    x, weight, bias, *parts, config = inputs
    _save_linear(ctx, x, weight, bias, parts, config)


def _save_linear(ctx, x, weight, bias, parts, codec_or_config) -> None:
    ctx.has_bias = bias is not None
    _save_compressed(ctx, x, parts, codec_or_config, weight)


def _linear_backward(ctx, dy):
    weight, *parts = ctx.saved_tensors
    dy2d = dy.reshape(math.prod(ctx.x_shape[:-1]), dy.shape[-1])  # also when dy has 0 columns
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = dy2d.mm(weight).view(ctx.x_shape)
    if ctx.needs_input_grad[1]:
        dw = _param_grad(ctx, dy, parts, "weight", "pruned_linear")
    if ctx.has_bias and ctx.needs_input_grad[2]:
        db = dy2d.sum(0)
    return dx, dw, db, *[None] * 7


pruned_linear.register_autograd(_linear_backward, setup_context=_linear_setup)


class PrunedLinearFunction(torch.autograd.Function):
    """``pruned_linear`` for eager mode: the same setup and backward, without the operator
    dispatch (a custom op's Python dispatch costs more than a small layer's whole step), given
    the ``Codec`` that made the parts instead of the config string. The parts come as one tuple:
    autograd then checks three tensor arguments, not nine."""

    @staticmethod
    def forward(ctx, x, weight, bias, parts, codec):
        _save_linear(ctx, x, weight, bias, parts, codec)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        return (*_linear_backward(ctx, dy)[:3], None, None)


# --- per-channel scale (Affine, LayerScale) -------------------------------------------------------


@torch.library.custom_op("actprune::pruned_channel_scale", mutates_args=())
def pruned_channel_scale(
    x: torch.Tensor, scale: torch.Tensor, shift: Optional[torch.Tensor],  # noqa: UP045 - older torch.library reads only Optional
    values: torch.Tensor, row_indices: torch.Tensor, ccol_indices: torch.Tensor,
    scales: torch.Tensor, low_codes: torch.Tensor, low_scales: torch.Tensor, config: str,
) -> torch.Tensor:  # fmt: skip
    """x ⊙ scale (+ shift), scale and shift holding one value per channel (last dim of x)."""
    return x * scale if shift is None else torch.addcmul(shift, scale, x)


@pruned_channel_scale.register_fake
def _(x, scale, shift, *parts_and_config):
    return torch.empty_like(x)


def _scale_setup(ctx, inputs, output) -> None:
    x, scale, shift, *parts, config = inputs
    _save_scale(ctx, x, scale, shift, parts, config)


def _save_scale(ctx, x, scale, shift, parts, codec_or_config) -> None:
    ctx.shift_shape = None if shift is None else shift.shape
    ctx.scale_shape = scale.shape
    _save_compressed(ctx, x, parts, codec_or_config, scale)


def _scale_backward(ctx, dy):
    scale, *parts = ctx.saved_tensors
    dx = dscale = dshift = None
    channels = ctx.x_shape[-1]
    if ctx.needs_input_grad[0]:
        dx = dy * scale
    if ctx.needs_input_grad[1]:
        dscale = _param_grad(ctx, dy, parts, "channel_scale", "pruned_channel_scale")
        dscale = dscale.view(ctx.scale_shape)
    if ctx.shift_shape is not None and ctx.needs_input_grad[2]:
        dshift = dy.reshape(-1, channels).sum(0).view(ctx.shift_shape)
    return dx, dscale, dshift, *[None] * 7


pruned_channel_scale.register_autograd(_scale_backward, setup_context=_scale_setup)


class PrunedChannelScaleFunction(torch.autograd.Function):
    """``pruned_channel_scale`` for eager mode (see ``PrunedLinearFunction``)."""

    @staticmethod
    def forward(ctx, x, scale, shift, parts, codec):
        _save_scale(ctx, x, scale, shift, parts, codec)
        return x * scale if shift is None else torch.addcmul(shift, scale, x)

    @staticmethod
    def backward(ctx, dy):
        return (*_scale_backward(ctx, dy)[:3], None, None)


# --- the parameter gradient from a compressed tensor ----------------------------------------------


_CODEC_GRADIENTS = {"weight": Codec.weight_grad, "channel_scale": Codec.channel_scale_grad}


@torch.library.custom_op("actprune::block_sparse_grad", mutates_args=())
def block_sparse_grad(
    dy: torch.Tensor, values: torch.Tensor, row_indices: torch.Tensor, ccol_indices: torch.Tensor,
    scales: torch.Tensor, low_codes: torch.Tensor, low_scales: torch.Tensor, config: str,
    rows: int, cols: int, param: str,
) -> torch.Tensor:  # fmt: skip
    """The gradient of a parameter that multiplied X [rows, cols], given dy as a row source
    [B, rows / B, N] (``blocksparse.row_source``) and X̃, the BlockSparse of compress_rows'
    parts: ``param="weight"`` gives dW [N, cols] = dyᵀ·X̃ (Linear), ``param="channel_scale"``
    gives [cols] = Σ_m dy[m, :] ⊙ X̃[m, :] (N = cols)."""
    parts = (values, row_indices, ccol_indices, scales, low_codes, low_scales)
    source = (dy.shape[0], rows // max(1, dy.shape[0]), cols)  # X's row source
    codec = codec_for(PruneConfig.from_json(config), source, dy.dtype, dy.device)
    return _CODEC_GRADIENTS[param](codec, dy, parts)


@block_sparse_grad.register_fake
def _(dy, *parts_and_args):
    *_, cols, param = parts_and_args
    return dy.new_empty((dy.shape[-1], cols) if param == "weight" else (cols,))


# --- activations with a low-bit derivative code ---------------------------------------------------


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.dim() else 1


def _forward(function: str):
    return F.relu if function == "relu" else ACTIVATIONS[function][0]


def activation_code_parts(
    x: torch.Tensor, bits: int, function: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, nonfinite): uint8, the packed ``bits``-bit code of ``function``'s derivative at
    every element of x, and one bit per row (last dim) set where the row holds a NaN or ±Inf.
    ``function="relu"`` (bits 1): the exact mask of where dense ReLU passes the gradient
    (x > 0 or NaN), and no rows (dense ReLU's dx stays finite at a NaN input). ``activation_code``'s
    body, which eager mode calls directly."""
    x = x.detach()
    if function == "relu":
        codes = pack_codes((~(x <= 0)).reshape(-1).to(torch.uint8), 1)
        return codes, x.new_empty(0, dtype=torch.uint8)
    return kernels.activation_codes(x, derivative_code(function, bits))


@torch.library.custom_op("actprune::activation_code", mutates_args=())
def activation_code(x: torch.Tensor, bits: int, function: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``activation_code_parts`` as an operator."""
    return activation_code_parts(x, bits, function)


@activation_code.register_fake
def _(x, bits, function):
    codes = x.new_empty(-(-x.numel() * bits // 8), dtype=torch.uint8)
    return codes, x.new_empty(0 if function == "relu" else -(-_rows(x) // 8), dtype=torch.uint8)


@torch.library.custom_op("actprune::coded_activation", mutates_args=())
def coded_activation(
    x: torch.Tensor, codes: torch.Tensor, nonfinite: torch.Tensor, bits: int, function: str
) -> torch.Tensor:
    """``function``(x), computed as the dense module computes it; backward reads only ``codes``
    and ``nonfinite`` (dx = dy ⊙ q(x), NaN in every row that held a non-finite x: f' is NaN
    there in dense training too; for ReLU dx = dy where the mask is set, else 0, exactly)."""
    return _forward(function)(x)


@coded_activation.register_fake
def _(x, codes, nonfinite, bits, function):
    return torch.empty_like(x)


def _activation_setup(ctx, inputs, output) -> None:
    x, codes, nonfinite, ctx.bits, ctx.function = inputs
    ctx.save_for_backward(codes, nonfinite)


def _activation_backward(ctx, dy, grad=None):
    codes, nonfinite = ctx.saved_tensors
    if ctx.function == "relu":
        mask = unpack_codes(codes, 1, dy.numel()).view(dy.shape).bool()
        return torch.where(mask, dy, 0), None, None, None, None
    dx = (grad or activation_grad)(dy, codes, nonfinite, ctx.bits, ctx.function)
    return dx, None, None, None, None


coded_activation.register_autograd(_activation_backward, setup_context=_activation_setup)


class CodedActivationFunction(torch.autograd.Function):
    """``coded_activation`` for eager mode (see ``PrunedLinearFunction``)."""

    @staticmethod
    def forward(ctx, x, codes, nonfinite, bits, function):
        _activation_setup(ctx, (x, codes, nonfinite, bits, function), None)
        return _forward(function)(x)

    @staticmethod
    def backward(ctx, dy):
        return _activation_backward(ctx, dy, activation_grad_eager)


def activation_grad_eager(
    dy: torch.Tensor, codes: torch.Tensor, nonfinite: torch.Tensor, bits: int, function: str
) -> torch.Tensor:
    """dx = dy ⊙ q(x) from activation_code's outputs (NaN in the flagged rows):
    ``activation_grad``'s body, which eager mode calls directly."""
    return kernels.activation_grad(dy, codes, nonfinite, derivative_code(function, bits))


@torch.library.custom_op("actprune::activation_grad", mutates_args=())
def activation_grad(
    dy: torch.Tensor, codes: torch.Tensor, nonfinite: torch.Tensor, bits: int, function: str
) -> torch.Tensor:
    """``activation_grad_eager`` as an operator of its own, so torch.compile traces the backward
    around the kernel instead of into it."""
    return activation_grad_eager(dy, codes, nonfinite, bits, function)


@activation_grad.register_fake
def _(dy, codes, nonfinite, bits, function):
    return torch.empty_like(dy)
