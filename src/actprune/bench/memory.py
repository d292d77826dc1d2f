"""Whole-training-step memory and speed: dense vs the alternatives users would pick.

Configurations, all measured in one run on the same model, batch and device:
- ``dense``: plain training;
- ``checkpoint``: every block under ``torch.utils.checkpoint`` (non-reentrant): only block inputs
  are held, the block's forward runs twice;
- ``unstructured_s{s}``: the same saved tensors as actprune (Linear inputs) kept as the top-k
  *elements* by magnitude, stored as values + int32 indices — the DropIT approach, i.e. actprune
  with 1×1 blocks;
- ``actprune_s{s}_b{b}``: block-sparse pruning of the Linear inputs (``--scope linear``);
- ``actprune_all_s{s}_b{b}`` (``--scope all``): also the Affine and LayerScale inputs, and GELU
  inputs as a 2-bit derivative code; ``…_int8_…`` keeps the kept blocks in int8, ``…_r{b}_…``
  also keeps the dropped blocks at b bits (``PruneConfig.remainder_bits``).
The classifier head stays dense in every pruned configuration (as in ``actprune train``).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import models
from ..config import PruneConfig
from ..convert import prune_activations_
from ..memory import measure_training_step
from . import device_name

SPARSITIES = (0.5, 0.8, 0.9, 0.95)
BASELINES = ("checkpoint", "unstructured")
BLOCKS = (8, 16, 32, 64)


class Checkpointed(nn.Module):
    """Runs ``block`` under non-reentrant activation checkpointing: only the block's input is held
    for backward (saved through saved-tensor hooks, so it is counted, as kind "checkpointed")."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.block, x, use_reentrant=False)


@dataclass(frozen=True)
class MemoryConfig:
    name: str
    method: str  # "dense", "checkpoint", "unstructured", "actprune"
    sparsity: float = 0.0
    block: int = 0
    scope: str = "linear"  # PruneConfig.scope
    int8: bool = False  # PruneConfig.int8
    remainder_bits: int = 0  # PruneConfig.remainder_bits

    def prune_config(self) -> PruneConfig:
        """What ``apply_config`` converts with (unstructured: 1×1 blocks, global top-k)."""
        selection = "global" if self.method == "unstructured" else "column"
        return PruneConfig(
            self.sparsity,
            self.block,
            selection=selection,
            scope=self.scope,
            int8=self.int8,
            remainder_bits=self.remainder_bits,
        )


def actprune_config(
    sparsity: float, block: int, scope: str = "linear", int8: bool = False, remainder_bits: int = 0
) -> MemoryConfig:
    """The MemoryConfig of one actprune setting, named as in the tables."""
    tag = "" if scope == "linear" else f"{scope}_"
    tag += "int8_" if int8 else ""
    tag += f"r{remainder_bits}_" if remainder_bits else ""
    name = f"actprune_{tag}s{sparsity:g}_b{block}"
    return MemoryConfig(name, "actprune", sparsity, block, scope, int8, remainder_bits)


def default_configs(
    sparsities: Iterable[float] = SPARSITIES,
    blocks: Iterable[int] = BLOCKS,
    scopes: Iterable[str] = ("linear",),
    int8: bool = False,
    baselines: Iterable[str] = BASELINES,
    remainder_bits: Iterable[int] = (0,),
) -> list[MemoryConfig]:
    """dense, then the ``baselines`` ("checkpoint", "unstructured"), then actprune for every
    scope × remainder bits × sparsity × block (and the int8 variant of each when ``int8``)."""
    configs = [MemoryConfig("dense", "dense")]
    sparsities = list(sparsities)
    if "checkpoint" in baselines:
        configs.append(MemoryConfig("checkpoint", "checkpoint"))
    if "unstructured" in baselines:
        configs += [MemoryConfig(f"unstructured_s{s:g}", "unstructured", s, 1) for s in sparsities]
    for scope in scopes:
        for r in remainder_bits:
            for q in (False, True) if int8 else (False,):
                configs += [actprune_config(s, b, scope, q, r) for s in sparsities for b in blocks]
    return configs


