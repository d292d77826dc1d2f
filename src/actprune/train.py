"""Train an image classifier, dense or with pruned activations: one loop, read top to bottom.

Writes to ``out``: ``metrics.jsonl`` (one line per epoch), ``checkpoint.pt`` (each epoch, written
atomically; ``resume=True`` continues from it to the same result as an uninterrupted run) and
``summary.json`` (test accuracy, peak memory and saved activation bytes of a training step, median
step time, images/s). Determinism: the data order of epoch e depends only on (seed, e), and the
initial weights only on seed, so dense and pruned runs with one seed see identical batches.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import data as data_lib
from . import models
from .config import PruneConfig
from .convert import describe_compression, prune_activations_
from .layers import exact_gradients
from .memory import measure_training_step

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class UserError(ValueError):
    """Bad input from the user: reported as one line, exit code 2."""


@dataclass
class TrainConfig:
    model: str = "resmlp_tiny"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    out: str = "runs/train"
    epochs: int = 3
    batch_size: int = 128
    optimizer: str = "adamw"  # "adamw" or "lamb"
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.2
    label_smoothing: float = 0.1
    seed: int = 0
    amp: str = "none"  # "none", "bf16", "fp16" (fp16 only on CUDA)
    device: str = "auto"
    sparsity: float = 0.0  # 0: dense nn.Linear, no conversion
    block_size: int = 32
    criterion: str = "l2"
    row_order: str = "token-major"
    selection: str = "column"
    # The training CLI's defaults are actprune's recommended setting: every saved tensor compressed
    # (scope "all") and the dropped blocks kept at 4 bits. The seed paper's method is
    # scope="linear", remainder_bits=0, selection="global"; docs/results/README.md compares.
    scope: str = "all"
    gelu_bits: int = 2
    int8: bool = False
    remainder_bits: int = 4
    # Layers (shell-style patterns on qualified names, comma-separated) kept dense. The classifier
    # head's saved input is tiny (batch × width) while its gradient steers everything else.
    exclude: str = "head"
    image_size: int | None = None  # model/dataset override (default: the dataset's)
    train_subset: int | None = None  # first N training images only (quick runs, tests)
    test_subset: int | None = None
    overwrite: bool = False
    resume: bool = False
    progress: bool = True
    model_overrides: dict = field(default_factory=dict)

    def validate(self) -> None:
        positive = {"epochs": self.epochs, "batch_size": self.batch_size}
        for name, value in positive.items():
            if value <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.optimizer not in ("adamw", "lamb"):
            raise UserError(f"--optimizer must be adamw or lamb, got {self.optimizer!r}")
        if self.amp not in AMP_DTYPES:
            raise UserError(f"--amp must be one of {', '.join(AMP_DTYPES)}, got {self.amp!r}")
        if self.model not in models.list_models():
            raise UserError(
                f"unknown model {self.model!r}; available: {', '.join(models.list_models())}"
            )
        if self.dataset not in data_lib.DATASETS:
            raise UserError(
                f"unknown dataset {self.dataset!r}; available: {', '.join(data_lib.DATASETS)}"
            )
        if self.sparsity:
            self.prune_config()

    def prune_config(self) -> PruneConfig | None:
        if not self.sparsity:
            return None
        try:
            return PruneConfig(
                self.sparsity,
                self.block_size,
                self.criterion,
                self.row_order,
                self.selection,
                self.scope,
                self.gelu_bits,
                self.int8,
                self.remainder_bits,
            )
        except ValueError as err:
            raise UserError(str(err).replace("PruneConfig.", "--").replace("_", "-")) from err


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA GPU is visible")
    return device


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def init_distributed(device: torch.device) -> tuple[Distributed, torch.device]:
    """Join the process group torchrun describes (WORLD_SIZE > 1): gloo on CPU, nccl on CUDA,
    one GPU per local rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(torch.distributed.get_rank(), world), device


def check_out_dir(out: Path, overwrite: bool, resume: bool) -> None:
    """Never clobber earlier results: an existing non-empty folder needs --overwrite or --resume."""
    if out.exists() and any(out.iterdir()) and not (overwrite or resume):
        raise UserError(
            f"output folder {out} exists and is not empty; pass --overwrite (or --resume)"
        )


