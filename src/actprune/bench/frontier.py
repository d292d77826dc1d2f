"""The memory × time × accuracy frontier: which ways to train are Pareto-optimal, and where.

Reads what the other benchmarks wrote — ``bench memory --frontier`` (peak and saved bytes of every
configuration, one run), ``benchmarks/step_time.py --frontier`` (step time × dense, interleaved,
one run) and ``compare`` summaries (accuracy at equal schedule) — and writes tables and plots.
Nothing is measured here; every figure keeps the run it came from.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import PruneConfig
from ..methods import MemoryConfig

CHECKPOINTING = ("checkpoint", "selective")  # the families a user already has in torch


def pareto(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For points (x, y) where smaller is better in both: True for those no other point
    dominates (as good in both and better in one)."""
    return [
        not any(
            (a <= x and b <= y) and (a < x or b < y) for j, (a, b) in enumerate(points) if j != i
        )
        for i, (x, y) in enumerate(points)
    ]


@dataclass
class StepPoint:
    """One configuration of the step-time run: peak and saved bytes × dense, step time × dense."""

    name: str
    family: str
    peak: float
    saved: float
    step: float
    optimal: bool = False


def step_points(memory: dict, step_times: dict) -> list[StepPoint]:
    """Join a ``bench memory`` JSON and a ``step_time.py`` JSON of the same configurations by
    name; mark the points Pareto-optimal in (peak, step time)."""
    ratios = {r["config"]: r["ratio"] for r in step_times["rows"]}
    points = []
    for row in memory["rows"]:
        name = row["config"]["name"]
        if name not in ratios:
            raise ValueError(f"{name} has a memory row but no step time")
        points.append(StepPoint(name, _family(row["config"]), row["ratios"]["peak"],
                                row["ratios"]["saved"], ratios[name]))  # fmt: skip
    for p, optimal in zip(points, pareto([(p.peak, p.step) for p in points])):
        p.optimal = optimal
    return points


def _family(config: dict) -> str:
    """``MemoryConfig.family`` of a config as ``bench memory`` stored it (``asdict``)."""
    prune = config.get("prune")
    prune = PruneConfig.from_dict(prune) if prune else None
    fields = {k: v for k, v in config.items() if k not in ("prune", "exclude")}
    return MemoryConfig(**fields, prune=prune, exclude=tuple(config.get("exclude", ()))).family


def budget_winners(points: Iterable[StepPoint]) -> list[tuple[float, StepPoint, StepPoint | None]]:
    """For each budget (every configuration's peak × dense, ascending): the fastest configuration
    that fits it and the fastest checkpointing configuration that fits it (None if none does).
    Where the first is not checkpointing, compression trains faster than any checkpointing at
    that budget."""
    points = list(points)
    out = []
    for budget in sorted({p.peak for p in points}):
        fits = [p for p in points if p.peak <= budget]
        best = min(fits, key=lambda p: p.step)
        ckpt = [p for p in fits if p.family in CHECKPOINTING or p.family == "dense"]
        out.append((budget, best, min(ckpt, key=lambda p: p.step) if ckpt else None))
    return out


@dataclass
class AccuracyPoint:
    """One configuration's accuracy runs on the demo task: saved and peak × dense (from its
    compare run), and test accuracy minus the same run's dense, per (epochs, seed)."""

    name: str
    saved: float
    peak: float
    delta: dict[tuple[int, int], float]  # (epochs, seed) -> Δ accuracy in points
    accuracy: dict[tuple[int, int], float]
    optimal: bool = False


def accuracy_points(summaries: Iterable[Sequence[dict]]) -> list[AccuracyPoint]:
    """Merge ``compare`` summaries (each a list of runs, dense first) into one point per run
    name; Pareto marks on (saved bytes, −Δ accuracy at the shortest schedule every point has)."""
    points: dict[str, AccuracyPoint] = {}
    for runs in summaries:
        dense = runs[0]
        if dense["run"] != "dense":
            raise ValueError("a compare summary starts with its dense run")
        for r in runs:
            key = (r["epochs"], r["config"]["seed"])
            saved = r["saved_activation_bytes"] / dense["saved_activation_bytes"]
            peak = r["peak_step_bytes"] / dense["peak_step_bytes"]
            p = points.setdefault(r["run"], AccuracyPoint(r["run"], saved, peak, {}, {}))
            p.delta[key] = r["test_acc"] - dense["test_acc"]
            p.accuracy[key] = r["test_acc"]
    points_list = list(points.values())
    common = set.intersection(*(set(p.delta) for p in points_list)) if points_list else set()
    if common:
        key = min(common)
        marks = pareto([(p.saved, -p.delta[key]) for p in points_list])
        for p, optimal in zip(points_list, marks):
            p.optimal = optimal
    return points_list


