"""Layers whose saved activations are compressed for backward, and nothing else changes.

For y = x·Wᵀ + b, backward needs x only for dW = dyᵀ·x; dx = dy·W and db = Σ dy never read it.
The same holds for a per-channel scale y = α ⊙ x (+ β): dx = dy ⊙ α, and only dα = Σ dy ⊙ x reads
x. So those inputs are kept block-sparse (``actprune.compress``): the output and the input
gradient stay exact and only the parameter gradient sees the pruned input (Barley & Fröning 2023,
arXiv 2311.16883). An activation's input is on the input-gradient path; it is kept as a low-bit
code of the derivative (``derivative_code``; ReLU: an exact 1-bit mask). The computations are
autograd Functions around registered kernel operators (``ops.py``): torch.compile traces the
Functions (inductor fuses the layer's own PyTorch ops, and with PyTorch's backend the uniform
compression and the activation codes too), keeps the kernels whole and saves only the compressed
tensors.

In eager mode a tensor is compressed once per config even when several layers read it (q, k and v
projections of one input): the later layers reuse the first one's tensors, so autograd holds one
copy (``SavedTensorLog.shared_bytes`` reports it). The reuse is keyed by the tensor object and its
version counter, so an in-place change between two readers (``add_``, ``mul_``, also on a view)
makes the second compress again. A change through ``.data`` bypasses the version counter (as it
bypasses autograd's own checks) and is not seen: the second layer would reuse the stale copy.
A Linear whose input is a converted norm's output keeps no copy at all: it reads what the norm
saved (``norm_input``).
"""

from __future__ import annotations

import contextlib
import functools
import operator
import threading
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from . import kernels, norm_input, ops, rng
from .blocksparse import Codec, codec_for, traced_compress, traced_compression
from .config import PruneConfig
from .storage import Parts, empty_parts

_exact = threading.local()  # .on, set by exact_gradients(): every layer runs its dense original


@contextlib.contextmanager
def exact_gradients() -> Iterator[None]:
    """Within this block every actprune layer computes and saves exactly what its dense original
    does: for measuring how far the compressed gradients are from the exact ones. It applies to
    forward passes run in this thread only; other threads keep compressing.

    Returns:
        A context manager; nothing is yielded.

    Example:
        >>> import torch
        >>> from actprune import PruneConfig, exact_gradients, prune_activations_
        >>> model = prune_activations_(torch.nn.Linear(64, 8), PruneConfig(0.9, 16))
        >>> x = torch.randn(32, 64)
        >>> with exact_gradients():
        ...     model(x).sum().backward()
        >>> torch.allclose(model.weight.grad, torch.ones(8, 32) @ x)
        True
    """
    previous, _exact.on = getattr(_exact, "on", False), True
    try:
        yield
    finally:
        _exact.on = previous


class _CompressionCache:
    """Compressed tensors of recent inputs, so a tensor read by several layers is compressed (and
    saved) once. Holds only weak references: an entry lives while autograd keeps its tensors and
    is valid while the input is the same, unmodified tensor (its version counter)."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple] = {}

    def get(self, x: torch.Tensor, key: object) -> Parts | None:
        entry = self._entries.get(id(x))
        if entry is None:
            return None
        x_ref, version, entry_key, refs = entry
        if x_ref() is not x or version != x._version or entry_key is not key:
            return None
        tensors = tuple(map(operator.call, refs))
        # not ``None in tensors``: that compares None to every tensor with ==, an op each
        return None if any(map(_is_none, tensors)) else tensors

    def put(self, x: torch.Tensor, key: object, tensors: Parts) -> None:
        ident = id(x)
        drop = self._entries.pop
        x_ref = weakref.ref(x, lambda _: drop(ident, None))
        self._entries[ident] = (x_ref, x._version, key, tuple(map(weakref.ref, tensors)))


_is_none = functools.partial(operator.is_, None)


_cache = _CompressionCache()


def compressed_rows(x: torch.Tensor, codec: Codec, stream: int = 0) -> Parts:
    """``codec.compress(x)`` (drawn from ``rng.stream(stream)``), reusing an earlier call's
    tensors for the same x and codec (drawn from whichever stream compressed it first)."""
    found = _cache.get(x, codec)
    if found is None:  # the codec reads x detached: records no graph, grad mode or not
        found = codec.compress(x, rng.stream(stream))
        _cache.put(x, codec, found)
    return found


def _compressed_input(
    x: torch.Tensor, config: PruneConfig, stream: int, param: torch.Tensor
) -> tuple[Parts, Codec | PruneConfig]:
    """What a layer's Function saves of its input x, and what it reads it back with, for the
    gradient of ``param`` (every part absent when it needs none): in eager mode the codec's
    parts (``compressed_rows``) and the codec; under torch.compile the traced compression's
    (``blocksparse.traced_compression``: PyTorch ops that inductor fuses, its key from
    ``ops.next_key``) or ``ops.compress_rows``' (opaque), and the config."""
    needed = param.requires_grad
    if torch.compiler.is_compiling():
        if not needed:
            return empty_parts(x.device, x.dtype, config.block_shape), config
        if traced_compression(config, x):
            return traced_compress(x, config, ops.next_key(x, param, stream)), config
        return ops.compress_rows(x.detach(), config.to_json(), stream), config
    codec = codec_for(config, x.shape, x.dtype, x.device)
    return (compressed_rows(x, codec, stream) if needed else codec.nothing_saved), codec