def prepare_out_dir(out: Path, overwrite: bool, resume: bool) -> None:
    """check_out_dir, then clear our own files (only those) when overwriting, and create it."""
    check_out_dir(out, overwrite, resume)
    if overwrite and not resume and out.exists():
        for name in ("metrics.jsonl", "summary.json", "checkpoint.pt"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def build_model(cfg: TrainConfig, dataset: data_lib.Dataset, device: torch.device) -> nn.Module:
    """Initial weights depend only on cfg.seed; pruning converts layers without touching them."""
    c, h, _ = dataset.image_shape
    torch.manual_seed(cfg.seed)
    overrides = {"img_size": h, "in_chans": c, "num_classes": dataset.num_classes}
    try:
        model = models.create(cfg.model, **{**overrides, **cfg.model_overrides})
    except ValueError as err:
        raise UserError(str(err)) from err
    model.to(device)
    prune = cfg.prune_config()
    if not prune:
        return model
    return prune_activations_(model, prune, exclude=[p for p in cfg.exclude.split(",") if p])


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW, or LAMB (AdamW's update rescaled per tensor by ‖w‖ / ‖update‖, You et al. 2020).

    No weight decay on biases, Affine and LayerScale parameters (1-D tensors).
    """
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "lamb":
        return Lamb(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr)


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2020): the AdamW step of each tensor scaled by trust ratio ‖w‖ / ‖step‖."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ) -> None:  # noqa: ANN001
        super().__init__(
            params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        )

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> None:  # noqa: ARG002
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(p.grad, 1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                m_hat = m / (1 - beta1 ** state["step"])
                v_hat = v / (1 - beta2 ** state["step"])
                update = m_hat / (v_hat.sqrt() + group["eps"]) + group["weight_decay"] * p
                w_norm, u_norm = p.norm(), update.norm()
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, 1.0)
                p.sub_(update * (group["lr"] * trust))


def lr_at(step: int, total: int, warmup: int, base_lr: float) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch: a function of (seed, epoch) only, so resuming replays it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def evaluate(model: nn.Module, split: data_lib.Split, cfg: TrainConfig, device: torch.device):
    """(accuracy %, mean loss) on a split, in eval mode without autograd."""
    model.eval()
    correct, loss_sum = 0, 0.0
    n = len(split) if cfg.test_subset is None else min(cfg.test_subset, len(split))
    with torch.no_grad(), _autocast(cfg, device):
        for start in range(0, n, cfg.batch_size):
            x, y = split.batch(torch.arange(start, min(n, start + cfg.batch_size)))
            logits = model(x.to(device)).float()
            loss_sum += F.cross_entropy(logits, y.to(device), reduction="sum").item()
            correct += (logits.argmax(1).cpu() == y).sum().item()
    model.train()
    return 100.0 * correct / n, loss_sum / n


def _autocast(cfg: TrainConfig, device: torch.device):
    dtype = AMP_DTYPES[cfg.amp]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def measure_step(model: nn.Module, cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Memory of one full training step (``actprune.measure_training_step``) on copies of the
    model and optimizer, so training itself is untouched."""
    model = copy.deepcopy(model)

    def loss_fn() -> torch.Tensor:
        with _autocast(cfg, x.device):
            return F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)

    m = measure_training_step(model, make_optimizer(cfg, model), loss_fn, resident=(x, y))
    return {k: v for k, v in asdict(m).items() if k != "median_step_s"}


def gradient_cosines(
    model: nn.Module, cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor
) -> dict[str, float]:
    """Cosine similarity of each parameter's gradient on one batch to the exact gradient (the same
    model with every actprune layer computing densely, ``exact_gradients``). Leaves .grad unset."""
    grads = []
    for exact in (False, True):
        with exact_gradients() if exact else contextlib.nullcontext(), _autocast(cfg, x.device):
            loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        grads.append(torch.autograd.grad(loss, [p for _, p in params], allow_unused=True))
    out = {}
    for (name, _), approx, exact in zip(params, *grads):
        if approx is not None and exact is not None:
            cos = F.cosine_similarity(approx.flatten().double(), exact.flatten().double(), dim=0)
            out[name] = round(cos.item(), 5)
    return out


def _atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(
    cfg: TrainConfig,
    dataset: data_lib.Dataset | None = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> dict:
    """Train per ``cfg``; returns the summary dict (also written to out/summary.json).

    Under torchrun (WORLD_SIZE > 1) each of the W processes takes every W-th sample of each global
    batch of ``cfg.batch_size`` and DistributedDataParallel averages the gradients; the loss is
    scaled so that the step equals one over the whole global batch. Rank 0 writes all files.
    """
    cfg.validate()
    dist, device = init_distributed(resolve_device(cfg.device))
    if cfg.amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA device (use bf16 on CPU)")
    if cfg.batch_size % dist.world:
        raise UserError(f"--batch-size {cfg.batch_size} must divide among {dist.world} processes")
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    if cfg.resume and not ckpt_path.is_file():
        raise UserError(f"--resume: no checkpoint at {ckpt_path}")
    check_out_dir(out, cfg.overwrite, cfg.resume)
    dist.barrier()  # every rank has checked before rank 0 writes
    if dist.main:
        prepare_out_dir(out, cfg.overwrite, cfg.resume)
    if dataset is None:
        try:
            dataset = data_lib.load(cfg.dataset, cfg.data_dir, cfg.image_size)
        except data_lib.DataError as err:
            raise UserError(str(err)) from err

    core = build_model(cfg, dataset, device)  # the model itself; `model` may wrap it in DDP
    model = core
    if dist.world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(core, device_ids=ids)
    opt = make_optimizer(cfg, core)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    n_train = (
        len(dataset.train)
        if cfg.train_subset is None
        else min(cfg.train_subset, len(dataset.train))
    )
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    total_steps, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)

    start_epoch, history, step_times = 0, [], []
    if cfg.resume:
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        core.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, history, step_times = ckpt["epoch"] + 1, ckpt["history"], ckpt["step_times"]
        torch.set_rng_state(ckpt["rng"]["cpu"])  # stochastic rounding (remainder_bits) draws
        if device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)

    probe = [t.to(device) for t in dataset.train.batch(epoch_order(n_train, cfg.seed, 0)[:256])]
    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, cfg.epochs):
        order = epoch_order(n_train, cfg.seed, epoch)
        seen, correct, loss_sum = 0, 0, 0.0
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            unit="step",
            disable=not (cfg.progress and dist.main),
            file=sys.stderr,
            leave=False,
        )
        for i in bar:
            batch = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            x, y = dataset.train.batch(batch[dist.rank :: dist.world])  # this rank's share
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total_steps, warmup, cfg.lr)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with _autocast(cfg, device):
                logits = model(x)
                ce = F.cross_entropy(
                    logits, y, label_smoothing=cfg.label_smoothing, reduction="sum"
                )
            # DDP averages over ranks: scaled so, the gradient is that of the global-batch mean.
            scaler.scale(ce * (dist.world / batch.numel())).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - t0)
            step += 1
            seen += y.numel()
            loss_sum += ce.item()
            correct += (logits.argmax(1) == y).sum().item()
            bar.set_postfix(
                loss=f"{loss_sum / seen:.3f}",
                acc=f"{100 * correct / seen:.1f}",
                img_s=f"{y.numel() / step_times[-1]:.0f}",
            )
        bar.close()
        if dist.world > 1:  # epoch totals over all ranks
            totals = torch.tensor([loss_sum, correct, seen], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(totals)
            loss_sum, correct, seen = totals[0].item(), totals[1].item(), totals[2].item()
        test_acc, test_loss = evaluate(core, dataset.test, cfg, device)
        record = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / seen,
            "train_acc": 100.0 * correct / seen,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "lr": opt.param_groups[0]["lr"],
        }
        if cfg.sparsity:  # how far the compressed gradients are from exact, on a fixed batch
            record["grad_cosine"] = gradient_cosines(core, cfg, *probe)
        history.append(record)
        if dist.main:
            with (out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
        ckpt = {
            "model": core.state_dict(),
            "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch,
            "history": history,
            "step_times": step_times,
            "rng": {
                "cpu": torch.get_rng_state(),
                **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}),
            },
            "config": asdict(cfg),
        }
        if dist.main:
            _atomic_save(ckpt, ckpt_path)
        dist.barrier()
        if cfg.progress and dist.main:
            print(
                f"epoch {epoch + 1}/{cfg.epochs}: train loss {record['train_loss']:.4f} "
                f"acc {record['train_acc']:.2f}%  test loss {test_loss:.4f} acc {test_acc:.2f}%",
                file=sys.stderr,
            )
        if on_epoch_end:
            on_epoch_end(epoch, record)

    x, y = dataset.train.batch(epoch_order(n_train, cfg.seed, 0)[: cfg.batch_size // dist.world])
    memory = measure_step(core, cfg, x.to(device), y.to(device))  # one process's step
    median_step = statistics.median(step_times[1:] or step_times)  # first step: warm-up
    summary = {
        "model": cfg.model,
        "dataset": dataset.name,
        "data_source": dataset.source,
        "device": str(device),
        "processes": dist.world,
        "sparsity": cfg.sparsity,
        "block_size": cfg.block_size,
        "criterion": cfg.criterion,
        "scope": cfg.scope if cfg.sparsity else None,
        "compressed": describe_compression(core),
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "test_acc": history[-1]["test_acc"],
        "test_loss": history[-1]["test_loss"],
        "history": history,
        **memory,
        "median_step_s": median_step,
        "images_per_s": cfg.batch_size / median_step,
        "parameters": sum(p.numel() for p in model.parameters()),
        "config": asdict(cfg),
    }
    if dist.main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
