"""The CPU fast path: the block kernels compiled by numba, one pass over memory each.

``reference.py`` runs each kernel as a chain of whole-tensor PyTorch passes (scores, top-k input,
random bytes, quantisation, bit packing: five reads and writes of the activation, plus a copy for
the token-major row order). Here each kernel is one loop nest that reads every element once,
in token-major row order straight from the row source (no copy of a contiguous x or dy, as
activations and their gradients are; other layouts are made contiguous first, so that each kernel
is compiled for one layout only), in parallel over block-rows: scoring and
the low-bit remainder share one read of each block, which is still in L1 when it is coded. numba
is a PyPI wheel with its own LLVM, so no compiler has to be installed; functions are compiled on
first use and cached on disk (docs/design.md, "CPU fast path", has the measurements and the
alternatives weighed). The contract of each launcher is the function of the same name in
``reference.py``; the tests check codes and kept blocks bit for bit against it.

Only float32 runs here (each dtype is a compilation of its own, and numpy has no bfloat16); the
dispatcher sends other dtypes to the reference. The launchers allocate their outputs with numpy
and return ``torch.from_numpy`` of them (the same memory): at the sizes where host time is what a
layer costs, ``torch.empty`` + ``.numpy()`` took about twice as long (3.5 vs 1.9 µs a tensor).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import FunctionType

import numba as nb
import numpy as np
import torch
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

from .. import rng
from ..derivative_code import DerivativeCode
from ..storage import BlockSparse
from . import reference

_CRITERION_CODE = {"l2": 0, "l1": 1, "max": 2}

_JIT = {"cache": True, "nogil": True, "error_model": "numpy"}

# Below this many elements a kernel runs its serial compilation: entering a parallel region costs
# microseconds on an idle machine and, while other processes hold the cores, waits for every
# worker thread to be scheduled (docs/design.md, "Host cost, launches and the compiled path").
SERIAL_BELOW = 1 << 15


class _Parallel:
    """A kernel compiled twice from one loop nest: ``parallel`` over its ``prange`` and ``serial``
    (without ``parallel=True`` numba runs a ``prange`` as a ``range``); ``kernel[elements]`` is
    the one for a call over that many elements. The serial one is compiled from a copy of the
    function under its own name, so the two never share an entry of numba's on-disk cache."""

    def __init__(self, fn: Callable) -> None:
        self.parallel = nb.njit(parallel=True, **_JIT)(fn)
        serial = FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial",
                              fn.__defaults__, fn.__closure__)  # fmt: skip
        serial.__qualname__ = fn.__qualname__ + "_serial"
        self.serial = nb.njit(**_JIT)(serial)

    def __getitem__(self, elements: int) -> Callable:
        return self.serial if elements < SERIAL_BELOW else self.parallel


@intrinsic
def _random_word(typingctx, key, word):
    """``rng.random_words`` of one word: key (uint32) and word (int64, used modulo 2^32) to the
    uint32 hash, emitted as 32-bit LLVM operations: numba widens integer arithmetic to 64 bits,
    and LLVM then vectorises the multiplies as 64-bit ones, four lanes per AVX2 register instead
    of eight (docs/design.md, "CPU fast path")."""

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        h = builder.mul(builder.trunc(args[1], i32), ir.Constant(i32, rng.GOLDEN))
        h = builder.xor(h, args[0])
        for multiplier, shift in ((rng.MIX1, 16), (rng.MIX2, 13), (None, 16)):
            h = builder.xor(h, builder.lshr(h, ir.Constant(i32, shift)))
            if multiplier is not None:
                h = builder.mul(h, ir.Constant(i32, multiplier))
        return h

    return types.uint32(types.uint32, types.int64), codegen


@intrinsic
def _stochastic_code(typingctx, v, c, byte, levels):
    """``reference.low_bit_code`` of one element: min((int32(v · c + 128·levels + ½) + byte) >> 8,
    levels) as uint8, emitted as 32-bit LLVM operations (a float32
    multiply, then an add: no fused multiply-add, as the reference rounds each) for the reason
    ``_random_word`` gives. The conversion's input is clamped to [0, 2^16] first (NaN to 0), so
    no conversion is undefined; only non-finite blocks, whose codes are zeroed, reach the clamp."""

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        v, c, byte, levels = args
        levels = builder.trunc(levels, i32)
        # 128·levels + ½, exact in float32; loop-invariant, so LLVM computes it once per loop
        offset = builder.fadd(
            builder.sitofp(builder.shl(levels, ir.Constant(i32, 7)), ir.FloatType()),
            ir.Constant(ir.FloatType(), 0.5),
        )
        w = builder.fadd(builder.fmul(v, c), offset)
        zero, top = ir.Constant(ir.FloatType(), 0.0), ir.Constant(ir.FloatType(), 65536.0)
        w = builder.select(builder.fcmp_ordered(">", w, zero), w, zero)  # NaN to 0: maxps
        w = builder.select(builder.fcmp_ordered("<", w, top), w, top)
        q = builder.add(builder.fptosi(w, i32), builder.zext(byte, i32))
        code = builder.lshr(q, ir.Constant(i32, 8))
        code = builder.select(builder.icmp_unsigned("<", code, levels), code, levels)
        return builder.trunc(code, ir.IntType(8))

    sig = types.uint8(types.float32, types.float32, types.uint8, types.int64)
    return sig, codegen


