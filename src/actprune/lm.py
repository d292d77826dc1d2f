"""Causal language modelling on real text, dense against compressed: ``compare --task lm``.

A byte-level causal LM (actprune's ``gpt_tiny`` by default, or a Hugging Face config such as
``hf:gpt2:vocab_size=256,n_layer=4,n_embd=256,n_head=4``) trains for a fixed number of steps on
the Python standard library's source (``text``). Every run of a comparison starts from the same
weights and sees the same batches (window starts drawn from a generator seeded by ``seed``), so
runs differ only in what backward sees. Reported per run: validation loss and perplexity on fixed
held-out windows, the peak of a training step and the bytes saved for backward
(``measure_training_step``), the median step time, and each parameter's gradient cosine to the
exact gradient on a fixed batch.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from . import models, rng, rowcode
from .compare import compression_section, cosine_by_layer, run_name
from .config import PruneConfig
from .convert import describe_compression
from .memory import measure_training_step
from .methods import MemoryConfig, apply_method
from .plan import require_fits
from .text import VOCAB_SIZE, Corpus, python_stdlib_corpus
from .train import TrainError, gradient_cosines, lr_at, prepare_out_dir, resolve_device
from .workloads import Workload, WorkloadError, build_workload, language_model


@dataclass
class LMConfig:
    """One language-model run; ``prune`` is None for dense training."""

    model: str = "gpt_tiny"  # zoo name or hf:TYPE[:k=v,...] (vocab_size >= 256)
    out: str = "runs/compare_lm"
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 600
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 60
    seed: int = 0
    eval_every: int = 100
    eval_windows: int = 256
    device: str = "auto"
    prune: PruneConfig | None = field(default_factory=lambda: PruneConfig.preset("recommended"))
    # The output head's input is small (one row per token) and its gradient steers everything.
    exclude: tuple[str, ...] = ("head", "lm_head")
    # With ``prune``: also checkpoint every block, holding its input as row codes of these bits
    # (``coded_checkpoint``: a lossy recompute, opt-in); 0: no checkpointing.
    boundary_bits: int = 0
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        """Raise TrainError for anything that would fail later."""
        for name in ("seq_len", "batch_size", "steps", "eval_every", "eval_windows"):
            if getattr(self, name) <= 0:
                raise TrainError(f"must be positive, got {getattr(self, name)}", name)
        if self.boundary_bits not in (0, *rowcode.BITS):
            raise TrainError(f"must be 0, 4 or 8, got {self.boundary_bits}", "boundary_bits")
        if self.warmup_steps < 0:
            raise TrainError(f"must be >= 0, got {self.warmup_steps}", "warmup_steps")
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0 and (value > 0 or name != "lr")):
                raise TrainError(f"must be a finite number >= 0 (lr > 0), got {value}", name)


def build_lm(cfg: LMConfig, device: torch.device | str = "cpu") -> Workload:
    """The run's model (random init, seeded) as a causal-LM ``Workload`` over bytes."""
    torch.manual_seed(cfg.seed)
    on_meta = torch.device(device).type == "meta"  # checking the spec only: no weights
    if not language_model(cfg.model) and cfg.model in models.list_models():
        raise TrainError(f"must be a causal language model; {cfg.model} is an image model",
                         "model")  # fmt: skip
    try:
        work = build_workload(cfg.model, seq_len=cfg.seq_len, device="meta" if on_meta else None)
    except WorkloadError as err:
        raise TrainError(str(err), "model") from err
    if work.task != "causal_lm" or work.classes < VOCAB_SIZE:
        raise TrainError(
            f"must be a causal language model with vocab_size >= {VOCAB_SIZE} (bytes); "
            f"{cfg.model} is {work.task} with {work.classes} classes",
            "model",
        )
    if not on_meta:
        work.model.to(device)
    return work


def _method(cfg: LMConfig) -> MemoryConfig:
    """How a compressed run trains: ``prune`` everywhere, or with ``boundary_bits`` every block
    also checkpointed with coded inputs (and ``prune`` inside)."""
    if cfg.boundary_bits:
        return MemoryConfig.composition(cfg.prune, 1, inside=True, exclude=cfg.exclude,
                                        boundary_bits=cfg.boundary_bits)  # fmt: skip
    return MemoryConfig.actprune(cfg.prune, cfg.exclude)


def _run_name(cfg: LMConfig) -> str:
    """ "dense", or the name ``bench memory`` gives the same configuration."""
    return run_name(None) if cfg.prune is None else _method(cfg).name


