"""Layers whose saved activations are compressed for backward, and nothing else changes.

For y = x·Wᵀ + b, backward needs x only for dW = dyᵀ·x; dx = dy·W and db = Σ dy never read it.
The same holds for a per-channel scale y = α ⊙ x (+ β): dx = dy ⊙ α, and only dα = Σ dy ⊙ x reads
x. So those inputs are kept block-sparse (``actprune.compress``): the output and the input
gradient stay exact and only the parameter gradient sees the pruned input (Barley & Fröning 2023,
arXiv 2311.16883). GELU's input is on the input-gradient path; it is kept as a low-bit code of
gelu' (``derivative_code``). The computations are registered operators (``ops.py``), so
torch.compile keeps them whole and saves only the compressed tensors.

In eager mode a tensor is compressed once per config even when several layers read it (q, k and v
projections of one input): the later layers reuse the first one's tensors, so autograd holds one
copy (``SavedTensorLog.shared_bytes`` reports it).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .config import PruneConfig
from .models.resmlp import Affine, LayerScale

_exact = False  # set by exact_gradients(): every layer here runs its dense original


@contextlib.contextmanager
def exact_gradients() -> Iterator[None]:
    """Within this block actprune layers compute and save exactly what their dense originals do
    (for measuring how far the compressed gradients are from the exact ones)."""
    global _exact
    previous, _exact = _exact, True
    try:
        yield
    finally:
        _exact = previous


class _CompressionCache:
    """Compressed tensors of recent inputs, so a tensor read by several layers is compressed (and
    saved) once. Holds only weak references: an entry lives while autograd keeps its tensors and
    is valid while the input is the same, unmodified tensor (its version counter)."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple] = {}

    def get(self, x: torch.Tensor, key: tuple) -> tuple[torch.Tensor, ...] | None:
        entry = self._entries.get(id(x))
        if entry is None:
            return None
        x_ref, version, entry_key, refs = entry
        tensors = tuple(r() for r in refs)
        if x_ref() is not x or version != x._version or entry_key != key or None in tensors:
            return None
        return tensors

    def put(self, x: torch.Tensor, key: tuple, tensors: tuple[torch.Tensor, ...]) -> None:
        ident = id(x)
        drop = self._entries.pop
        x_ref = weakref.ref(x, lambda _: drop(ident, None))
        self._entries[ident] = (x_ref, x._version, key, tuple(weakref.ref(t) for t in tensors))


_cache = _CompressionCache()


def compressed_rows(x: torch.Tensor, config: PruneConfig) -> tuple[torch.Tensor, ...]:
    """``ops.compress_rows`` of x, reusing an earlier call's tensors for the same x and config."""
    args = ops.config_args(config)
    if torch.compiler.is_compiling():
        return ops.compress_rows(x.detach(), *args)
    found = _cache.get(x, args)
    if found is None:
        found = ops.compress_rows(x.detach(), *args)
        _cache.put(x, args, found)
    return found


