"""Packing small unsigned codes (1, 2, 4 bits) into bytes: how low-bit codes are stored."""

from __future__ import annotations

import torch


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes < 2^bits, 1-D, packed 8 // bits to a byte (first code in the lowest bits)."""
    per = 8 // bits
    pad = -codes.numel() % per
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    lanes = codes.view(-1, per)
    packed = lanes[:, 0].clone()
    for i in range(1, per):
        packed |= lanes[:, i] << (bits * i)
    return packed


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """The inverse of ``pack_codes``: uint8 [numel]."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return codes.view(-1)[:numel]
