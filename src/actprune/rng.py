"""actprune's own random numbers (the remainder's stochastic rounding), apart from torch's.

A training step with compression must leave ``torch.get_rng_state()`` exactly as the dense step
leaves it: the same dropout masks, the same next ``torch.rand`` for the user. So every draw here
comes from a fresh ``torch.Generator`` seeded from (seed, counter) — a counter-based stream, like
Philox's (seed, offset): the pair is the whole state, ``get_state`` / ``set_state`` save and
restore it (training checkpoints do, so resume stays exact), and no draw depends on what torch's
global generator did. The seed is ``manual_seed``'s, or else ``torch.initial_seed()`` (the seed the
user gave ``torch.manual_seed``) read at each draw.
"""

from __future__ import annotations

import threading

import torch

_MASK = (1 << 63) - 1
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


def generator(device: torch.device | str) -> torch.Generator:
    """A generator on ``device`` for one draw: seeded from (seed, counter), then counter + 1."""
    global _counter
    with _lock:
        seed = torch.initial_seed() if _seed is None else _seed
        counter, _counter = _counter, _counter + 1
    g = torch.Generator(device=device)
    # Distinct, well-spread seeds for consecutive counters (a 64-bit LCG step of the pair).
    g.manual_seed((seed * 6364136223846793005 + counter * 1442695040888963407 + 1) & _MASK)
    return g
