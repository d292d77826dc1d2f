"""Dense vs pruned, same seed, same initial weights, same data order: a table and plots.

Writes OUT/<run>/ (each run's metrics, checkpoint, summary), OUT/summary.json (one entry per run),
OUT/report.md (accuracy, peak memory, activation memory and step time, each with its ratio to
dense; what each run compressed and how; gradient cosine to exact per layer) and OUT/accuracy.png,
OUT/loss.png, OUT/memory.png, OUT/grad_cosine.png.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from . import data as data_lib
from .config import PruneConfig
from .train import TrainConfig, TrainError, prepare_out_dir, train


def run_name(prune: PruneConfig | None) -> str:
    """ "dense", or "actprune_<label>" (the name ``bench memory`` gives the same configuration)."""
    return "dense" if prune is None else f"actprune_{prune.label()}"


def compare(
    base: TrainConfig, prunes: list[PruneConfig], command: str = "", dense: dict | None = None
) -> list[dict]:
    """Train dense and one run per PruneConfig from ``base`` (same seed, weights, data order).

    Args:
        base: the settings shared by every run (its ``prune`` is ignored).
        prunes: the compressed runs to compare with dense.
        command: the command line, quoted in the report.
        dense: the summary of a dense run with the same model, dataset, seed, epochs and batch
            made before (dense training is deterministic on one machine and torch version):
            reused instead of trained again. Its step time is then not from this run.

    Returns:
        One summary per run (``train``), dense first, each with its ``run`` name; also written
        to ``base.out``: summary.json, report.md and the plots.
    """
    out = Path(base.out)
    settings = [None, *prunes] if dense is None else list(prunes)
    for prune in settings:
        dataclasses.replace(base, prune=prune).validate()
    if dense is not None:
        _check_same_schedule(dense, base)
    prepare_out_dir(out, base.overwrite, base.resume)
    try:
        dataset = data_lib.load(base.dataset, base.data_dir, base.image_size)
    except data_lib.DataError as err:
        raise TrainError(str(err)) from err
    runs = [] if dense is None else [{**dense, "run": "dense"}]
    for prune in settings:
        name = run_name(prune)
        cfg = dataclasses.replace(base, prune=prune, out=str(out / name))
        runs.append({"run": name, **train(cfg, dataset=dataset)})
    (out / "summary.json").write_text(json.dumps(runs, indent=2) + "\n")
    (out / "report.md").write_text(_report(runs, report_table(runs), command))
    plot(runs, out)
    return runs


def _check_same_schedule(dense: dict, base: TrainConfig) -> None:
    """A reused dense run must have trained what ``base`` would: same model, data, schedule."""
    theirs = dense["config"]
    for key in ("model", "dataset", "seed", "epochs", "batch_size", "lr", "weight_decay",
                "optimizer", "label_smoothing", "warmup_epochs"):  # fmt: skip
        if theirs.get(key) != getattr(base, key):
            raise TrainError(
                f"the dense run to reuse has {key}={theirs.get(key)!r}, this comparison "
                f"{getattr(base, key)!r}"
            )


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def report_table(runs: list[dict]) -> str:
    """Markdown table; every ratio is to the dense run measured in the same comparison."""
    dense = runs[0]
    lines = [
        "| run | test acc % | Δ acc (pts) | peak step memory | ratio | saved activations | ratio "
        "| median step | ratio | images/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        peak, saved, step = (
            r[k] / dense[k] for k in ("peak_step_bytes", "saved_activation_bytes", "median_step_s")
        )
        lines.append(
            f"| {r['run']} | {r['test_acc']:.2f} | {r['test_acc'] - dense['test_acc']:+.2f} "
            f"| {_mib(r['peak_step_bytes'])} | {peak:.3f} "
            f"| {_mib(r['saved_activation_bytes'])} | {saved:.3f} "
            f"| {1e3 * r['median_step_s']:.1f} ms | {step:.2f} | {r['images_per_s']:.0f} |"
        )
    return "\n".join(lines)


def cosine_by_layer(grad_cosine: dict[str, float]) -> dict[str, tuple[float, float]]:
    """Per-parameter cosines grouped over blocks ("blocks.3.fc1.weight" -> "blocks.*.fc1.weight"):
    {group: (mean, min)}."""
    groups: dict[str, list[float]] = {}
    for name, cos in grad_cosine.items():
        groups.setdefault(re.sub(r"\.\d+\.", ".*.", name), []).append(cos)
    return {g: (sum(v) / len(v), min(v)) for g, v in groups.items()}


def compression_section(runs: list[dict]) -> str:
    """Markdown: per compressed run, what each kind of layer saves and how it is kept."""
    parts = []
    for r in runs[1:]:
        lines = [
            f"**{r['run']}** (scope {r['prune']['scope']}):",
            "",
            "| layer | count | saved | kept as |",
        ]
        lines.append("|---|---|---|---|")
        lines += [
            f"| {c['layer']} | {c['count']} | {c['saved']} | {c['kept_as']} |"
            for c in r["saved_tensors"]
        ]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _cosine_section(runs: list[dict]) -> str:
    pruned = [r for r in runs[1:] if "grad_cosine" in r["history"][-1]]
    if not pruned:
        return ""
    tables = [cosine_by_layer(r["history"][-1]["grad_cosine"]) for r in pruned]
    head = "| parameter | " + " | ".join(f"{r['run']} mean / min" for r in pruned) + " |"
    lines = [head, "|---|" + "---|" * len(pruned)]
    for group in tables[0]:
        cells = [f"{t[group][0]:.3f} / {t[group][1]:.3f}" for t in tables]
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    return (
        "## Gradient cosine to the exact gradient (last epoch)\n\n"
        "On a fixed batch of 256 training images after each epoch: each parameter's gradient from "
        "the compressed model against the same model computing exactly (per-epoch values in each "
        "run's metrics.jsonl, plot grad_cosine.png). 1.0 = exact.\n\n" + "\n".join(lines) + "\n"
    )


def _report(runs: list[dict], table: str, command: str) -> str:
    d = runs[0]
    return (
        f"# actprune compare: {d['model']} on {d['dataset']}\n\n"
        f"{d['epochs']} epochs, batch {d['batch_size']}, device {d['device']}, data from "
        f"{d['data_source']}. Command: `{command}`\n\n"
        f"{table}\n\n"
        "Peak step memory: parameters + optimizer state + batch + the peak of one full training "
        "step (forward, backward, optimizer step). Saved activations: bytes autograd holds for "
        "backward after the forward. Both from `actprune.memory` (method: docs/design.md).\n\n"
        "## What was compressed\n\n"
        f"{compression_section(runs)}\n\n"
        f"{_cosine_section(runs)}"
    )


def plot(runs: list[dict], out: Path) -> None:
    """accuracy.png and loss.png per epoch for every run; memory.png: peak and saved bytes;
    grad_cosine.png: each compressed run's gradient cosines per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _plot_history(plt, runs, out)
    _plot_memory(plt, runs, out)
    pruned = [r for r in runs[1:] if "grad_cosine" in r["history"][-1]]
    if pruned:
        _plot_cosines(plt, pruned, out)


