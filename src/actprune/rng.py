"""actprune's own random numbers (the remainder's stochastic rounding), apart from torch's.

A training step with compression must leave ``torch.get_rng_state()`` exactly as the dense step
leaves it: the same dropout masks, the same next ``torch.rand`` for the user. So no draw here uses a
torch generator. A ``Stream`` is counter-based, like Philox's (seed, offset): each compression
takes one 32-bit key derived from (seed, counter), and the random byte of element i is a fixed
hash of (key, i) (``random_bytes``). Because the byte of an element depends only on the key and the
element's index, every kernel backend (PyTorch, numba, Triton) computes the same bytes in whatever
order its threads visit the elements, so the backends write identical codes.

Whose counter: every model converted by ``prune_activations_`` has a stream of its own, shared by
its layers; anything else (``compress``, a layer converted on its own) draws from the calling
thread's stream. So a run repeats exactly however many runs came before it in the process, and two
models trained in two threads at once each draw their own sequence. A stream takes its seed at its
first draw: ``manual_seed``'s if one was given, else ``torch.initial_seed()`` (the seed the user
gave ``torch.manual_seed``). ``get_state`` / ``set_state`` save and restore a model's pair (training
checkpoints do, so resume stays exact).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import weakref
from collections.abc import Iterator

import torch

from .config import is_int

_MASK = (1 << 63) - 1
_MASK32 = (1 << 32) - 1
_lock = threading.Lock()  # guards the globals below
_seed: int | None = None  # manual_seed's; None: torch.initial_seed() at a stream's first draw
_streams: weakref.WeakValueDictionary[int, Stream] = weakref.WeakValueDictionary()
_ids = itertools.count(1)  # 0 names the calling thread's stream
_local = threading.local()  # .stream: this thread's stream


class Stream:
    """One sequence of keys: the pair (seed, counter), counter + 1 per key.

    A model's layers share one (``prune_activations_`` sets it); operators find it by ``id``
    (``stream``). Copies (``copy.deepcopy``, pickling) are new streams in the same state.

    Args:
        seed: the seed, or None to take it at the first draw (see the module docstring).
        counter: keys drawn so far.
    """

    def __init__(self, seed: int | None = None, counter: int = 0) -> None:
        self._lock = threading.Lock()
        self.seed, self.counter = seed, counter
        with _lock:
            self.id = next(_ids)
            _streams[self.id] = self

    def next_key(self) -> int:
        """The key of one compression's random bytes, in [0, 2^32): a hash of (seed, counter),
        then counter + 1."""
        with self._lock:
            if self.seed is None:
                self.seed = _default_seed()
            seed, counter = self.seed, self.counter
            self.counter += 1
        # Distinct, well-spread keys for consecutive counters (a 64-bit LCG step of the pair).
        mixed = (seed * 6364136223846793005 + counter * 1442695040888963407 + 1) & _MASK
        return (mixed ^ (mixed >> 32)) & _MASK32

    def get_state(self) -> dict[str, int]:
        """``{"seed": ..., "counter": ...}`` (plain ints; the seed it would take if none yet)."""
        with self._lock:
            return {"seed": _default_seed() if self.seed is None else self.seed,
                    "counter": self.counter}  # fmt: skip

    def set_state(self, state: dict[str, int]) -> None:
        """Restore a state from ``get_state``; ValueError if it is not one."""
        problem = state_problem(state)
        if problem:
            raise ValueError(f"not an actprune.rng state: {problem}")
        with self._lock:
            self.seed, self.counter = int(state["seed"]), int(state["counter"])

    def __deepcopy__(self, memo: dict) -> Stream:
        return Stream(self.seed, self.counter)

    def __reduce__(self) -> tuple:
        return (Stream, (self.seed, self.counter))

    def __repr__(self) -> str:
        return f"Stream(seed={self.seed}, counter={self.counter})"


def _default_seed() -> int:
    return torch.initial_seed() if _seed is None else _seed


def thread_stream() -> Stream:
    """The calling thread's stream (``compress`` and layers outside a converted model draw
    from it)."""
    found = getattr(_local, "stream", None)
    if found is None:
        found = _local.stream = Stream()
    return found


def stream(ident: int) -> Stream:
    """The stream whose ``id`` is ``ident``; 0 (or one no longer alive) is the thread's."""
    found = _streams.get(ident) if ident else None
    return thread_stream() if found is None else found


def model_stream(model: torch.nn.Module) -> Stream | None:
    """The stream of a model's converted layers (``prune_activations_``), or None."""
    for module in model.modules():
        found = getattr(module, "stream", None)
        if isinstance(found, Stream):
            return found
    return None


def _target(model: torch.nn.Module | None) -> Stream:
    """``model``'s stream; the thread's without a model or for a model with no actprune layers
    (which draws nothing)."""
    found = None if model is None else model_stream(model)
    return thread_stream() if found is None else found


