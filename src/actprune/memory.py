"""Memory accounting users can trust: bytes held for backward, and the realised peak.

Both numbers are reported because they differ: activation bytes can drop 10× while the peak of a
training step moves much less (weights, gradients, optimizer state and transient buffers stay).

- ``saved_activation_bytes``: every tensor autograd saves passes through
  ``torch.autograd.graph.saved_tensors_hooks``; the tensors still alive when ``fn`` returns are
  counted once per storage (two views of one buffer are one buffer), whole storage each, and
  Parameters (and views of them) are left out. Exact.
- ``peak_memory``: the most bytes that ``fn``'s allocations reach beyond what was allocated when it
  started. CUDA: ``torch.cuda.max_memory_allocated`` minus the start value (exact, caching
  allocator's view). CPU: PyTorch keeps no CPU allocator statistics, so glibc's ``mallinfo2()``
  (heap in use + mmapped bytes) is read after every ATen op inside a TorchDispatchMode. It counts
  every malloc of the process (autograd nodes too, not only tensors) and misses scratch buffers an
  op frees before returning. The one-time cost of the first op under a dispatch mode is paid before
  measuring; repeated runs then agree to the byte, but run ``fn`` once before measuring anyway:
  its own first call allocates thread pools and caches.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "SavedTensorLog",
    "StepMemory",
    "layer_kind",
    "measure_training_step",
    "peak_memory",
    "saved_activation_bytes",
]


class _Saved:
    """What the graph holds in place of a saved tensor: dies exactly when the graph drops it."""

    __slots__ = ("tensor", "kind", "__weakref__")

    def __init__(self, tensor: torch.Tensor, kind: str) -> None:
        self.tensor = tensor
        self.kind = kind


def layer_kind(module: nn.Module | None) -> str:
    """Short name of the kind of layer that saved a tensor: "linear" for Linear and subclasses,
    an actprune layer's dense kind ("affine" for PrunedAffine), else the class name lowered."""
    if module is None:
        return "other"
    if isinstance(module, nn.Linear):
        return "linear"
    return getattr(module, "dense_class", type(module)).__name__.lower()


class SavedTensorLog:
    """Records the tensors autograd saves while active (a context manager).

    ``live_bytes()`` sums, once per storage, those a graph still holds. Tensors alive only because
    the caller keeps a reference (an input batch after backward, say) are not counted.
    With ``by_kind=True``, ``bytes_by_kind()`` splits the same total by the kind of the innermost
    module whose forward saved each tensor (``layer_kind``; a storage saved by several kinds counts
    for the first). That needs global module hooks, which torch.compile cannot trace through, so it
    is off by default.

    Args:
        by_kind: also record which kind of layer saved each tensor (``bytes_by_kind``).

    Example:
        >>> import torch
        >>> from actprune import SavedTensorLog
        >>> layer = torch.nn.Linear(64, 32)
        >>> with SavedTensorLog(by_kind=True) as log:
        ...     out = layer(torch.randn(8, 64))           # Linear saves its input: 8·64·4 bytes
        >>> log.live_bytes(), log.bytes_by_kind()
        (2048, {'linear': 2048})
    """

    def __init__(self, by_kind: bool = False) -> None:
        self.by_kind = by_kind
        self._saved: list[weakref.ref[_Saved]] = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
        self._modules: list[nn.Module] = []
        self._handles: list[Any] = []

    def _pack(self, t: torch.Tensor) -> _Saved | torch.Tensor:
        if isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter):
            return t
        # A tensor with a grad_fn is held detached: a saved output's grad_fn is the very node that
        # holds this holder, a cycle through C++ that Python's gc cannot see (it kept every
        # measured model alive); autograd restores the grad_fn when it unpacks. Other tensors are
        # held as they are (the compressed copies: layers' dedup cache watches those objects).
        held = t.detach() if t.grad_fn is not None else t
        holder = _Saved(held, layer_kind(self._modules[-1] if self._modules else None))
        self._saved.append(weakref.ref(holder))
        return holder

    def __enter__(self) -> SavedTensorLog:
        self._hooks.__enter__()
        if not self.by_kind:
            return self
        self._handles = [
            nn.modules.module.register_module_forward_pre_hook(
                lambda m, args: self._modules.append(m)
            ),
            nn.modules.module.register_module_forward_hook(lambda m, args, out: self._pop(m)),
        ]
        return self

    def _pop(self, module: nn.Module) -> None:
        if self._modules and self._modules[-1] is module:
            self._modules.pop()

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._hooks.__exit__(*exc)

    def _live(self) -> Iterator[_Saved]:
        seen: set[int] = set()
        for ref in self._saved:
            holder = ref()
            if holder is None:
                continue
            key = holder.tensor.untyped_storage()._cdata  # the StorageImpl: shared by all views
            if key not in seen:
                seen.add(key)
                yield holder

    def live_tensors(self) -> Iterator[torch.Tensor]:
        """Saved tensors that are still alive, one per storage."""
        return (holder.tensor for holder in self._live())

    def live_bytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in self.live_tensors())

    def shared_bytes(self) -> int:
        """Bytes that several ops saved but that are held once: Σ (saves − 1) · storage bytes.

        What storing each op's saved tensors separately would add to ``live_bytes``. PyTorch
        shares a tensor saved by several ops; actprune shares one compressed copy of an input
        read by several layers (``actprune.layers``)."""
        counts: dict[int, list[int]] = {}
        for ref in self._saved:
            holder = ref()
            if holder is not None:
                storage = holder.tensor.untyped_storage()
                entry = counts.setdefault(storage._cdata, [0, storage.nbytes()])
                entry[0] += 1
        return sum((n - 1) * size for n, size in counts.values())

    def bytes_by_kind(self) -> dict[str, int]:
        if not self.by_kind:
            raise RuntimeError("bytes_by_kind needs SavedTensorLog(by_kind=True)")
        out: dict[str, int] = {}
        for holder in self._live():
            out[holder.kind] = out.get(holder.kind, 0) + holder.tensor.untyped_storage().nbytes()
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _unpack(saved: _Saved | torch.Tensor) -> torch.Tensor:
    return saved.tensor if isinstance(saved, _Saved) else saved


