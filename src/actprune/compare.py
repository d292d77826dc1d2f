"""Dense vs pruned, same seed, same initial weights, same data order: a table and plots.

Writes OUT/<run>/ (each run's metrics, checkpoint, summary), OUT/summary.json (one entry per run),
OUT/report.md (accuracy, peak memory, activation memory and step time, each with its ratio to
dense) and OUT/accuracy.png, OUT/loss.png, OUT/memory.png.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from . import data as data_lib
from .train import TrainConfig, UserError, prepare_out_dir, train


def run_name(sparsity: float) -> str:
    return "dense" if not sparsity else f"pruned_s{sparsity:g}"


def compare(base: TrainConfig, sparsities: list[float], command: str = "") -> list[dict]:
    """Train a dense run and one per sparsity (> 0) from ``base``; write the report; return runs."""
    out = Path(base.out)
    prepare_out_dir(out, base.overwrite, base.resume)
    for s in [0.0, *sparsities]:
        dataclasses.replace(base, sparsity=s).validate()
    try:
        dataset = data_lib.load(base.dataset, base.data_dir, base.image_size)
    except data_lib.DataError as err:
        raise UserError(str(err)) from err
    runs = []
    for s in [0.0, *[s for s in sparsities if s]]:
        cfg = dataclasses.replace(base, sparsity=s, out=str(out / run_name(s)))
        summary = train(cfg, dataset=dataset)
        runs.append({"run": run_name(s), **summary})
    (out / "summary.json").write_text(json.dumps(runs, indent=2) + "\n")
    table = report_table(runs)
    (out / "report.md").write_text(_report(runs, table, command))
    plot(runs, out)
    return runs


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


def _report(runs: list[dict], table: str, command: str) -> str:
    d = runs[0]
    return (
        f"# actprune compare: {d['model']} on {d['dataset']}\n\n"
        f"{d['epochs']} epochs, batch {d['batch_size']}, device {d['device']}, data from "
        f"{d['data_source']}. Command: `{command}`\n\n"
        f"{table}\n\n"
        "Peak step memory: parameters + optimizer state + batch + the peak of one full training "
        "step (forward, backward, optimizer step). Saved activations: bytes autograd holds for "
        "backward after the forward. Both from `actprune.memory` (method: docs/design.md).\n"
    )


def plot(runs: list[dict], out: Path) -> None:
    """accuracy.png and loss.png per epoch for every run; memory.png: peak and saved bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