@nb.njit(inline="always")
def _next_row(t, b, batch):
    """(t, b) of the row after row t·batch + b in token-major order, without a division (the
    kernels step through a block-row's rows; a ``divmod`` per row cost more than a narrow row)."""
    return (t + 1, 0) if b == batch - 1 else (t, b + 1)


@nb.njit(fastmath={"reassoc", "nsz"}, **_JIT)
def _block_row_sums(x, x_bits, mask, br, bm, bk, criterion, acc, top):
    """Per block of block-row br: Σ v² (l2) or Σ |v| (l1) into acc, and the max of the magnitude
    bits into top. The magnitude bits of a float (sign cleared) order like |v|, with NaN above
    +Inf above every finite value, so one integer max gives both the block's max |v| and whether
    it is finite. Rows are accumulated element-wise into per-column buffers (vectorised loops
    with no reduction), then each block's bk columns are reduced once; reassociation makes the
    scores agree with the reference to rounding."""
    batch, m, k = x.shape[0], x.shape[0] * x.shape[1], x.shape[2]
    col_acc = np.zeros(k, x.dtype)
    col_top = np.zeros(k, x_bits.dtype)
    t, b = divmod(br * bm, batch)
    for _ in range(min(bm, m - br * bm)):
        if criterion == 0:
            for j in range(k):
                col_acc[j] += x[b, t, j] * x[b, t, j]
        elif criterion == 1:
            for j in range(k):
                col_acc[j] += abs(x[b, t, j])
        for j in range(k):
            v = x_bits[b, t, j] & mask
            col_top[j] = v if v > col_top[j] else col_top[j]
        t, b = _next_row(t, b, batch)
    for j in range(k):  # plain loops: a slice per block is an array view (a refcount) each
        bc = j // bk
        acc[bc] += col_acc[j]
        top[bc] = col_top[j] if col_top[j] > top[bc] else top[bc]


@nb.njit(**_JIT)
def _pack_lanes(lanes, bits, out):
    """Pack the first ``len(out) · 8 // bits`` codes of ``lanes`` (uint8, one per code, length a
    multiple of 8) into ``out``, 8 // bits per byte, first code in the lowest bits: ``bitpack``'s
    scheme, through a wider view of the lanes so that each loop is contiguous and vectorised."""
    if bits == 8:
        for q in range(out.shape[0]):
            out[q] = lanes[q]
    elif bits == 4:
        wide = lanes.view(np.uint16)
        for q in range(out.shape[0]):
            out[q] = np.uint8((wide[q] & 0x0F) | ((wide[q] >> 4) & 0xF0))
    elif bits == 2:
        wide4 = lanes.view(np.uint32)
        for q in range(out.shape[0]):
            v = wide4[q]
            out[q] = np.uint8((v & 0x3) | ((v >> 6) & 0xC) | ((v >> 12) & 0x30)
                              | ((v >> 18) & 0xC0))  # fmt: skip
    else:
        wide8 = lanes.view(np.uint64)
        for q in range(out.shape[0]):
            v = wide8[q]
            byte = v & 1
            for p in range(1, 8):
                byte |= (v >> np.uint64(7 * p)) & np.uint64(1 << p)
            out[q] = np.uint8(byte)


@nb.njit(**_JIT)
def _unpack_lanes(packed, bits, lanes):
    """The inverse of ``_pack_lanes``: the codes of ``packed``, one per byte, into the start of
    ``lanes``."""
    if bits == 8:
        for q in range(packed.shape[0]):
            lanes[q] = packed[q]
    elif bits == 4:
        wide = lanes.view(np.uint16)
        for q in range(packed.shape[0]):
            b = np.uint16(packed[q])
            wide[q] = (b & 0x0F) | ((b & 0xF0) << 4)
    elif bits == 2:
        wide4 = lanes.view(np.uint32)
        for q in range(packed.shape[0]):
            b = np.uint32(packed[q])
            wide4[q] = (b & 0x3) | ((b & 0xC) << 6) | ((b & 0x30) << 12) | ((b & 0xC0) << 18)
    else:
        wide8 = lanes.view(np.uint64)
        for q in range(packed.shape[0]):
            b = np.uint64(packed[q])
            v = b & np.uint64(1)
            for p in range(1, 8):
                v |= ((b >> np.uint64(p)) & np.uint64(1)) << np.uint64(8 * p)
            wide8[q] = v


# Elements coded per flat pass: a few rows' buffers stay in L1 (docs/design.md, "CPU fast path").
_CODE_CHUNK = 4096