def saved_activation_bytes(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Bytes autograd holds for backward once ``fn(*args, **kwargs)`` has returned.

    Deduplicated by storage, Parameters excluded (see the module docstring). The graph is the one
    ``fn``'s result holds; it is released when this function returns.

    Args:
        fn: runs a forward pass (a module, or any callable) and returns what holds the graph.
        *args, **kwargs: passed to ``fn``.

    Returns:
        The bytes, exact.

    Example:
        >>> import torch
        >>> from actprune import PruneConfig, prune_activations_, saved_activation_bytes
        >>> layer, x = torch.nn.Linear(256, 256), torch.randn(256, 256)
        >>> saved_activation_bytes(layer, x)                    # the fp32 input: 256·256·4
        262144
        >>> layer = prune_activations_(layer, PruneConfig(0.875, 32))  # a new root module
        >>> saved_activation_bytes(layer, x)                    # 8 of 64 blocks + indices
        32836
    """
    with SavedTensorLog() as log:
        result = fn(*args, **kwargs)
    total = log.live_bytes()
    del result
    return total


# --- peak ---------------------------------------------------------------------------------------


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


@cache
def _malloc_in_use_reader() -> Callable[[], int]:
    """glibc's bytes in use, with the one-time cost of the first dispatch-mode op already paid."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (AttributeError, OSError) as err:
        raise RuntimeError(
            "peak_memory on CPU needs glibc >= 2.33 (mallinfo2); measure on CUDA instead"
        ) from err
    mallinfo2.restype = _Mallinfo2

    def read() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd

    with _PeakAfterEachOp(read):  # the first op under any dispatch mode allocates ~27 MB once
        torch.zeros(1).add_(1)
    return read


class _PeakAfterEachOp(TorchDispatchMode):
    def __init__(self, read: Callable[[], int]) -> None:
        super().__init__()
        self.read = read
        self.peak = read()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.read())
        return out


