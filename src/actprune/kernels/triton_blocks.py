"""Triton kernels for block scoring, block packing and the block-sparse parameter gradients.

Each kernel sits beside its launcher; the PyTorch reference with the same contract is the function
of the same name in ``reference.py``. This module imports triton, so it is only imported by the
dispatcher (``actprune.kernels``) when a Triton launch is wanted. Plain pointer arithmetic only (no
block pointers), so the kernels also run under ``TRITON_INTERPRET=1`` on CPU tensors.

Blocks may have any shape: a block's tile is padded to a power of two >= 16 (``tl.dot``'s minimum)
and masked, so (8, 8) or (24, 40) blocks work, with padded lanes doing no useful work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..storage import BlockSparse

_CRITERION_CODE = {"l2": 0, "l1": 1, "max": 2}


def _tile(n: int) -> int:
    """Power-of-two tile side >= 16 that holds n."""
    return max(16, triton.next_power_of_2(n))


def _block_args(block_shape: tuple[int, int]) -> dict[str, int]:
    """The compile-time block arguments every kernel here takes."""
    bm, bk = block_shape
    return {"BM": bm, "BK": bk, "TILE_M": _tile(bm), "TILE_K": _tile(bk)}


# --- block scores: read M·K, write n_blocks floats ---------------------------------------------


@triton.jit
def _block_scores_kernel(
    x_ptr,
    out_ptr,
    M,
    K,
    stride_xm,
    stride_xk,
    n_bc,
    BM: tl.constexpr,
    BK: tl.constexpr,
    TILE_M: tl.constexpr,
    TILE_K: tl.constexpr,
    CRITERION: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    i = tl.arange(0, TILE_M)
    j = tl.arange(0, TILE_K)
    offs_m = pid_r.to(tl.int64) * BM + i
    offs_k = pid_c.to(tl.int64) * BK + j
    mask = (i[:, None] < BM) & (j[None, :] < BK) & (offs_m[:, None] < M) & (offs_k[None, :] < K)
    ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    a = tl.abs(x)
    if CRITERION == 0:
        score = tl.sqrt(tl.sum(tl.sum(a * a, axis=1), axis=0))
    elif CRITERION == 1:
        score = tl.sum(tl.sum(a, axis=1), axis=0)
    else:
        score = tl.max(tl.max(a, axis=1), axis=0)
    # NaN / Inf anywhere in the block: score +inf, so the block is kept (never silently dropped).
    bad = ((x != x) | (a == float("inf"))).to(tl.int32)
    score = tl.where(tl.sum(tl.sum(bad, axis=1), axis=0) > 0, float("inf"), score)
    tl.store(out_ptr + pid_r * n_bc + pid_c, score)


def block_scores(x: torch.Tensor, block_shape: tuple[int, int], criterion: str) -> torch.Tensor:
    """Triton version of ``reference.block_scores``: float32 [n_br, n_bc]."""
    m, k = x.shape
    n_br, n_bc = triton.cdiv(m, block_shape[0]), triton.cdiv(k, block_shape[1])
    out = torch.empty(n_br, n_bc, device=x.device, dtype=torch.float32)
    _block_scores_kernel[(n_br, n_bc)](
        x,
        out,
        m,
        k,
        x.stride(0),
        x.stride(1),
        n_bc,
        **_block_args(block_shape),
        CRITERION=_CRITERION_CODE[criterion],
    )
    return out


# --- pack kept blocks: read and write nnz·bm·bk elements -----------------------------------------


@triton.jit
def _pack_blocks_kernel(
    x_ptr,
    rows_ptr,
    cols_ptr,
    out_ptr,
    M,
    K,
    stride_xm,
    stride_xk,
    BM: tl.constexpr,
    BK: tl.constexpr,
    TILE_M: tl.constexpr,
    TILE_K: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    r = tl.load(rows_ptr + b).to(tl.int64)
    c = tl.load(cols_ptr + b).to(tl.int64)
    i = tl.arange(0, TILE_M)
    j = tl.arange(0, TILE_K)
    offs_m = r * BM + i
    offs_k = c * BK + j
    in_block = (i[:, None] < BM) & (j[None, :] < BK)
    in_x = in_block & (offs_m[:, None] < M) & (offs_k[None, :] < K)
    x = tl.load(
        x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=in_x, other=0.0
    )
    tl.store(out_ptr + b * (BM * BK) + i[:, None] * BK + j[None, :], x, mask=in_block)


def pack_blocks(
    x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, block_shape: tuple[int, int]
) -> torch.Tensor:
    """Triton version of ``reference.pack_blocks``: values [nnz, bm, bk] in x.dtype."""
    nnz = rows.numel()
    out = torch.empty(nnz, *block_shape, device=x.device, dtype=x.dtype)
    if nnz:
        _pack_blocks_kernel[(nnz,)](
            x,
            rows,
            cols,
            out,
            x.shape[0],
            x.shape[1],
            x.stride(0),
            x.stride(1),
            **_block_args(block_shape),
        )
    return out


# --- weight gradient dW = dyᵀ·X̃: reads dy once per kept block and N-tile, FLOPs ∝ density -------


@triton.jit
def _weight_grad_kernel(
    dy_ptr,
    vals_ptr,
    rows_ptr,
    ccol_ptr,
    dw_ptr,
    M,
    N,
    K,
    stride_dym,
    stride_dyn,
    stride_dwn,
    stride_dwk,
    BM: tl.constexpr,
    BK: tl.constexpr,
    TILE_M: tl.constexpr,
    TILE_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # One program owns dW[n-tile, block-column c] and walks that column's kept blocks (BSC order).
    pid_n = tl.program_id(0)
    c = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    i = tl.arange(0, TILE_M)
    j = tl.arange(0, TILE_K)
    start = tl.load(ccol_ptr + c)
    end = tl.load(ccol_ptr + c + 1)
    acc = tl.zeros((BLOCK_N, TILE_K), dtype=tl.float32)
    v_ptrs = vals_ptr + start.to(tl.int64) * (BM * BK) + i[:, None] * BK + j[None, :]
    v_mask = (i[:, None] < BM) & (j[None, :] < BK)
    for b in range(start, end):
        r = tl.load(rows_ptr + b).to(tl.int64)
        offs_m = r * BM + i
        dy_mask = (i[None, :] < BM) & (offs_m[None, :] < M) & (offs_n[:, None] < N)
        dy_t = tl.load(
            dy_ptr + offs_m[None, :] * stride_dym + offs_n[:, None] * stride_dyn,
            mask=dy_mask,
            other=0.0,
        )  # [BLOCK_N, TILE_M] = dy-blockᵀ
        v = tl.load(v_ptrs, mask=v_mask, other=0.0)
        acc += tl.dot(dy_t, v, input_precision=INPUT_PRECISION)
        v_ptrs += BM * BK
    offs_k = c * BK + j
    out_mask = (offs_n[:, None] < N) & (j[None, :] < BK) & (offs_k[None, :] < K)
    tl.store(
        dw_ptr + offs_n[:, None] * stride_dwn + offs_k[None, :] * stride_dwk,
        acc.to(dw_ptr.dtype.element_ty),
        mask=out_mask,
    )


def weight_grad(dy: torch.Tensor, x: BlockSparse) -> torch.Tensor:
    """Triton version of ``reference.weight_grad``: dW [N, K] = dyᵀ·X̃ in dy.dtype."""
    if dy.dtype != x.dtype:
        raise ValueError(f"weight_grad: dy dtype {dy.dtype} differs from values dtype {x.dtype}")
    m, k = x.shape
    n = dy.shape[1]
    dw = torch.empty(n, k, device=dy.device, dtype=dy.dtype)
    block_n = min(64, _tile(n))
    # fp32 follows torch's matmul setting (exact by default); 16-bit operands ignore it.
    tf32 = dy.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    precision = "tf32" if tf32 else "ieee"
    grid = (triton.cdiv(n, block_n), x.grid_shape[1])
    _weight_grad_kernel[grid](
        dy,
        x.values,
        x.row_indices,
        x.ccol_indices,
        dw,
        m,
        n,
        k,
        dy.stride(0),
        dy.stride(1),
        dw.stride(0),
        dw.stride(1),
        **_block_args(x.block_shape),
        BLOCK_N=block_n,
        INPUT_PRECISION=precision,
    )
    return dw


# --- per-channel scale gradient Σ_m dy ⊙ X̃: reads dy only where blocks are kept ----------------


@triton.jit
def _channel_scale_grad_kernel(
    dy_ptr,
    vals_ptr,
    rows_ptr,
    ccol_ptr,
    out_ptr,
    M,
    K,
    stride_dym,
    stride_dyk,
    BM: tl.constexpr,
    BK: tl.constexpr,
    TILE_M: tl.constexpr,
    TILE_K: tl.constexpr,
):
    # One program owns the bk channels of block-column c and walks that column's kept blocks.
    c = tl.program_id(0)
    i = tl.arange(0, TILE_M)
    j = tl.arange(0, TILE_K)
    offs_k = c.to(tl.int64) * BK + j
    start = tl.load(ccol_ptr + c)
    end = tl.load(ccol_ptr + c + 1)
    acc = tl.zeros((TILE_K,), dtype=tl.float32)
    v_ptrs = vals_ptr + start.to(tl.int64) * (BM * BK) + i[:, None] * BK + j[None, :]
    v_mask = (i[:, None] < BM) & (j[None, :] < BK)
    for b in range(start, end):
        r = tl.load(rows_ptr + b).to(tl.int64)
        offs_m = r * BM + i
        dy_mask = v_mask & (offs_m[:, None] < M) & (offs_k[None, :] < K)
        dy = tl.load(
            dy_ptr + offs_m[:, None] * stride_dym + offs_k[None, :] * stride_dyk,
            mask=dy_mask,
            other=0.0,
        )
        v = tl.load(v_ptrs, mask=v_mask, other=0.0)
        acc += tl.sum(dy.to(tl.float32) * v.to(tl.float32), axis=0)
        v_ptrs += BM * BK
    tl.store(out_ptr + offs_k, acc.to(out_ptr.dtype.element_ty), mask=(j < BK) & (offs_k < K))


def channel_scale_grad(dy: torch.Tensor, x: BlockSparse) -> torch.Tensor:
    """Triton version of ``reference.channel_scale_grad``: [K] in dy.dtype."""
    if dy.dtype != x.dtype:
        raise ValueError(
            f"channel_scale_grad: dy dtype {dy.dtype} differs from values dtype {x.dtype}"
        )
    m, k = x.shape
    out = torch.empty(k, device=dy.device, dtype=dy.dtype)
    _channel_scale_grad_kernel[(x.grid_shape[1],)](
        dy,
        x.values,
        x.row_indices,
        x.ccol_indices,
        out,
        m,
        k,
        dy.stride(0),
        dy.stride(1),
        **_block_args(x.block_shape),
    )
    return out
