"""Predict the peak memory of a training step, and the largest batch that fits, without memory;
rank the ways to train that fit a budget by their step time.

The step (forward, backward, AdamW step) runs on the ``meta`` device: every op computes shapes
only. A TorchDispatchMode adds each new storage's bytes when an op creates it and subtracts them
when the storage dies (a weak reference on it), so the live total over time — and its peak — is
that of the real step, without allocator overheads, autograd bookkeeping or kernel workspaces
(docs/design.md, "Predicting memory", has the measured agreement; the test holds it within 10 %).

Step time cannot be predicted on "meta": ``rank`` uses measured ratios to dense per configuration
(``step_time_ratios``: by default a packaged run of ``benchmarks/step_time.py --frontier``, or the
user's own run on their device).
"""

from __future__ import annotations

import json
import os
import re
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .methods import MemoryConfig, apply_method
from .workloads import Workload, WorkloadError, build_workload


class LiveStorageBytes(TorchDispatchMode):
    """Bytes of the storages created under this mode that are still alive, and their peak.

    A branch on a value (``bool(t)``, ``t.item()``) cannot be decided on "meta". The one kind
    models take on every step is a check on their inputs that holds for the planner's batches:
    no padding, no packed sequences (Hugging Face's mask code asks ``(mask == 0).all()``-style
    questions). So a one-element boolean meta tensor reads as True; any other value raises as on
    "meta"."""

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
        if func is torch.ops.aten._local_scalar_dense.default:
            (t,) = args
            if t.is_meta and t.dtype == torch.bool:
                return True
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


@dataclass(frozen=True)
class OptimizerFootprint:
    """What AdamW adds to a step: parameters + its state (resident), and its step's transient
    peak above what lives when the step starts. Both depend on the parameters only, so one
    footprint serves every configuration of a model (conversions keep the parameters)."""

    fixed_bytes: int
    step_peak: int


def optimizer_footprint(
    work: Workload, model: nn.Module, foreach: bool | None
) -> OptimizerFootprint:
    """Trace AdamW on ``model`` (on "meta"): a step at batch 1 creates its state, as the measured
    step's warm-up does; a second step is traced. Leaves no gradients behind."""
    opt = torch.optim.AdamW(model.parameters(), foreach=True if foreach is None else foreach)
    one = work.empty_batch(1, "meta")
    for _ in range(2):  # the first creates the state, the second is what a step costs
        with LiveStorageBytes():  # (its meta branches)
            work.loss(model, one).backward()
        with LiveStorageBytes() as tracker:
            opt.step()
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    fixed = sum(t.untyped_storage().nbytes() for t in [*model.parameters(), *state])
    opt.zero_grad(set_to_none=True)
    return OptimizerFootprint(fixed, tracker.peak)


class StepPredictor:
    """Peak bytes of one AdamW training step of the model of ``spec`` under ``config``, on
    "meta", at any batch: ``StepPredictor(...)(batch)``.

    ``spec``, ``image_size``, ``seq_len`` and ``overrides`` (zoo models' arguments: width, depth,
    ...) build the model as ``workloads.build_workload`` does. ``foreach``: AdamW's
    implementation; None = what torch picks on CUDA (foreach), False = what it picks on CPU (one
    tensor at a time). It only changes the optimizer step's transients, which are traced once
    (``optimizer_footprint``; pass ``footprint`` to reuse one across configurations of a model);
    each call then traces one forward and backward: the step's peak is the larger of their peak
    and what lives after backward plus the optimizer step's transient.
    """

    def __init__(
        self,
        spec: str,
        config: MemoryConfig,
        foreach: bool | None = None,
        image_size: int | None = None,
        seq_len: int | None = None,
        footprint: OptimizerFootprint | None = None,
        **overrides: object,
    ) -> None:
        self.work = build_workload(spec, image_size, seq_len, device="meta", **overrides)
        self.model = apply_method(self.work.model, config)
        self.name = config.name
        self.footprint = footprint or optimizer_footprint(self.work, self.model, foreach)

    def __call__(self, batch: int) -> StepPlan:
        data = self.work.empty_batch(batch, "meta")
        resident = self.footprint.fixed_bytes + sum(t.untyped_storage().nbytes() for t in data)
        with LiveStorageBytes() as tracker:
            self.work.loss(self.model, data).backward()
        peak = max(tracker.peak, tracker.live + self.footprint.step_peak)
        for p in self.model.parameters():
            p.grad = None
        return StepPlan(self.name, batch, resident, resident + peak)