def evaluate_lm(work: Workload, model: nn.Module, corpus: Corpus, cfg: LMConfig) -> float:
    """Mean loss (nats per byte) over the fixed validation windows, in eval mode."""
    device = next(model.parameters()).device
    starts = corpus.fixed_starts(cfg.eval_windows, cfg.seq_len)
    total, n = 0.0, 0
    model.eval()
    with torch.no_grad():
        for chunk in starts.split(cfg.batch_size):
            x = corpus.windows("val", chunk, cfg.seq_len).to(device)
            total += work.loss(model, (x, x)).item() * len(chunk)
            n += len(chunk)
    model.train()
    return total / n


def train_lm(cfg: LMConfig, corpus: Corpus) -> dict:
    """Train one run; writes ``cfg.out``/summary.json and metrics.jsonl; returns the summary."""
    cfg.validate()
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    prepare_out_dir(out, cfg.overwrite, resume=False)
    work = build_lm(cfg, device)
    model = work.model
    if cfg.prune is not None:
        apply_method(model, _method(cfg))
    rng.manual_seed(cfg.seed, model)  # the remainder's rounding: the model's own stream
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=(0.9, 0.95))  # fmt: skip
    batches = torch.Generator().manual_seed(cfg.seed)
    history, step_times, losses = [], [], []
    bar = tqdm(range(cfg.steps), desc=_run_name(cfg), unit="step",
               disable=not cfg.progress, file=sys.stderr, leave=False)  # fmt: skip
    for step in bar:
        starts = corpus.random_starts(cfg.batch_size, cfg.seq_len, batches)
        x = corpus.windows("train", starts, cfg.seq_len).to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.steps, cfg.warmup_steps, cfg.lr)
        t0 = time.perf_counter()
        loss = work.loss(model, (x, x))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            record = {"step": step + 1, "train_loss": statistics.fmean(losses),
                      "val_loss": evaluate_lm(work, model, corpus, cfg)}  # fmt: skip
            losses = []
            history.append(record)
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
    bar.close()
    summary = _summarize(cfg, work, corpus, history, step_times)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _summarize(cfg, work: Workload, corpus: Corpus, history: list, step_times: list) -> dict:
    model, device = work.model, next(work.model.parameters()).device
    probe_starts = corpus.random_starts(
        cfg.batch_size, cfg.seq_len, torch.Generator().manual_seed(1)
    )
    probe = corpus.windows("train", probe_starts, cfg.seq_len).to(device)
    cosines = {}
    if cfg.prune is not None:
        cosines = gradient_cosines(model, lambda: work.loss(model, (probe, probe)))
    twin = copy.deepcopy(model)  # the memory of one step, without touching the trained model
    opt = torch.optim.AdamW(twin.parameters(), lr=cfg.lr)
    m = measure_training_step(twin, opt, lambda: work.loss(twin, (probe, probe)), resident=[probe])
    median = statistics.median(step_times[1:] or step_times)
    val = history[-1]["val_loss"]
    return {
        "run": _run_name(cfg),
        "config": {**dataclasses.asdict(cfg), "prune": cfg.prune and cfg.prune.to_dict()},
        "corpus": corpus.source,
        "torch": torch.__version__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "val_loss": val,
        "val_ppl": math.exp(val),
        "history": history,
        "peak_step_bytes": m.peak_step_bytes,
        "saved_activation_bytes": m.saved_activation_bytes,
        "saved_by_kind": m.saved_by_kind,
        "median_step_s": median,
        "tokens_per_s": cfg.batch_size * cfg.seq_len / median,
        "grad_cosine": cosines,
        "saved_tensors": describe_compression(model),
        "prune": cfg.prune and cfg.prune.to_dict(),
    }


