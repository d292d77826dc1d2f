"""Kernel benchmarks: compression and the block-sparse weight gradient against what users have.

Baselines, all measured in the same run: a plain copy of the activation (what compression must
beat in bandwidth), the dense weight gradient dyᵀ·x (cuBLAS / MKL), and torch.sparse BSR
(``to_sparse_bsr`` + BSR @ dense; on CUDA ``torch.sparse._triton_ops.bsr_dense_mm``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import kernels
from ..blocksparse import compress_rows_of, row_source
from ..config import PRESETS, PruneConfig
from . import device_name, save_results, time_ms

# ResMLP-S24's Linear shapes at batch 8, (B, T, K, N): the input x [B, T, K] (its B·T rows in
# token-major order) and N outputs: fc1, fc2, the token mixer (whose rows are B·384 channels).
RESMLP_S24_SHAPES = ((8, 196, 384, 1536), (8, 196, 1536, 384), (8, 384, 196, 196))
PRESETS_MEASURED = tuple(PruneConfig.preset(name) for name in PRESETS)


@dataclass
class KernelRow:
    """One (shape, PruneConfig) measurement; times in ms, medians."""

    batch: int  # B of the input [B, T, K]; m = B·T rows
    m: int
    k: int
    n: int
    config: str  # PruneConfig.label()
    dtype: str
    compressed_bytes: int  # what compression writes: BlockSparse.nbytes
    copy_ms: float  # x.clone(): the bandwidth floor for compression
    compress_ms: float  # what a layer runs: score + remainder code, select, pack, from [B, T, K]
    bsr_compress_ms: float | None  # mask + Tensor.to_sparse_bsr (selection given; None: shape
    # not divisible by the block, which torch.sparse BSR requires)
    dense_dw_ms: float  # dyᵀ·x
    dw_ms: float  # actprune dW = dyᵀ·X̃ from the compressed tensors (decoding included)
    bsr_dw_ms: float | None  # torch.sparse BSR dW (None where torch has no kernel for the dtype)
    backend: str

    @property
    def copy_gbps(self) -> float:
        """x.clone(): reads and writes M·K elements."""
        return 2 * self.m * self.k * _itemsize(self.dtype) / (self.copy_ms * 1e6)

    @property
    def compress_gbps(self) -> float:
        """Useful traffic of compression: read x once, write what is kept."""
        traffic = self.m * self.k * _itemsize(self.dtype) + self.compressed_bytes
        return traffic / (self.compress_ms * 1e6)

    @property
    def compress_of_copy(self) -> float:
        """Compression bandwidth as a fraction of the copy's (1: as fast as memory allows)."""
        return self.compress_gbps / self.copy_gbps

    @property
    def dw_tflops(self) -> float:
        """Effective TFLOP/s: the dense FLOP count 2·M·N·K over the measured time."""
        return 2 * self.m * self.n * self.k / (self.dw_ms * 1e9)


def _itemsize(dtype: str) -> int:
    return getattr(torch, dtype).itemsize


def _bsr_dw(dy: torch.Tensor, x_masked_t_bsr: torch.Tensor) -> Callable[[], torch.Tensor] | None:
    """dW = (X̃ᵀ·dy)ᵀ with X̃ᵀ in BSR: the way torch.sparse offers it, or None if unsupported."""
    if dy.is_cuda:
        try:
            from torch.sparse._triton_ops import bsr_dense_mm
        except ImportError:
            return None
        if bsr_dense_mm is None:
            return None
        try:  # its Triton kernel refuses some shapes (a dy width not divisible by 16)
            bsr_dense_mm(x_masked_t_bsr, dy)
        except ValueError:
            return None
        return lambda: bsr_dense_mm(x_masked_t_bsr, dy).t()
    if dy.dtype != torch.float32:  # CPU BSR @ dense is fp32-only
        return None
    return lambda: (x_masked_t_bsr @ dy).t()


def measure_kernels(
    shapes: Iterable[tuple[int, int, int, int]] = RESMLP_S24_SHAPES,
    prunes: Iterable[PruneConfig] = PRESETS_MEASURED,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    repeats: int = 10,
    progress: Callable[[str], None] | None = None,
) -> list[KernelRow]:
    """Time compression and dW for every ((B, T, K, N), PruneConfig); one row each. x and dy
    are [B, T, ·] tensors read in token-major row order, as the layers read them."""
    warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta")
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    for b, t, k, n in shapes:
        x = torch.randn(b, t, k, generator=gen).to(device, dtype)
        dy = torch.randn(b, t, n, generator=gen).to(device, dtype)
        x2d, dy2d = x.transpose(0, 1).reshape(-1, k), dy.transpose(0, 1).reshape(-1, n)
        baselines = {
            "copy_ms": time_ms(x.clone, repeats),
            "dense_dw_ms": time_ms(lambda: dy2d.t().mm(x2d), repeats),  # noqa: B023 - runs here
        }
        for prune in prunes:
            rows.append(_measure_one(x, dy, prune, baselines, repeats))
            if progress:
                progress(f"B={b} T={t} K={k} N={n} {prune.label()}: done")
    return rows