def compressing() -> bool:
    """Whether a forward run now keeps compressed tensors: autograd records, and no
    ``exact_gradients()`` block is active in this thread."""
    return torch.is_grad_enabled() and not getattr(_exact, "on", False)


def _needs_graph(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    return (
        compressing()
        and x.numel() > 0
        and (x.requires_grad or any(p is not None and p.requires_grad for p in params))
    )


_autocast_available = functools.cache(torch.amp.is_autocast_available)  # per call: host time
# One C call that is False while autocast is off on every device: the common case, answered
# without building x's device (private to torch, hence the fallback: always ask per device).
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast now casts to on x's device, or None when it is off there."""
    if not _any_autocast():
        return None
    kind = x.device.type
    if _autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


def autocast_of(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """The autocast now active for x's device, as a context to enter again later: autocast is
    off during backward, and a backward that recomputes forward work must compute it in the
    forward's dtypes."""
    dtype = _autocast_dtype(x)
    return contextlib.nullcontext() if dtype is None else torch.autocast(x.device.type, dtype=dtype)


class CompressedLayer:
    """What every actprune layer shares: its config and how it is built from a dense module."""

    # Not ``config``: Hugging Face modules (attention, MLP) keep their model's config under it.
    prune_config: PruneConfig
    dense_class: type[nn.Module]  # what it is built from and restored to
    saved_for: str  # what backward reads the saved tensor for (``describe``)
    # The random stream of the model it belongs to (set by ``prune_activations_``); None: the
    # calling thread's (``actprune.rng``).
    stream: rng.Stream | None = None

    @property
    def stream_id(self) -> int:
        """The id of ``stream`` as the operators take it (0: the calling thread's)."""
        return 0 if self.stream is None else self.stream.id

    @classmethod
    def from_module(cls, module: nn.Module, config: PruneConfig) -> nn.Module:
        """An instance holding the very same Parameter objects (and hooks) as ``module``."""
        if not isinstance(module, cls.dense_class):
            dense = cls.dense_class
            raise TypeError(
                f"{cls.__name__} is built from a {dense.__module__}.{dense.__qualname__} "
                f"(or subclass), got {type(module).__name__}"
            )
        new = rebuild_as(_with_parametrizations(cls, module), module)
        new.prune_config = check_config(config)
        return new

    @classmethod
    def applies(cls, config: PruneConfig) -> bool:
        """Whether this class converts under ``config`` within its registered scopes: a layer
        that exists for an opt-in field (``norm_bits``, ``attention_bits``) answers from it."""
        return True

    @classmethod
    def convertible(cls, module: nn.Module) -> bool:
        """Whether this dense ``module`` (an instance of ``dense_class``) can be converted
        without changing its output; a subclass refuses configurations it cannot reproduce."""
        return True

    def describe(self) -> str:
        """How this layer keeps its saved tensor (``describe_compression``)."""
        c = self.prune_config
        bm, bk = c.block_shape
        if c.uniform:
            return f"every element at {c.remainder_bits} bits, one scale per {bm}x{bk} block"
        values = "int8 + per-block scale" if c.int8 else "native dtype"
        how = f"sparsity {c.sparsity:g}, {bm}x{bk} blocks, {c.selection} top-k, {values}"
        return how + (f"; dropped blocks at {c.remainder_bits} bits" if c.remainder_bits else "")


def linear_keeping_compressed_input(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    config: PruneConfig,
    stream: int = 0,
) -> torch.Tensor:
    """F.linear(x, weight, bias), keeping x compressed with ``config`` for dW: the computation of
    every pruned linear layer (``PrunedLinear``; GPT-2's Conv1D passes its weight transposed).
    ``stream``: the ``rng.Stream`` id its rounding draws from (``CompressedLayer.stream_id``)."""
    if not _needs_graph(x, weight, bias):
        return F.linear(x, weight, bias)
    compiling = torch.compiler.is_compiling()
    norm = None if compiling or not weight.requires_grad else norm_input.find(x)
    dtype = _autocast_dtype(x)
    if dtype is not None:
        # Cast as autocast casts linear's arguments, so the Function computes, and the
        # compressed input is kept, in the autocast dtype (the compression's kernels are
        # opaque to autocast).
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if norm is not None:  # a norm's output: its saved x̂ serves dW (norm_input)
        return norm_input.NormInputLinearFunction.apply(x, weight, bias, norm)
    parts, reader = _compressed_input(x, config, stream, weight)
    return ops.PrunedLinearFunction.apply(x, weight, bias, parts, reader)


class PrunedLinear(CompressedLayer, nn.Linear):
    """nn.Linear that keeps a block-sparse copy of its input for the weight gradient only.

    Same parameters, state_dict, forward output, input gradient and bias gradient as nn.Linear;
    dW = dyᵀ·X̃ with X̃ the compressed input. The saved input costs about (1 - sparsity) of
    nn.Linear's, plus 4 bytes per kept block and per block-column of indices.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.

    Keyword args:
        config: the ``PruneConfig`` the saved input is compressed with.

    Example:
        >>> import torch
        >>> from actprune import PruneConfig, PrunedLinear
        >>> layer = PrunedLinear.from_linear(torch.nn.Linear(64, 32), PruneConfig(0.5, 16))
        >>> layer(torch.randn(8, 64, requires_grad=True)).shape
        torch.Size([8, 32])
    """

    dense_class = nn.Linear
    saved_for = "input (for the weight gradient)"

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
        self.prune_config = check_config(config)

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
        return linear_keeping_compressed_input(
            x, self.weight, self.bias, self.prune_config, self.stream_id
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {_describe(self.prune_config)}"


class PrunedTransposedLinear(CompressedLayer):
    """Base of the linear layers that store their weight as [in, out] (y = x·W + b, W =
    ``self.weight``, ``self.bias`` or None): GPT-2's Conv1D and the like. Output, input gradient
    and bias gradient are the dense layer's; dW = (dyᵀ·X̃)ᵀ with X̃ the compressed input, as for
    ``PrunedLinear`` (the op sees the weight transposed, a view: no copy). A subclass names its
    dense class (second base) and is registered with ``actprune.register_conversion``; the dense
    class's forward must compute exactly ``x·W + b`` (``torch.addmm`` of the flattened rows).

    Attributes:
        weight: [in, out] Parameter; bias: [out] Parameter or None (the dense class's).
        prune_config: the ``PruneConfig`` the saved input is compressed with.
        dense_class: the class it is built from and restored to (set by ``register_conversion``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from actprune import PruneConfig, PrunedTransposedLinear, register_conversion
        >>> class Proj(nn.Module):                      # a user's own [in, out] projection
        ...     def __init__(self, n_in, n_out):
        ...         super().__init__()
        ...         self.weight = nn.Parameter(torch.randn(n_in, n_out))
        ...         self.bias = nn.Parameter(torch.zeros(n_out))
        ...     def forward(self, x):
        ...         return torch.addmm(self.bias, x.view(-1, x.shape[-1]), self.weight).view(
        ...             *x.shape[:-1], -1)
        >>> @register_conversion(Proj, scopes=("linear", "all"))
        ... class PrunedProj(PrunedTransposedLinear, Proj):
        ...     pass
        >>> PrunedProj.from_module(Proj(64, 32), PruneConfig(0.5, 16))(torch.randn(8, 64)).shape
        torch.Size([8, 32])
    """

    saved_for = "input (for the weight gradient)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_in = self.weight.shape[0]
        if x.dim() == 0 or x.shape[-1] != n_in:
            raise ValueError(f"{type(self).__name__} expects input of shape (..., {n_in}), got "
                             f"{tuple(x.shape)}")  # fmt: skip
        return linear_keeping_compressed_input(
            x, self.weight.t(), self.bias, self.prune_config, self.stream_id
        )


def scale_channels(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor | None,
    config: PruneConfig,
    stream: int = 0,
) -> torch.Tensor:
    """x ⊙ scale (+ shift), one value per channel (last dim), keeping x compressed with
    ``config`` for the gradient of ``scale``: the computation of every ``PrunedChannelScale``,
    also for a scale that is a bare Parameter inside a block's forward."""
    if not _needs_graph(x, scale, shift):
        return x * scale if shift is None else torch.addcmul(shift, scale, x)
    parts, reader = _compressed_input(x, config, stream, scale)
    return ops.PrunedChannelScaleFunction.apply(x, scale, shift, parts, reader)


class PrunedChannelScale(CompressedLayer):
    """Base of the compressing per-channel scales y = x ⊙ scale (+ shift).

    dx = dy ⊙ scale and d shift = Σ dy never read x; only d scale = Σ_rows dy ⊙ x does, so x is
    kept compressed for it. A subclass names the dense class it is built from (its second base),
    the attribute names of its parameters, and is registered with
    ``actprune.register_conversion``; the dense class's forward must compute exactly
    ``x * scale`` or ``addcmul(shift, scale, x)`` with one value per channel (last dim of x).

    Attributes:
        param_names: (scale, shift) attribute names of the parameters; shift may be None.
        prune_config: the ``PruneConfig`` the saved input is compressed with.
        dense_class: the class it is built from and restored to (set by ``register_conversion``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from actprune import PruneConfig, PrunedChannelScale, register_conversion
        >>> class Gain(nn.Module):                      # a user's own per-channel layer
        ...     def __init__(self, dim):
        ...         super().__init__()
        ...         self.gain = nn.Parameter(torch.ones(dim))
        ...     def forward(self, x):
        ...         return x * self.gain
        >>> @register_conversion(Gain)
        ... class PrunedGain(PrunedChannelScale, Gain):
        ...     param_names = ("gain", None)              # (scale, shift or None)
        >>> layer = PrunedGain.from_module(Gain(64), PruneConfig(0.5, 16))
        >>> layer(torch.randn(8, 64, requires_grad=True)).shape
        torch.Size([8, 64])
    """

    param_names: tuple[str, str | None]  # (scale, shift) attribute names
    saved_for = "input (for the scale gradient)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale_name, shift_name = self.param_names
        scale, shift = getattr(self, scale_name), shift_name and getattr(self, shift_name)
        if x.dim() == 0 or x.shape[-1] != scale.numel():
            raise ValueError(
                f"{type(self).__name__} expects input of shape (..., {scale.numel()}), "
                f"got {tuple(x.shape)}"
            )
        return scale_channels(x, scale, shift, self.prune_config, self.stream_id)

    def extra_repr(self) -> str:
        return _describe(self.prune_config)


class CodedActivation(CompressedLayer):
    """Base of the activations that keep a low-bit code of their derivative instead of the input.

    The output is exactly the dense module's; dx = dy ⊙ q(x), q the piecewise-constant derivative
    of ``actprune.derivative_code`` with ``config.activation_bits`` bits (error bounds there;
    2 bits keep 1/16 of fp32 x, 4 bits 1/8), plus one bit per row (last dim) marking rows that
    hold a NaN or ±Inf: their dx is NaN, as the dense derivative is NaN at such inputs, so a
    non-finite value is never hidden. ReLU keeps an exact 1-bit mask and no row bits (its dx is
    dense ReLU's, bit for bit). An in-place dense module (``inplace=True``) becomes out-of-place
    while training: the code replaces the output autograd would otherwise hold.

    A subclass names its dense class (second base), whose forward must compute exactly that
    function, and says which function it computes (``function``: a key of
    ``derivative_code.ACTIVATIONS``, or "relu").

    Attributes:
        prune_config: its ``activation_bits`` pick the code.
        dense_class: the class it is built from and restored to (set by ``register_conversion``).

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from actprune import CodedActivation, PruneConfig, register_conversion
        >>> class Swish(nn.Module):                     # a user's own activation module
        ...     def forward(self, x):
        ...         return F.silu(x)
        >>> @register_conversion(Swish)
        ... class CodedSwish(CodedActivation, Swish):
        ...     def function(self):
        ...         return "silu"
        >>> layer = CodedSwish.from_module(Swish(), PruneConfig(0.9, scope="all"))
        >>> layer(torch.randn(8, 64, requires_grad=True)).shape
        torch.Size([8, 64])
    """

    saved_for = "input (for dx)"

    def function(self) -> str:
        """The activation this module computes (``derivative_code.ACTIVATIONS`` key or "relu")."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _needs_graph(x):
            return self.dense_class.forward(self, x)
        function = self.function()
        bits = 1 if function == "relu" else self.prune_config.activation_bits
        if torch.compiler.is_compiling():
            if kernels.traced(x):  # PyTorch ops that inductor fuses
                codes, nonfinite = ops.activation_code_parts(x, bits, function, traced=True)
            else:
                codes, nonfinite = ops.activation_code(x, bits, function)
            return ops.CodedActivationFunction.apply(x, codes, nonfinite, bits, function)
        with torch.no_grad():
            codes, nonfinite = ops.activation_code_parts(x, bits, function)
        return ops.CodedActivationFunction.apply(x, codes, nonfinite, bits, function)

    def describe(self) -> str:
        if self.function() == "relu":
            return "1-bit mask of relu' (exact)"
        return f"{self.prune_config.activation_bits}-bit code of {self.function()}'"


class CodedGELU(CodedActivation, nn.GELU):
    """nn.GELU (either ``approximate``) that keeps a ``config.activation_bits``-bit code of
    gelu'(x) instead of x (``CodedActivation``).

    Attributes:
        approximate: as ``nn.GELU``.
        prune_config: its ``activation_bits`` pick the code.

    Example:
        >>> import torch
        >>> from actprune import CodedGELU, PruneConfig, saved_activation_bytes
        >>> gelu = CodedGELU.from_module(torch.nn.GELU(), PruneConfig(0.9, scope="all"))
        >>> x = torch.randn(64, 64, requires_grad=True)
        >>> saved_activation_bytes(gelu, x)  # 2 bits per element + 1 bit per row: 1024 + 8
        1032
    """

    dense_class = nn.GELU

    def function(self) -> str:
        return "gelu" if self.approximate == "none" else "gelu_tanh"

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation_bits={self.prune_config.activation_bits}"


class CodedSiLU(CodedActivation, nn.SiLU):
    """nn.SiLU that keeps a ``config.activation_bits``-bit code of silu'(x) instead of x.

    Attributes:
        prune_config: its ``activation_bits`` pick the code.

    Example:
        >>> import torch
        >>> from actprune import CodedSiLU, PruneConfig, saved_activation_bytes
        >>> silu = CodedSiLU.from_module(torch.nn.SiLU(), PruneConfig(0.9, scope="all"))
        >>> saved_activation_bytes(silu, torch.randn(64, 64, requires_grad=True))
        1032
    """

    dense_class = nn.SiLU

    def function(self) -> str:
        return "silu"


class CodedReLU(CodedActivation, nn.ReLU):
    """nn.ReLU that keeps a 1-bit mask of where x > 0 instead of its output: exact.

    Attributes:
        inplace: as ``nn.ReLU``; converted, it computes out of place while training.

    Example:
        >>> import torch
        >>> from actprune import CodedReLU, PruneConfig, saved_activation_bytes
        >>> relu = CodedReLU.from_module(torch.nn.ReLU(), PruneConfig(0.9, scope="all"))
        >>> saved_activation_bytes(relu, torch.randn(64, 64, requires_grad=True))  # 1 bit each
        512
    """

    dense_class = nn.ReLU

    def function(self) -> str:
        return "relu"


def _describe(config: PruneConfig) -> str:
    bm, bk = config.block_shape
    text = (
        f"sparsity={config.sparsity}, block_size=({bm}, {bk}), criterion={config.criterion!r}, "
        f"selection={config.selection!r}"
    )
    text += ", int8=True" if config.int8 else ""
    return text + (f", remainder_bits={config.remainder_bits}" if config.remainder_bits else "")


def rebuild_as(cls: type[nn.Module], module: nn.Module, drop: tuple[str, ...] = ()) -> nn.Module:
    """A ``cls`` instance with module's state, minus the attributes named in ``drop``.

    Parameters, buffers and children are the same objects in fresh containers, so the two modules
    can diverge. The hook dicts are shared, not copied: a handle taken before the swap
    (``h = layer.register_forward_hook(...)``) still removes its hook from the new module."""
    new = cls.__new__(cls)
    state = {
        k: v.copy() if isinstance(v, dict) and "hooks" not in k else v
        for k, v in module.__dict__.items()
    }
    new.__dict__.update({k: v for k, v in state.items() if k not in drop})
    return new


def _with_parametrizations(cls: type[nn.Module], module: nn.Module) -> type[nn.Module]:
    """``cls``, or for a module under ``torch.nn.utils.parametrize`` (weight_norm, spectral_norm)
    a subclass of ``cls`` carrying the parametrized properties of the module's own class."""
    if not parametrize.is_parametrized(module):
        return cls
    injected = {
        k: v
        for k, v in type(module).__dict__.items()
        if isinstance(v, property) or k in ("__getstate__", "__deepcopy__")
    }
    return type(f"Parametrized{cls.__name__}", (cls,), injected)


def check_config(config: object) -> PruneConfig:
    """``config`` if it is a PruneConfig, else TypeError saying what it is."""
    if not isinstance(config, PruneConfig):
        raise TypeError(f"config must be an actprune.PruneConfig, got {type(config).__name__}")
    return config
