"""Predict the peak memory of a training step, and the largest batch that fits, without memory.

The step (forward, backward, AdamW step) runs on the ``meta`` device: every op computes shapes
only. A TorchDispatchMode adds each new storage's bytes when an op creates it and subtracts them
when the storage dies (a weak reference on it), so the live total over time — and its peak — is
that of the real step, without allocator overheads, autograd bookkeeping or kernel workspaces
(docs/design.md, "Predicting memory", has the measured agreement; the test holds it within 10 %).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .methods import MemoryConfig, apply_method
from .workloads import build_workload


class LiveStorageBytes(TorchDispatchMode):
    """Bytes of the storages created under this mode that are still alive, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}

    def _release(self, key: int, nbytes: int) -> None:
        self._refs.pop(key, None)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # Outputs that alias an input (in-place ops, views) allocate nothing.
        inputs = {
            t.untyped_storage()._cdata
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self._refs and key not in inputs:
                    nbytes = storage.nbytes()
                    self._refs[key] = weakref.ref(
                        storage, lambda _, key=key, n=nbytes: self._release(key, n)
                    )
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
        return out


@dataclass
class StepPlan:
    config: str
    batch: int
    resident_bytes: int  # parameters, AdamW state, batch
    peak_step_bytes: int  # resident + the step's own peak


def predict_step(
    spec: str,
    batch: int,
    config: MemoryConfig,
    foreach: bool | None = None,
    image_size: int | None = None,
    seq_len: int | None = None,
    **overrides: object,
) -> StepPlan:
    """Peak bytes of one AdamW training step of the model of ``spec`` under ``config``, on
    "meta".

    ``spec``, ``image_size``, ``seq_len`` and ``overrides`` (zoo models' arguments: width, depth,
    ...) build the model as ``workloads.build_workload`` does. ``foreach``: AdamW's
    implementation; None = what torch picks on CUDA (foreach), False = what it picks on CPU (one
    tensor at a time). It only changes the optimizer step's transients.
    """
    work = build_workload(spec, image_size, seq_len, device="meta", **overrides)
    model = apply_method(work.model, config)
    data = work.empty_batch(batch, "meta")
    opt = torch.optim.AdamW(model.parameters(), foreach=True if foreach is None else foreach)

    def step() -> None:
        work.loss(model, data).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # creates the optimizer state, as the measured step's warm-up does
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    resident = sum(t.untyped_storage().nbytes() for t in [*model.parameters(), *state, *data])
    with LiveStorageBytes() as tracker:
        step()
    return StepPlan(config.name, batch, resident, resident + tracker.peak)


def largest_batch(peak: Callable[[int], int], budget: int, probe: int, limit: int) -> int:
    """Largest batch b <= limit with peak(b) <= budget (0 if none).

    Activations grow linearly with the batch, so two probes give a close guess; the guess is then
    confirmed with exact predictions by bisection between bounds that bracket the answer.
    """
    cache: dict[int, int] = {}

    def at(b: int) -> int:  # every batch is predicted once
        if b not in cache:
            cache[b] = peak(b)
        return cache[b]

    def fits(b: int) -> bool:
        return at(b) <= budget

    if not fits(1):
        return 0
    probe = max(1, min(probe, limit))
    slope = (at(2 * probe) - at(probe)) / probe
    guess = limit if slope <= 0 else min(limit, max(1, probe + int((budget - at(probe)) / slope)))
    margin = max(1, guess // 64)
    lo, hi = max(1, guess - margin), min(limit + 1, guess + margin + 1)
    if not fits(lo):
        lo = 1
    if hi <= limit and fits(hi):
        lo, hi = hi, limit + 1
    while hi - lo > 1:  # invariant: fits(lo), and hi does not fit or is past the limit
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(text: str) -> int:
    """ "80GB" (10^9), "80GiB" (2^30), "512MiB", "1000000" -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a memory size (examples: 80GB, 24GiB, 512MiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