def _infer_device(args: tuple, kwargs: dict) -> torch.device:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
        if isinstance(value, nn.Module):
            for p in value.parameters():
                return p.device
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def peak_memory(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Peak bytes allocated while ``fn(*args, **kwargs)`` runs, beyond those live when it starts.

    The device is that of the first tensor (or module) argument; with none, CUDA when it is in use,
    else CPU. Add the bytes that were live before (parameters, optimizer state, the batch) for the
    absolute peak of a training step. See the module docstring for the method and its accuracy.

    Args:
        fn: the work to measure (a training step, say).
        *args, **kwargs: passed to ``fn``; the first tensor or module among them picks the device.

    Returns:
        The peak in bytes (CUDA: allocated by the caching allocator; CPU: glibc heap in use).

    Example:
        >>> import torch
        >>> from actprune import peak_memory
        >>> x = torch.randn(1024, 1024)
        >>> peak_memory(lambda t: (t * 2).sum(), x) >= 1024 * 1024 * 4   # the transient t * 2
        True
    """
    device = _infer_device(args, kwargs)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn(*args, **kwargs)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    read = _malloc_in_use_reader()
    with _PeakAfterEachOp(read) as mode:
        start = mode.peak
        fn(*args, **kwargs)
    return max(0, mode.peak - start)


@dataclass
class StepMemory:
    """Memory (and optionally time) of one full training step: forward, backward, optimizer.

    Attributes:
        peak_step_bytes: resident_bytes + the step's own peak (``peak_memory``).
        resident_bytes: live before the step: parameters, optimizer state, the batch.
        saved_activation_bytes: held for backward after the forward.
        saved_by_kind: the same, by kind of layer that saved it.
        shared_bytes: saved by several ops but held once (``SavedTensorLog.shared_bytes``).
        median_step_s: median wall time of the timed steps, or None.

    Example: see ``measure_training_step``, which returns one.
    """

    peak_step_bytes: int  # resident_bytes + the step's own peak (peak_memory)
    resident_bytes: int  # live before the step: parameters, optimizer state, the batch
    saved_activation_bytes: int  # held for backward after the forward
    saved_by_kind: dict[str, int]  # the same, by kind of layer that saved it
    shared_bytes: int = 0  # saved by several ops, held once (SavedTensorLog.shared_bytes)
    median_step_s: float | None = None


def _storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def measure_training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[], torch.Tensor],
    resident: Iterable[torch.Tensor] = (),
    timing_steps: int = 0,
) -> StepMemory:
    """Run warm-up, measured and timed training steps of ``model`` (it is trained by them).

    Args:
        model: the model being trained.
        optimizer: its optimizer (its state counts as resident after the warm-up step).
        loss_fn: runs the forward pass and returns the loss.
        resident: tensors that live across steps besides parameters and optimizer state (the
            batch).
        timing_steps: how many more steps to time (0: none).

    Returns:
        The ``StepMemory``: peak of the whole step, resident bytes, bytes saved for backward.

    Example:
        >>> import torch
        >>> from actprune import measure_training_step
        >>> model, x = torch.nn.Linear(64, 64), torch.randn(32, 64)
        >>> opt = torch.optim.AdamW(model.parameters())
        >>> m = measure_training_step(model, opt, lambda: model(x).square().mean(), resident=[x])
        >>> m.saved_activation_bytes   # x (for dW) and the output (for square's backward)
        16384
        >>> m.resident_bytes           # parameters, AdamW's two moments and step counters, x
        58120
    """
    anchor = next(model.parameters())

    def step(_: torch.Tensor) -> None:  # the argument tells peak_memory the device
        loss_fn().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(anchor)  # warm-up: optimizer state, thread pools, kernel caches
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    resident_bytes = _storage_bytes([*model.parameters(), *state, *resident])
    peak = peak_memory(step, anchor)
    with SavedTensorLog(by_kind=True) as log:
        loss = loss_fn()
    saved, by_kind, shared = log.live_bytes(), log.bytes_by_kind(), log.shared_bytes()
    del loss
    median = None
    if timing_steps:
        sync = torch.cuda.synchronize if anchor.is_cuda else (lambda: None)
        times = []
        for _ in range(timing_steps):
            sync()
            start = time.perf_counter()
            step(anchor)
            sync()
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
    return StepMemory(resident_bytes + peak, resident_bytes, saved, by_kind, shared, median)