def manual_seed(seed: int, model: torch.nn.Module | None = None) -> None:
    """Restart streams at ``seed`` (counter 0).

    Args:
        seed: any int.
        model: restart only this converted model's stream. Without it, every stream restarts
            (this thread's, every model's) and streams made later start at ``seed`` too.

    Returns:
        None.

    Example:
        >>> from actprune import rng
        >>> rng.manual_seed(7); rng.get_state()
        {'seed': 7, 'counter': 0}
    """
    global _seed
    if model is not None:
        _target(model).set_state({"seed": int(seed), "counter": 0})
        return
    with _lock:
        _seed = int(seed)
        streams = list(_streams.values())
    for s in streams:
        s.set_state({"seed": int(seed), "counter": 0})


def get_state(model: torch.nn.Module | None = None) -> dict[str, int]:
    """The state of ``model``'s stream (this thread's without a model): ``{"seed", "counter"}``."""
    return _target(model).get_state()


def set_state(state: dict[str, int], model: torch.nn.Module | None = None) -> None:
    """Restore a state from ``get_state`` into ``model``'s stream (this thread's without one)."""
    _target(model).set_state(state)


def next_key() -> int:
    """The next key of this thread's stream.

    Returns:
        The key, a plain int in [0, 2^32).

    Example:
        >>> from actprune import rng
        >>> rng.manual_seed(7); a = rng.next_key(); b = rng.next_key()
        >>> rng.manual_seed(7); rng.next_key() == a and a != b
        True
    """
    return thread_stream().next_key()


def state_problem(state: object) -> str | None:
    """What is wrong with a would-be ``get_state`` result, or None."""
    if not isinstance(state, dict) or set(state) != {"seed", "counter"}:
        return f"must be a dict with the keys seed and counter, got {state!r}"[:200]
    for name, value in state.items():
        if not is_int(value) or not 0 <= value < 1 << 64:
            return f"{name} must be an integer in [0, 2^64), got {value!r}"
    return None


# The random byte of element i under key k is byte i mod 4 (little-endian) of the 32-bit word
# hash(k, i // 4), hash(k, w) = murmur3's finaliser of (w · GOLDEN) xor k, all modulo 2^32:
# xor-shift 16, · MIX1, xor-shift 13, · MIX2, xor-shift 16. The finaliser is a bijection with full
# avalanche, so distinct (key, word) give independent-looking words, and one word serves four
# elements. Each kernel backend implements exactly this.
GOLDEN, MIX1, MIX2 = 0x9E3779B1, 0x85EBCA6B, 0xC2B2AE35


def random_words(key: int | torch.Tensor, word: torch.Tensor) -> torch.Tensor:
    """The 32-bit words (as int64) whose bytes are the random bytes: hash(key, word); the key
    an int or a 0-d int64 tensor (``ops.next_key``, under torch.compile)."""
    h = ((word * GOLDEN) & _MASK32) ^ key
    h = h ^ (h >> 16)
    h = (h * MIX1) & _MASK32
    h = h ^ (h >> 13)
    h = (h * MIX2) & _MASK32
    return h ^ (h >> 16)


def random_bytes(key: int | torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """uint8 random bytes of the elements whose (int64) indices are ``index`` under ``key``: the
    definition the numba and Triton kernels reproduce bit for bit. Word indices wrap modulo 2^32.

    Args:
        key: from ``Stream.next_key()`` (or that int as a 0-d int64 tensor).
        index: int64 tensor of element indices, any shape.

    Returns:
        uint8 tensor of index's shape.

    Example:
        >>> import torch
        >>> from actprune import rng
        >>> rng.random_bytes(1, torch.arange(4)).tolist()
        [183, 40, 78, 81]
    """
    return ((random_words(key, index >> 2) >> ((index & 3) * 8)) & 255).to(torch.uint8)


def torch_state(device: torch.device) -> tuple[torch.Tensor, ...]:
    """torch's own random state that a forward on ``device`` draws from (the CPU generator's, and
    the accelerator's): what a backward that recomputes forward work restores (``replaying``) so
    the recompute draws the forward's dropout masks, as ``torch.utils.checkpoint`` does."""
    if device.type in ("cpu", "meta"):
        return (torch.get_rng_state(),)
    return torch.get_rng_state(), torch.get_device_module(device).get_rng_state(device)


@contextlib.contextmanager
def replaying(device: torch.device, state: tuple[torch.Tensor, ...]) -> Iterator[None]:
    """Inside: torch's random state is ``state`` (from ``torch_state``); after: what it was."""
    devices = [] if device.type in ("cpu", "meta") else [device]
    with torch.random.fork_rng(devices):
        torch.set_rng_state(state[0])
        if len(state) > 1:
            torch.get_device_module(device).set_rng_state(state[1], device)
        yield
