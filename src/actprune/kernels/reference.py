"""PyTorch implementations of the block kernels: the contract every backend meets, and the fallback.

Every kernel reads an activation as its *row source* ``x3`` [B, T, C]: the matrix that blocks are
cut from has M = T·B rows, row t·B + b being ``x3[b, t]`` (``blocksparse.as_rows``' token-major
order; a 2-D tensor is the row source ``x.unsqueeze(0)``). The fast backends (``cpu_blocks``,
``triton_blocks``) follow the strides of x3 and never copy it; the functions here materialise the
rows (``rows_of``) and then work on the 2-D tensor viewed as a grid of (bm × bk) blocks. Edge
blocks of shapes that are not multiples of the block are zero-padded internally and padding never
reaches the caller. No Python loop runs over blocks: each op is a handful of whole-tensor calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from .. import rng
from ..bitpack import pack_codes, top_code, unpack_codes
from ..derivative_code import DerivativeCode
from ..storage import BlockSparse, blocked_view

_REDUCE_COLS = {  # within each block row: [n_br, bm, n_bc, bk] -> [n_br, bm, n_bc] in dtype `acc`
    "l2": lambda b, acc: torch.linalg.vector_norm(b, 2, dim=3, dtype=acc),
    "l1": lambda b, acc: b.abs().sum(3, dtype=acc),
    "max": lambda b, acc: b.abs().amax(3).to(acc),
}
_REDUCE_ROWS = {  # then across the block's rows: -> [n_br, n_bc]
    "l2": lambda r: torch.linalg.vector_norm(r, 2, dim=1),
    "l1": lambda r: r.sum(1),
    "max": lambda r: r.amax(1),
}

# Elements of X̃ decoded at a time by the tiled gradients, by device type: big enough for
# full-speed matmuls (and on CUDA for each tile's launches to cost less than its work), small enough
# that the transient stays far below the dense tensor (docs/design.md, "Backward").
TILE_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 23}


def rows_of(x3: torch.Tensor) -> torch.Tensor:
    """The [T·B, C] matrix of a row source [B, T, C] (a copy when B > 1)."""
    return x3.transpose(0, 1).reshape(x3.shape[0] * x3.shape[1], x3.shape[2])


def block_scores(x: torch.Tensor, block_shape: tuple[int, int], criterion: str) -> torch.Tensor:
    """Score every block of x [M, K]; returns float32 [n_br, n_bc].

    l2 / l1 / max = the block's Frobenius norm / sum of |x| / max |x|, accumulated in float32
    (float64 for float64 input).
    A block holding NaN or ±Inf scores +inf, so it always ranks first and is kept: a non-finite
    activation is never dropped silently, it reaches the weight gradient as it would in dense.
    """
    # Two single-dim reductions: faster on CPU than one over dims (1, 3) (docs/design.md).
    acc = torch.promote_types(x.dtype, torch.float32)
    per_row = _REDUCE_COLS[criterion](blocked_view(x, block_shape), acc)
    return _REDUCE_ROWS[criterion](per_row).float().nan_to_num_(nan=math.inf, posinf=math.inf)


def low_bit_code(
    x: torch.Tensor, block_shape: tuple[int, int], bits: int, key: int | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``storage.LowBitBlocks`` codes and scales of x [M, K] (padded to whole blocks).

    Element v of a block with scale s = max |block| lies u = (v / s + 1) · L / 2 levels above −s,
    L = 2^bits − 1. Its code is stochastic rounding of u in fixed point with 8 fraction bits:
    q = int(v · c + 128·L + ½), c = 128·L / max(s, 1e-30) (float32, each operation rounded, no
    fused multiply-add), so q = round(256·u); the code is (q + byte) >> 8, clamped to L, byte the
    element's random byte (``rng.random_bytes(key, i)``, i its row-major index in the padded
    tensor; the key an int or, traced, a 0-d int64 tensor). Its expectation is q / 256:
    unbiased to 1/512 of a level. One multiply-add per element and no division (docs/design.md,
    "Remainder"). A block holding NaN/±Inf has scale NaN and all-zero codes, so it decodes to NaN
    (such blocks score +inf and are kept exactly when any block is kept)."""
    blocks = blocked_view(x.contiguous(), block_shape)  # row-major, so flat order = index
    levels = top_code(bits)
    scales = blocks.abs().amax(dim=(1, 3)).float()  # [n_br, n_bc]
    # A true division (``scalar / tensor`` would multiply by a rounded reciprocal).
    c = torch.full_like(scales, 128 * levels).div_(scales.clamp_min(1e-30))
    fixed = (blocks.float() * c[:, None, :, None]).add_(128 * levels + 0.5).to(torch.int32)
    # The blocked view of the padded tensor is a view: its flat order is the padded row-major one.
    index = torch.arange(fixed.numel(), device=x.device).view(fixed.shape)
    codes = fixed.add_(rng.random_bytes(key, index)).bitwise_right_shift_(8).clamp_(0, levels)
    finite = scales.isfinite()  # amax is NaN with a NaN, +inf with an infinity
    codes = torch.where(finite[:, None, :, None], codes, 0)
    scales = torch.where(finite, scales, torch.nan)
    return pack_codes(codes.to(torch.uint8).view(-1), bits), scales