def _plot_history(plt, runs: list[dict], out: Path) -> None:
    for key, label, fname in [
        ("test_acc", "test accuracy (%)", "accuracy.png"),
        ("test_loss", "test loss", "loss.png"),
    ]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in runs:
            epochs = [h["epoch"] for h in r["history"]]
            ax.plot(epochs, [h[key] for h in r["history"]], marker="o", label=r["run"])
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)


def _plot_memory(plt, runs: list[dict], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    names = [r["run"] for r in runs]
    width = 0.38
    xs = range(len(runs))
    ax.bar(
        [x - width / 2 for x in xs],
        [r["peak_step_bytes"] / 2**20 for r in runs],
        width,
        label="peak step memory",
    )
    ax.bar(
        [x + width / 2 for x in xs],
        [r["saved_activation_bytes"] / 2**20 for r in runs],
        width,
        label="saved activations",
    )
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("MiB")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=120)
    plt.close(fig)


def _plot_cosines(plt, pruned: list[dict], out: Path) -> None:
    fig, axes = plt.subplots(1, len(pruned), figsize=(6.5 * len(pruned), 4.5), squeeze=False)
    for ax, r in zip(axes[0], pruned):
        per_epoch = [cosine_by_layer(h["grad_cosine"]) for h in r["history"]]
        epochs = [h["epoch"] for h in r["history"]]
        # parameters whose gradient stays exact (cosine > 0.995 every epoch) are left out
        shown = [g for g in per_epoch[0] if min(c[g][0] for c in per_epoch) <= 0.995]
        ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)
        for group in shown:
            ax.plot(epochs, [c[group][0] for c in per_epoch], marker=".", label=group)
        ax.set_title(f"{r['run']}: gradient cosine to exact (mean over blocks)", fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylim(top=1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "grad_cosine.png", dpi=120)
    plt.close(fig)
