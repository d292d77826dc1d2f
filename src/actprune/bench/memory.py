"""Whole-training-step memory and speed of every method (``actprune.methods``) in one run.

Each configuration trains the same model on the same batch on the same device; every ratio is to
the dense row of the same run.
"""

from __future__ import annotations

import copy
import gc
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch

from ..config import PruneConfig
from ..memory import measure_training_step
from ..methods import MemoryConfig, apply_method, methods
from ..workloads import build_workload
from . import device_name, save_results


@dataclass
class MemoryRow:
    config: MemoryConfig
    saved_bytes: int
    saved_by_kind: dict[str, int]
    peak_step_bytes: int
    resident_bytes: int
    median_step_s: float
    shared_bytes: int = 0
    ratios: dict[str, float] = field(default_factory=dict)


def run_memory_bench(
    spec: str = "resmlp_s24",
    batch: int = 8,
    configs: Iterable[MemoryConfig] | None = None,
    device: str = "cpu",
    timing_steps: int = 3,
    image_size: int | None = None,
    seq_len: int | None = None,
    num_classes: int | None = None,
    progress: Callable[[str], None] | None = None,
    amp: torch.dtype | None = None,
    **overrides: object,
) -> list[MemoryRow]:
    """Measure every configuration on the model of ``spec`` (``workloads.build_workload``: a zoo
    name, ``timm:NAME`` or ``hf:TYPE[:k=v,...]``; ``overrides``: a zoo model's arguments), the
    forward under autocast to ``amp`` when given; ratios are to the dense row of this run."""
    configs = list(configs or methods([PruneConfig.preset("recommended")]))
    if configs[0].family != "dense":
        raise ValueError("the first configuration must be dense: it is every ratio's baseline")
    torch.manual_seed(0)
    work = build_workload(spec, image_size, seq_len, num_classes, **overrides)
    data = work.batch(batch, device)
    rows = []
    for i, config in enumerate(configs):
        model = apply_method(copy.deepcopy(work.model), config).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        m = measure_training_step(
            model,
            optimizer,
            partial(_loss, work, model, data, amp),
            resident=data,
            timing_steps=timing_steps,
        )
        rows.append(
            MemoryRow(
                config,
                m.saved_activation_bytes,
                m.saved_by_kind,
                m.peak_step_bytes,
                m.resident_bytes,
                m.median_step_s,
                m.shared_bytes,
            )
        )
        if progress:
            progress(
                f"[{i + 1}/{len(configs)}] {config.name}: peak {m.peak_step_bytes / 2**20:.0f}"
                f" MiB, saved {m.saved_activation_bytes / 2**20:.0f} MiB"
            )
        del model, optimizer  # this configuration's weights, gradients and state go now
        gc.collect()
    dense = rows[0]
    for r in rows:
        r.ratios = {
            "saved": r.saved_bytes / dense.saved_bytes,
            "peak": r.peak_step_bytes / dense.peak_step_bytes,
            "step_time": r.median_step_s / dense.median_step_s,
        }
    return rows


def _loss(work, model, data, amp: torch.dtype | None) -> torch.Tensor:
    device = data[0].device.type
    with torch.autocast(device, dtype=amp, enabled=amp is not None):
        return work.loss(model, data)


def memory_table(rows: list[MemoryRow]) -> str:
    """Markdown: every measured figure with its ratio to dense."""
    kinds = sorted(
        {k for r in rows for k in r.saved_by_kind}, key=lambda k: -rows[0].saved_by_kind.get(k, 0)
    )
    head = [
        "config",
        "saved MiB",
        "× dense",
        *[f"{k} MiB" for k in kinds],
        "peak step MiB",
        "× dense",
        "peak saved %",
        "step s",
        "× dense",
        "shared MiB",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r.config.name,
            f"{r.saved_bytes / 2**20:.1f}",
            f"{r.ratios['saved']:.3f}",
            *[f"{r.saved_by_kind.get(k, 0) / 2**20:.1f}" for k in kinds],
            f"{r.peak_step_bytes / 2**20:.1f}",
            f"{r.ratios['peak']:.3f}",
            f"{100 * (1 - r.ratios['peak']):.1f}",
            f"{r.median_step_s:.3f}",
            f"{r.ratios['step_time']:.2f}",
            f"{r.shared_bytes / 2**20:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_memory(rows: list[MemoryRow], path: Path) -> None:
    """Peak and saved bytes (× dense) vs sparsity, one line per block size, with the ideal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    pruned = [r for r in rows if r.config.family in ("actprune", "uniform")]
    sparsities = sorted({r.config.prune.sparsity for r in pruned})
    for ax, key, title in (
        (axes[0], "peak", "peak step memory"),
        (axes[1], "saved", "saved for backward"),
    ):

        def variant(r: MemoryRow) -> str:  # the label without the sparsity
            return re.sub(r"_?s[0-9.]+(?=_b)", "", r.config.prune.label()).strip("_")

        for v in sorted({variant(r) for r in pruned}):
            pts = sorted(
                (r.config.prune.sparsity, r.ratios[key]) for r in pruned if variant(r) == v
            )
            ax.plot(*zip(*pts), marker="o", label=v)
        unstructured = sorted(
            (r.config.prune.sparsity, r.ratios[key])
            for r in rows
            if r.config.family == "unstructured"
        )
        if unstructured:
            ax.plot(*zip(*unstructured), marker="x", ls="--", color="gray", label="unstructured")
        for r in rows:
            if r.config.family in ("checkpoint", "selective"):
                ax.axhline(r.ratios[key], color="tab:red", ls=":", lw=1, label=r.config.name)
        if key == "saved" and sparsities:
            # Ideal: only the pruned tensors shrink, to (1 - s) of their dense bytes.
            dense = rows[0]
            linear = dense.saved_by_kind.get("linear", 0) / dense.saved_bytes
            ax.plot(
                sparsities,
                [1 - linear * s for s in sparsities],
                color="black",
                lw=1,
                label="ideal (Linear inputs × (1 − s))",
            )
        ax.set_title(title)
        ax.set_xlabel("sparsity")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("× dense")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_memory_results(
    rows: list[MemoryRow], out_dir: Path, stem: str, command: str, setup: dict
) -> str:
    """``stem``.json, ``stem``.md and ``stem``.png under out_dir; returns the markdown."""
    table = memory_table(rows)
    dev = device_name(setup["device"])
    md = (
        f"# Training-step memory: {setup['model']} at {setup['input']}, batch "
        f"{setup['batch']}, on {dev}{', autocast ' + setup['amp'] if setup.get('amp') else ''}\n\n"
        f"torch {torch.__version__}. Command: `{command}`\n\n"
        "saved = bytes autograd holds for backward after the forward (by kind of layer that saved "
        "them); peak step = parameters + AdamW state + batch + the peak of one forward, backward "
        "and optimizer step; step s = median wall time of a step; shared = bytes several ops "
        "saved but held once. Every × is to the dense row of this run.\n\n"
        f"{table}\n"
    )
    if any(r.config.family == "selective" for r in rows):
        md += (
            "\nSelective checkpointing holds the matmul outputs in its own cache, not through "
            "saved-tensor hooks: its saved column counts only the block inputs; its peak counts "
            "everything.\n"
        )
    payload = {
        **setup,
        "device_name": dev,
        "torch": torch.__version__,
        "command": command,
        "rows": [asdict(r) for r in rows],
    }
    save_results(out_dir, stem, md, payload)
    plot_memory(rows, out_dir / f"{stem}.png")
    return md