@nb.njit(**_JIT)
def _block_row_codes(x, br, bm, bk, scales, finite, bits, key, codes):
    """Write the packed codes of block-row br, a chunk of rows at a time (``_CODE_CHUNK``
    elements, at least one row). A chunk's rows are gathered into one contiguous buffer (rows
    past M and columns past K as zeros), so that each phase is a flat loop over the chunk that
    LLVM vectorises, without per-row setup (which dominated for narrow rows: K = 16): the random
    words (consecutive rows have consecutive words; their bytes, viewed as uint8, are the
    elements' bytes), the codes (``_stochastic_code``: float32 arithmetic as the reference's),
    then packing ``8 // bits`` codes per byte through a wider view of the codes (``bitpack``'s
    scheme)."""
    batch, m, k = x.shape[0], x.shape[0] * x.shape[1], x.shape[2]
    n_bc = scales.shape[0]
    k_padded, per, levels = n_bc * bk, 8 // bits, (1 << bits) - 1
    rows = max(1, min(bm, _CODE_CHUNK // k_padded))
    n = rows * k_padded
    values = np.zeros(n, np.float32)  # columns past K stay zero: only rows are written
    words = np.empty(n // 4, np.uint32)
    random = words.view(np.uint8)
    lanes = np.empty(n, np.uint8)
    c = np.empty(k_padded, np.float32)  # each element's 128·levels / scale
    for bc in range(n_bc):
        c[bc * bk : (bc + 1) * bk] = np.float32(128 * levels) / max(scales[bc], np.float32(1e-30))
    for i0 in range(0, bm, rows):
        count = min(rows, bm - i0)
        r0 = br * bm + i0
        valid = max(0, min(count, m - r0))
        t, b = divmod(r0, batch)
        for i in range(valid):
            for j in range(k):  # a plain loop: numba's slice assignment checks for overlap
                values[i * k_padded + j] = x[b, t, j]
            t, b = _next_row(t, b, batch)
        values[valid * k_padded :] = 0  # rows past M (the last block-row only)
        first_word = r0 * (k_padded // 4)
        for w in range(count * k_padded // 4):
            words[w] = _random_word(key, first_word + w)
        for i in range(count):
            for j in range(k_padded):
                e = i * k_padded + j
                lanes[e] = _stochastic_code(values[e], c[j], random[e], levels)
        out = codes[r0 * k_padded // per : (r0 + count) * k_padded // per]
        _pack_lanes(lanes, bits, out)  # packs out's length: the chunk's codes
        for bc in range(n_bc):
            if not finite[bc]:
                for i in range(count):
                    start = (i * k_padded + bc * bk) // per
                    out[start : start + bk // per] = 0


@nb.njit(**_JIT)
def _score_block_row(x, x_bits, mask, inf_bits, br, bm, bk, criterion, bits, key, scores,
                     low_scales, codes):  # fmt: skip
    """Scores (and with ``bits`` the scales and codes) of block-row br: one task of the kernel."""
    n_bc = scores.shape[0]
    acc = np.zeros(n_bc, x.dtype)
    top = np.zeros(n_bc, x_bits.dtype)
    _block_row_sums(x, x_bits, mask, br, bm, bk, criterion, acc, top)
    finite = np.empty(n_bc, np.bool_)
    amax = top.view(x.dtype)  # magnitude bits (sign cleared) as floats: each block's max |v|
    for bc in range(n_bc):
        finite[bc] = top[bc] < inf_bits
        if not finite[bc]:
            scores[bc] = np.inf
        elif criterion == 0:
            scores[bc] = np.sqrt(acc[bc])
        elif criterion == 1:
            scores[bc] = acc[bc]
        else:
            scores[bc] = amax[bc]
        if bits:
            low_scales[bc] = amax[bc] if finite[bc] else np.float32(np.nan)
    if bits:
        _block_row_codes(x, br, bm, bk, low_scales, finite, bits, key, codes)


# The parallel kernels are a prange over one helper call: numba's parallel lowering then has
# little to analyse, which keeps the first (cached) compilation short.
@_Parallel
def _score_blocks_kernel(x, x_bits, mask, inf_bits, bm, bk, criterion, bits, key, scores,
                         low_scales, codes):  # fmt: skip
    for br in nb.prange(scores.shape[0]):
        _score_block_row(x, x_bits, mask, inf_bits, br, bm, bk, criterion, bits, key, scores[br],
                         low_scales[br] if bits else low_scales[0], codes)  # fmt: skip


# float32's magnitude bits: the mask that clears the sign bit, and the bits of +Inf.
_MAGNITUDE, _INF_BITS = np.int32(0x7FFFFFFF), 0x7F800000
_NO_SCALES = np.empty(0, np.float32)  # the low scales without a remainder (read-only: no elements)


@functools.lru_cache(maxsize=1024)
def _scorer(
    shape: tuple[int, int, int], block_shape: tuple[int, int], criterion: str, bits: int
) -> Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``score_blocks`` of row sources of ``shape`` as a function of (x as a C-contiguous float32
    array of that shape, key) to (scores, codes, low_scales): sizes and the compilation fixed once
    per kind of call (host time: docs/design.md, "Host cost, launches and the compiled path")."""
    (bm, bk), (batch, t, k) = block_shape, shape
    n_br, n_bc = -(-batch * t // bm), -(-k // bk)
    kernel, code = _score_blocks_kernel[batch * t * k], _CRITERION_CODE[criterion]
    scale_shape, code_bytes = (n_br, n_bc) if bits else (1, 1), n_br * bm * n_bc * bk * bits // 8

    def score(x: np.ndarray, key: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        scores, low_scales = np.empty((n_br, n_bc), np.float32), np.empty(scale_shape, np.float32)
        codes = np.empty(code_bytes, np.uint8)
        kernel(x, x.view(np.int32), _MAGNITUDE, _INF_BITS, bm, bk, code, bits, np.uint32(key),
               scores, low_scales, codes)  # fmt: skip
        return scores, codes, low_scales if bits else _NO_SCALES

    return score


def _array(x: torch.Tensor) -> np.ndarray:
    """x's elements as a C-contiguous array: its own memory when it is contiguous (activations
    are: one compiled layout), else a copy into an array numpy allocates (in a ResMLP step most
    compressed inputs and their gradients arrive transposed). torch's CPU allocator page-faults
    every 4 KB of each fresh allocation of 256 KB or more, call after call; numpy's arrays come
    from the C heap, which keeps its pages (docs/design.md, "CPU fast path")."""
    x = x.detach()
    if x.is_contiguous():
        return x.numpy()
    if x.dtype != torch.float32:  # the kernels' data is float32
        return x.contiguous().numpy()
    out = np.empty(x.shape, np.float32)
    torch.from_numpy(out).copy_(x)
    return out


def score_blocks(
    x3: torch.Tensor,
    block_shape: tuple[int, int],
    criterion: str,
    bits: int,
    key: int,
    ccol: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """numba version of ``reference.score_blocks``: one read of x3 for scores and codes."""
    if ccol is not None:
        ccol.zero_()
    if bits and block_shape[1] % 8:  # the codes are written 8 per group (a word per 4 bytes)
        return reference.score_blocks(x3, block_shape, criterion, bits, key)
    score = _scorer(tuple(x3.shape), block_shape, criterion, bits)
    return tuple(torch.from_numpy(a) for a in score(_array(x3), key))


@nb.njit(**_JIT)
def _uniform_weight_grad_kernel(dy, codes, low_scales, bits, bm, bk, out):
    """out [N, K] = dyᵀ·X̃ for an X̃ coded whole (no kept block), dy its row source [B, T, N]:
    each row of X̃ decoded into a row buffer (token-major: row t·B + b meets dy[b, t]) and its
    outer product with that row of dy added to out, in one call."""
    batch, tokens, n = dy.shape
    n_bc, k = low_scales.shape[1], out.shape[1]
    k_padded = n_bc * bk
    scales = np.empty(k_padded, np.float32)
    lanes = np.empty(k_padded, np.uint8)
    row = np.empty((1, k_padded), np.float32)
    no_kept, no_values = np.full(n_bc, -1, np.int32), np.empty((0, bm, bk), np.float32)
    out[:] = 0
    t = b = 0
    for r in range(batch * tokens):
        if r % bm == 0:
            _block_row_scales(low_scales, r // bm, bk, bits, scales)
        _unpack_rows(codes, bits, r, 1, k_padded, lanes)
        _decoded_row(lanes, 0, scales, bits, no_kept, no_values, 0, row, 0)
        for i in range(n):
            g = dy[b, t, i]
            for j in range(k):
                out[i, j] += g * row[0, j]
        t, b = _next_row(t, b, batch)


# Below this many multiply-adds the weight gradient of uniform quantization is one numba call
# (decode and product fused); above it, X̃ decoded and one matmul (docs/design.md, "Host cost,
# launches and the compiled path").
FUSED_GRAD_MAX_MACS = 1 << 16


def uniform_coders(
    shape: tuple[int, int, int], block_shape: tuple[int, int], bits: int
) -> tuple[Callable, Callable] | None:
    """Uniform quantization (no block kept) of row sources of ``shape`` as two functions, every
    size, compilation and absent part fixed. ``encode(x, key)`` (x the activation, or any shape of
    its elements in the same order) gives (ccol, codes, low_scales): ``score_blocks``' codes and
    scales, and the empty selection's zeroed offsets. ``weight_grad(dy, codes, low_scales)`` gives
    dW = dyᵀ·X̃ (``reference.weight_grad``) for the output's gradient dy (..., N): one fused call
    below ``FUSED_GRAD_MAX_MACS`` multiply-adds, else X̃ decoded whole (``decode_rows`` of every
    block-row) and one product. ``blocksparse.Codec`` calls them where X̃ fits one tile. None
    where ``score_blocks`` would not run here (bk not a multiple of 8)."""
    (bm, bk), (batch, t, k) = block_shape, shape
    if bk % 8:
        return None
    m, n_br, n_bc = batch * t, -(-batch * t // bm), -(-k // bk)
    score = _scorer(shape, block_shape, "max", bits)
    kernel = _decode_rows_kernel[m * n_bc * bk]
    no_values, no_ints = np.empty((0, bm, bk), np.float32), np.empty(0, np.int32)
    ccol = np.zeros(n_bc + 1, np.int32)

    def encode(x: torch.Tensor, key: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _, codes, low_scales = score(_array(x).reshape(shape), key)
        return torch.from_numpy(ccol.copy()), torch.from_numpy(codes), torch.from_numpy(low_scales)

    def weight_grad(
        dy: torch.Tensor, codes: torch.Tensor, low_scales: torch.Tensor
    ) -> torch.Tensor:
        n = dy.shape[-1]
        if m * n * k <= FUSED_GRAD_MAX_MACS:
            out = np.empty((n, k), np.float32)
            _uniform_weight_grad_kernel(_array(dy).reshape(batch, t, n), codes.numpy(),
                                        low_scales.numpy(), bits, bm, bk, out)  # fmt: skip
            return torch.from_numpy(out)
        tile = np.empty((m, n_bc * bk), np.float32)
        kernel(codes.numpy(), low_scales.numpy(), bits, no_values, no_ints, ccol, n_br, m, batch,
               0, n_br, tile)  # fmt: skip
        return reference.one_tile_weight_grad(dy, torch.from_numpy(tile), k)

    return encode, weight_grad


@nb.njit(**_JIT)
def _select_kernel(scores, k, per_column, rows, cols, ccol):
    """``reference.select_blocks`` without a sort: the k-th largest score by partition (of each
    column, or of the grid), every block above it kept, ties at it to the lowest row-major id
    (per column: the lowest block-row); then the kept blocks read column by column, which is BSC
    order."""
    n_br, n_bc = scores.shape
    keep = np.zeros((n_br, n_bc), np.bool_)
    if per_column:
        column = np.empty(n_br, scores.dtype)
        for j in range(n_bc):
            for i in range(n_br):
                column[i] = scores[i, j]
            threshold = np.partition(column, n_br - k)[n_br - k]
            room = k
            for i in range(n_br):
                room -= scores[i, j] > threshold
            for i in range(n_br):
                v = scores[i, j]
                if v > threshold or (v == threshold and room > 0):
                    room -= v == threshold
                    keep[i, j] = True
    else:
        flat = scores.copy().reshape(-1)
        threshold = np.partition(flat, flat.shape[0] - k)[flat.shape[0] - k]
        room = k
        for i in range(n_br):
            for j in range(n_bc):
                room -= scores[i, j] > threshold
        for i in range(n_br):
            for j in range(n_bc):
                v = scores[i, j]
                if v > threshold or (v == threshold and room > 0):
                    room -= v == threshold
                    keep[i, j] = True
    p = 0
    for j in range(n_bc):
        for i in range(n_br):
            if keep[i, j]:
                rows[p], cols[p] = i, j
                p += 1
        ccol[j + 1] = p


def select_blocks(
    scores: torch.Tensor, k: int, *, per_column: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """numba version of ``reference.select_blocks`` (k >= 1): no sort, one pass to BSC order."""
    n_br, n_bc = scores.shape
    nnz = k * n_bc if per_column else k
    rows, cols = np.empty(nnz, np.int32), np.empty(nnz, np.int32)
    ccol = np.zeros(n_bc + 1, np.int32)
    _select_kernel(_array(scores), k, per_column, rows, cols, ccol)
    return torch.from_numpy(rows), torch.from_numpy(cols), torch.from_numpy(ccol)


@_Parallel
def _pack_blocks_kernel(x, rows, cols, bm, bk, out):
    batch, m, k = x.shape[0], x.shape[0] * x.shape[1], x.shape[2]
    for n in nb.prange(rows.shape[0]):
        r0, c0 = rows[n] * bm, cols[n] * bk
        for i in range(bm):
            r = r0 + i
            if r >= m:
                out[n, i, :] = 0
                continue
            t = r // batch
            b = r - t * batch
            for j in range(bk):
                out[n, i, j] = x[b, t, c0 + j] if c0 + j < k else 0


def pack_blocks(
    x3: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, block_shape: tuple[int, int]
) -> torch.Tensor:
    """numba version of ``reference.pack_blocks``: reads only the kept blocks of x3."""
    out = np.empty((rows.numel(), *block_shape), np.float32)
    _pack_blocks_kernel[out.size](
        _array(x3), rows.numpy(), cols.numpy(), *block_shape, out
    )
    return torch.from_numpy(out)


@nb.njit(**_JIT)
def _kept_map(row_indices, ccol, n_br):
    """int32 [n_br, n_bc]: the index in ``values`` of block (r, c), or -1 where none is kept."""
    n_bc = ccol.shape[0] - 1
    kept = np.full((n_br, n_bc), -1, np.int32)
    for c in range(n_bc):
        for n in range(ccol[c], ccol[c + 1]):
            kept[row_indices[n], c] = n
    return kept


@nb.njit(inline="always")
def _remainder_value(code, bits, scale):
    """One remainder code decoded: (code · 2/(2^bits − 1) − 1) · scale, float32 operations in
    the reference's order. The one place every decoding loop here takes it from."""
    return (np.float32(code) * np.float32(2.0 / ((1 << bits) - 1)) - np.float32(1.0)) * scale


@nb.njit(inline="always")
def _decoded_row(lanes, i, scales, bits, kept, values, block_row_i, out, r):
    """Row ``block_row_i`` of a block-row of X̃ into ``out[r]`` (its first n_bc·bk columns): codes
    ``lanes[i·n_bc·bk:]`` (unpacked) scaled by each element's block scale (``scales``), or zeros
    without a remainder, then the kept blocks' rows over it. Written in place, 2-D indexed: a
    row view per row, or a row buffer and a copy, cost more than the row's work at K = 16."""
    k_padded, bk = kept.shape[0] * values.shape[2], values.shape[2]
    if bits:
        for j in range(k_padded):
            out[r, j] = _remainder_value(lanes[i * k_padded + j], bits, scales[j])
    else:
        for j in range(k_padded):
            out[r, j] = 0
    for c in range(kept.shape[0]):
        if kept[c] >= 0:
            for j in range(bk):
                out[r, c * bk + j] = values[kept[c], block_row_i, j]


@nb.njit(**_JIT)
def _unpack_rows(codes, bits, r0, count, k_padded, lanes):
    """The codes of rows [r0, r0 + count) (contiguous: one flat pass) into ``lanes``."""
    if bits:
        per = 8 // bits
        _unpack_lanes(codes[r0 * k_padded // per : (r0 + count) * k_padded // per], bits, lanes)


@nb.njit(**_JIT)
def _block_row_scales(low_scales, br, bk, bits, out):
    """Each element's block scale along block-row br (nothing without a remainder)."""
    if bits:
        for c in range(low_scales.shape[1]):
            for j in range(bk):
                out[c * bk + j] = low_scales[br, c]


@nb.njit(**_JIT)
def _block_row_of_x(codes, low_scales, bits, values, kept, br, m, batch, t0, out, dy, acc):
    """Decode the rows of block-row br of X̃ a chunk at a time (``_CODE_CHUNK`` elements: the
    chunk's codes are contiguous, one flat pass unpacks them) and use each row: with ``dy``
    empty, decode it straight to its batch-major place in the tile ``out`` (``decode_rows``);
    otherwise add dy ⊙ row into ``acc`` [K] (the channel-scale gradient; dy read in place), the
    row decoded into a row buffer where the block-row keeps a block, else multiplied as it is
    decoded (uniform codes: the same float32 operations, no buffer). Arrays are indexed in
    2-D / 3-D: a row view per row cost more than the row's work at K = 16."""
    nnz, bm, bk = values.shape
    k_padded = kept.shape[0] * bk
    scales = np.empty(k_padded, np.float32)
    _block_row_scales(low_scales, br, bk, bits, scales)
    rows = max(1, min(bm, _CODE_CHUNK // k_padded))
    lanes = np.empty(rows * k_padded, np.uint8)
    row = np.empty((1, k_padded), values.dtype)
    to_tile, tokens = dy.size == 0, out.shape[0] // batch
    codes_only = bits and kept.max() < 0  # no kept block: dy ⊙ X̃ straight from the codes
    t, b = divmod(br * bm, batch)
    for i0 in range(0, min(bm, m - br * bm), rows):
        count = min(rows, m - br * bm - i0, bm - i0)
        _unpack_rows(codes, bits, br * bm + i0, count, k_padded, lanes)
        for i in range(count):
            if to_tile:
                _decoded_row(lanes, i, scales, bits, kept, values, i0 + i, out, b * tokens + t - t0)
            elif codes_only:
                for j in range(acc.shape[0]):
                    acc[j] += dy[b, t, j] * _remainder_value(lanes[i * k_padded + j], bits,
                                                             scales[j])  # fmt: skip
            else:
                _decoded_row(lanes, i, scales, bits, kept, values, i0 + i, row, 0)
                for j in range(acc.shape[0]):
                    acc[j] += dy[b, t, j] * row[0, j]
            t, b = _next_row(t, b, batch)


@_Parallel
def _decode_rows_kernel(codes, low_scales, bits, values, row_indices, ccol, n_br, m, batch, start,
                        stop, out):  # fmt: skip
    kept = _kept_map(row_indices, ccol, n_br)
    t0 = start * values.shape[1] // batch
    no_dy, no_acc = np.empty((0, 0, 0), values.dtype), np.empty(0, values.dtype)
    for br in nb.prange(start, stop):
        _block_row_of_x(codes, low_scales, bits, values, kept[br], br, m, batch, t0, out, no_dy,
                        no_acc)  # fmt: skip


def _low(x: BlockSparse) -> tuple[np.ndarray, np.ndarray, int]:
    if x.remainder is None:
        return np.empty(0, np.uint8), np.empty((0, 0), np.float32), 0
    r = x.remainder
    return r.codes.numpy(), r.scales.numpy(), r.bits


def decode_rows(x: BlockSparse, start: int, stop: int, batch: int) -> torch.Tensor:
    """numba version of ``reference.decode_rows``: each row decoded straight to its place."""
    (m, _), (bm, bk), n_bc = x.shape, x.block_shape, x.grid_shape[1]
    out = np.empty((min(m, stop * bm) - start * bm, n_bc * bk), np.float32)
    _decode_rows_kernel[out.size](
        *_low(x), x.values.numpy(), x.row_indices.numpy(), x.ccol_indices.numpy(),
        x.grid_shape[0], m, batch, start, stop, out,
    )  # fmt: skip
    return torch.from_numpy(out)


def weight_grad(dy3: torch.Tensor, x: BlockSparse) -> torch.Tensor:
    """numba version of ``reference.weight_grad``: X̃ decoded one tile at a time."""
    return reference.weight_grad(dy3, x, decode_rows)


@nb.njit(**_JIT)
def _channel_scale_block_row(dy, codes, low_scales, bits, values, kept, br, out):
    """Σ over the rows of block-row br of dy ⊙ X̃ into out [K] (float64)."""
    acc = np.zeros(dy.shape[2], values.dtype)  # bm rows in the input's precision, then float64
    _block_row_of_x(codes, low_scales, bits, values, kept, br, dy.shape[0] * dy.shape[1],
                    dy.shape[0], 0, np.empty((0, 0), values.dtype), dy, acc)  # fmt: skip
    for j in range(acc.shape[0]):
        out[j] = acc[j]


@nb.njit(**_JIT)
def _sum_rows(partial, out):
    """out[j] = Σ_r partial[r, j], block-row by block-row. A plain loop outside the parallel
    kernel: there, numba made each ``partial[:, j].sum()`` a parallel reduction of its own (1.8 ms
    of a 3 ms call at K = 1536)."""
    out[:] = 0
    for r in range(partial.shape[0]):
        for j in range(partial.shape[1]):
            out[j] += partial[r, j]


@_Parallel
def _channel_scale_grad_kernel(dy, codes, low_scales, bits, values, row_indices, ccol, out):
    k, bm = dy.shape[2], values.shape[1]
    n_br = -(-dy.shape[0] * dy.shape[1] // bm)
    kept = _kept_map(row_indices, ccol, n_br)
    partial = np.zeros((n_br, k), np.float64)  # one row per block-row: no shared writes
    for br in nb.prange(n_br):
        _channel_scale_block_row(dy, codes, low_scales, bits, values, kept[br], br, partial[br])
    _sum_rows(partial, out)


def channel_scale_grad(dy3: torch.Tensor, x: BlockSparse) -> torch.Tensor:
    """numba version of ``reference.channel_scale_grad``: one pass over dy and the codes, each
    row of X̃ decoded into a row buffer, never a tile."""
    out = np.empty(x.shape[1], np.float64)
    _channel_scale_grad_kernel[dy3.numel()](
        _array(dy3), *_low(x), x.values.numpy(), x.row_indices.numpy(),
        x.ccol_indices.numpy(), out,
    )  # fmt: skip
    return torch.from_numpy(out).to(dy3.dtype)


# --- activation derivative codes (``derivative_code``): 8 rows per task, so that each task owns
# whole bytes of the codes and exactly one byte of the non-finite row flags ----------------------


@_Parallel
def _activation_codes_kernel(x, bounds, bits, codes, nonfinite):
    """``bounds`` is a tuple: its length is part of the compiled type, so the comparisons unroll
    and the loop over a chunk's elements vectorises (a loop over an array of bounds per element
    did not: docs/design.md, "CPU fast path")."""
    rows, k = x.shape
    flat_x = x.reshape(-1)
    for chunk in nb.prange(-(-rows // 8)):
        first, count = chunk * 8, min(8, rows - chunk * 8)
        n = count * k
        lanes = np.empty(-(-n // 8) * 8, np.uint8)
        lanes[n:] = 0
        flat = flat_x[first * k : first * k + n]
        for e in range(n):  # the code is the number of boundaries below x (NaN: none)
            v = flat[e]
            c = np.uint8(0)
            for t in bounds:
                c += v > t
            lanes[e] = c
        flags = 0
        for i in range(count):
            bad = False
            for j in range(k):
                bad |= not (abs(flat[i * k + j]) < np.inf)
            flags |= np.int32(bad) << i
        nonfinite[chunk] = flags
        start = first * k * bits // 8
        _pack_lanes(lanes, bits, codes[start : start - (-n * bits // 8)])


@functools.cache
def _code_constants(code: DerivativeCode) -> tuple[tuple, np.ndarray]:
    """The code's boundaries as a tuple of float32 (compared in x's dtype) and its values as a
    float32 table: made once per code, not per call."""
    bounds = tuple(np.float32(t) for t in code.boundaries)
    return bounds, np.array(code.values, dtype=np.float32)


def activation_codes(x: torch.Tensor, code: DerivativeCode) -> tuple[torch.Tensor, torch.Tensor]:
    """numba version of ``reference.activation_codes``: one read of x."""
    x2 = (
        x.detach().reshape(x.numel() // max(1, x.shape[-1]), x.shape[-1])
        if x.dim()
        else x.reshape(1, 1)
    )
    x2 = _array(x2)
    rows, k = x2.shape
    codes = np.empty(-(-rows * k * code.bits // 8), np.uint8)
    nonfinite = np.empty(-(-rows // 8), np.uint8)
    _activation_codes_kernel[x2.size](x2, _code_constants(code)[0], code.bits, codes, nonfinite)
    return torch.from_numpy(codes), torch.from_numpy(nonfinite)


@_Parallel
def _activation_grad_kernel(dy, codes, nonfinite, table, bits, out):
    """A 4-entry table (2-bit codes) is read by selects, which vectorise; a longer one by an
    indexed load per element."""
    rows, k = dy.shape
    flat_dy, flat_out = dy.reshape(-1), out.reshape(-1)
    t0, t1, t2, t3 = table[0], table[1], table[2], table[3]  # tables have 4 or 16 entries
    for chunk in nb.prange(-(-rows // 8)):
        first, count = chunk * 8, min(8, rows - chunk * 8)
        n = count * k
        lanes = np.empty(-(-n // 8) * 8, np.uint8)
        start = first * k * bits // 8
        _unpack_lanes(codes[start : start - (-n * bits // 8)], bits, lanes)
        g, dx = flat_dy[first * k : first * k + n], flat_out[first * k : first * k + n]
        if table.shape[0] == 4:
            for e in range(n):
                c = lanes[e]
                dx[e] = g[e] * (t0 if c == 0 else (t1 if c == 1 else (t2 if c == 2 else t3)))
        else:
            for e in range(n):
                dx[e] = g[e] * table[lanes[e]]
        for i in range(count):
            if (nonfinite[chunk] >> i) & 1:
                for j in range(i * k, (i + 1) * k):
                    dx[j] = np.nan


def activation_grad(
    dy: torch.Tensor, codes: torch.Tensor, nonfinite: torch.Tensor, code: DerivativeCode
) -> torch.Tensor:
    """numba version of ``reference.activation_grad``: one pass over dy and the codes."""
    dy2 = (
        dy.reshape(dy.numel() // max(1, dy.shape[-1]), dy.shape[-1])
        if dy.dim()
        else dy.reshape(1, 1)
    )
    dy2 = _array(dy2)
    out = np.empty(dy2.shape, np.float32)
    _activation_grad_kernel[dy2.size](dy2, codes.numpy(), nonfinite.numpy(),
                                      _code_constants(code)[1], code.bits, out)  # fmt: skip
    return torch.from_numpy(out).view(dy.shape)


# --- per-row codes of the input-gradient path (``rowcode``) -------------------------------------


@_Parallel
def _row_scales_kernel(x, top, scales, inverses):
    for r in nb.prange(x.shape[0]):
        amax, nan = np.float32(0.0), False
        for v in x[r]:
            a = abs(v)
            nan |= a != a
            amax = max(amax, a)
        finite = not nan and amax < np.inf
        scales[r] = amax / top if finite else np.nan
        inverses[r] = top / amax if finite and amax > 0 else 0.0


@nb.njit(inline="always")
def _code(v, inverse, top):
    c = np.rint(v * inverse)  # round half to even, as torch.round
    return 0.0 if c != c else min(max(c, -top), top)  # NaN · 0 of a non-finite row: 0


@_Parallel
def _encode8_kernel(x, inverses, top, codes):
    for r in nb.prange(x.shape[0]):
        for j in range(x.shape[1]):
            codes[r, j] = np.int8(_code(x[r, j], inverses[r], top))


@_Parallel
def _encode4_kernel(flat, cols, inverses, top, packed):
    n = flat.shape[0]
    for i in nb.prange(packed.shape[0]):
        lo = np.uint8(_code(flat[2 * i], inverses[2 * i // cols], top) + 8)
        hi = np.uint8(0)
        if 2 * i + 1 < n:
            hi = np.uint8(_code(flat[2 * i + 1], inverses[(2 * i + 1) // cols], top) + 8)
        packed[i] = lo | (hi << 4)


def encode_row_codes(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """numba version of ``reference.encode_row_codes``: the same codes and scales, bit for bit, in
    two reads of x (row maxima, then codes) instead of about six whole-tensor passes."""
    x = _array(x.reshape(-1, x.shape[-1]))
    rows, cols = x.shape
    top = np.float32(2 ** (bits - 1) - 1)
    scales, inverses = torch.empty(rows), np.empty(rows, np.float32)
    _row_scales_kernel[x.size](x, top, scales.numpy(), inverses)
    if bits == 8:
        codes = torch.empty(rows, cols, dtype=torch.int8)
        _encode8_kernel[x.size](x, inverses, top, codes.numpy())
    else:
        codes = torch.empty(-(-rows * cols // 2), dtype=torch.uint8)
        _encode4_kernel[x.size](x.reshape(-1), cols, inverses, top, codes.numpy())
    return codes, scales


@_Parallel
def _decode8_kernel(codes, scales, out):
    for r in nb.prange(out.shape[0]):
        for j in range(out.shape[1]):
            out[r, j] = np.float32(codes[r, j]) * scales[r]


@_Parallel
def _decode4_kernel(packed, scales, cols, out):
    flat = out.reshape(-1)
    for i in nb.prange(flat.shape[0]):
        byte = packed[i // 2]
        nibble = (byte >> 4) if i % 2 else (byte & 15)
        flat[i] = np.float32(np.int8(nibble) - 8) * scales[i // cols]


def decode_row_codes(
    codes: torch.Tensor, scales: torch.Tensor, cols: int, dtype: torch.dtype, bits: int
) -> torch.Tensor:
    """numba version of ``reference.decode_row_codes`` (float32): one pass over the codes."""
    out = torch.empty(scales.numel(), cols)
    if bits == 8:
        _decode8_kernel[out.numel()](codes.view(-1, cols).numpy(), scales.numpy(), out.numpy())
    else:
        _decode4_kernel[out.numel()](codes.numpy(), scales.numpy(), cols, out.numpy())
    return out