def score_blocks(
    x3: torch.Tensor,
    block_shape: tuple[int, int],
    criterion: str,
    bits: int,
    key: int | torch.Tensor,
    ccol: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scores, codes, low_scales) of the row source x3: ``block_scores`` of its rows and, with
    ``bits`` > 0, their ``low_bit_code`` under ``key`` (empty tensors when ``bits`` is 0).
    ``ccol``, when given, is zeroed: the offsets of an empty selection (uniform quantization),
    which the fast backends write in the same pass."""
    if ccol is not None:
        ccol.zero_()
    x = rows_of(x3)
    scores = block_scores(x, block_shape, criterion)
    if not bits:
        return scores, x.new_empty(0, dtype=torch.uint8), x.new_empty(0, dtype=torch.float32)
    return scores, *low_bit_code(x, block_shape, bits, key)


def _first_true(mask: torch.Tensor, size: int, fill: int) -> torch.Tensor:
    """int64 [size]: the first `size` indices where the 1-D mask is true, padded with `fill`."""
    try:
        return torch.nonzero_static(mask, size=size, fill_value=fill).squeeze(1)
    except NotImplementedError:  # CUDA before torch 2.6 has only the data-dependent nonzero
        found = torch.nonzero(mask).squeeze(1)[:size]
        return torch.nn.functional.pad(found, (0, size - found.numel()), value=fill)


def select_blocks(
    scores: torch.Tensor, k: int, *, per_column: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch version of ``kernels.select_blocks`` (static shapes: runs on "meta" too)."""
    if k == 0:  # uniform quantization keeps no block
        empty = torch.empty(0, device=scores.device, dtype=torch.int32)
        return empty, empty, torch.zeros(scores.shape[1] + 1, device=scores.device,
                                         dtype=torch.int32)  # fmt: skip
    if per_column:
        return _select_per_column(scores, k)
    n_br, n_bc = scores.shape
    flat = scores.reshape(-1)  # row-major block ids: id = row * n_bc + col (a view, no copy)
    n = flat.numel()
    # Every block above the k-th largest score is kept; ties at it go to the lowest ids. topk and
    # fixed-size nonzero keep the transient memory well below a full sort (docs/design.md,
    # "Selection") and every shape static, so this also runs on the meta device.
    threshold = torch.topk(flat, k, sorted=False).values.min()
    above = _first_true(flat > threshold, k, fill=n)
    tied = _first_true(flat == threshold, k, fill=n)
    n_above = (above < n).sum()
    tied = torch.where(torch.arange(k, device=flat.device) < k - n_above, tied, n)
    kept = torch.cat([above, tied]).sort().values[:k]  # the k valid ids sort before the fill
    rows, cols = kept // n_bc, kept % n_bc
    order = torch.sort(cols * n_br + rows).indices  # BSC: by block-column, then block-row
    rows, cols = rows[order], cols[order]
    # Offsets by binary search rather than bincount: static shapes, so this also runs on "meta".
    bounds = torch.arange(n_bc + 1, device=scores.device, dtype=cols.dtype)
    ccol = torch.searchsorted(cols, bounds, out_int32=True)
    return rows.int(), cols.int(), ccol


