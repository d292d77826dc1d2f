"""The one place that picks a backend for each block kernel.

Triton kernels (``triton_blocks``) run for CUDA tensors when triton is installed; the numba kernels
(``cpu_blocks``) run for float32 CPU tensors when numba is installed; everything else runs
the PyTorch reference (``reference``), which is also the contract both are tested against.
``ACTPRUNE_KERNELS=torch`` forces the reference everywhere, ``=numba`` the numba kernels on CPU,
``=triton`` Triton (on CPU tensors this needs ``TRITON_INTERPRET=1``; used by the tests); it is
read at the first kernel call, and ``set_backend`` changes the choice in a running process.
triton and numba are imported on first use only, so ``import actprune`` stays light.

Every kernel reads activations and output gradients as a *row source* [B, T, C] whose rows are
t·B + b (``reference``'s docstring); ``row_source`` makes one without copying.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from functools import cache
from types import ModuleType

import torch

from ..derivative_code import DerivativeCode
from ..storage import BlockSparse
from . import reference

BACKENDS = ("auto", "torch", "numba", "triton")

__all__ = [
    "BACKENDS",
    "activation_codes",
    "activation_grad",
    "backend_choice",
    "backend_for",
    "backend_module",
    "channel_scale_grad",
    "decode_row_codes",
    "dropout_grad",
    "encode_row_codes",
    "norm_grad",
    "normalized_row_codes",
    "pack_blocks",
    "pack_mask",
    "score_blocks",
    "select_blocks",
    "set_backend",
    "traced",
    "weight_grad",
]


# Whether each optional kernel package is installed, looked up when this module is imported:
# torch.compile traces ``backend_for``, and torch 2.11's dynamo refuses to trace
# ``importlib.util.find_spec`` (a lookup on first use broke a compiled model's first step there).
_INSTALLED = {name: importlib.util.find_spec(name) is not None for name in ("numba", "triton")}


_choice: str | None = None  # backend_choice(): None until read


def _checked(choice: str) -> str:
    if choice not in BACKENDS:
        raise ValueError(f"ACTPRUNE_KERNELS must be one of {', '.join(BACKENDS)}, got {choice!r}")
    return choice


def backend_choice() -> str:
    """The backend choice, one of ``BACKENDS``: ``ACTPRUNE_KERNELS`` ("auto" when unset), read
    from the environment at the first kernel call of the process (a read per call was a few µs
    on every layer's step: docs/design.md, "Host cost, launches and the compiled path"), or the
    one given to ``set_backend``."""
    global _choice
    if _choice is None:
        _choice = _checked(os.environ.get("ACTPRUNE_KERNELS", "auto"))
    return _choice


def set_backend(choice: str | None) -> None:
    """Choose the kernels' backend from now on in this process, as ``ACTPRUNE_KERNELS`` does at
    start-up; None: read ``ACTPRUNE_KERNELS`` again at the next kernel call.

    Args:
        choice: "auto" (Triton on CUDA, numba for float32 on the CPU, PyTorch otherwise),
            "torch", "numba", "triton", or None.

    Example:
        >>> import torch
        >>> from actprune import kernels
        >>> kernels.set_backend("torch")
        >>> kernels.backend_for(torch.zeros(2))
        'torch'
        >>> kernels.set_backend(None)                 # back to ACTPRUNE_KERNELS (or "auto")
    """
    global _choice
    _choice = None if choice is None else _checked(choice)


def backend_for(x: torch.Tensor) -> str:
    """ "triton", "numba" or "torch": the backend the kernels below use for a tensor like x."""
    choice = backend_choice()
    if choice == "numba" and x.is_cuda:
        return "torch"
    if choice != "auto":
        return choice
    if x.is_cuda:
        return "triton" if _INSTALLED["triton"] else "torch"
    if x.device.type == "cpu" and x.dtype == torch.float32 and _INSTALLED["numba"]:
        return "numba"
    return "torch"


def traced(x: torch.Tensor) -> bool:
    """Whether, under torch.compile, the uniform compression and the activation codes of tensors
    like x (and the gradients read back from them) are ``reference``'s PyTorch ops, traced for
    inductor to generate and fuse, rather than operators around the backend's kernels. True
    where the backend is PyTorch's (``ACTPRUNE_KERNELS=torch``, or no kernel for x's device and
    dtype). The numba and Triton kernels stay: inductor's code for the same ops measured slower
    than numba's on the CPU, and for a GPU it splits a compression into four kernels that pass
    int32 codes through memory, where the Triton kernel is one launch (docs/design.md, "Host
    cost, launches and the compiled path")."""
    return backend_for(x) == "torch"


_MODULES = {"triton": "triton_blocks", "numba": "cpu_blocks", "meta": "meta_blocks"}


@cache
def _module(backend: str) -> ModuleType:
    """The module of a backend, imported on first use (once: every kernel call asks)."""
    name = _MODULES.get(backend)
    return reference if name is None else importlib.import_module(f".{name}", __name__)


def backend_module(x: torch.Tensor) -> ModuleType:
    """The module whose kernels run for tensors like x: ``backend_for``'s, or on the meta device
    (the planner) ``meta_blocks``, which allocates what the fast backends allocate. Each has
    ``score_blocks``, ``pack_blocks``, ``decode_rows``, ``weight_grad`` and
    ``channel_scale_grad`` with ``reference``'s contracts; ``blocksparse.Codec`` asks once and
    calls them directly. Two are optional, used where a backend has them: ``uniform_coders``
    (numba: uniform quantization's code and weight gradient, each one call) and
    ``fused_compression`` (Triton: score, select and pack in one launch)."""
    return _module("meta" if x.device.type == "meta" else backend_for(x))


def score_blocks(
    x3: torch.Tensor,
    block_shape: tuple[int, int],
    criterion: str,
    bits: int,
    key: int,
    ccol: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scores, codes, low_scales): float32 [n_br, n_bc] block scores of the rows of x3 [B, T, C]
    (NaN/Inf score +inf) and, with ``bits`` > 0, the packed low-bit codes and per-block scales of
    the whole tensor (``storage.LowBitBlocks``), rounded with ``rng.random_bytes(key, ·)``.
    ``ccol`` (int32 [n_bc + 1]), when given, is zeroed in the same pass: the block-column offsets
    of an empty selection, so uniform quantization's compression is one launch."""
    return backend_module(x3).score_blocks(x3, block_shape, criterion, bits, key, ccol)


def select_blocks(
    scores: torch.Tensor, k: int, *, per_column: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The blocks with the largest scores, in BSC order (by block-column, then block-row).

    Ties are broken deterministically: among equal scores, the block that comes first in
    row-major order (block-row, then block-column) is kept first.

    Args:
        scores: [n_br, n_bc] score of every block, >= 0 (norms and maxima; +inf for blocks
            holding NaN/Inf), as ``score_blocks`` gives them.
        k: blocks kept in all, or with ``per_column`` in every block-column.

    Keyword args:
        per_column: keep the k best of every block-column instead of the whole grid.

    Returns:
        (rows, cols, ccol_indices), int32: the kept blocks' block-rows and block-columns, and
        the offsets of each block-column's run.

    Example:
        >>> import torch
        >>> from actprune import select_blocks
        >>> rows, cols, ccol = select_blocks(torch.tensor([[1.0, 1, 1, 5]]), 2)
        >>> cols.tolist(), ccol.tolist()
        ([0, 3], [0, 1, 1, 1, 2])
    """
    # numba on the CPU, one Triton launch on CUDA (neither sorts; "meta" allocates as numba
    # does); the PyTorch reference otherwise and for an empty selection.
    impl = backend_module(scores) if k else reference
    return impl.select_blocks(scores, k, per_column=per_column)


def pack_blocks(
    x3: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, block_shape: tuple[int, int]
) -> torch.Tensor:
    """values [nnz, bm, bk]: block (rows[i], cols[i]) of the rows of x3, zero-padded at edges."""
    if rows.numel() == 0:  # uniform quantization keeps no block: no launch
        return x3.new_empty(0, *block_shape)
    return backend_module(x3).pack_blocks(x3, rows, cols, block_shape)


def _as_source(dy: torch.Tensor) -> torch.Tensor:
    return dy.unsqueeze(0) if dy.dim() == 2 else dy


def weight_grad(dy: torch.Tensor, x: BlockSparse) -> torch.Tensor:
    """dW [N, K] = dyᵀ·X̃, dy [M, N] or a row source [B, T, N] (its rows), never with a dense
    copy of X̃: the kept blocks alone, or (with a remainder, or dense-ish X̃) one decoded tile of
    rows at a time.

    int8 blocks are dequantised to dy.dtype first (a transient of the kept blocks' size)."""
    return backend_module(dy).weight_grad(_as_source(dy), x.dequantized(dy.dtype))


def channel_scale_grad(dy: torch.Tensor, x: BlockSparse) -> torch.Tensor:
    """[K] = Σ_m dy[m, k] · X̃[m, k], dy [M, K] or a row source [B, T, K] (its rows): the gradient
    of a per-channel scale whose input is X̃."""
    return backend_module(dy).channel_scale_grad(_as_source(dy), x.dequantized(dy.dtype))


def activation_codes(x: torch.Tensor, code: DerivativeCode) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, nonfinite): ``code``'s packed piece index of every element of an activation's
    input x (..., K), and one bit per row set where the row holds a NaN or ±Inf."""
    return backend_module(x).activation_codes(x, code)


def activation_grad(
    dy: torch.Tensor, codes: torch.Tensor, nonfinite: torch.Tensor, code: DerivativeCode
) -> torch.Tensor:
    """dx = dy ⊙ q(x) from ``activation_codes``' output, NaN in the rows flagged non-finite."""
    return backend_module(dy).activation_grad(dy, codes, nonfinite, code)


def encode_row_codes(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales): the per-row ``bits``-bit codes of the rows of x (..., C) (``rowcode``;
    the contract: ``reference.encode_row_codes``). In eager mode numba for float32 CPU tensors
    and one Triton launch for CUDA tensors; the PyTorch ops otherwise (under torch.compile:
    traced, and inductor fuses them)."""
    backend = backend_for(x)
    if backend in ("numba", "triton") and not torch.compiler.is_compiling():
        return _module(backend).encode_row_codes(x, bits)
    return reference.encode_row_codes(x, bits)


def normalized_row_codes(
    x: torch.Tensor, eps: float, rms: bool, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A normalization's saved tensors, (x̂ or its ``bits``-bit codes, their scales, rstd)
    (``reference.normalized_row_codes``): one Triton launch on CUDA in eager mode; otherwise
    PyTorch's ops for the statistics and ``encode_row_codes`` for the codes."""
    if _triton_in_eager(x):
        return _module("triton").normalized_row_codes(x, eps, rms, bits)
    x_hat, empty, rstd = reference.normalized_row_codes(x, eps, rms, 0)
    return (*encode_row_codes(x_hat, bits), rstd) if bits else (x_hat, empty, rstd)


def norm_grad(
    dy: torch.Tensor, saved: torch.Tensor, scales: torch.Tensor, rstd: torch.Tensor,
    weight: torch.Tensor | None, rms: bool, bits: int, has_bias: bool, x_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """A normalization's (dx, dγ, dβ) from ``normalized_row_codes``' outputs
    (``reference.norm_grad``): one Triton launch and a sum per parameter on CUDA in eager mode;
    otherwise ``decode_row_codes`` and PyTorch's ops."""
    if _triton_in_eager(dy):
        return _module("triton").norm_grad(dy, saved, scales, rstd, weight, rms, bits, has_bias,
                                           x_dtype)  # fmt: skip
    if bits:
        saved = decode_row_codes(saved, scales.reshape(-1), dy.shape[-1], x_dtype, bits)
    return reference.norm_grad(dy, saved, scales, rstd, weight, rms, 0, has_bias, x_dtype)


def decode_row_codes(
    codes: torch.Tensor, scales: torch.Tensor, cols: int, dtype: torch.dtype, bits: int
) -> torch.Tensor:
    """x̃ [R, C] in ``dtype`` from ``encode_row_codes``' outputs (numba: float32 only)."""
    backend = backend_for(scales)
    fast = backend == "triton" or (backend == "numba" and dtype == torch.float32)
    if fast and not torch.compiler.is_compiling():
        return _module(backend).decode_row_codes(codes, scales, cols, dtype, bits)
    return reference.decode_row_codes(codes, scales, cols, dtype, bits)


def _triton_in_eager(x: torch.Tensor) -> bool:
    return backend_for(x) == "triton" and not torch.compiler.is_compiling()


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A dropout's bool mask as bits (uint8 [ceil(numel / 8)], ``reference.pack_mask``): one
    Triton launch on CUDA in eager mode; PyTorch's shifts otherwise (traced under compile)."""
    return (_module("triton") if _triton_in_eager(mask) else reference).pack_mask(mask)


def dropout_grad(dy: torch.Tensor, packed: torch.Tensor, scale: float) -> torch.Tensor:
    """dx = dy · mask · scale from ``pack_mask``'s bits (``reference.dropout_grad``): one Triton
    launch on CUDA in eager mode."""
    impl = _module("triton") if _triton_in_eager(dy) else reference
    return impl.dropout_grad(dy, packed, scale)
