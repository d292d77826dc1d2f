"""Triton kernels: block scores with the remainder code, block selection and packing (apart, or
scored, selected and packed in one launch), decoding, and the weight gradient over kept blocks.

Each kernel sits beside its launcher; the PyTorch reference with the same contract is the function
of the same name in ``reference.py``. This module imports triton, so it is only imported by the
dispatcher (``actprune.kernels``) when a Triton launch is wanted. Plain pointer arithmetic only (no
block pointers), so the kernels also run under ``TRITON_INTERPRET=1`` on CPU tensors.

Activations and output gradients are read as row sources [B, T, C] (row t·B + b, ``reference``)
through their strides: no kernel needs a copy in token-major order. Blocks may have any shape: a
block's tile is padded to a power of two >= 16 (``tl.dot``'s minimum) and masked, so (8, 8) or
(24, 40) blocks work, with padded lanes doing no useful work.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from .. import rng
from ..storage import BlockSparse
from . import reference

_CRITERION_CODE = {"l2": 0, "l1": 1, "max": 2}

# Launch options of the kernels whose float32 arithmetic must be the reference's bit for bit (the
# remainder's codes and their decoding): no fused multiply-add, which rounds once where the
# reference rounds twice (found on an H200: docs/results/gpu-NVIDIA-H200/README.md).
EXACT = {"enable_fp_fusion": False}


def _tile(n: int) -> int:
    """Power-of-two tile side >= 16 that holds n."""
    return max(16, triton.next_power_of_2(n))


def _block_args(block_shape: tuple[int, int]) -> dict[str, int]:
    """The compile-time block arguments every kernel here takes."""
    bm, bk = block_shape
    return {"BM": bm, "BK": bk, "TILE_M": _tile(bm), "TILE_K": _tile(bk)}


@triton.jit
def _zero_offsets(ccol_ptr, pid_r, pid_c):
    """ccol[pid_c + 1] = 0 from the first block-row's programs, and ccol[0] from program (0, 0)."""
    if pid_r == 0:
        tl.store(ccol_ptr + pid_c + 1, 0)
        if pid_c == 0:
            tl.store(ccol_ptr, 0)


@triton.jit
def _row_offsets(offs_m, batch, stride_b, stride_t):
    """Memory offsets of rows offs_m of a row source: row t·batch + b is [b, t]."""
    t = offs_m // batch
    return (offs_m - t * batch) * stride_b + t * stride_t


# rng's hash constants (module-level constexprs: Triton reads globals only as constants).
GOLDEN: tl.constexpr = tl.constexpr(rng.GOLDEN)
MIX1: tl.constexpr = tl.constexpr(rng.MIX1)
MIX2: tl.constexpr = tl.constexpr(rng.MIX2)


@triton.jit
def _random_bytes(key, index):
    """``rng.random_bytes``: byte index % 4 of the hash of word index // 4, int64 arithmetic
    masked to 32 bits as in the reference."""
    h = (((index >> 2) * GOLDEN) & 0xFFFFFFFF) ^ key
    h = h ^ (h >> 16)
    h = (h * MIX1) & 0xFFFFFFFF
    h = h ^ (h >> 13)
    h = (h * MIX2) & 0xFFFFFFFF
    h = h ^ (h >> 16)
    return (h >> ((index & 3) * 8)) & 255


# --- block scores and the remainder code: read M·K, write n_blocks floats (+ M·K·bits/8 B) ---