def _nothing_saved(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """compress_rows' outputs when no parameter gradient needs the input: empty tensors."""
    empty = x.new_empty(0)
    return empty, empty.int(), empty.int(), empty.float(), empty.to(torch.uint8), empty.float()


def _needs_graph(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    return (
        not _exact
        and torch.is_grad_enabled()
        and x.numel() > 0
        and (x.requires_grad or any(p is not None and p.requires_grad for p in params))
    )


class _Compressed:
    """What every actprune layer shares: its config and how it is built from a dense module."""

    config: PruneConfig
    dense_class: type[nn.Module]  # what it is built from and restored to

    @classmethod
    def from_module(cls, module: nn.Module, config: PruneConfig) -> nn.Module:
        """An instance holding the very same Parameter objects (and hooks) as ``module``."""
        if not isinstance(module, cls.dense_class):
            dense = cls.dense_class
            raise TypeError(
                f"{cls.__name__} is built from a {dense.__module__}.{dense.__qualname__} "
                f"(or subclass), got {type(module).__name__}"
            )
        new = rebuild_as(cls, module)
        new.config = _check_config(config)
        return new


class PrunedLinear(_Compressed, nn.Linear):
    """nn.Linear that keeps only the top-magnitude blocks of its input for the weight gradient.

    Same parameters, state_dict and forward output as nn.Linear. The saved input costs about
    (1 - sparsity) of nn.Linear's, plus 4 bytes per kept block and per block-column of indices.
    Build one from an existing layer with ``PrunedLinear.from_linear`` (shares the Parameters) or
    convert a whole model with ``actprune.prune_activations_``.
    """

    dense_class = nn.Linear

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        config: PruneConfig,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.config = _check_config(config)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: PruneConfig) -> PrunedLinear:
        """A PrunedLinear holding the very same Parameter objects (and hooks) as ``linear``."""
        return cls.from_module(linear, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"PrunedLinear expects input of shape (..., {self.in_features}), "
                f"got {tuple(x.shape)}"
            )
        weight, bias = self.weight, self.bias
        if not _needs_graph(x, weight, bias):
            return F.linear(x, weight, bias)
        kind = x.device.type
        if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
            # Cast as autocast casts linear's arguments, so the op computes, and the compressed
            # input is kept, in the autocast dtype (the op itself is opaque to autocast).
            dtype = torch.get_autocast_dtype(kind)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        saved = compressed_rows(x, self.config) if self.weight.requires_grad else _nothing_saved(x)
        c = self.config
        return ops.pruned_linear(x, weight, bias, *saved, c.row_order, c.remainder_bits)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {_describe(self.config)}"


class _PrunedChannelScale(_Compressed):
    """Shared forward of the per-channel scales: y = x ⊙ scale (+ shift)."""

    param_names: tuple[str, str | None]  # (scale, shift) attribute names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale_name, shift_name = self.param_names
        scale, shift = getattr(self, scale_name), shift_name and getattr(self, shift_name)
        if x.dim() == 0 or x.shape[-1] != scale.numel():
            raise ValueError(
                f"{type(self).__name__} expects input of shape (..., {scale.numel()}), "
                f"got {tuple(x.shape)}"
            )
        if not _needs_graph(x, scale, shift):
            return x * scale if shift is None else torch.addcmul(shift, scale, x)
        saved = compressed_rows(x, self.config) if scale.requires_grad else _nothing_saved(x)
        c = self.config
        return ops.pruned_channel_scale(x, scale, shift, *saved, c.row_order, c.remainder_bits)

    def extra_repr(self) -> str:
        return _describe(self.config)


class PrunedAffine(_PrunedChannelScale, Affine):
    """ResMLP's Affine (α ⊙ x + β) keeping a block-sparse x for dα; output, dx and dβ exact."""

    dense_class = Affine
    param_names = ("alpha", "beta")


class PrunedLayerScale(_PrunedChannelScale, LayerScale):
    """LayerScale (x ⊙ s) keeping a block-sparse x for ds; output and dx exact."""

    dense_class = LayerScale
    param_names = ("scale", None)


class CodedGELU(_Compressed, nn.GELU):
    """nn.GELU that keeps a ``config.gelu_bits``-bit code of gelu'(x) instead of x.

    The output is exactly nn.GELU's; dx = dy ⊙ q(x), q the piecewise-constant derivative of
    ``actprune.derivative_code`` (error bounds there). 2 bits keep 1/16 of fp32 x, 4 bits 1/8.
    """

    dense_class = nn.GELU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _needs_graph(x):
            return F.gelu(x, approximate=self.approximate)
        bits = self.config.gelu_bits
        codes = ops.gelu_code(x, bits, self.approximate)
        return ops.coded_gelu(x, codes, bits, self.approximate)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gelu_bits={self.config.gelu_bits}"


def _describe(config: PruneConfig) -> str:
    bm, bk = config.block_shape
    text = (
        f"sparsity={config.sparsity}, block_size=({bm}, {bk}), criterion={config.criterion!r}, "
        f"selection={config.selection!r}"
    )
    text += ", int8=True" if config.int8 else ""
    return text + (f", remainder_bits={config.remainder_bits}" if config.remainder_bits else "")


def rebuild_as(cls: type[nn.Module], module: nn.Module, drop: tuple[str, ...] = ()) -> nn.Module:
    """A ``cls`` instance with module's state: the same Parameters, buffers, children and hooks in
    fresh containers (so the two modules can diverge), minus the attributes named in ``drop``."""
    new = cls.__new__(cls)
    state = {k: v.copy() if isinstance(v, dict) else v for k, v in module.__dict__.items()}
    new.__dict__.update({k: v for k, v in state.items() if k not in drop})
    return new


def _check_config(config: object) -> PruneConfig:
    if not isinstance(config, PruneConfig):
        raise TypeError(f"config must be an actprune.PruneConfig, got {type(config).__name__}")
    return config
