"""The one place that picks a backend for each block kernel.

Triton kernels (``triton_blocks``) run for CUDA tensors when triton is installed; everything else
runs the PyTorch reference (``reference``), which is also the contract the Triton kernels are tested
against. ``ACTPRUNE_KERNELS=torch`` forces the reference everywhere, ``ACTPRUNE_KERNELS=triton``
forces Triton (on CPU tensors this needs ``TRITON_INTERPRET=1``; used by the tests). triton is
imported on first use only, so ``import actprune`` stays light.
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache
from types import ModuleType

import torch

from ..storage import BlockSparse
from . import reference

BACKENDS = ("auto", "torch", "triton")

__all__ = [
    "BACKENDS",
    "backend_for",
    "block_scores",
    "channel_scale_grad",
    "pack_blocks",
    "weight_grad",
]


@cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def backend_for(x: torch.Tensor) -> str:
    """ "triton" or "torch": the backend the kernels below use for a tensor like x."""
    choice = os.environ.get("ACTPRUNE_KERNELS", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"ACTPRUNE_KERNELS must be one of {', '.join(BACKENDS)}, got {choice!r}")
    if choice == "auto":
        return "triton" if x.is_cuda and _triton_installed() else "torch"
    return choice


def _impl(x: torch.Tensor) -> ModuleType:
    if backend_for(x) == "triton":
        from . import triton_blocks

        return triton_blocks
    return reference


def block_scores(x: torch.Tensor, block_shape: tuple[int, int], criterion: str) -> torch.Tensor:
    """float32 [n_br, n_bc]: the score of each (bm × bk) block of x [M, K]; NaN/Inf score +inf."""
    return _impl(x).block_scores(x, block_shape, criterion)


def pack_blocks(
    x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, block_shape: tuple[int, int]
) -> torch.Tensor:
    """values [nnz, bm, bk]: block (rows[i], cols[i]) of x [M, K], zero-padded at the edges."""
    return _impl(x).pack_blocks(x, rows, cols, block_shape)


def weight_grad(dy: torch.Tensor, x: BlockSparse) -> torch.Tensor:
    """dW [N, K] = dyᵀ [N, M] · X̃ [M, K] for block-sparse X̃, without a dense copy on Triton.

    int8 blocks are dequantised to dy.dtype first (a transient of the kept blocks' size). With a
    low-bit remainder X̃ is dense: it is decoded into a transient [M, K] for one matmul."""
    if x.remainder is not None:
        return dy.t().mm(x.dequantized(dy.dtype).to_dense())
    return _impl(dy).weight_grad(dy, x.dequantized(dy.dtype))


def channel_scale_grad(dy: torch.Tensor, x: BlockSparse) -> torch.Tensor:
    """[K] = Σ_m dy[m, k] · X̃[m, k]: the gradient of a per-channel scale whose input is X̃."""
    if x.remainder is not None:
        acc = torch.promote_types(dy.dtype, torch.float32)
        dense = x.dequantized(dy.dtype).to_dense()
        return (dy.to(acc) * dense.to(acc)).sum(0).to(dy.dtype)
    return _impl(dy).channel_scale_grad(dy, x.dequantized(dy.dtype))