def apply_config(model: nn.Module, config: MemoryConfig) -> nn.Module:
    """Convert ``model`` in place for a configuration; returns it."""
    if config.method == "checkpoint":
        model.blocks = nn.Sequential(*[Checkpointed(b) for b in model.blocks])
    elif config.method in ("unstructured", "actprune"):
        prune_activations_(model, config.prune_config(), exclude="head")
    return model


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
    model_name: str = "resmlp_s24",
    image_size: int = 224,
    batch: int = 8,
    configs: Iterable[MemoryConfig] | None = None,
    device: str = "cpu",
    timing_steps: int = 3,
    num_classes: int = 1000,
    progress: Callable[[str], None] | None = None,
) -> list[MemoryRow]:
    """Measure every configuration; ratios are to the dense row of this same run."""
    configs = list(configs or default_configs())
    if configs[0].method != "dense":
        raise ValueError("the first configuration must be dense: it is every ratio's baseline")
    torch.manual_seed(0)
    base = models.create(model_name, img_size=image_size, num_classes=num_classes)
    gen = torch.Generator().manual_seed(0)
    c = base.config.in_chans
    x = torch.randn(batch, c, image_size, image_size, generator=gen).to(device)
    y = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
    rows = []
    for i, config in enumerate(configs):
        model = apply_config(copy.deepcopy(base), config).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        m = measure_training_step(
            model,
            optimizer,
            lambda: F.cross_entropy(model(x), y),  # noqa: B023 - used within this iteration
            resident=(x, y),
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
    dense = rows[0]
    for r in rows:
        r.ratios = {
            "saved": r.saved_bytes / dense.saved_bytes,
            "peak": r.peak_step_bytes / dense.peak_step_bytes,
            "step_time": r.median_step_s / dense.median_step_s,
        }
    return rows


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
    pruned = [r for r in rows if r.config.method == "actprune"]
    sparsities = sorted({r.config.sparsity for r in pruned})
    for ax, key, title in (
        (axes[0], "peak", "peak step memory"),
        (axes[1], "saved", "saved for backward"),
    ):

        def variant(r: MemoryRow) -> tuple:
            c = r.config
            return (c.scope, c.int8, c.remainder_bits, c.block)

        for v in sorted({variant(r) for r in pruned}):
            scope, int8, bits, block = v
            pts = sorted((r.config.sparsity, r.ratios[key]) for r in pruned if variant(r) == v)
            label = f"scope {scope}{' int8' if int8 else ''}{f' r{bits}' if bits else ''}"
            label += f", block {block}"
            ax.plot(*zip(*pts), marker="o", label=label)
        unstructured = sorted(
            (r.config.sparsity, r.ratios[key]) for r in rows if r.config.method == "unstructured"
        )
        if unstructured:
            ax.plot(*zip(*unstructured), marker="x", ls="--", color="gray", label="unstructured")
        for r in rows:
            if r.config.method == "checkpoint":
                ax.axhline(r.ratios[key], color="tab:red", ls=":", label="checkpointing")
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
    out_dir.mkdir(parents=True, exist_ok=True)
    table = memory_table(rows)
    dev = device_name(setup["device"])
    md = (
        f"# Training-step memory: {setup['model']} at {setup['image_size']} px, batch "
        f"{setup['batch']}, on {dev}\n\n"
        f"torch {torch.__version__}. Command: `{command}`\n\n"
        "saved = bytes autograd holds for backward after the forward (by kind of layer that saved "
        "them); peak step = parameters + AdamW state + batch + the peak of one forward, backward "
        "and optimizer step; step s = median wall time of a step; shared = bytes several ops "
        "saved but held once. Every × is to the dense row of this run.\n\n"
        f"{table}\n"
    )
    (out_dir / f"{stem}.md").write_text(md)
    payload = {
        **setup,
        "device_name": dev,
        "torch": torch.__version__,
        "command": command,
        "rows": [asdict(r) for r in rows],
    }
    (out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    plot_memory(rows, out_dir / f"{stem}.png")
    return md