def _measure_one(
    x: torch.Tensor,
    dy: torch.Tensor,
    config: PruneConfig,
    baselines: dict[str, float],
    repeats: int,
) -> KernelRow:
    (b, t, k), n, (bm, bk) = x.shape, dy.shape[-1], config.block_shape
    m = b * t
    packed = compress_rows_of(x, config)
    dy2d = dy.transpose(0, 1).reshape(m, n)
    mask = packed.block_mask().repeat_interleave(bm, 0).repeat_interleave(bk, 1)[:m, :k]
    x_masked = x.transpose(0, 1).reshape(m, k) * mask
    # torch.sparse BSR needs divisible shapes and has no low-bit remainder
    bsr_ok = m % bm == 0 and k % bk == 0 and not config.remainder_bits
    bsr_dw = None
    if bsr_ok:
        bsr_dw = _bsr_dw(dy2d, x_masked.t().contiguous().to_sparse_bsr((bk, bm)))
    return KernelRow(
        batch=b,
        m=m,
        k=k,
        n=n,
        config=config.label(),
        dtype=str(x.dtype).removeprefix("torch."),
        compressed_bytes=packed.nbytes,
        compress_ms=time_ms(lambda: compress_rows_of(x, config), repeats),
        bsr_compress_ms=(
            time_ms(lambda: x_masked.to_sparse_bsr((bm, bk)), repeats) if bsr_ok else None
        ),
        dw_ms=time_ms(lambda: kernels.weight_grad(dy, packed), repeats),
        bsr_dw_ms=time_ms(bsr_dw, repeats) if bsr_dw else None,
        backend=kernels.backend_for(x),
        **baselines,
    )


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def kernel_table(rows: list[KernelRow]) -> str:
    """Markdown table; ratios > 1 mean actprune is faster than the baseline."""
    head = (
        "| B×T×K → N | config | copy ms | copy GB/s | compress ms | compress GB/s "
        "| % of copy | BSR compress ms | dense dW ms | dW ms | dW TFLOP/s (eff.) | BSR dW ms "
        "| dW speed-up vs dense | vs BSR |\n|" + "---|" * 14
    )
    lines = [head]
    for r in rows:
        vs_bsr = None if r.bsr_dw_ms is None else r.bsr_dw_ms / r.dw_ms
        lines.append(
            f"| {r.batch}×{r.m // r.batch}×{r.k} → {r.n} | {r.config} | {_fmt(r.copy_ms)} "
            f"| {r.copy_gbps:.2f} | {_fmt(r.compress_ms)} | {r.compress_gbps:.2f} "
            f"| {100 * r.compress_of_copy:.0f} % | {_fmt(r.bsr_compress_ms)} "
            f"| {_fmt(r.dense_dw_ms)} | {_fmt(r.dw_ms)} | {r.dw_tflops:.3f} | {_fmt(r.bsr_dw_ms)} "
            f"| {r.dense_dw_ms / r.dw_ms:.2f}× | {'n/a' if vs_bsr is None else f'{vs_bsr:.2f}×'} |"
        )
    return "\n".join(lines)


def write_results(
    rows: list[KernelRow], device: str, out_dir: Path, stem: str, command: str
) -> str:
    """Write ``stem``.json and ``stem``.md under out_dir; returns the markdown."""
    meta = {
        "device": device_name(device),
        "torch": torch.__version__,
        "command": command,
    }
    table = kernel_table(rows)
    md = (
        f"# Kernel benchmark on {meta['device']}\n\n"
        f"torch {meta['torch']}, kernels: {rows[0].backend if rows else 'n/a'}. "
        f"Command: `{command}`\n\n"
        "Times are medians; ratios are baseline time / actprune time (> 1: actprune faster), "
        "measured in the same run. Compress reads x [B, T, K] in token-major row order (as the "
        "layers do) and writes the compressed tensors; its GB/s count one read of x plus what "
        "is written, and % of copy compares that with x.clone(). dW includes decoding the "
        "remainder, tile by tile.\n\n"
        f"{table}\n"
    )
    save_results(out_dir, stem, md, {**meta, "rows": [asdict(r) for r in rows]})
    return md


def linear_shapes(model_name: str, batch: int, image_size: int) -> list[tuple[int, int, int, int]]:
    """Distinct (B, T, K, N) of the Linear layers of a registered model (meta-device forward):
    the input as a row source [B, T, K] (``blocksparse.row_source``) and the outputs."""
    from .. import models

    model = models.create(model_name, img_size=image_size, device="meta")
    shapes: list[tuple[int, int, int, int]] = []

    def record(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        b, t, k = row_source(args[0], "token-major").shape
        shape = (b, t, k, module.out_features)
        if shape not in shapes:
            shapes.append(shape)

    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(record)
    c = model.config.in_chans
    with torch.no_grad():
        model(torch.empty(batch, c, image_size, image_size, device="meta"))
    return shapes
