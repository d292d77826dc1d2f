"""actprune's own random numbers (the remainder's stochastic rounding), apart from torch's.

A training step with compression must leave ``torch.get_rng_state()`` exactly as the dense step
leaves it: the same dropout masks, the same next ``torch.rand`` for the user. So no draw here uses a
torch generator. The stream is counter-based, like Philox's (seed, offset): each compression takes
one 32-bit ``next_key()`` derived from (seed, counter), and the random byte of element i is a fixed
hash of (key, i) (``random_bytes``). The pair (seed, counter) is the whole state: ``get_state`` /
``set_state`` save and restore it (training checkpoints do, so resume stays exact). Because the byte
of an element depends only on the key and the element's index, every kernel backend (PyTorch,
numba, Triton) computes the same bytes in whatever order its threads visit the elements, so the
backends write identical codes. The seed is ``manual_seed``'s, or else ``torch.initial_seed()``
(the seed the user gave ``torch.manual_seed``) read at each draw.
"""

from __future__ import annotations

import threading

import torch

_MASK = (1 << 63) - 1
_MASK32 = (1 << 32) - 1
_lock = threading.Lock()
_seed: int | None = None
_counter = 0


def manual_seed(seed: int) -> None:
    """Start actprune's stream at ``seed`` (counter 0).

    Args:
        seed: any int.

    Returns:
        None.

    Example:
        >>> from actprune import rng
        >>> rng.manual_seed(7); rng.get_state()
        {'seed': 7, 'counter': 0}
    """
    global _seed, _counter
    with _lock:
        _seed, _counter = int(seed), 0


def get_state() -> dict[str, int]:
    """The stream's state: ``{"seed": ..., "counter": ...}`` (plain ints)."""
    with _lock:
        return {"seed": torch.initial_seed() if _seed is None else _seed, "counter": _counter}


def set_state(state: dict[str, int]) -> None:
    """Restore a state from ``get_state``."""
    global _seed, _counter
    with _lock:
        _seed, _counter = int(state["seed"]), int(state["counter"])


def next_key() -> int:
    """The key of one compression's random bytes, in [0, 2^32): a hash of (seed, counter), then
    counter + 1.

    Returns:
        The key, a plain int.

    Example:
        >>> from actprune import rng
        >>> rng.manual_seed(7); a = rng.next_key(); b = rng.next_key()
        >>> rng.manual_seed(7); rng.next_key() == a and a != b
        True
    """
    global _counter
    with _lock:
        seed = torch.initial_seed() if _seed is None else _seed
        counter, _counter = _counter, _counter + 1
    # Distinct, well-spread keys for consecutive counters (a 64-bit LCG step of the pair).
    mixed = (seed * 6364136223846793005 + counter * 1442695040888963407 + 1) & _MASK
    return (mixed ^ (mixed >> 32)) & _MASK32


# The random byte of element i under key k is byte i mod 4 (little-endian) of the 32-bit word
# hash(k, i // 4), hash(k, w) = murmur3's finaliser of (w · GOLDEN) xor k, all modulo 2^32:
# xor-shift 16, · MIX1, xor-shift 13, · MIX2, xor-shift 16. The finaliser is a bijection with full
# avalanche, so distinct (key, word) give independent-looking words, and one word serves four
# elements. Each kernel backend implements exactly this.
GOLDEN, MIX1, MIX2 = 0x9E3779B1, 0x85EBCA6B, 0xC2B2AE35


def random_words(key: int, word: torch.Tensor) -> torch.Tensor:
    """The 32-bit words (as int64) whose bytes are the random bytes: hash(key, word)."""
    h = ((word * GOLDEN) & _MASK32) ^ key
    h = h ^ (h >> 16)
    h = (h * MIX1) & _MASK32
    h = h ^ (h >> 13)
    h = (h * MIX2) & _MASK32
    return h ^ (h >> 16)


def random_bytes(key: int, index: torch.Tensor) -> torch.Tensor:
    """uint8 random bytes of the elements whose (int64) indices are ``index`` under ``key``: the
    definition the numba and Triton kernels reproduce bit for bit. Word indices wrap modulo 2^32.

    Args:
        key: from ``next_key()``.
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