def compare_lm(base: LMConfig, prunes: list[PruneConfig], command: str = "") -> list[dict]:
    """Dense and one run per PruneConfig from ``base`` (same seed, weights and batches).

    Args:
        base: the settings shared by every run (its ``prune`` is ignored).
        prunes: the compressed runs.
        command: the command line, quoted in the report.

    Returns:
        One summary per run, dense first; also writes ``base.out``/summary.json, report.md and
        loss.png.
    """
    out = Path(base.out)
    for prune in (None, *prunes):
        dataclasses.replace(base, prune=prune).validate()
    build_lm(base, "meta")  # a bad --model fails before the corpus is read
    try:  # and one that cannot fit, before anything is allocated
        require_fits(base.model, base.batch_size, resolve_device(base.device),
                     seq_len=base.seq_len)  # fmt: skip
    except WorkloadError as err:
        raise TrainError(str(err), "model") from err
    prepare_out_dir(out, base.overwrite, resume=False)
    corpus = python_stdlib_corpus()
    runs = []
    for prune in (None, *prunes):
        cfg = dataclasses.replace(base, prune=prune)
        cfg = dataclasses.replace(cfg, out=str(out / _run_name(cfg)))
        runs.append(train_lm(cfg, corpus))
    (out / "summary.json").write_text(json.dumps(runs, indent=2) + "\n")
    (out / "report.md").write_text(lm_report(runs, command))
    _plot_loss(runs, out / "loss.png")
    return runs


def lm_table(runs: list[dict]) -> str:
    """Markdown: validation loss and memory, every ratio to the dense run of the same comparison."""
    d = runs[0]
    lines = ["| run | val loss (nats/byte) | Δ vs dense | val ppl | peak step MiB | ratio "
             "| saved MiB | ratio | median step ms | ratio | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in runs:
        delta = 100 * (r["val_loss"] / d["val_loss"] - 1)
        lines.append(
            f"| {r['run']} | {r['val_loss']:.4f} | {delta:+.2f} % | {r['val_ppl']:.3f} "
            f"| {r['peak_step_bytes'] / 2**20:.1f} "
            f"| {r['peak_step_bytes'] / d['peak_step_bytes']:.3f} "
            f"| {r['saved_activation_bytes'] / 2**20:.1f} "
            f"| {r['saved_activation_bytes'] / d['saved_activation_bytes']:.3f} "
            f"| {1e3 * r['median_step_s']:.1f} | {r['median_step_s'] / d['median_step_s']:.2f} "
            f"| {r['tokens_per_s']:.0f} |"
        )
    return "\n".join(lines)


def _by_kind_table(runs: list[dict]) -> str:
    dense = runs[0]["saved_by_kind"]
    kinds = sorted(dense, key=lambda k: -dense[k])
    kinds += list(dict.fromkeys(k for r in runs for k in r["saved_by_kind"] if k not in dense))
    lines = [
        "| run | " + " | ".join(f"{k} MiB" for k in kinds) + " |",
        "|---|" + "---|" * len(kinds),
    ]
    for r in runs:
        cells = [f"{r['saved_by_kind'].get(k, 0) / 2**20:.2f}" for k in kinds]
        lines.append(f"| {r['run']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cosine_table(runs: list[dict]) -> str:
    pruned = runs[1:]
    lines = ["| parameter | " + " | ".join(f"{r['run']} mean / min" for r in pruned) + " |",
             "|---|" + "---|" * len(pruned)]  # fmt: skip
    tables = [cosine_by_layer(r["grad_cosine"]) for r in pruned]
    for group in tables[0] if tables else []:
        cells = [f"{t[group][0]:.3f} / {t[group][1]:.3f}" for t in tables]
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def lm_report(runs: list[dict], command: str) -> str:
    """report.md: the table, saved bytes by layer kind, what was compressed, gradient cosines."""
    d, cfg = runs[0], runs[0]["config"]
    return (
        f"# actprune compare --task lm: {cfg['model']} on the Python standard library\n\n"
        f"{d['parameters'] / 1e6:.2f} M parameters; {cfg['steps']} steps of batch "
        f"{cfg['batch_size']} × {cfg['seq_len']} bytes, AdamW lr {cfg['lr']}, seed {cfg['seed']}; "
        f"validation on {cfg['eval_windows']} fixed held-out windows. {d['corpus']}. "
        f"torch {d['torch']}.\n\n"
        f"Command: `{command}`\n\n{lm_table(runs)}\n\n"
        "Peak step: parameters + AdamW state + batch + the peak of one training step. Saved: bytes "
        "autograd holds for backward after the forward, by the kind of module that saved them:\n\n"
        f"{_by_kind_table(runs)}\n\n## What was compressed\n\n{compression_section(runs)}\n\n"
        "## Gradient cosine to the exact gradient (end of training, fixed batch)\n\n"
        f"{_cosine_table(runs)}\n"
    )


def _plot_loss(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        steps = [h["step"] for h in r["history"]]
        ax.plot(steps, [h["val_loss"] for h in r["history"]], marker="o", label=r["run"])
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