def _select_per_column(
    scores: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """select_blocks with ``per_column``: the same threshold-and-ties rule within each column."""
    n_br, n_bc = scores.shape
    threshold = torch.topk(scores, k, dim=0, sorted=False).values.amin(0)  # [n_bc]
    above = scores > threshold
    tied = scores == threshold
    room = k - above.sum(0)  # ties each column still takes, lowest block-rows first
    keep = above | (tied & (tied.cumsum(0) <= room))
    # Column-major ids (col * n_br + row) come out of nonzero already in BSC order.
    ids = _first_true(keep.t().reshape(-1), n_bc * k, fill=0)
    rows, cols = ids % n_br, ids // n_br
    ccol = torch.arange(0, n_bc * k + 1, k, device=scores.device, dtype=torch.int32)
    return rows.int(), cols.int(), ccol


def pack_blocks(
    x3: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, block_shape: tuple[int, int]
) -> torch.Tensor:
    """Gather the blocks (rows[i], cols[i]) of x3's rows into values [nnz, bm, bk] (x3.dtype)."""
    return blocked_view(rows_of(x3), block_shape)[rows.long(), :, cols.long(), :]


def decode_rows(x: BlockSparse, start: int, stop: int, batch: int) -> torch.Tensor:
    """Block-rows [start, stop) of X̃ as a dense tile in x.dtype, its rows in *batch-major*
    order: the rows t·batch + b of the tile (t0 ≤ t < t1, rows past M left out) come as row
    b·(t1 − t0) + (t − t0) of the [batch·(t1 − t0), n_bc·bk] result, so that they line up with
    ``dy3[:, t0:t1].reshape(-1, N)``, a view of dy when the tile holds every token. start·bm
    must be a multiple of batch (``row_tiles``). The tile is the remainder's decoding (or zeros)
    with the kept blocks written over it; x must hold float values
    (``BlockSparse.dequantized``)."""
    (bm, bk), n_bc = x.block_shape, x.grid_shape[1]
    if x.remainder is None:
        tile = x.values.new_zeros(stop - start, bm, n_bc, bk)
    else:
        tile = x.remainder.decode(x.block_shape, x.values.dtype, start, stop)
    if x.nnz_blocks:  # (static: a traced uniform decoding has no data-dependent shape)
        here = ((x.row_indices >= start) & (x.row_indices < stop)).nonzero().squeeze(1)
        rows = x.row_indices[here].long() - start
        tile[rows, :, x.col_indices()[here].long(), :] = x.values[here]
    count = min(x.shape[0], stop * bm) - start * bm
    tile = tile.view((stop - start) * bm, n_bc * bk)[:count]
    return tile.view(count // batch, batch, n_bc * bk).transpose(0, 1).reshape(count, -1)


def _tile_elements(device: torch.device) -> int:
    """``TILE_ELEMENTS`` for a device (the CPU's figure off CUDA, "meta" included)."""
    return TILE_ELEMENTS.get(device.type, TILE_ELEMENTS["cpu"])


def row_tiles(x: BlockSparse, batch: int) -> Iterator[tuple[int, int]]:
    """Block-row ranges [start, stop) of about ``TILE_ELEMENTS`` elements each (the CPU's figure
    off CUDA, "meta" included), every start a row that is a multiple of ``batch`` (so a tile's
    rows are whole tokens of the row source)."""
    (bm, bk), (n_br, n_bc) = x.block_shape, x.grid_shape
    tile_elements = _tile_elements(x.device)
    step_rows = math.lcm(bm, batch)
    if x.remainder is not None:  # a tile's codes start on a byte: rows · n_bc·bk · bits ≡ 0 (8)
        step_rows = math.lcm(step_rows, 8 // math.gcd(n_bc * bk * x.remainder.bits, 8))
    per_step = step_rows // bm  # block-rows per step
    steps = max(1, tile_elements // (step_rows * n_bc * bk))
    for start in range(0, n_br, per_step * steps):
        yield start, min(n_br, start + per_step * steps)


def _dy_tile(dy3: torch.Tensor, start: int, stop: int, bm: int) -> torch.Tensor:
    """The rows of dy3 [B, T, N] in block-rows [start, stop), batch-major (``decode_rows``' row
    order): a view when the tile holds every token, else a tile-sized copy."""
    b, t = dy3.shape[:2]
    tile = dy3[:, start * bm // b : min(t, stop * bm // b)]
    return tile.reshape(tile.shape[0] * tile.shape[1], tile.shape[2])  # sizes: N may be 0


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def one_tile(padded_elements: int, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the weight gradient over an X̃ of ``padded_elements`` (its whole grid) is one
    decoded tile and one product (``one_tile_weight_grad``): X̃ within ``TILE_ELEMENTS`` and dy's
    ``dtype`` its own accumulator (16-bit products are accumulated in float32, tile by tile)."""
    return padded_elements <= _tile_elements(device) and _accumulator(dtype) == dtype


def one_tile_weight_grad(dy3: torch.Tensor, tile: torch.Tensor, k: int) -> torch.Tensor:
    """``weight_grad_tiled`` when ``one_tile`` holds: dyᵀ·X̃ given X̃ decoded whole (``tile``,
    batch-major rows, its width padded to whole blocks) and dy as a row source (or any shape with
    its rows in that order): one product, no accumulator and no tile planning (host time)."""
    dy = dy3.reshape(tile.shape[0], dy3.shape[-1])
    return dy.t().mm(tile[:, :k] if tile.shape[1] > k else tile)


def weight_grad_tiled(
    dy3: torch.Tensor,
    x: BlockSparse,
    decode: Callable[[BlockSparse, int, int, int], torch.Tensor],
) -> torch.Tensor:
    """dW = dyᵀ·X̃ one tile of block-rows at a time (``row_tiles``): ``decode`` gives the tile of
    X̃ in batch-major row order (``decode_rows``) and the same rows of dy, read in place, are
    multiplied into dW, so no dense copy of X̃ (or of token-major dy) ever exists. Accumulated in
    float32 for 16-bit dy; result in dy3.dtype."""
    k, (bm, bk), (n_br, n_bc), batch = x.shape[1], x.block_shape, x.grid_shape, dy3.shape[0]
    if one_tile(n_br * bm * n_bc * bk, x.device, dy3.dtype):
        return one_tile_weight_grad(dy3, decode(x, 0, n_br, batch), k)
    tiles = list(row_tiles(x, batch))
    dw = dy3.new_zeros(dy3.shape[-1], k, dtype=_accumulator(dy3.dtype))
    for start, stop in tiles:
        tile, dy = decode(x, start, stop, batch)[:, :k], _dy_tile(dy3, start, stop, bm)
        if dy.dtype == dw.dtype:
            dw.addmm_(dy.t(), tile)
        else:  # 16-bit products, accumulated in float32
            dw.add_(dy.t().mm(tile).to(dw.dtype))
    return dw.to(dy3.dtype)


def _weight_grad_by_blocks(dy: torch.Tensor, x: BlockSparse) -> torch.Tensor:
    """dW = dyᵀ·X̃ as one small matmul per kept block, summed per block-column (FLOPs ∝ density)."""
    bm, bk = x.block_shape
    n_br, n_bc = x.grid_shape
    n = dy.shape[1]
    dy_blocks = blocked_view(dy, (bm, n)).view(n_br, bm, n)  # [n_br, bm, N]
    rows, cols = x.row_indices.long(), x.col_indices().long()
    # Chunk so that the gathered dy blocks and the per-block partial products never take more than
    # a dense copy of the input would (the buffer the other path expands into).
    per_block = (bm * n + n * bk) * dy.element_size()
    chunk = max(1, x.shape[0] * x.shape[1] * dy.element_size() // per_block)
    grad = dy.new_zeros(n, n_bc * bk)
    grad_blocks = grad.view(n, n_bc, bk)
    for start in range(0, x.nnz_blocks, chunk):
        sl = slice(start, start + chunk)
        partial = torch.bmm(dy_blocks[rows[sl]].transpose(1, 2), x.values[sl])  # [c, N, bk]
        grad_blocks.index_add_(1, cols[sl], partial.transpose(0, 1))
    return grad[:, : x.shape[1]]


# The per-block path is a fixed handful of PyTorch calls (pad, gather, bmm, index_add per chunk);
# below this many multiply-adds of the dense product, one decoded tile and one matmul take less
# time than those calls do (docs/design.md, "Host cost, launches and the compiled path").
BLOCK_PATH_MIN_MACS = 1 << 22


def use_block_matmul(x: BlockSparse, n: int) -> bool:
    """CPU cost model: per-block matmuls beat dense tiles only for big blocks at low density, and
    only for products big enough to pay for the path's own calls (``BLOCK_PATH_MIN_MACS``).

    The per-block path runs at about c / density of dense speed with c = 0.2 · sqrt(bm·bk / 1024),
    fitted to measurements (docs/design.md, "Kernels and dispatch"). Never with a remainder: then
    X̃ is dense. ``n``: the gradient's rows (dy's width).
    """
    (bm, bk), (m, k) = x.block_shape, x.shape
    return (
        x.remainder is None
        and n * m * k >= BLOCK_PATH_MIN_MACS
        and x.density <= 0.2 * math.sqrt(bm * bk / 1024)
    )


def weight_grad(
    dy3: torch.Tensor,
    x: BlockSparse,
    decode: Callable[[BlockSparse, int, int, int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """dW [N, K] = dyᵀ [N, M] · X̃ [M, K], dy given as the row source dy3 [B, T, N] and X̃ as
    float blocks; result in dy3.dtype. ``decode`` writes the tiles of X̃ (default
    ``decode_rows``; the numba and meta backends pass theirs)."""
    if use_block_matmul(x, dy3.shape[-1]):
        return _weight_grad_by_blocks(rows_of(dy3), x)
    return weight_grad_tiled(dy3, x, decode or decode_rows)


def channel_scale_grad(
    dy3: torch.Tensor,
    x: BlockSparse,
    decode: Callable[[BlockSparse, int, int, int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """[K] = Σ_m dy[m, k] · X̃[m, k], dy the rows of dy3 [B, T, K]: over the kept blocks only,
    or tile by tile with a remainder or a ``decode`` (``decode_rows``' contract; the Triton
    backend passes its own); accumulated in float32, dy3.dtype out."""
    acc = _accumulator(dy3.dtype)
    if x.remainder is not None or decode is not None:
        (_, k), (bm, batch) = x.shape, (x.block_shape[0], dy3.shape[0])
        out = dy3.new_zeros(k, dtype=acc)
        for start, stop in row_tiles(x, batch):
            tile = (decode or decode_rows)(x, start, stop, batch)[:, :k]
            out += (_dy_tile(dy3, start, stop, bm).to(acc) * tile.to(acc)).sum(0)
        return out.to(dy3.dtype)
    bk = x.block_shape[1]
    n_bc = x.grid_shape[1]
    cols = x.col_indices().long()
    dy_blocks = blocked_view(rows_of(dy3), x.block_shape)[x.row_indices.long(), :, cols, :]
    partial = (dy_blocks.to(acc) * x.values.to(acc)).sum(1)  # [nnz, bk]
    out = partial.new_zeros(n_bc, bk).index_add_(0, cols, partial)
    return out.view(-1)[: x.shape[1]].to(dy3.dtype)


def activation_codes(x: torch.Tensor, code: DerivativeCode) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, nonfinite) of an activation's input x (..., K): ``code.encode(x)``, the packed
    piece index of every element, and one bit per row (last dim), set where the row holds a NaN
    or ±Inf (packed like the codes)."""
    rows = x.numel() // x.shape[-1] if x.dim() else 1
    nonfinite = ~torch.isfinite(x.reshape(rows, -1)).all(dim=1)
    return code.encode(x), pack_codes(nonfinite.to(torch.uint8), 1)


def activation_grad(
    dy: torch.Tensor, codes: torch.Tensor, nonfinite: torch.Tensor, code: DerivativeCode
) -> torch.Tensor:
    """dx = dy ⊙ q(x) from ``activation_codes``' output: NaN in every row flagged non-finite."""
    rows = dy.numel() // dy.shape[-1] if dy.dim() else 1
    dx = dy * code.derivative(codes, dy.numel(), dy.dtype).view(dy.shape)
    bad_rows = unpack_codes(nonfinite, 1, rows).bool().view(-1, 1)
    return dx.reshape(rows, -1).masked_fill(bad_rows, torch.nan).view(dy.shape)


# --- per-row codes of the input-gradient path (``rowcode``) -------------------------------------


def encode_row_codes(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of the R rows of x (..., C): scale = max|row| / (2^(bits−1) − 1) (float32
    [R], NaN for a row holding NaN/Inf), codes = round-half-even(x · (top / max|row|)) clamped to
    ±top: int8 [R, C] (8 bits) or offset by 8 and packed two to a byte over the flattened rows,
    uint8 [ceil(R·C / 2)] (4 bits). A non-finite row's codes are 0."""
    top = 2 ** (bits - 1) - 1
    xf = x.reshape(-1, x.shape[-1]).float()
    # max |x| of each row (NaN if the row holds a NaN, inf if an Inf) without an |x| temporary
    amax = torch.maximum(xf.amax(dim=-1, keepdim=True), -xf.amin(dim=-1, keepdim=True))
    finite = torch.isfinite(amax)
    scale = torch.where(finite, amax / top, torch.nan)
    inverse = torch.where(finite & (amax > 0), top / amax, 0.0)
    codes = (xf * inverse).round_().clamp_(-top, top).nan_to_num_(0.0).to(torch.int8)
    if bits == 4:
        codes = pack_codes((codes + 8).to(torch.uint8).flatten(), 4)
    return codes, scale.squeeze(-1)


def normalized_row_codes(
    x: torch.Tensor, eps: float, rms: bool, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A normalization's saved tensors from its input x (..., C): (x̂ in x's dtype, or with
    ``bits`` its codes; the codes' scales, empty without; rstd float32 (..., 1)), where
    x̂ = (x − mean) · rstd (RMSNorm, ``rms``: no mean), rstd = 1 / sqrt(mean((x − mean)²) + eps),
    all in float32."""
    xf = x.float()
    centred = xf if rms else xf - xf.mean(dim=-1, keepdim=True)
    rstd = torch.rsqrt(centred.square().mean(dim=-1, keepdim=True) + eps)
    x_hat = (centred * rstd).to(x.dtype)
    if not bits:
        return x_hat, x_hat.new_empty(0, dtype=torch.float32), rstd
    return *encode_row_codes(x_hat, bits), rstd


def norm_grad(
    dy: torch.Tensor, saved: torch.Tensor, scales: torch.Tensor, rstd: torch.Tensor,
    weight: torch.Tensor | None, rms: bool, bits: int, has_bias: bool, x_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """A normalization's (dx in ``x_dtype``, dγ, dβ) (float32 [C]; None when absent) from
    ``normalized_row_codes``' outputs (``saved``: x̂, or its codes with their ``scales``), in
    float32, with g = dy ⊙ γ:  dx = rstd · (g − x̂ · mean(g ⊙ x̂) [− mean(g), LayerNorm]),
    dγ = Σ_rows dy ⊙ x̂, dβ = Σ_rows dy."""
    if bits:
        saved = decode_row_codes(saved, scales.reshape(-1), dy.shape[-1], x_dtype, bits)
    x_hat, dyf = saved.view(dy.shape).float(), dy.float()
    g = dyf * weight.float() if weight is not None else dyf
    dx = g - x_hat * (g * x_hat).mean(dim=-1, keepdim=True)
    if not rms:
        dx = dx - g.mean(dim=-1, keepdim=True)
    rows = tuple(range(dy.dim() - 1))
    dw = None if weight is None else (dyf * x_hat).sum(dim=rows)
    return (dx * rstd).to(x_dtype), dw, dyf.sum(dim=rows) if has_bias else None


def decode_row_codes(
    codes: torch.Tensor, scales: torch.Tensor, cols: int, dtype: torch.dtype, bits: int
) -> torch.Tensor:
    """x̃ [R, C] in ``dtype`` from ``encode_row_codes``' outputs: codes · scale (float32), NaN rows
    NaN."""
    if bits == 4:
        codes = unpack_codes(codes, 4, scales.numel() * cols).view(-1, cols).to(torch.int8) - 8
    return (codes.view(-1, cols).float() * scales.unsqueeze(-1)).to(dtype)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A dropout's bool mask as bits, 8 to a byte in flat order (first element in the lowest
    bit; the last byte zero-padded): uint8 [ceil(numel / 8)]."""
    # Traced, a conversion: torch 2.11's inductor cannot lower a bool tensor viewed as uint8.
    as_bytes = mask.to if torch.compiler.is_compiling() else mask.view
    return pack_codes(as_bytes(torch.uint8).flatten(), 1)


def dropout_grad(dy: torch.Tensor, packed: torch.Tensor, scale: float) -> torch.Tensor:
    """dx of a dropout from its packed mask (``pack_mask``): ``native_dropout_backward``, i.e.
    dy · mask · scale (a dropped element of a NaN dy stays NaN, as dense)."""
    # != 0, not a view as bool: inductor's C++ for a uint8 buffer read as bool did not compile
    mask = unpack_codes(packed, 1, dy.numel()).view(dy.shape) != 0
    return torch.ops.aten.native_dropout_backward(dy, mask, scale)
