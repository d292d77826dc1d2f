"""Per-row integer codes of a tensor on the input-gradient path (norm inputs, attention's q, k, v,
SwiGLU's gate and up): the lossy opt-in of ``PruneConfig.norm_bits``, ``attention_bits`` and
``swiglu_bits``.

A row is the last dimension (a token's features; for attention a token's head: per-head scales).
Each row keeps one float32 scale s = max|row| / (2^(bits−1) − 1) and signed codes
round(x / s), rounded to nearest (no random draw: the same digits in eager and compiled code), so
every decoded element is within s / 2 of the original:

    |x̃ − x| ≤ max|row| / (2 · (2^(bits−1) − 1))      (1/254 of the row's largest magnitude at 8
                                                        bits, 1/14 at 4 bits)

A row holding a NaN or ±Inf gets a NaN scale and decodes to NaN as a whole (its codes are 0),
so a non-finite input is never hidden from the gradients (dense backward may turn fewer of that
row's elements into NaN). 8-bit codes are int8, one per element; 4-bit codes are offset by 8 and
packed two to a byte. The kernels (``kernels.encode_row_codes``: numba on CPU, Triton on CUDA,
PyTorch ops under torch.compile) give the same digits.
"""

from __future__ import annotations

import torch

from . import kernels

BITS = (4, 8)


def encode(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of x: codes int8 of x's shape (8 bits) or uint8 [ceil(numel / 2)] (4 bits,
    packed); scales float32 of x's shape without its last dimension
    (``kernels.encode_row_codes``)."""
    if bits not in BITS:
        raise ValueError(f"row codes have {' or '.join(map(str, BITS))} bits, got {bits}")
    codes, scales = kernels.encode_row_codes(x.detach(), bits)  # in place: no copy of a view
    return (codes.view(x.shape) if bits == 8 else codes), scales.view(x.shape[:-1])


def decode(
    codes: torch.Tensor, scales: torch.Tensor, shape: torch.Size, dtype: torch.dtype, bits: int
) -> torch.Tensor:
    """x̃ of ``shape`` and ``dtype`` from ``encode``'s outputs (NaN rows stay NaN)."""
    return kernels.decode_row_codes(codes, scales.reshape(-1), shape[-1], dtype, bits).view(shape)


def error_bound(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The largest |x̃ − x| ``encode`` allows in each row of x (shape of x without its last dim)."""
    return x.detach().float().abs().amax(dim=-1) / (2 * (2 ** (bits - 1) - 1))


def save_for_backward(
    ctx, coded: tuple[tuple[torch.Tensor, int], ...], *other: torch.Tensor
) -> None:
    """``ctx.save_for_backward`` of each (tensor, bits) in ``coded``, exactly (bits 0) or as a row
    code, then ``other`` as they are: the one place every coded Function saves through, so
    autograd (and its saved-tensor hooks) holds only the codes."""
    ctx.row_codes = tuple((t.shape, t.dtype, bits) for t, bits in coded)
    tensors = [part for t, bits in coded for part in ((t,) if bits == 0 else encode(t, bits))]
    ctx.save_for_backward(*tensors, *other)


def save_encoded(
    ctx, shape: torch.Size, dtype: torch.dtype, bits: int, codes: torch.Tensor,
    scales: torch.Tensor, *other: torch.Tensor,
) -> None:  # fmt: skip
    """``save_for_backward`` of one tensor of ``shape`` and ``dtype`` that a kernel already coded
    (``encode``'s outputs; with bits 0 the tensor itself as ``codes``), then ``other``."""
    ctx.row_codes = ((shape, dtype, bits),)
    ctx.save_for_backward(*((codes,) if bits == 0 else (codes, scales)), *other)


def saved_tensors(ctx) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(the coded tensors decoded, the other tensors) that ``save_for_backward`` saved."""
    tensors, decoded = list(ctx.saved_tensors), []
    for shape, dtype, bits in ctx.row_codes:
        if bits == 0:
            decoded.append(tensors.pop(0))
        else:
            codes, scales = tensors.pop(0), tensors.pop(0)
            decoded.append(decode(codes, scales, shape, dtype, bits))
    return decoded, tensors
