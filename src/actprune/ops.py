"""actprune's layers as autograd Functions around registered PyTorch operators (torch.library).

The work that is not PyTorch ops (the numba or Triton kernels: compressing, decoding into a
parameter gradient, coding an activation's derivative) is a registered operator, so torch.compile
and the meta device see opaque ops with known output shapes instead of tracing into the kernels.
Everything around them is an ``autograd.Function`` of PyTorch ops (``PrunedLinearFunction``,
``PrunedChannelScaleFunction``, ``CodedActivationFunction``), which torch.compile traces: inductor
fuses the layer's own computation (F.linear, the scale, the activation) with its neighbours, and
the Function saves exactly the compressed tensors. Under torch.compile with PyTorch's backend
(``kernels.traced``) the uniform compression and the activation codes, and what reads them back,
are PyTorch ops too (``blocksparse.traced_compress``), so inductor generates them as well; their
rounding key comes from ``next_key``. In eager mode the Functions call the kernels directly
(``blocksparse.Codec``, ``activation_code_parts``): a custom op's Python dispatch costs more than
a small layer's whole step.

The compression operator returns the compressed tensors, and each layer takes them as inputs and
keeps them for its backward. So one compressed copy of a tensor can serve several layers that read
it (``layers`` deduplicates in eager mode), and autograd saves exactly those tensors.

Every op that compresses or reads compressed tensors takes the configuration as one string,
``PruneConfig.to_json()``: the config's own serialisation, so no field list is repeated here.

- ``actprune::compress_rows`` — the ``storage.Parts`` of ``compress(as_rows(x))``: values,
  row_indices, ccol_indices, scales (int8), low_codes and low_scales (the low-bit remainder),
  empty when not used; shapes depend only on the input shape and the config.
- ``actprune::block_sparse_grad`` — a parameter gradient from compressed tensors (``kernels``):
  dyᵀ·X̃ for a weight (``param="weight"``), Σ_rows dy ⊙ X̃ for a per-channel scale
  (``param="channel_scale"``).
- ``actprune::activation_code`` — the packed derivative code of an activation's input
  (``derivative_code``; ReLU: an exact 1-bit mask) plus one bit per row marking non-finite
  inputs.
- ``actprune::activation_grad`` — the coded activation's input gradient, from its codes.
- ``actprune::next_key`` — the next rounding key of a random stream as a 0-d int64 tensor on
  the device of the tensor compressed, for a traced compression.

``compress_rows`` and ``next_key`` draw on the host and carry ``torch.Tag.cudagraph_unsafe``:
inductor runs them outside CUDA graphs, whose replays would repeat one key (docs/design.md,
"Keys under torch.compile, and CUDA graphs").
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import kernels, rng
from .bitpack import pack_codes, unpack_codes
from .blocksparse import Codec, codec_for, row_source, traced_compression, traced_param_grad
from .config import PruneConfig
from .derivative_code import ACTIVATIONS, derivative_code, traced_code
from .kernels import reference
from .storage import Parts

_LIBRARY = torch.library.Library("actprune", "DEF")


# The tags of an operator whose body draws a random key on the host: its value is a new draw
# each call (``nondeterministic_seeded``), and it must run outside CUDA graphs, whose replays
# would repeat the key captured (``cudagraph_unsafe``, which older torch lacks).
_HOST_RANDOM = tuple(
    tag for tag in (torch.Tag.nondeterministic_seeded, getattr(torch.Tag, "cudagraph_unsafe", None))
    if tag is not None
)  # fmt: skip


def _define(schema: str, body: Callable, fake: Callable, tags: tuple = ()) -> torch._ops.OpOverload:
    """The operator ``actprune::<schema>``: ``body`` its kernel on every device, ``fake`` its
    shapes (FakeTensor, "meta"), ``tags`` its ``torch.Tag``s. Defined on a
    ``torch.library.Library`` rather than with ``torch.library.custom_op``, whose autograd
    wrapper and per-call checks cost ~13 µs a call above the body on this CPU: compiled steps
    call these once per compressed tensor each way, and none needs autograd (they run on
    detached inputs or inside a backward)."""
    name = schema.split("(", 1)[0]
    _LIBRARY.define(schema, tags=tags)
    _LIBRARY.impl(name, body, "CompositeExplicitAutograd")
    torch.library.register_fake(f"actprune::{name}", fake, lib=_LIBRARY)
    return getattr(torch.ops.actprune, name).default


def _compress_rows(x: torch.Tensor, config: str, stream: int) -> Parts:
    """The ``Parts`` of ``compress(as_rows(x), c)``, c = ``PruneConfig.from_json(config)``, its
    rounding drawn from ``rng.stream(stream)`` (0: the calling thread's): the ``Codec``'s
    compression as an operator (torch.compile and the meta device see its shapes; eager layers
    call the codec directly)."""
    codec = codec_for(PruneConfig.from_json(config), x.shape, x.dtype, x.device)
    return codec.compress(x, rng.stream(stream))


def _compress_rows_fake(x: torch.Tensor, config: str, stream: int) -> Parts:
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


compress_rows = _define(
    "compress_rows(Tensor x, str config, int stream) -> (Tensor, Tensor, Tensor, Tensor, Tensor, "
    "Tensor)", _compress_rows, _compress_rows_fake, _HOST_RANDOM,
)  # fmt: skip


def _next_key(x: torch.Tensor, param: torch.Tensor, stream: int) -> torch.Tensor:
    """The next key of ``rng.stream(stream)`` (0: the calling thread's) as a 0-d int64 tensor
    on x's device, written by a fill (no host-to-device copy): the key of a traced compression
    of x for the gradient of ``param`` (``blocksparse.traced_compress``). Both are inputs so
    that the draw is ordered by x's computation, as in eager mode (the compiled step draws the
    same keys for the same compressions), and so that two layers reading one x are two calls:
    the graph's common-subexpression pass merges identical calls whatever their tags."""
    return torch.full((), rng.stream(stream).next_key(), dtype=torch.int64, device=x.device)


next_key = _define(
    "next_key(Tensor x, Tensor param, int stream) -> Tensor", _next_key,
    lambda x, param, stream: x.new_empty((), dtype=torch.int64), _HOST_RANDOM,
)  # fmt: skip


def _save_compressed(ctx, x, parts, codec_or_config, *params) -> None:
    """Saves the parameters and parts; keeps what the parameter gradient needs: the ``Codec``
    (eager) or the config string (compiled, for ``block_sparse_grad``)."""
    ctx.x_shape = x.shape
    if isinstance(codec_or_config, Codec):
        ctx.codec = codec_or_config
        ctx.compressed = parts is not codec_or_config.nothing_saved
    else:  # under torch.compile: the PruneConfig
        ctx.codec, ctx.config = None, codec_or_config
        ctx.traced = traced_compression(codec_or_config, x)
        ctx.compressed = parts[0].numel() > 0 or parts[4].numel() > 0  # kept blocks or codes
    ctx.save_for_backward(*params, *parts)


def _param_grad(ctx, dy: torch.Tensor, parts: list, param: str, op: str) -> torch.Tensor:
    """The gradient of the parameter that multiplied the compressed input: dW for a Linear
    (``param="weight"``), d scale for a per-channel scale (``"channel_scale"``)."""
    if not ctx.compressed:
        raise RuntimeError(
            f"{op} got no compressed input (empty values and codes), so it kept "
            "nothing to compute the parameter gradient from; pass compress_rows' outputs when "
            "the parameter needs grad"
        )
    if ctx.codec is not None:  # eager: the codec's kernels, no operator dispatch
        return _CODEC_GRADIENTS[param](ctx.codec, dy, parts)
    if ctx.traced:
        return traced_param_grad(dy, parts, ctx.config, ctx.x_shape, param)
    rows, cols = math.prod(ctx.x_shape[:-1]), ctx.x_shape[-1]
    dy3 = row_source(dy, ctx.config.row_order)  # a view: no token-major copy
    return block_sparse_grad(dy3, *parts, ctx.config.to_json(), rows, cols, param)


# --- Linear ---------------------------------------------------------------------------------------


class PrunedLinearFunction(torch.autograd.Function):
    """F.linear(x, weight, bias) whose backward reads x only as the compressed ``parts``: dx =
    dy·W and db exact, dW = dyᵀ·X̃. Given the ``Codec`` that made the parts (eager: the codec's
    kernels, no operator dispatch, which costs more than a small layer's whole step) or the
    ``PruneConfig`` (under torch.compile, which traces this Function: inductor sees F.linear and
    fuses around it, and dW is ``block_sparse_grad``, opaque). The parts come as one tuple:
    autograd then checks three tensor arguments, not nine."""

    @staticmethod
    def forward(ctx, x, weight, bias, parts, codec_or_config):
        ctx.has_bias = bias is not None
        _save_compressed(ctx, x, parts, codec_or_config, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        weight, *parts = ctx.saved_tensors
        dy2d = dy.reshape(math.prod(ctx.x_shape[:-1]), dy.shape[-1])  # also with 0 columns
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = dy2d.mm(weight).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dw = _param_grad(ctx, dy, parts, "weight", "PrunedLinearFunction")
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2d.sum(0)
        return dx, dw, db, None, None


# --- per-channel scale (Affine, LayerScale) -------------------------------------------------------


class PrunedChannelScaleFunction(torch.autograd.Function):
    """x ⊙ scale (+ shift), scale and shift holding one value per channel (last dim of x), whose
    backward reads x only as the compressed ``parts``: dx = dy ⊙ scale and d shift exact, d scale
    = Σ_rows dy ⊙ X̃ (see ``PrunedLinearFunction`` for eager and compiled)."""

    @staticmethod
    def forward(ctx, x, scale, shift, parts, codec_or_config):
        ctx.shift_shape = None if shift is None else shift.shape
        ctx.scale_shape = scale.shape
        _save_compressed(ctx, x, parts, codec_or_config, scale)
        return x * scale if shift is None else torch.addcmul(shift, scale, x)

    @staticmethod
    def backward(ctx, dy):
        scale, *parts = ctx.saved_tensors
        dx = dscale = dshift = None
        channels = ctx.x_shape[-1]
        if ctx.needs_input_grad[0]:
            dx = dy * scale
        if ctx.needs_input_grad[1]:
            dscale = _param_grad(ctx, dy, parts, "channel_scale", "PrunedChannelScaleFunction")
            dscale = dscale.view(ctx.scale_shape)
        if ctx.shift_shape is not None and ctx.needs_input_grad[2]:
            dshift = dy.reshape(-1, channels).sum(0).view(ctx.shift_shape)
        return dx, dscale, dshift, None, None


# --- the parameter gradient from a compressed tensor ----------------------------------------------


_CODEC_GRADIENTS = {"weight": Codec.weight_grad, "channel_scale": Codec.channel_scale_grad}


def _block_sparse_grad(
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


def _block_sparse_grad_fake(dy: torch.Tensor, *parts_and_args) -> torch.Tensor:
    *_, cols, param = parts_and_args
    return dy.new_empty((dy.shape[-1], cols) if param == "weight" else (cols,))


block_sparse_grad = _define(
    "block_sparse_grad(Tensor dy, Tensor values, Tensor row_indices, Tensor ccol_indices, "
    "Tensor scales, Tensor low_codes, Tensor low_scales, str config, int rows, int cols, "
    "str param) -> Tensor", _block_sparse_grad, _block_sparse_grad_fake,
)  # fmt: skip


# --- activations with a low-bit derivative code ---------------------------------------------------


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.dim() else 1


def _forward(function: str):
    return F.relu if function == "relu" else ACTIVATIONS[function][0]


def activation_code_parts(
    x: torch.Tensor, bits: int, function: str, traced: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, nonfinite): uint8, the packed ``bits``-bit code of ``function``'s derivative at
    every element of x, and one bit per row (last dim) set where the row holds a NaN or ±Inf.
    ``function="relu"`` (bits 1): the exact mask of where dense ReLU passes the gradient
    (x > 0 or NaN), and no rows (dense ReLU's dx stays finite at a NaN input). ``activation_code``'s
    body, which eager mode calls directly; ``traced``: as ``reference``'s PyTorch ops, for
    torch.compile to trace (``kernels.traced``)."""
    x = x.detach()
    if function == "relu":
        codes = pack_codes((~(x <= 0)).reshape(-1).to(torch.uint8), 1)
        return codes, x.new_empty(0, dtype=torch.uint8)
    if traced:
        return reference.activation_codes(x, traced_code(function, bits))
    return kernels.activation_codes(x, derivative_code(function, bits))


def _activation_code_fake(x: torch.Tensor, bits: int, function: str) -> tuple[torch.Tensor, ...]:
    codes = x.new_empty(-(-x.numel() * bits // 8), dtype=torch.uint8)
    return codes, x.new_empty(0 if function == "relu" else -(-_rows(x) // 8), dtype=torch.uint8)


activation_code = _define(  # ``activation_code_parts`` as an operator
    "activation_code(Tensor x, int bits, str function) -> (Tensor, Tensor)",
    activation_code_parts, _activation_code_fake,
)


class CodedActivationFunction(torch.autograd.Function):
    """``function``(x), computed as the dense module computes it, whose backward reads only
    ``codes`` and ``nonfinite`` (``activation_code``'s outputs): dx = dy ⊙ q(x), NaN in every
    row that held a non-finite x (f' is NaN there in dense training too); for ReLU dx = dy where
    the mask is set, else 0, exactly. Eager mode decodes with the kernels directly; under
    torch.compile (which traces this Function, so inductor fuses the activation with its
    neighbours) the decoding is ``activation_grad``, opaque."""

    @staticmethod
    def forward(ctx, x, codes, nonfinite, bits, function):
        ctx.bits, ctx.function = bits, function
        ctx.save_for_backward(codes, nonfinite)
        return _forward(function)(x)

    @staticmethod
    def backward(ctx, dy):
        codes, nonfinite = ctx.saved_tensors
        if ctx.function == "relu":
            mask = unpack_codes(codes, 1, dy.numel()).view(dy.shape).bool()
            return torch.where(mask, dy, 0), None, None, None, None
        if not torch.compiler.is_compiling():
            dx = activation_grad_eager(dy, codes, nonfinite, ctx.bits, ctx.function)
        elif kernels.traced(dy):
            code = traced_code(ctx.function, ctx.bits)
            dx = reference.activation_grad(dy, codes, nonfinite, code)
        else:
            dx = activation_grad(dy, codes, nonfinite, ctx.bits, ctx.function)
        return dx, None, None, None, None


def activation_grad_eager(
    dy: torch.Tensor, codes: torch.Tensor, nonfinite: torch.Tensor, bits: int, function: str
) -> torch.Tensor:
    """dx = dy ⊙ q(x) from activation_code's outputs (NaN in the flagged rows):
    ``activation_grad``'s body, which eager mode calls directly."""
    return kernels.activation_grad(dy, codes, nonfinite, derivative_code(function, bits))


activation_grad = _define(  # an operator of its own: compile traces around the kernel, not into it
    "activation_grad(Tensor dy, Tensor codes, Tensor nonfinite, int bits, str function) -> Tensor",
    activation_grad_eager, lambda dy, *_: torch.empty_like(dy),
)