def step_table(points: list[StepPoint]) -> str:
    lines = ["| config | family | peak × dense | saved × dense | step × dense | Pareto |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for p in sorted(points, key=lambda p: p.peak):
        lines.append(f"| {p.name} | {p.family} | {p.peak:.3f} | {p.saved:.3f} | {p.step:.3f} "
                     f"| {'**yes**' if p.optimal else ''} |")  # fmt: skip
    return "\n".join(lines)


def budget_table(points: list[StepPoint]) -> str:
    lines = [
        "| budget (peak × dense) | fastest that fits | step × dense | fastest checkpointing "
        "that fits | step × dense | compression faster by |",
        "|---|---|---|---|---|---|",
    ]
    for budget, best, ckpt in budget_winners(points):
        ckpt_cells = f"{ckpt.name} | {ckpt.step:.3f}" if ckpt else "none fits | —"
        if ckpt is None:
            gain = "only compression fits"
        elif best is ckpt or best.family in CHECKPOINTING:
            gain = ""
        else:
            gain = f"{(ckpt.step / best.step - 1) * 100:.1f} %"
        lines.append(f"| {budget:.3f} | {best.name} | {best.step:.3f} | {ckpt_cells} | {gain} |")
    return "\n".join(lines)


def accuracy_table(points: list[AccuracyPoint]) -> str:
    if not points:
        return "(no accuracy runs given)"
    keys = sorted({k for p in points for k in p.delta})
    head = " | ".join(f"{e} ep seed {s}: acc (Δ)" for e, s in keys)
    lines = [f"| config | saved × dense (this task) | peak × dense (this task) | {head} | Pareto |",
             "|---|---|---|" + "---|" * len(keys) + "---|"]  # fmt: skip
    for p in sorted(points, key=lambda p: p.saved):
        cells = " | ".join(
            f"{p.accuracy[k]:.2f} ({p.delta[k]:+.2f})" if k in p.delta else "—" for k in keys
        )
        lines.append(f"| {p.name} | {p.saved:.3f} | {p.peak:.3f} | {cells} "
                     f"| {'**yes**' if p.optimal else ''} |")  # fmt: skip
    return "\n".join(lines)


def plot_frontier(step: list[StepPoint], accuracy: list[AccuracyPoint], out: Path) -> None:
    """frontier_step.png (peak vs step time) and frontier_accuracy.png (saved bytes vs Δ
    accuracy), Pareto-optimal points ringed and joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def draw(xs, ys, names, optimal, families, xlabel, ylabel, path):
        fig, ax = plt.subplots(figsize=(8, 5.5))
        for fam in dict.fromkeys(families):
            idx = [i for i, f in enumerate(families) if f == fam]
            ax.scatter([xs[i] for i in idx], [ys[i] for i in idx], label=fam, s=30)
        front = sorted((xs[i], ys[i]) for i in range(len(xs)) if optimal[i])
        ax.plot(*zip(*front), color="black", lw=1, ls="--", label="Pareto front")
        for i, name in enumerate(names):
            ax.annotate(name, (xs[i], ys[i]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=130)
        plt.close(fig)

    if step:
        draw([p.peak for p in step], [p.step for p in step], [p.name for p in step],
             [p.optimal for p in step], [p.family for p in step], "peak step memory × dense",
             "step time × dense", out / "frontier_step.png")  # fmt: skip
    if accuracy:
        # the longest schedule that every point has (its first seed): the most settled accuracy
        key = max(set.intersection(*(set(p.delta) for p in accuracy)), key=lambda k: (k[0], -k[1]))
        draw([p.saved for p in accuracy], [p.delta[key] for p in accuracy],
             [p.name for p in accuracy], [p.optimal for p in accuracy],
             ["dense" if p.name == "dense" else "compressed" for p in accuracy],
             "saved activations × dense",
             f"Δ test accuracy (points), {key[0]} epochs seed {key[1]}",
             out / "frontier_accuracy.png")  # fmt: skip


def load_json(path: str | Path) -> object:
    return json.loads(Path(path).read_text())