@triton.jit
def _score_block(
    x_ptr, scores_ptr, low_scales_ptr, codes_ptr, key, batch, M, K, stride_b, stride_t, stride_k,
    n_bc, pid_r, pid_c, BM: tl.constexpr, BK: tl.constexpr, TILE_M: tl.constexpr,
    TILE_K: tl.constexpr, CRITERION: tl.constexpr, BITS: tl.constexpr,
):  # fmt: skip
    """Block (pid_r, pid_c): its score and, with BITS > 0, its scale and remainder codes."""
    i = tl.arange(0, TILE_M)
    j = tl.arange(0, TILE_K)
    offs_m = pid_r.to(tl.int64) * BM + i
    offs_k = pid_c.to(tl.int64) * BK + j
    in_block = (i[:, None] < BM) & (j[None, :] < BK)
    mask = in_block & (offs_m[:, None] < M) & (offs_k[None, :] < K)
    rows = _row_offsets(offs_m, batch, stride_b, stride_t)
    x = tl.load(x_ptr + rows[:, None] + offs_k[None, :] * stride_k, mask=mask, other=0.0)
    x = x.to(tl.float32)
    a = tl.abs(x)
    if CRITERION == 0:
        score = tl.sqrt(tl.sum(tl.sum(a * a, axis=1), axis=0))
    elif CRITERION == 1:
        score = tl.sum(tl.sum(a, axis=1), axis=0)
    else:
        score = tl.max(tl.max(a, axis=1), axis=0)
    # NaN / Inf anywhere in the block: score +inf, so the block is kept (never silently dropped).
    bad = tl.sum(tl.sum(((x != x) | (a == float("inf"))).to(tl.int32), axis=1), axis=0) > 0
    tl.store(scores_ptr + pid_r * n_bc + pid_c, tl.where(bad, float("inf"), score))
    if BITS > 0:
        PER: tl.constexpr = 8 // BITS
        LEVELS: tl.constexpr = (1 << BITS) - 1
        scale = tl.max(tl.max(a, axis=1), axis=0)
        tl.store(low_scales_ptr + pid_r * n_bc + pid_c, tl.where(bad, float("nan"), scale))
        c = tl.div_rn(tl.zeros_like(scale) + 128.0 * LEVELS, tl.maximum(scale, 1e-30))
        # >= 0, so truncation is floor; a non-finite block codes zeros (its scale is NaN).
        fixed = tl.where(bad, 0.0, x * c + (128.0 * LEVELS + 0.5)).to(tl.int32)
        k_padded = n_bc * BK
        index = offs_m[:, None] * k_padded + offs_k[None, :]
        code = tl.minimum((fixed + _random_bytes(key, index).to(tl.int32)) >> 8, LEVELS)
        shifts = tl.arange(0, PER) * BITS
        grouped = tl.reshape(code, (TILE_M, TILE_K // PER, PER)) << shifts[None, None, :]
        packed = tl.sum(grouped, axis=2).to(tl.uint8)  # disjoint bits: the sum is the OR
        jb = tl.arange(0, TILE_K // PER)
        first = (offs_m[:, None] * k_padded + pid_c.to(tl.int64) * BK) // PER
        tl.store(codes_ptr + first + jb[None, :], packed,
                 mask=(i[:, None] < BM) & (jb[None, :] < BK // PER))  # fmt: skip


@triton.jit
def _score_blocks_kernel(
    x_ptr, scores_ptr, low_scales_ptr, codes_ptr, ccol_ptr, key, batch, M, K,
    stride_b, stride_t, stride_k, n_bc,
    BM: tl.constexpr, BK: tl.constexpr, TILE_M: tl.constexpr, TILE_K: tl.constexpr,
    CRITERION: tl.constexpr, BITS: tl.constexpr, ZERO_CCOL: tl.constexpr,
):  # fmt: skip
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    if ZERO_CCOL:  # an empty selection's offsets, in the same launch (no fill of its own)
        _zero_offsets(ccol_ptr, pid_r, pid_c)
    _score_block(x_ptr, scores_ptr, low_scales_ptr, codes_ptr, key, batch, M, K, stride_b,
                 stride_t, stride_k, n_bc, pid_r, pid_c, BM, BK, TILE_M, TILE_K, CRITERION,
                 BITS)  # fmt: skip


def _bytes_within_blocks(bk: int, bits: int) -> bool:
    """Whether every byte of the remainder's codes lies in one block (one program writes it):
    else ``score_blocks`` runs the reference."""
    return not bits or (bk * bits) % 8 == 0


def score_blocks(
    x3: torch.Tensor,
    block_shape: tuple[int, int],
    criterion: str,
    bits: int,
    key: int,
    ccol: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton version of ``reference.score_blocks``: one read of x3 for scores and codes, and
    ``ccol`` zeroed by the same launch."""
    (bm, bk), (batch, t, k) = block_shape, x3.shape
    if not _bytes_within_blocks(bk, bits):
        return reference.score_blocks(x3, block_shape, criterion, bits, key, ccol)
    m = batch * t
    n_br, n_bc = triton.cdiv(m, bm), triton.cdiv(k, bk)
    scores = torch.empty(n_br, n_bc, device=x3.device, dtype=torch.float32)
    low_scales = torch.empty((n_br, n_bc) if bits else (0,), device=x3.device, dtype=torch.float32)
    codes = torch.empty(n_br * bm * n_bc * bk * bits // 8, device=x3.device, dtype=torch.uint8)
    _score_blocks_kernel[(n_br, n_bc)](
        x3, scores, low_scales, codes, scores if ccol is None else ccol, key, batch, m, k,
        *x3.stride(), n_bc, **_block_args(block_shape), CRITERION=_CRITERION_CODE[criterion],
        BITS=bits, ZERO_CCOL=ccol is not None, **EXACT,
    )  # fmt: skip
    return scores, codes, low_scales


# --- select blocks without a sort: the k-th largest score by bisection on its bits -------------
# Scores are >= 0 (+inf for non-finite blocks, no NaN), so their float32 bits order like the values:
# the k-th largest is the largest t with count(bits >= t) >= k, 31 halvings of [0, bits(+inf)].
_INF_BITS: tl.constexpr = tl.constexpr(0x7F800000)


@triton.jit
def _kth_largest_bits(bits, k):
    """The bits of the k-th largest of a tile of score bits (-1 marks lanes outside)."""
    lo = tl.zeros((), dtype=tl.int32)
    hi = tl.zeros((), dtype=tl.int32) + _INF_BITS + 1
    for _ in range(31):
        mid = lo + (hi - lo) // 2
        enough = tl.sum((bits >= mid).to(tl.int32), axis=0) >= k
        lo, hi = tl.where(enough, mid, lo), tl.where(enough, hi, mid)
    return lo


@triton.jit
def _select_column(scores_ptr, rows_ptr, cols_ptr, ccol_ptr, j, n_br, n_bc, k,
                   TILE: tl.constexpr):  # fmt: skip
    """Keeps the k best blocks of block-column j (ties to the lowest block-row), in block-row
    order, and writes ccol[j + 1] = (j + 1)·k. Reads n_br scores, writes 2k + 1 ints. The
    scores are read past the SM's L1 (``.cg``): other programs of the fused kernel wrote them."""
    i = tl.arange(0, TILE)
    score = tl.load(scores_ptr + i * n_bc + j, mask=i < n_br, other=0.0, cache_modifier=".cg")
    bits = tl.where(i < n_br, score.to(tl.int32, bitcast=True), -1)
    kth = _kth_largest_bits(bits, k)
    above, tie = bits > kth, bits == kth
    room = k - tl.sum(above.to(tl.int32), axis=0)
    keep = above | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= room))
    slot = j * k + tl.cumsum(keep.to(tl.int32), axis=0) - 1
    tl.store(rows_ptr + slot, i, mask=keep)
    tl.store(cols_ptr + slot, tl.zeros_like(i) + j, mask=keep)
    tl.store(ccol_ptr + j + 1, (j + 1) * k)
    if j == 0:
        tl.store(ccol_ptr, 0)


@triton.jit
def _select_column_kernel(scores_ptr, rows_ptr, cols_ptr, ccol_ptr, n_br, n_bc, k,
                          TILE: tl.constexpr):  # fmt: skip
    """Program j selects block-column j (``_select_column``)."""
    _select_column(scores_ptr, rows_ptr, cols_ptr, ccol_ptr, tl.program_id(0), n_br, n_bc, k,
                   TILE)  # fmt: skip


@triton.jit
def _kth_largest_bits_in_memory(scores_ptr, n, k, BLOCK: tl.constexpr):
    """The bits of the k-th largest of n scores in memory, by radix selection: four passes over
    the scores, each a histogram of one byte of the bits (high byte first) among the scores
    whose higher bytes are the answer's so far. (Bisection, as ``_kth_largest_bits`` does on a
    tile in registers, would read them 31 times.)"""
    bins = tl.arange(0, 256)
    prefix = tl.zeros((), dtype=tl.int32)
    need = tl.zeros((), dtype=tl.int32) + k  # how many of the candidates still rank above
    for byte in tl.static_range(3, -1, -1):
        shift = 8 * byte
        hist = tl.zeros((256,), dtype=tl.int32)
        for start in range(0, n, BLOCK):
            e = start + tl.arange(0, BLOCK)
            score = tl.load(scores_ptr + e, mask=e < n, other=0.0, cache_modifier=".cg")
            bits = score.to(tl.int32, bitcast=True)
            higher = (bits >> shift) >> 8 == prefix >> shift >> 8  # the bytes above agree
            hist += tl.histogram((bits >> shift) & 255, 256, mask=(e < n) & higher)
        at_or_above = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist  # per bin, from top
        chosen = tl.max(tl.where(at_or_above >= need, bins, -1), axis=0)
        need -= tl.sum(tl.where(bins > chosen, hist, 0), axis=0)
        prefix |= chosen << shift
    return prefix


@triton.jit
def _select_global(scores_ptr, keep_ptr, rows_ptr, cols_ptr, ccol_ptr, n_br, n_bc, k,
                   BLOCK: tl.constexpr):  # fmt: skip
    """Keeps the k best blocks of the grid (ties to the lowest row-major id): the threshold by
    radix selection over chunks, the keep flags in row-major order (the ties' ranks need it),
    then the kept blocks column by column, which is BSC order, with the offsets. One program's
    work."""
    n = n_br * n_bc
    lo = _kth_largest_bits_in_memory(scores_ptr, n, k, BLOCK)
    room = k
    for start in range(0, n, BLOCK):
        e = start + tl.arange(0, BLOCK)
        score = tl.load(scores_ptr + e, mask=e < n, other=-1.0, cache_modifier=".cg")
        room -= tl.sum((score.to(tl.int32, bitcast=True) > lo).to(tl.int32), axis=0)
    taken = tl.zeros((), dtype=tl.int32)
    for start in range(0, n, BLOCK):
        e = start + tl.arange(0, BLOCK)
        bits = tl.load(scores_ptr + e, mask=e < n, other=-1.0,
                       cache_modifier=".cg").to(tl.int32, bitcast=True)  # fmt: skip
        tie = bits == lo
        keep = (bits > lo) | (tie & (taken + tl.cumsum(tie.to(tl.int32), axis=0) <= room))
        taken += tl.sum(tie.to(tl.int32), axis=0)
        tl.store(keep_ptr + e, keep.to(tl.int8), mask=e < n)
    tl.debug_barrier()  # the flags are read back below by other threads of the program
    tl.store(ccol_ptr, 0)
    total = tl.zeros((), dtype=tl.int32)
    for j in range(0, n_bc):
        for r0 in range(0, n_br, BLOCK):
            r = r0 + tl.arange(0, BLOCK)
            keep = tl.load(keep_ptr + r * n_bc + j, mask=r < n_br, other=0) != 0
            slot = total + tl.cumsum(keep.to(tl.int32), axis=0) - 1
            tl.store(rows_ptr + slot, r, mask=keep)
            tl.store(cols_ptr + slot, tl.zeros_like(r) + j, mask=keep)
            total += tl.sum(keep.to(tl.int32), axis=0)
        tl.store(ccol_ptr + j + 1, total)


@triton.jit
def _select_global_kernel(scores_ptr, keep_ptr, rows_ptr, cols_ptr, ccol_ptr, n_br, n_bc, k,
                          BLOCK: tl.constexpr):  # fmt: skip
    """One program selects over the grid (``_select_global``)."""
    _select_global(scores_ptr, keep_ptr, rows_ptr, cols_ptr, ccol_ptr, n_br, n_bc, k, BLOCK)


def select_blocks(
    scores: torch.Tensor, k: int, *, per_column: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton version of ``reference.select_blocks`` (k >= 1): one launch, no sort, fixed-size
    outputs."""
    n_br, n_bc = scores.shape
    scores = scores.contiguous()
    rows, cols, ccol = _selection(scores, k, per_column)
    if per_column:
        _select_column_kernel[(n_bc,)](scores, rows, cols, ccol, n_br, n_bc, k,
                                       TILE=_tile(n_br))  # fmt: skip
    else:
        keep = torch.empty(n_br * n_bc, dtype=torch.int8, device=scores.device)
        _select_global_kernel[(1,)](scores, keep, rows, cols, ccol, n_br, n_bc, k, BLOCK=1024)
    return rows, cols, ccol


def _selection(
    scores: torch.Tensor, k: int, per_column: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty (rows, cols, ccol) for a selection of k blocks (of each block-column)."""
    nnz = k * scores.shape[1] if per_column else k
    rows = torch.empty(nnz, dtype=torch.int32, device=scores.device)
    return rows, torch.empty_like(rows), rows.new_empty(scores.shape[1] + 1)


# --- pack kept blocks: read and write nnz·bm·bk elements -----------------------------------------


@triton.jit
def _pack_slots(
    x_ptr, rows_ptr, cols_ptr, out_ptr, first, stop, batch, M, K, stride_b, stride_t, stride_k,
    BM: tl.constexpr, BK: tl.constexpr, TILE_M: tl.constexpr, TILE_K: tl.constexpr,
    NB: tl.constexpr,
):  # fmt: skip
    """out[s] = block (rows[s], cols[s]) of the row source, zero-padded at its edges, for the
    slots s in [first, stop), NB blocks ([NB, TILE_M, TILE_K] tiles) at a time."""
    i = tl.arange(0, TILE_M)[None, :, None]
    j = tl.arange(0, TILE_K)[None, None, :]
    in_block = (i < BM) & (j < BK)
    for s0 in range(first, stop, NB):
        slot = s0 + tl.arange(0, NB)
        live = slot < stop
        r = tl.load(rows_ptr + slot, mask=live, other=0).to(tl.int64)[:, None, None]
        c = tl.load(cols_ptr + slot, mask=live, other=0).to(tl.int64)[:, None, None]
        offs_m, offs_k = r * BM + i, c * BK + j
        in_x = in_block & (offs_m < M) & (offs_k < K) & live[:, None, None]
        rows = _row_offsets(offs_m, batch, stride_b, stride_t)
        x = tl.load(x_ptr + rows + offs_k * stride_k, mask=in_x, other=0.0)
        dest = slot.to(tl.int64)[:, None, None] * (BM * BK) + i * BK + j
        tl.store(out_ptr + dest, x, mask=in_block & live[:, None, None])


@triton.jit
def _pack_blocks_kernel(
    x_ptr, rows_ptr, cols_ptr, out_ptr, batch, M, K, stride_b, stride_t, stride_k,
    BM: tl.constexpr, BK: tl.constexpr, TILE_M: tl.constexpr, TILE_K: tl.constexpr,
):  # fmt: skip
    """Program b packs slot b."""
    b = tl.program_id(0)
    _pack_slots(x_ptr, rows_ptr, cols_ptr, out_ptr, b, b + 1, batch, M, K, stride_b, stride_t,
                stride_k, BM, BK, TILE_M, TILE_K, 1)  # fmt: skip


def pack_blocks(
    x3: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, block_shape: tuple[int, int]
) -> torch.Tensor:
    """Triton version of ``reference.pack_blocks``: values [nnz, bm, bk] in x3.dtype, nnz ≥ 1
    (``kernels.pack_blocks`` launches nothing for none)."""
    nnz, (batch, t, k) = rows.numel(), x3.shape
    out = torch.empty(nnz, *block_shape, device=x3.device, dtype=x3.dtype)
    _pack_blocks_kernel[(nnz,)](
        x3, rows, cols, out, batch, batch * t, k, *x3.stride(), **_block_args(block_shape)
    )
    return out


# --- score, select and pack in one launch: scorers, then selectors, then packers ----------------
# The launch's sync words (int32, zero between launches): tickets drawn, selections done,
# programs finished, then one arrival counter per block-column (per-column selection) or one for
# the grid.
_TICKETS: tl.constexpr = tl.constexpr(0)
_SELECTED: tl.constexpr = tl.constexpr(1)
_FINISHED: tl.constexpr = tl.constexpr(2)
_ARRIVALS: tl.constexpr = tl.constexpr(3)


@triton.jit
def _compress_blocks_kernel(
    x_ptr, scores_ptr, low_scales_ptr, codes_ptr, sync_ptr, keep_ptr, rows_ptr, cols_ptr,
    ccol_ptr, values_ptr, key, batch, M, K, stride_b, stride_t, stride_k, n_br, n_bc, k,
    per_packer, packers,
    BM: tl.constexpr, BK: tl.constexpr, TILE_M: tl.constexpr, TILE_K: tl.constexpr,
    CRITERION: tl.constexpr, BITS: tl.constexpr, PER_COLUMN: tl.constexpr, TILE_R: tl.constexpr,
    NB: tl.constexpr,
):  # fmt: skip
    """n_br·n_bc scorers, then ``packers`` packers, by the ticket each program draws first (not
    its program id: a ticket is drawn by a program already running, so every scorer is running
    or done before any packer draws one, and a waiting packer never holds up a scorer). A scorer
    scores (and codes) its block, then arrives at its block-column's counter (PER_COLUMN) or the
    grid's; the last to arrive has every score it needs and selects. A packer waits until every
    selection is done, then packs its ``per_packer`` slots. The last program to finish zeroes
    the sync words for the next launch. Ordering: a barrier before each release (the program's
    stores, by all its threads, before the atomic), acquire atomics at GPU scope, and the
    selector reads the scores past the SM's L1 (``.cg``)."""
    n = n_br * n_bc
    ticket = tl.atomic_add(sync_ptr + _TICKETS, 1, sem="relaxed", scope="gpu")
    if ticket < n:
        pid_r, pid_c = ticket // n_bc, ticket % n_bc
        _score_block(x_ptr, scores_ptr, low_scales_ptr, codes_ptr, key, batch, M, K, stride_b,
                     stride_t, stride_k, n_bc, pid_r, pid_c, BM, BK, TILE_M, TILE_K, CRITERION,
                     BITS)  # fmt: skip
        tl.debug_barrier()
        if PER_COLUMN:
            counter, expected = sync_ptr + _ARRIVALS + pid_c, n_br
        else:
            counter, expected = sync_ptr + _ARRIVALS, n
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == expected - 1:
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")
            tl.debug_barrier()
            if PER_COLUMN:
                _select_column(scores_ptr, rows_ptr, cols_ptr, ccol_ptr, pid_c, n_br, n_bc, k,
                               TILE_R)  # fmt: skip
            else:
                _select_global(scores_ptr, keep_ptr, rows_ptr, cols_ptr, ccol_ptr, n_br, n_bc,
                               k, 1024)  # fmt: skip
            tl.debug_barrier()
            tl.atomic_add(sync_ptr + _SELECTED, 1, sem="release", scope="gpu")
    else:
        selections = n_bc if PER_COLUMN else 1
        done = tl.atomic_add(sync_ptr + _SELECTED, 0, sem="acquire", scope="gpu")
        while done < selections:
            done = tl.atomic_add(sync_ptr + _SELECTED, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()
        first = (ticket - n) * per_packer
        _pack_slots(x_ptr, rows_ptr, cols_ptr, values_ptr, first,
                    tl.minimum(first + per_packer, k * selections), batch, M, K, stride_b,
                    stride_t, stride_k, BM, BK, TILE_M, TILE_K, NB)  # fmt: skip
    tl.debug_barrier()
    if tl.atomic_add(sync_ptr + _FINISHED, 1, sem="acq_rel", scope="gpu") == n + packers - 1:
        tl.atomic_xchg(sync_ptr + _TICKETS, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(sync_ptr + _SELECTED, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(sync_ptr + _FINISHED, 0, sem="relaxed", scope="gpu")


# Blocks a packer moves per step of its loop (NB tiles in flight at once), and per program.
PACK_BLOCKS = 8
PACKER_SLOTS = 64
_sync: dict[tuple, torch.Tensor] = {}


def _sync_words(device: torch.device, n: int) -> torch.Tensor:
    """int32 sync words of ``_compress_blocks_kernel``, at least n, zero between launches (each
    launch zeroes what it used): one buffer per device and CUDA stream, made once (a fill per
    call would be a launch), so launches on two streams never share one."""
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    found = _sync.get((device, stream))
    if found is None or found.numel() < n:
        found = _sync[(device, stream)] = torch.zeros(max(n, 64), dtype=torch.int32,
                                                      device=device)  # fmt: skip
    return found


def compress_blocks(
    x3: torch.Tensor,
    block_shape: tuple[int, int],
    criterion: str,
    bits: int,
    key: int,
    k: int,
    per_column: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, rows, ccol, codes, low_scales): ``score_blocks``, ``select_blocks`` (k ≥ 1) and
    ``pack_blocks`` of x3 in one launch, the same bytes as the three (the reference's), where
    ``fused_compression`` offers it."""
    (bm, bk), (batch, t, width) = block_shape, x3.shape
    m = batch * t
    n_br, n_bc = triton.cdiv(m, bm), triton.cdiv(width, bk)
    scores = torch.empty(n_br, n_bc, device=x3.device, dtype=torch.float32)
    low_scales = torch.empty((n_br, n_bc) if bits else (0,), device=x3.device, dtype=torch.float32)
    codes = torch.empty(n_br * bm * n_bc * bk * bits // 8, device=x3.device, dtype=torch.uint8)
    rows, cols, ccol = _selection(scores, k, per_column)
    keep = torch.empty(0 if per_column else n_br * n_bc, dtype=torch.int8, device=x3.device)
    values = torch.empty(rows.numel(), *block_shape, device=x3.device, dtype=x3.dtype)
    packers = triton.cdiv(rows.numel(), PACKER_SLOTS)
    sync = _sync_words(x3.device, 3 + (n_bc if per_column else 1))
    _compress_blocks_kernel[(n_br * n_bc + packers,)](
        x3, scores, low_scales, codes, sync, keep, rows, cols, ccol, values, key, batch, m, width,
        *x3.stride(), n_br, n_bc, k, PACKER_SLOTS, packers, **_block_args(block_shape),
        CRITERION=_CRITERION_CODE[criterion], BITS=bits, PER_COLUMN=per_column,
        TILE_R=_tile(n_br) if per_column else 16, NB=PACK_BLOCKS, **EXACT,
    )  # fmt: skip
    return values, rows, ccol, codes, low_scales


def fused_compression(block_shape: tuple[int, int], bits: int) -> Callable | None:
    """``compress_blocks`` for selections of ``block_shape`` blocks with a ``bits`` remainder,
    or None where its codes' bytes would span blocks (``blocksparse.Codec`` then scores,
    selects and packs apart, the scores by the reference)."""
    return compress_blocks if _bytes_within_blocks(block_shape[1], bits) else None


@triton.jit
def _x_tile(v_ptrs, v_mask, kept, codes_ptr, low_scales_ptr, r, c, offs_m, offs_k, n_bc,
            BK: tl.constexpr, BITS: tl.constexpr):  # fmt: skip
    """Block (r, c) of X̃ in float32: the kept block at v_ptrs where ``kept``, else the remainder
    decoded (``LowBitBlocks.decode``). Lanes outside the block (v_mask false) are zero."""
    PER: tl.constexpr = 8 // BITS
    LEVELS: tl.constexpr = (1 << BITS) - 1
    index = offs_m[:, None] * (n_bc * BK) + offs_k[None, :]
    byte = tl.load(codes_ptr + index // PER, mask=v_mask, other=0).to(tl.int32)
    code = (byte >> ((index % PER) * BITS).to(tl.int32)) & LEVELS
    scale = tl.load(low_scales_ptr + r * n_bc + c)
    low = (code.to(tl.float32) * (2.0 / LEVELS) - 1.0) * scale
    v = tl.load(v_ptrs, mask=v_mask & kept, other=0.0).to(tl.float32)
    return tl.where(v_mask, tl.where(kept, v, low), 0.0)


# --- decode block-rows of X̃ to a dense tile: read the codes (and kept blocks), write the tile ---


@triton.jit
def _decode_rows_kernel(
    vals_ptr, rows_ptr, ccol_ptr, codes_ptr, low_scales_ptr, out_ptr, start, steps, batch, M,
    n_bc, t0, tokens, BM: tl.constexpr, BK: tl.constexpr, TILE_M: tl.constexpr,
    TILE_K: tl.constexpr, BITS: tl.constexpr,
):  # fmt: skip
    # One program per block (r, c) of the tile. Whether it is kept is a binary search of
    # block-column c's sorted block-rows (``steps`` halvings), so no dense map of kept blocks is
    # built; each row goes to its batch-major place (``reference.decode_rows``).
    r = start + tl.program_id(0)
    c = tl.program_id(1)
    lo = tl.load(ccol_ptr + c)
    end = tl.load(ccol_ptr + c + 1)
    hi = end
    for _ in range(steps):  # lo = the first kept block of column c at block-row >= r
        active = lo < hi
        mid = (lo + hi) // 2
        less = tl.load(rows_ptr + mid, mask=active, other=0) < r
        lo = tl.where(active & less, mid + 1, lo)
        hi = tl.where(active & ~less, mid, hi)
    kept = (lo < end) & (tl.load(rows_ptr + lo, mask=lo < end, other=-1) == r)
    i = tl.arange(0, TILE_M)
    j = tl.arange(0, TILE_K)
    offs_m = r.to(tl.int64) * BM + i
    offs_k = c.to(tl.int64) * BK + j
    v_mask = (i[:, None] < BM) & (j[None, :] < BK)
    v_ptrs = vals_ptr + lo.to(tl.int64) * (BM * BK) + i[:, None] * BK + j[None, :]
    if BITS == 0:
        v = tl.load(v_ptrs, mask=v_mask & kept, other=0.0)
    else:
        v = _x_tile(v_ptrs, v_mask, kept, codes_ptr, low_scales_ptr, r, c, offs_m, offs_k, n_bc,
                    BK, BITS)  # fmt: skip
    t = offs_m // batch
    out_rows = (offs_m - t * batch) * tokens + t - t0
    tl.store(out_ptr + out_rows[:, None] * (n_bc * BK) + offs_k[None, :],
             v.to(out_ptr.dtype.element_ty), mask=v_mask & (offs_m[:, None] < M))  # fmt: skip


def _low_parts(x: BlockSparse) -> tuple[torch.Tensor, torch.Tensor, int]:
    if x.remainder is None:
        empty = x.values.new_empty(0)
        return empty.to(torch.uint8), empty.float(), 0
    return x.remainder.codes, x.remainder.scales, x.remainder.bits


def decode_rows(x: BlockSparse, start: int, stop: int, batch: int) -> torch.Tensor:
    """Triton version of ``reference.decode_rows``: block-rows [start, stop) of X̃ as a dense
    batch-major tile in x.dtype, bit for bit the reference's."""
    (m, _), (bm, bk), (n_br, n_bc) = x.shape, x.block_shape, x.grid_shape
    count = min(m, stop * bm) - start * bm
    out = x.values.new_empty(count, n_bc * bk)
    codes, low_scales, bits = _low_parts(x)
    _decode_rows_kernel[(stop - start, n_bc)](
        x.values, x.row_indices, x.ccol_indices, codes, low_scales, out, start,
        max(1, n_br.bit_length()), batch, m, n_bc, start * bm // batch, count // batch,
        **_block_args(x.block_shape), BITS=bits,
        **EXACT,
    )  # fmt: skip
    return out


# --- weight gradient dW = dyᵀ·X̃ over the kept blocks alone: reads dy once per block and N-tile ---


@triton.jit
def _weight_grad_kernel(
    dy_ptr, vals_ptr, rows_ptr, ccol_ptr, dw_ptr, batch, M, N, K, stride_dyb, stride_dyt,
    stride_dyn, stride_dwn, stride_dwk, BM: tl.constexpr, BK: tl.constexpr, TILE_M: tl.constexpr,
    TILE_K: tl.constexpr, BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    # One program owns dW[n-tile, block-column c] and walks that column's kept blocks (BSC
    # order): FLOPs ∝ density.
    pid_n = tl.program_id(0)
    c = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    i = tl.arange(0, TILE_M)
    j = tl.arange(0, TILE_K)
    offs_k = c.to(tl.int64) * BK + j
    start = tl.load(ccol_ptr + c)
    end = tl.load(ccol_ptr + c + 1)
    acc = tl.zeros((BLOCK_N, TILE_K), dtype=tl.float32)
    v_mask = (i[:, None] < BM) & (j[None, :] < BK)
    for b in range(start, end):
        offs_m = tl.load(rows_ptr + b).to(tl.int64) * BM + i
        rows = _row_offsets(offs_m, batch, stride_dyb, stride_dyt)
        dy_mask = (i[:, None] < BM) & (offs_m[:, None] < M) & (offs_n[None, :] < N)
        dy = tl.load(dy_ptr + rows[:, None] + offs_n[None, :] * stride_dyn, mask=dy_mask,
                     other=0.0)  # fmt: skip
        v_ptrs = vals_ptr + tl.cast(b, tl.int64) * (BM * BK) + i[:, None] * BK + j[None, :]
        v = tl.load(v_ptrs, mask=v_mask, other=0.0)
        acc += tl.dot(tl.trans(dy), v, input_precision=INPUT_PRECISION)
    out_mask = (offs_n[:, None] < N) & (j[None, :] < BK) & (offs_k[None, :] < K)
    tl.store(
        dw_ptr + offs_n[:, None] * stride_dwn + offs_k[None, :] * stride_dwk,
        acc.to(dw_ptr.dtype.element_ty),
        mask=out_mask,
    )


def use_block_kernel(x: BlockSparse, dtype: torch.dtype) -> bool:
    """Kept blocks alone (``_weight_grad_kernel``) or decoded tiles through cuBLAS: on an H200 at
    ResMLP-S24 shapes the block kernel ran at about 4 % of cuBLAS's rate in 16-bit and 20 % in
    float32 (docs/design.md, "Backward"), so it pays only below those densities, and never with a
    remainder (X̃ is dense then)."""
    return x.remainder is None and x.density <= (0.2 if dtype == torch.float32 else 0.04)


def weight_grad(dy3: torch.Tensor, x: BlockSparse) -> torch.Tensor:
    """Triton version of ``reference.weight_grad``: dW [N, K] = dyᵀ·X̃ in dy3.dtype."""
    if dy3.dtype != x.dtype:
        raise ValueError(f"weight_grad: dy dtype {dy3.dtype} differs from values dtype {x.dtype}")
    if not use_block_kernel(x, dy3.dtype):
        return reference.weight_grad_tiled(dy3, x, decode_rows)
    m, k = x.shape
    n = dy3.shape[-1]
    dw = torch.empty(n, k, device=dy3.device, dtype=dy3.dtype)
    block_n = min(64, _tile(n))
    # fp32 follows torch's matmul setting (exact by default); 16-bit operands ignore it.
    tf32 = dy3.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    _weight_grad_kernel[(triton.cdiv(n, block_n), x.grid_shape[1])](
        dy3, x.values, x.row_indices, x.ccol_indices, dw, dy3.shape[0], m, n, k, *dy3.stride(),
        dw.stride(0), dw.stride(1), **_block_args(x.block_shape), BLOCK_N=block_n,
        INPUT_PRECISION="tf32" if tf32 else "ieee",
    )  # fmt: skip
    return dw


def channel_scale_grad(dy3: torch.Tensor, x: BlockSparse) -> torch.Tensor:
    """Triton version of ``reference.channel_scale_grad``: [K] in dy3.dtype, X̃ decoded tile by
    tile (``decode_rows``) and reduced by PyTorch ops."""
    if dy3.dtype != x.dtype:
        raise ValueError(
            f"channel_scale_grad: dy dtype {dy3.dtype} differs from values dtype {x.dtype}"
        )
    return reference.channel_scale_grad(dy3, x, decode_rows)


# --- activation derivative codes (``derivative_code``): one launch each way ----------------------


@functools.lru_cache(maxsize=64)
def _code_table(values: tuple[float, ...], device: torch.device, dtype: torch.dtype
                ) -> torch.Tensor:  # fmt: skip
    """A code's boundaries or values on the device, made once (no copy from the host per call:
    on CUDA that would synchronise)."""
    return torch.tensor(values, dtype=dtype, device=device)


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _activation_codes_kernel(
    x_ptr, bounds_ptr, codes_ptr, nonfinite_ptr, rows, k,
    N_BOUNDS: tl.constexpr, BITS: tl.constexpr, BYTES: tl.constexpr,
):  # fmt: skip
    """Program p codes rows [8p, 8p + 8) of x [rows, k]: whole bytes of the packed codes (8 rows
    hold 8·k·BITS bits) and exactly one byte of the non-finite row flags, so no two programs
    write one byte. Reads 8·k elements, writes k·BITS + 1 bytes."""
    PER: tl.constexpr = 8 // BITS
    p = tl.program_id(0)
    first = p * 8 * k
    end = tl.minimum(rows * k, first + 8 * k)
    flags = tl.zeros((), dtype=tl.int32)
    lanes = tl.arange(0, PER)
    for b0 in range(first // PER, (first + 8 * k) // PER, BYTES):
        byte = b0 + tl.arange(0, BYTES)  # [BYTES]
        e = byte[:, None] * PER + lanes[None, :]  # [BYTES, PER] element indices
        inside = e < end
        x = tl.load(x_ptr + e, mask=inside, other=0.0).to(tl.float32)
        code = tl.zeros((BYTES, PER), dtype=tl.int32)
        for i in tl.static_range(N_BOUNDS):  # pieces below x: the number of boundaries under it
            code += (x > tl.load(bounds_ptr + i)).to(tl.int32)
        code = tl.where(inside, code, 0)  # past the last element: zero codes, as pack_codes pads
        packed = tl.sum(code << (lanes[None, :] * BITS), axis=1)  # disjoint bits: sum is OR
        tl.store(codes_ptr + byte, packed.to(tl.uint8), mask=byte * PER < end)
        bad = inside & ((x != x) | (tl.abs(x) == float("inf")))
        row_bit = tl.where(bad, 1 << (e // k - p * 8), 0)
        flags |= tl.reduce(tl.reduce(row_bit, 1, _bit_or), 0, _bit_or)
    tl.store(nonfinite_ptr + p, flags.to(tl.uint8))


def activation_codes(x: torch.Tensor, code) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of ``reference.activation_codes``: one launch."""
    k = x.shape[-1] if x.dim() else 1
    rows = x.numel() // k if k else 0
    x2 = x.reshape(rows, k).contiguous()
    codes = torch.empty(code.packed_numel(x.numel()), dtype=torch.uint8, device=x.device)
    nonfinite = torch.empty(-(-rows // 8), dtype=torch.uint8, device=x.device)
    if rows and k:
        bounds = _code_table(code.boundaries, x.device, torch.float32)
        _activation_codes_kernel[(nonfinite.numel(),)](
            x2, bounds, codes, nonfinite, rows, k, N_BOUNDS=len(code.boundaries),
            BITS=code.bits, BYTES=min(1024, _tile(k * code.bits)),
        )  # fmt: skip
    else:
        nonfinite.zero_()
    return codes, nonfinite


@triton.jit
def _activation_grad_kernel(
    dy_ptr, codes_ptr, nonfinite_ptr, table_ptr, dx_ptr, numel, k,
    BITS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """dx = dy ⊙ table[code], NaN in the rows flagged non-finite: reads dy and the codes, writes
    dx (one element per lane)."""
    PER: tl.constexpr = 8 // BITS
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = e < numel
    byte = tl.load(codes_ptr + e // PER, mask=inside, other=0).to(tl.int32)
    code = (byte >> ((e % PER) * BITS)) & ((1 << BITS) - 1)
    dy = tl.load(dy_ptr + e, mask=inside, other=0.0)
    dx = dy * tl.load(table_ptr + code, mask=inside, other=0.0)
    row = e // k
    flag = (tl.load(nonfinite_ptr + row // 8, mask=inside, other=0).to(tl.int32) >> (row % 8)) & 1
    tl.store(dx_ptr + e, tl.where(flag != 0, float("nan"), dx), mask=inside)


def activation_grad(
    dy: torch.Tensor, codes: torch.Tensor, nonfinite: torch.Tensor, code
) -> torch.Tensor:
    """Triton version of ``reference.activation_grad``: one launch."""
    k = dy.shape[-1] if dy.dim() else 1
    flat = dy.contiguous().view(-1)
    dx = torch.empty_like(flat)
    if flat.numel():
        table = _code_table(code.values, dy.device, dy.dtype)
        block = 1024
        _activation_grad_kernel[(triton.cdiv(flat.numel(), block),)](
            flat, codes, nonfinite, table, dx, flat.numel(), k, BITS=code.bits, BLOCK=block,
        )  # fmt: skip
    return dx.view(dy.shape)


# --- per-row codes of the input-gradient path (``rowcode``): one launch each way ----------------
# round-half-even of |v| < 2^22 in float32: (v + 1.5·2^23) − 1.5·2^23 (each add rounds to nearest
# even; no fused or reassociated arithmetic: the launches pass EXACT).
_RINT_MAGIC: tl.constexpr = tl.constexpr(12582912.0)


@triton.jit
def _row_value(x_ptr, rows, c, m, stride_c, mean, rstd, NORM: tl.constexpr):
    """Elements c of the rows at offsets ``rows``, in float32: x itself (NORM 0) or the
    normalized x̂ = ((x − mean) · rstd) rounded to x's dtype, as ``reference.normalized_rows``."""
    x = tl.load(x_ptr + rows[:, None] + c[None, :] * stride_c, mask=m, other=0.0)
    if NORM == 0:
        return x.to(tl.float32)
    x_hat = (x.to(tl.float32) - mean[:, None]) * rstd[:, None]
    return x_hat.to(x_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _row_statistics(x_ptr, rows, in_rows, C, eps, stride_c, NORM: tl.constexpr,
                    ROWS: tl.constexpr, TILE_C: tl.constexpr):  # fmt: skip
    """(mean, rstd) of the rows (NORM 1, RMSNorm: mean 0): the mean, then the variance about it."""
    mean = tl.zeros((ROWS,), dtype=tl.float32)
    none = tl.zeros((ROWS,), dtype=tl.float32)
    if NORM == 2:
        for c0 in range(0, C, TILE_C):
            c = c0 + tl.arange(0, TILE_C)
            m = in_rows[:, None] & (c[None, :] < C)
            mean += tl.sum(_row_value(x_ptr, rows, c, m, stride_c, none, none, 0), axis=1)
        mean = mean / C
    square = tl.zeros((ROWS,), dtype=tl.float32)
    for c0 in range(0, C, TILE_C):
        c = c0 + tl.arange(0, TILE_C)
        m = in_rows[:, None] & (c[None, :] < C)
        x = _row_value(x_ptr, rows, c, m, stride_c, none, none, 0)
        d = tl.where(m, x - mean[:, None], 0.0)
        square += tl.sum(d * d, axis=1)
    return mean, 1.0 / tl.sqrt_rn(square / C + eps)


@triton.jit
def _row_codes_kernel(x_ptr, out_ptr, scales_ptr, rstd_ptr, R, C, eps, d1, d2, stride_0, stride_1,
                      stride_2, stride_c, NORM: tl.constexpr, BITS: tl.constexpr,
                      ROWS: tl.constexpr, TILE_C: tl.constexpr):  # fmt: skip
    """Rows [p·ROWS, (p+1)·ROWS) of x [d0, d1, d2, C] (read through its strides: attention's q,
    k, v are permuted views). NORM 1 (RMSNorm) or 2 (LayerNorm): first their statistics (mean,
    then the variance about it; rstd written), the rows becoming x̂, written as they are with BITS
    0. With BITS > 0: the rows' max |value| and finiteness, then their codes (the rows are still
    in cache): int8 per element (8 bits), or offset by 8 and packed two to a byte, row by row
    (4 bits; C even)."""
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    in_rows = r < R
    rows = (r // (d1 * d2)) * stride_0 + (r // d2 % d1) * stride_1 + (r % d2) * stride_2
    mean = tl.zeros((ROWS,), dtype=tl.float32)
    rstd = tl.zeros((ROWS,), dtype=tl.float32)
    if NORM > 0:
        mean, rstd = _row_statistics(x_ptr, rows, in_rows, C, eps, stride_c, NORM, ROWS, TILE_C)
        tl.store(rstd_ptr + r, rstd, mask=in_rows)
    if BITS == 0:
        for c0 in range(0, C, TILE_C):
            c = c0 + tl.arange(0, TILE_C)
            m = in_rows[:, None] & (c[None, :] < C)
            x_hat = _row_value(x_ptr, rows, c, m, stride_c, mean, rstd, NORM)
            tl.store(out_ptr + r[:, None] * C + c[None, :],
                     x_hat.to(out_ptr.dtype.element_ty), mask=m)  # fmt: skip
    else:
        TOP: tl.constexpr = (1 << (BITS - 1)) - 1
        amax = tl.zeros((ROWS,), dtype=tl.float32)
        bad = tl.zeros((ROWS,), dtype=tl.int32)
        for c0 in range(0, C, TILE_C):
            c = c0 + tl.arange(0, TILE_C)
            m = in_rows[:, None] & (c[None, :] < C)
            a = tl.abs(_row_value(x_ptr, rows, c, m, stride_c, mean, rstd, NORM))
            amax = tl.maximum(amax, tl.max(a, axis=1))
            bad += tl.sum(((a != a) | (a == float("inf"))).to(tl.int32), axis=1)
        finite = bad == 0
        top = tl.zeros((ROWS,), dtype=tl.float32) + TOP
        tl.store(scales_ptr + r, tl.where(finite, tl.div_rn(amax, top), float("nan")),
                 mask=in_rows)  # fmt: skip
        inverse = tl.where(finite & (amax > 0), tl.div_rn(top, tl.maximum(amax, 1e-30)), 0.0)
        for c0 in range(0, C, TILE_C):
            c = c0 + tl.arange(0, TILE_C)
            m = in_rows[:, None] & (c[None, :] < C)
            v = _row_value(x_ptr, rows, c, m, stride_c, mean, rstd, NORM)
            v = tl.where(finite[:, None], v, 0.0)  # a non-finite row codes zeros
            q = (v * inverse[:, None] + _RINT_MAGIC) - _RINT_MAGIC
            q = tl.minimum(tl.maximum(q, -TOP), TOP).to(tl.int32)
            if BITS == 8:
                tl.store(out_ptr + r[:, None] * C + c[None, :], q.to(tl.int8), mask=m)
            else:
                lanes = (tl.arange(0, 2) * 4)[None, None, :]
                pairs = tl.reshape(q + 8, (ROWS, TILE_C // 2, 2)) << lanes
                packed = tl.sum(pairs, axis=2).to(tl.uint8)  # disjoint bits: the sum is the OR
                jb = c0 // 2 + tl.arange(0, TILE_C // 2)
                tl.store(out_ptr + r[:, None] * (C // 2) + jb[None, :], packed,
                         mask=in_rows[:, None] & (jb[None, :] < C // 2))  # fmt: skip


def _row_tiles(cols: int) -> dict[str, int]:
    """TILE_C (columns per step, ≤ 1024) and ROWS (rows per program, ~4096 elements a step)."""
    tile_c = min(1024, _tile(cols))
    return {"TILE_C": tile_c, "ROWS": max(1, 4096 // tile_c)}


def _row_codes(x: torch.Tensor, bits: int, norm: int, eps: float) -> tuple[torch.Tensor, ...]:
    """One ``_row_codes_kernel`` launch over the rows of x (..., C): (codes or x̂, scales, rstd)."""
    cols = x.shape[-1]
    if x.dim() > 4:
        x = x.reshape(-1, cols)
    rows = x.numel() // cols if cols else 0
    shape, dtype = {0: ((rows, cols), x.dtype), 8: ((rows, cols), torch.int8),
                    4: ((rows * cols // 2,), torch.uint8)}[bits]  # fmt: skip
    out = torch.empty(shape, dtype=dtype, device=x.device)
    scales = torch.empty(rows if bits else 0, dtype=torch.float32, device=x.device)
    rstd = torch.empty(rows if norm else 0, dtype=torch.float32, device=x.device)
    if rows and cols:
        lead = 3 - (x.dim() - 1)
        sizes, strides = (1,) * lead + x.shape[:-1], (0,) * lead + x.stride()[:-1]
        tiles = _row_tiles(cols)
        _row_codes_kernel[(triton.cdiv(rows, tiles["ROWS"]),)](
            x, out, scales, rstd, rows, cols, eps, sizes[1], sizes[2], *strides, x.stride(-1),
            NORM=norm, BITS=bits, **tiles, **EXACT,
        )  # fmt: skip
    return out, scales, rstd


def encode_row_codes(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of ``reference.encode_row_codes``: one launch, x read in place through its
    strides (4 bits with an odd row length, where a byte would span two rows: the reference)."""
    if bits == 4 and x.shape[-1] % 2:
        return reference.encode_row_codes(x, bits)
    codes, scales, _ = _row_codes(x, bits, 0, 0.0)
    return codes, scales


def normalized_row_codes(
    x: torch.Tensor, eps: float, rms: bool, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton version of ``reference.normalized_row_codes``: the statistics, x̂ and (bits > 0) its
    codes in one launch; the statistics to float rounding of the reference's (another order of
    summation), the codes those of this x̂."""
    if bits == 4 and x.shape[-1] % 2:
        return reference.normalized_row_codes(x, eps, rms, bits)
    out, scales, rstd = _row_codes(x, bits, 1 if rms else 2, eps)
    return (out if bits else out.view(x.shape)), scales, rstd.view(*x.shape[:-1], 1)


@triton.jit
def _saved_x_hat(saved_ptr, scale, r, c, m, C, BITS: tl.constexpr, X_DTYPE: tl.constexpr):
    """x̂ of rows r, columns c in float32 from what the forward saved: x̂ itself (BITS 0) or its
    codes decoded to x's dtype (as ``decode_row_codes``)."""
    if BITS == 0:
        return tl.load(saved_ptr + r[:, None] * C + c[None, :], mask=m, other=0.0).to(tl.float32)
    if BITS == 8:
        q = tl.load(saved_ptr + r[:, None] * C + c[None, :], mask=m, other=0).to(tl.float32)
    else:
        byte = tl.load(saved_ptr + r[:, None] * (C // 2) + c[None, :] // 2, mask=m, other=0)
        q = (((byte.to(tl.int32) >> ((c[None, :] % 2) * 4)) & 15) - 8).to(tl.float32)
    return (q * scale[:, None]).to(X_DTYPE).to(tl.float32)


@triton.jit
def _norm_grad_tile(dy_ptr, w_ptr, saved_ptr, scale, r, c, m, C, BITS: tl.constexpr,
                    HAS_W: tl.constexpr, X_DTYPE: tl.constexpr):  # fmt: skip
    """dy, g = dy ⊙ γ and x̂ of rows r, columns c, in float32."""
    dy = tl.load(dy_ptr + r[:, None] * C + c[None, :], mask=m, other=0.0).to(tl.float32)
    g = dy * tl.load(w_ptr + c, mask=c < C, other=0.0).to(tl.float32)[None, :] if HAS_W else dy
    return dy, g, _saved_x_hat(saved_ptr, scale, r, c, m, C, BITS, X_DTYPE)


@triton.jit
def _norm_grad_kernel(dy_ptr, saved_ptr, scales_ptr, rstd_ptr, w_ptr, dx_ptr, dw_ptr, db_ptr, R, C,
                      RMS: tl.constexpr, BITS: tl.constexpr, HAS_W: tl.constexpr,
                      HAS_B: tl.constexpr, ROWS: tl.constexpr, TILE_C: tl.constexpr):  # fmt: skip
    """dx of rows [p·ROWS, (p+1)·ROWS) (their two sums first, then dx), and this program's
    partial column sums of dy ⊙ x̂ and dy (row p of dw, db: summed over programs after)."""
    p = tl.program_id(0).to(tl.int64)
    r = p * ROWS + tl.arange(0, ROWS)
    in_rows = r < R
    rstd = tl.load(rstd_ptr + r, mask=in_rows, other=0.0)
    scale = tl.load(scales_ptr + r, mask=in_rows, other=0.0) if BITS > 0 else rstd
    gx = tl.zeros((ROWS,), dtype=tl.float32)
    gs = tl.zeros((ROWS,), dtype=tl.float32)
    for c0 in range(0, C, TILE_C):
        c = c0 + tl.arange(0, TILE_C)
        m = in_rows[:, None] & (c[None, :] < C)
        dy, g, x_hat = _norm_grad_tile(dy_ptr, w_ptr, saved_ptr, scale, r, c, m, C, BITS, HAS_W,
                                       dx_ptr.dtype.element_ty)  # fmt: skip
        gx += tl.sum(g * x_hat, axis=1)
        gs += tl.sum(g, axis=1)
    gx, gs = gx / C, gs / C
    for c0 in range(0, C, TILE_C):
        c = c0 + tl.arange(0, TILE_C)
        m = in_rows[:, None] & (c[None, :] < C)
        dy, g, x_hat = _norm_grad_tile(dy_ptr, w_ptr, saved_ptr, scale, r, c, m, C, BITS, HAS_W,
                                       dx_ptr.dtype.element_ty)  # fmt: skip
        dx = g - x_hat * gx[:, None]
        if not RMS:
            dx = dx - gs[:, None]
        tl.store(dx_ptr + r[:, None] * C + c[None, :],
                 (dx * rstd[:, None]).to(dx_ptr.dtype.element_ty), mask=m)  # fmt: skip
        if HAS_W:
            tl.store(dw_ptr + p * C + c, tl.sum(dy * x_hat, axis=0), mask=c < C)
        if HAS_B:
            tl.store(db_ptr + p * C + c, tl.sum(dy, axis=0), mask=c < C)


def norm_grad(
    dy: torch.Tensor, saved: torch.Tensor, scales: torch.Tensor, rstd: torch.Tensor,
    weight: torch.Tensor | None, rms: bool, bits: int, has_bias: bool, x_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """Triton version of ``reference.norm_grad``: one launch for dx and the partial sums, one
    sum each for dγ and dβ; sums to float rounding of the reference's (another order)."""
    cols = dy.shape[-1]
    if bits == 4 and cols % 2:
        return reference.norm_grad(dy, saved, scales, rstd, weight, rms, bits, has_bias, x_dtype)
    rows = dy.numel() // cols if cols else 0
    tiles = _row_tiles(cols)
    programs = triton.cdiv(rows, tiles["ROWS"])
    dx = torch.empty(dy.shape, dtype=x_dtype, device=dy.device)
    parts = torch.empty(2 if has_bias else 1, programs, cols, dtype=torch.float32, device=dy.device)
    if rows and cols:
        _norm_grad_kernel[(programs,)](
            dy.contiguous(), saved, scales, rstd, dx if weight is None else weight, dx, parts[0],
            parts[-1], rows, cols, RMS=rms, BITS=bits, HAS_W=weight is not None, HAS_B=has_bias,
            **tiles, **EXACT,
        )  # fmt: skip
    sums = parts.sum(dim=1)
    return dx, None if weight is None else sums[0], sums[-1] if has_bias else None


@triton.jit
def _decode_row_codes_kernel(codes_ptr, scales_ptr, out_ptr, R, C, BITS: tl.constexpr,
                             ROWS: tl.constexpr, TILE_C: tl.constexpr):  # fmt: skip
    """x̃ = code · scale (float32, then the output's dtype) of rows [p·ROWS, (p+1)·ROWS)."""
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    in_rows = r < R
    scale = tl.load(scales_ptr + r, mask=in_rows, other=0.0)
    for c0 in range(0, C, TILE_C):
        c = c0 + tl.arange(0, TILE_C)
        m = in_rows[:, None] & (c[None, :] < C)
        if BITS == 8:
            q = tl.load(codes_ptr + r[:, None] * C + c[None, :], mask=m, other=0).to(tl.float32)
        else:
            byte = tl.load(codes_ptr + r[:, None] * (C // 2) + c[None, :] // 2, mask=m, other=0)
            q = (((byte.to(tl.int32) >> ((c[None, :] % 2) * 4)) & 15) - 8).to(tl.float32)
        out = (q * scale[:, None]).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + r[:, None] * C + c[None, :], out, mask=m)


def decode_row_codes(
    codes: torch.Tensor, scales: torch.Tensor, cols: int, dtype: torch.dtype, bits: int
) -> torch.Tensor:
    """Triton version of ``reference.decode_row_codes``: one launch."""
    rows = scales.numel()
    if bits == 4 and cols % 2:
        return reference.decode_row_codes(codes, scales, cols, dtype, bits)
    out = torch.empty(rows, cols, dtype=dtype, device=scales.device)
    if rows and cols:
        tiles = _row_tiles(cols)
        _decode_row_codes_kernel[(triton.cdiv(rows, tiles["ROWS"]),)](
            codes, scales.contiguous(), out, rows, cols, BITS=bits, **tiles, **EXACT,
        )  # fmt: skip
    return out


# --- dropout masks as bits (``dropout``): one launch each way -------------------------------------


@triton.jit
def _pack_mask_kernel(mask_ptr, packed_ptr, numel, BYTES: tl.constexpr):
    """Bytes [p·BYTES, (p+1)·BYTES) of the packed mask: 8 mask elements each, lowest bit first."""
    byte = tl.program_id(0).to(tl.int64) * BYTES + tl.arange(0, BYTES)
    lane = tl.arange(0, 8)
    e = byte[:, None] * 8 + lane[None, :]
    bit = tl.load(mask_ptr + e, mask=e < numel, other=0).to(tl.int32)
    packed = tl.sum((bit != 0).to(tl.int32) << lane[None, :], axis=1)  # disjoint bits: the OR
    tl.store(packed_ptr + byte, packed.to(tl.uint8), mask=byte * 8 < numel)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Triton version of ``reference.pack_mask``: one launch."""
    flat = mask.contiguous().view(-1).view(torch.uint8)
    packed = torch.empty(-(-flat.numel() // 8), dtype=torch.uint8, device=mask.device)
    if flat.numel():
        _pack_mask_kernel[(triton.cdiv(packed.numel(), 512),)](flat, packed, flat.numel(),
                                                               BYTES=512)  # fmt: skip
    return packed


@triton.jit
def _dropout_grad_kernel(dy_ptr, packed_ptr, dx_ptr, numel, scale, BLOCK: tl.constexpr):
    """dx = (dy · bit) · scale in float32, then dy's dtype: native_dropout_backward's arithmetic."""
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = e < numel
    byte = tl.load(packed_ptr + e // 8, mask=inside, other=0).to(tl.int32)
    bit = ((byte >> (e % 8)) & 1).to(tl.float32)
    dy = tl.load(dy_ptr + e, mask=inside, other=0.0).to(tl.float32)
    tl.store(dx_ptr + e, (dy * bit * scale).to(dx_ptr.dtype.element_ty), mask=inside)


def dropout_grad(dy: torch.Tensor, packed: torch.Tensor, scale: float) -> torch.Tensor:
    """Triton version of ``reference.dropout_grad``: one launch."""
    flat = dy.contiguous().view(-1)
    dx = torch.empty_like(flat)
    if flat.numel():
        _dropout_grad_kernel[(triton.cdiv(flat.numel(), 1024),)](
            flat, packed, dx, flat.numel(), scale, BLOCK=1024, **EXACT,
        )  # fmt: skip
    return dx.view(dy.shape)