def predict_step(
    spec: str,
    batch: int,
    config: MemoryConfig,
    foreach: bool | None = None,
    image_size: int | None = None,
    seq_len: int | None = None,
    **overrides: object,
) -> StepPlan:
    """``StepPredictor(spec, config, ...)(batch)``: one prediction."""
    return StepPredictor(spec, config, foreach, image_size, seq_len, **overrides)(batch)


def available_bytes(device: str | torch.device) -> int | None:
    """Memory a new allocation on ``device`` can take now: CUDA's free memory, or the host's
    ``MemAvailable`` (Linux; else free physical pages); None where it cannot be known."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def require_fits(
    spec: str,
    batch: int,
    device: str | torch.device,
    image_size: int | None = None,
    seq_len: int | None = None,
) -> int:
    """Refuse, before anything is allocated, a model and batch whose dense training step cannot
    fit in ``device``'s available memory (``available_bytes``); the peak is predicted on "meta"
    (``predict_step``).

    Returns:
        The predicted peak of the dense step, in bytes.

    Raises:
        WorkloadError: saying how many bytes the step needs and how many are available.
    """
    kind = torch.device(device).type
    need = predict_step(spec, batch, MemoryConfig.dense(), foreach=kind != "cpu",
                        image_size=image_size, seq_len=seq_len).peak_step_bytes  # fmt: skip
    have = available_bytes(device)
    if have is not None and need > have:
        raise WorkloadError(
            f"{spec} at batch {batch}{f', seq_len {seq_len}' if seq_len else ''} needs "
            f"{need:,} bytes ({need / 2**30:.1f} GiB) for one dense training step (predicted "
            f"on the meta device); {device} has {have / 2**30:.1f} GiB available"
        )
    return need


@dataclass
class PlanRow:
    """One configuration under a budget: its predicted peak at the asked batch, whether that
    fits, the largest batch that fits, its step time × dense and its test-accuracy change in
    points against dense (each None when never measured)."""

    config: MemoryConfig
    peak_step_bytes: int
    fits: bool
    largest_batch: int
    step_ratio: float | None
    accuracy_delta: float | None = None

    def accurate(self, tolerance: float) -> bool:
        """Measured to lose at most ``tolerance`` points (exact methods lose none)."""
        return self.accuracy_delta is not None and self.accuracy_delta >= -tolerance


def plan(
    spec: str,
    batch: int,
    budget: int,
    configs: Iterable[MemoryConfig],
    step_ratios: dict[str, float],
    accuracy: dict[str, float],
    tolerance: float = 0.3,
    *,
    foreach: bool | None = None,
    image_size: int | None = None,
    seq_len: int | None = None,
    max_batch: int = 1 << 16,
    progress: Callable[[str], None] | None = None,
) -> list[PlanRow]:
    """Predict every configuration at ``batch`` and its largest batch under ``budget`` bytes;
    the rows come back ranked (``rank``).

    Args:
        spec, image_size, seq_len: the model, as ``predict_step`` takes them.
        batch: the batch the user wants to train at.
        budget: device memory in bytes.
        configs: the ways to train to compare (``methods.frontier_methods``).
        step_ratios: measured step time × dense by configuration name (``step_time_ratios``).
        accuracy: measured Δ test accuracy by configuration name (``accuracy_deltas``).
        tolerance: the accuracy loss in points that ``rank`` still counts as kept.
        foreach: AdamW's implementation, as ``predict_step`` takes it.
        max_batch: the largest batch searched.
        progress: called with a line before each configuration.

    Returns:
        One ``PlanRow`` per configuration, the fastest that fits and keeps accuracy first.
    """
    rows, footprint = [], None
    for config in configs:
        if progress:
            progress(f"{config.name}: predicting ...")

        predictor = StepPredictor(spec, config, foreach, image_size, seq_len, footprint)
        footprint, peaks = predictor.footprint, {}

        def peak(b: int, predictor: StepPredictor = predictor, peaks: dict = peaks) -> int:
            if b not in peaks:
                peaks[b] = predictor(b).peak_step_bytes
            return peaks[b]

        at_batch = peak(batch)
        best = largest_batch(peak, budget, probe=max(1, batch // 2), limit=max_batch)
        measured = step_ratios.get(config.name), accuracy_delta(config, accuracy)
        rows.append(PlanRow(config, at_batch, at_batch <= budget, best, *measured))
    return rank(rows, tolerance)


def rank(rows: Iterable[PlanRow], tolerance: float = 0.3) -> list[PlanRow]:
    """Those that fit and keep accuracy within ``tolerance`` points first, then those that fit
    but lose more (or were never measured), each by step-time ratio (unmeasured after measured)
    and then peak; last those that do not fit, largest batch first."""

    def key(r: PlanRow) -> tuple:
        if r.fits:
            measured = r.step_ratio is not None
            speed = (not measured, r.step_ratio if measured else 0.0, r.peak_step_bytes)
            return (0, not r.accurate(tolerance), *speed)
        return (1, 0, -r.largest_batch, r.peak_step_bytes)

    return sorted(rows, key=key)


EXACT = ("dense", "checkpoint", "selective")  # families that compute the dense gradient


def accuracy_delta(config: MemoryConfig, accuracy: dict[str, float]) -> float | None:
    """Δ test accuracy of ``config``: 0 for the exact families; a composition with exact block
    inputs counts as its compression alone (it compresses a subset of what that compresses, the
    rest exactly); else the measured value, or None."""
    if config.family in EXACT:
        return 0.0
    if config.family == "composition" and not config.boundary_bits:
        return accuracy.get(MemoryConfig.actprune(config.prune).name)
    return accuracy.get(config.name)


def accuracy_deltas(
    path: str | Path | None = None, language: bool = False
) -> tuple[dict[str, float], str]:
    """Measured Δ test accuracy (points, against dense of the same run) by configuration name —
    at the longest schedule measured, the worst over seeds — and where it comes from. For a
    language model (``language``) the measure is −Δ validation loss in % of dense's (the worst
    over models and seeds), read from a ``benchmarks/lm_quality.py`` JSON.

    Args:
        path: a frontier JSON written by ``benchmarks/frontier.py`` (language: by
            ``benchmarks/lm_quality.py``); None: the packaged one (``actprune/frontier.json``, a
            copy of docs/results/frontier/frontier.json; ``actprune/lm_quality.json``).
    """
    if language:
        return _lm_quality(path)
    text, where = _read("frontier.json", path, "accuracy")
    try:
        frontier = json.loads(text)
        points, task = frontier["accuracy"], frontier.get("accuracy_task", "")
        deltas = {}
        for p in points:
            runs = {tuple(map(int, k.replace("ep_seed", " ").split())): v
                    for k, v in p["delta"].items()}  # fmt: skip
            longest = max(e for e, _ in runs)
            deltas[p["name"]] = min(v for (e, _), v in runs.items() if e == longest)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{where} is not a benchmarks/frontier.py JSON ({err})") from None
    return deltas, f"{where}{': ' + task if task else ''}"


def _lm_quality(path: str | Path | None) -> tuple[dict[str, float], str]:
    text, where = _read("lm_quality.json", path, "validation losses")
    try:
        run = json.loads(text)
        deltas = {name: float(v) for name, v in run["delta"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{where} is not a benchmarks/lm_quality.py JSON ({err})") from None
    return deltas, f"{where}: {run.get('task', '?')}"


def _read(packaged: str, path: str | Path | None, what: str) -> tuple[str, str]:
    """The text of ``path``, or of the packaged file ``packaged`` when None; and its name."""
    if path is None:
        return resources.files("actprune").joinpath(packaged).read_text(), f"actprune/{packaged}"
    try:
        return Path(path).read_text(), str(path)
    except OSError as err:
        raise ValueError(f"cannot read {what} from {path}: {err.strerror or err}") from None


def step_time_ratios(
    path: str | Path | None = None, language: bool = False
) -> tuple[dict[str, float], str]:
    """Measured step time × dense by configuration name, and a line saying where they come from.

    Args:
        path: a JSON written by ``benchmarks/step_time.py``; None: the packaged one
            (``actprune/step_times.json``, a copy of the run in docs/results; for a language
            model, ``language``, ``actprune/step_times_lm.json``).
    """
    packaged = "step_times_lm.json" if language else "step_times.json"
    text, where = _read(packaged, path, "step times")
    try:
        run = json.loads(text)
        ratios = {row["config"]: float(row["ratio"]) for row in run["rows"]}
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{where} is not a benchmarks/step_time.py JSON ({err})") from None
    size = run.get("image_size")
    on = f"{run.get('model', '?')} at " + (f"{size} px" if size else f"seq {run.get('seq_len')}")
    on += f", batch {run.get('batch', '?')}"
    on += f", on {run['device_name']}" if "device_name" in run else ""
    return ratios, f"{where}: {on} (`{run.get('command', '?')}`)"


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
    if fits(guess) and (guess == limit or not fits(guess + 1)):  # the usual case: linear
        return guess
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
