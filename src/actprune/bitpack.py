"""Packing small unsigned codes (1, 2, 4 bits; 8 is the identity) into bytes: the low-bit codes.

In eager mode both directions work on the codes viewed as wider integers, so each is a handful
of contiguous shift/or passes instead of one strided pass per lane: 8 // bits consecutive uint8
codes viewed as one integer hold lane i at bit 8·i; shifting right by (8 − bits)·i moves it to
bit bits·i, and the low byte of the OR of those shifts is the packed byte. Unpacking shifts left
and masks. (Lane i's copy never lands in another lane's bits, and codes below 2^bits keep every
integer positive. The byte order of the view is the machine's: little-endian is required.)

Under torch.compile the same bytes come from per-lane shifts of the codes as [n, 8 // bits]:
inductor must materialise a tensor to view it as another dtype, so the wide views cut the
kernel that computes the codes from the one that packs them (and the unpacking from its
consumer); the per-lane form fuses into both (docs/design.md, "Host cost, launches and the
compiled path"). In eager mode it measured up to 3× slower than the wide views (4 bits, 2^20
codes, CPU), hence the two forms, tested to agree.
"""

from __future__ import annotations

import sys

import torch

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships wheels for
    raise ImportError("actprune.bitpack assumes a little-endian machine")

_LANES = {
    1: (torch.int64, 0x0101010101010101),
    2: (torch.int32, 0x03030303),
    4: (torch.int16, 0x0F0F),
    8: (torch.uint8, 0xFF),
}


def top_code(bits: int) -> int:
    """The largest code of ``bits`` bits, 2^bits − 1: written as a power because ``bits`` may be
    a symbolic int under torch.compile, and torch 2.11's dynamo fails on ``1 << bits`` of one
    (``lshift`` of a SymInt; the GPU machines run 2.11)."""
    return 2**bits - 1


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes < 2^bits, 1-D, packed 8 // bits to a byte (first code in the lowest bits)."""
    per = 8 // bits
    pad = -codes.numel() % per
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    if torch.compiler.is_compiling():
        lanes = codes.reshape(-1, per)
        packed = lanes[:, 0]
        for i in range(1, per):
            packed = packed | (lanes[:, i] << (bits * i))
        return packed
    lanes = codes.contiguous().view(_LANES[bits][0])
    packed = lanes.clone()
    for i in range(1, per):
        packed |= lanes >> ((8 - bits) * i)
    return (packed & 0xFF).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """The inverse of ``pack_codes``: uint8 [numel]."""
    if torch.compiler.is_compiling():
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        return ((packed[:, None] >> shifts) & top_code(bits)).reshape(-1)[:numel]
    dtype, mask = _LANES[bits]
    wide = packed.to(dtype)
    lanes = wide.clone()
    for i in range(1, 8 // bits):
        lanes |= wide << ((8 - bits) * i)
    return (lanes & mask).view(torch.uint8)[:numel]
