"""Train an image classifier, dense or with compressed activations: a loop read in pieces.

``train(cfg)`` reads like a table of contents: set up the run (``setup_run``), resume
(``load_checkpoint``), then per epoch ``train_one_epoch``, ``evaluate``, ``save_checkpoint``, and
finally ``summarize``. It writes to ``cfg.out``: ``metrics.jsonl`` (one line per epoch),
``checkpoint.pt`` (each epoch, atomic; ``resume=True`` continues from it to the same result as an
uninterrupted run) and ``summary.json`` (test accuracy, peak memory and saved activation bytes of
a training step, median step time, images/s). Determinism: the data order of epoch e depends only
on (seed, e), and the initial weights only on seed, so dense and compressed runs with one seed see
identical batches.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import pickle
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
from . import models, rng
from .config import PruneConfig, is_int, is_number
from .convert import describe_compression, prune_activations_
from .layers import exact_gradients
from .memory import measure_training_step

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
OPTIMIZERS = ("adamw", "lamb")


class TrainError(ValueError):
    """A run that cannot start as configured (bad option, missing checkpoint, occupied folder).

    ``field`` names the TrainConfig field at fault, if one is (the CLI shows it as its flag)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(f"{field} {message}" if field else message)
        self.message, self.field = message, field


@dataclass
class TrainConfig:
    """Everything one training run needs; ``prune`` is None for dense training."""

    model: str = "resmlp_tiny"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    out: str = "runs/train"
    epochs: int = 3
    batch_size: int = 128
    optimizer: str = "adamw"  # one of OPTIMIZERS
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.2
    label_smoothing: float = 0.1
    seed: int = 0
    amp: str = "none"  # one of AMP_DTYPES ("fp16" only on CUDA)
    device: str = "auto"
    prune: PruneConfig | None = field(default_factory=lambda: PruneConfig.preset("recommended"))
    # Layers (shell-style patterns on qualified names) kept dense. The classifier head's saved
    # input is tiny (batch × width) while its gradient steers everything else.
    exclude: tuple[str, ...] = ("head",)
    image_size: int | None = None  # model/dataset override (default: the dataset's)
    train_subset: int | None = None  # first N training images only (quick runs, tests)
    test_subset: int | None = None
    overwrite: bool = False
    resume: bool = False
    progress: bool = True
    model_overrides: dict = field(default_factory=dict)

    def validate(self) -> None:
        """Raise TrainError for anything that would fail later."""
        for name in ("epochs", "batch_size", "train_subset", "test_subset", "image_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise TrainError(f"must be positive, got {value}", name)
        ranges = {  # (low, high, low allowed): finite numbers only
            "lr": (0.0, math.inf, False),
            "weight_decay": (0.0, math.inf, True),
            "warmup_epochs": (0.0, math.inf, True),
            "label_smoothing": (0.0, 1.0, True),
        }
        for name, (low, high, closed) in ranges.items():
            value = getattr(self, name)
            if not (
                math.isfinite(value) and (value >= low if closed else value > low) and value < high
            ):
                bounds = f"{'[' if closed else '('}{low:g}, {high:g})"
                raise TrainError(f"must be a finite number in {bounds}, got {value}", name)
        choices = {"optimizer": OPTIMIZERS, "amp": tuple(AMP_DTYPES)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                value = getattr(self, name)
                raise TrainError(f"must be one of {', '.join(allowed)}, got {value!r}", name)
        if self.model not in models.list_models():
            raise TrainError(
                f"unknown model {self.model!r}; available: {', '.join(models.list_models())}"
            )
        if self.dataset not in data_lib.DATASETS:
            raise TrainError(
                f"unknown dataset {self.dataset!r}; available: {', '.join(data_lib.DATASETS)}"
            )
        if self.prune is not None and not isinstance(self.prune, PruneConfig):
            raise TrainError(f"must be a PruneConfig or None, got {self.prune!r}", "prune")

    def to_dict(self) -> dict:
        """Plain values only (JSON, and checkpoints that load with ``weights_only=True``)."""
        d = asdict(self)
        d["prune"] = None if self.prune is None else self.prune.to_dict()
        d["exclude"] = list(self.exclude)
        return d


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise TrainError(f"must be auto, cpu, cuda or cuda:N, got {name!r}", "device") from None
    if device.type not in ("cpu", "cuda"):
        raise TrainError(f"must be auto, cpu, cuda or cuda:N, got {name!r}", "device")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError("cuda requested but no CUDA GPU is visible", "device")
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
    if out.exists() and not out.is_dir():
        raise TrainError(f"{out} is a file, not a folder", "out")
    if out.exists() and any(out.iterdir()) and not (overwrite or resume):
        raise TrainError(
            f"output folder {out} exists and is not empty; pass --overwrite (or --resume)"
        )


def prepare_out_dir(out: Path, overwrite: bool, resume: bool) -> None:
    """check_out_dir, then clear our own files (only those) when overwriting, and create it."""
    check_out_dir(out, overwrite, resume)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TrainError(f"cannot create {out}: {err.strerror or err}", "out") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise TrainError(f"cannot write in {out} (permission denied)", "out")
    if overwrite and not resume:
        for name in ("metrics.jsonl", "summary.json", "checkpoint.pt"):
            (out / name).unlink(missing_ok=True)


def build_model(cfg: TrainConfig, dataset: data_lib.Dataset, device: torch.device) -> nn.Module:
    """Initial weights depend only on cfg.seed; pruning converts layers without touching them."""
    c, h, _ = dataset.image_shape
    torch.manual_seed(cfg.seed)
    overrides = {"img_size": h, "in_chans": c, "num_classes": dataset.num_classes}
    try:
        model = models.create(cfg.model, **{**overrides, **cfg.model_overrides})
    except ValueError as err:
        raise TrainError(str(err)) from err
    model.to(device)
    if cfg.prune is None:
        return model
    model = prune_activations_(model, cfg.prune, exclude=cfg.exclude)
    rng.manual_seed(cfg.seed, model)  # the remainder's rounding: the model's own stream
    return model


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
    ) -> None:
        super().__init__(
            params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        )

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> None:
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


def gradient_cosines(model: nn.Module, loss_fn: Callable[[], torch.Tensor]) -> dict[str, float]:
    """Cosine similarity of each parameter's gradient of ``loss_fn()`` (one fixed batch) to the
    exact gradient (the same model with every actprune layer computing densely,
    ``exact_gradients``). Leaves .grad unset."""
    grads = []
    for exact in (False, True):
        with exact_gradients() if exact else contextlib.nullcontext():
            loss = loss_fn()
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        grads.append(torch.autograd.grad(loss, [p for _, p in params], allow_unused=True))
    out = {}
    for (name, _), approx, exact in zip(params, *grads):
        if approx is not None and exact is not None:
            cos = F.cosine_similarity(approx.flatten().double(), exact.flatten().double(), dim=0)
            out[name] = round(cos.item(), 5)
    return out


@dataclass
class Run:
    """What one training run holds: its device and process group, data, model and optimizer."""

    cfg: TrainConfig
    device: torch.device
    dist: Distributed
    out: Path
    dataset: data_lib.Dataset
    core: nn.Module  # the model itself
    model: nn.Module  # core, or core wrapped in DistributedDataParallel
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    n_train: int
    steps_per_epoch: int

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"


@dataclass
class Progress:
    """What a checkpoint carries besides weights: epochs done, their records, step times."""

    epoch: int = 0  # the next epoch to run
    history: list[dict] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)


def setup_run(cfg: TrainConfig, dataset: data_lib.Dataset | None) -> Run:
    """Validate, join the process group, prepare the output folder, load data, build the model."""
    cfg.validate()
    dist, device = init_distributed(resolve_device(cfg.device))
    if cfg.amp == "fp16" and device.type != "cuda":
        raise TrainError("fp16 needs a CUDA device (use bf16 on CPU)", "amp")
    if cfg.batch_size % dist.world:
        raise TrainError(f"{cfg.batch_size} must divide among {dist.world} processes", "batch_size")
    out = Path(cfg.out)
    if cfg.resume and not (out / "checkpoint.pt").is_file():
        raise TrainError(f"found no checkpoint at {out / 'checkpoint.pt'}", "resume")
    check_out_dir(out, cfg.overwrite, cfg.resume)
    dist.barrier()  # every rank has checked before rank 0 writes
    if dist.main:
        prepare_out_dir(out, cfg.overwrite, cfg.resume)
    if dataset is None:
        try:
            dataset = data_lib.load(cfg.dataset, cfg.data_dir, cfg.image_size)
        except data_lib.DataError as err:
            raise TrainError(str(err)) from err
    core = build_model(cfg, dataset, device)
    model = core
    if dist.world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(core, device_ids=ids)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    n_train = (
        len(dataset.train)
        if cfg.train_subset is None
        else min(cfg.train_subset, len(dataset.train))
    )
    steps = math.ceil(n_train / cfg.batch_size)
    opt = make_optimizer(cfg, core)
    return Run(cfg, device, dist, out, dataset, core, model, opt, scaler, n_train, steps)


def save_checkpoint(run: Run, progress: Progress) -> None:
    """Weights, optimizer, scaler, progress, RNG state and config, written atomically by rank 0.

    Only tensors and plain values: it loads with ``torch.load(weights_only=True)``."""
    cuda = run.device.type == "cuda"
    ckpt = {
        "model": run.core.state_dict(),
        "optimizer": run.opt.state_dict(),
        "scaler": run.scaler.state_dict(),
        "epoch": progress.epoch - 1,  # the last epoch done
        "history": progress.history,
        "step_times": progress.step_times,
        "rng": {
            "cpu": torch.get_rng_state(),
            **({"cuda": torch.cuda.get_rng_state(run.device)} if cuda else {}),
            "actprune": rng.get_state(run.core),
        },
        "config": run.cfg.to_dict(),
    }
    if run.dist.main:
        tmp = run.checkpoint_path.with_suffix(".pt.tmp")
        torch.save(ckpt, tmp)
        os.replace(tmp, run.checkpoint_path)
    run.dist.barrier()


# Settings a resumed run may change: where it writes and reads, how long it runs, what it shows.
RESUMABLE_CHANGES = (
    "out",
    "data_dir",
    "epochs",
    "resume",
    "overwrite",
    "progress",
    "device",
    "test_subset",
)


def read_checkpoint(path: Path, device: torch.device) -> dict:
    """``torch.load(weights_only=True)`` of an actprune checkpoint, or TrainError in one line.

    Only tensors and plain values load: a checkpoint holding anything else (a pickled callable)
    is refused, because unpickling it could run code."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err):
            raise TrainError(
                f"refused {path}: it holds objects other than tensors and plain "
                "values, and loading them could run code",
                "resume",
            ) from None
        raise TrainError(f"cannot read {path}: {str(err).splitlines()[0]}", "resume") from None
    except Exception as err:  # a file from outside: any failure to parse means corrupt
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise TrainError(
            f"cannot read {path} (corrupt or not a checkpoint: {reason})", "resume"
        ) from None
    keys = {"model", "optimizer", "scaler", "epoch", "history", "step_times", "rng", "config"}
    if not isinstance(ckpt, dict) or not keys <= set(ckpt):
        raise TrainError(f"{path} is not an actprune training checkpoint", "resume")
    problem = checkpoint_problem(ckpt)
    if problem:
        raise TrainError(f"{path} is not a valid actprune checkpoint: {problem}", "resume")
    return ckpt


# What a resumed run may set through the checkpoint's model_overrides: the model flags' fields.
MODEL_OVERRIDES = ("patch_size", "width", "depth")


def checkpoint_problem(ckpt: dict) -> str | None:
    """What is wrong with the fields of a checkpoint (a file from anywhere), by type and range,
    before anything of it is used; None when nothing is. Whether its tensors fit the model and
    optimizer is ``state_problem``'s question, once they are built."""
    config = ckpt["config"]
    if not isinstance(config, dict):
        return f"config must be a dict, got {type(config).__name__}"
    try:
        saved = config_from_dict(config)
    except TrainError as err:
        return f"config: {err}"
    epoch = ckpt["epoch"]
    if not is_int(epoch) or not 0 <= epoch < saved.epochs:
        return f"epoch (the last one done) must be an integer in [0, {saved.epochs}), got {epoch!r}"
    history, times = ckpt["history"], ckpt["step_times"]
    if not (isinstance(history, list) and len(history) == epoch + 1
            and all(isinstance(h, dict) for h in history)):  # fmt: skip
        return f"history must be a list of {epoch + 1} dicts (one per epoch done)"
    if not (isinstance(times, list) and all(is_number(t) and t >= 0 for t in times)):
        return "step_times must be a list of non-negative numbers"
    states = ckpt["rng"]
    if not isinstance(states, dict) or not {"cpu", "actprune"} <= set(states):
        return "rng must be a dict holding 'cpu' and 'actprune'"
    for name in ("cpu", "cuda"):
        state = states.get(name, torch.empty(0, dtype=torch.uint8))
        tensor = isinstance(state, torch.Tensor)
        if not (tensor and state.dtype == torch.uint8 and state.dim() == 1):
            got = f"{state.dtype} {tuple(state.shape)}" if tensor else type(state).__name__
            return f"rng.{name} must be a 1-D uint8 tensor (torch.get_rng_state()), got {got}"
    if states["cpu"].numel() != torch.get_rng_state().numel():
        return f"rng.cpu must hold {torch.get_rng_state().numel()} bytes"
    problem = rng.state_problem(states["actprune"])
    if problem:
        return f"rng.actprune: {problem}"
    model, opt, scaler = ckpt["model"], ckpt["optimizer"], ckpt["scaler"]
    tensors = isinstance(model, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()
    )
    if not (tensors and model):
        return "model must be a non-empty dict of parameter names to tensors"
    if not (isinstance(opt, dict) and isinstance(opt.get("state"), dict)
            and isinstance(opt.get("param_groups"), list)):  # fmt: skip
        return "optimizer must be an optimizer state_dict (state and param_groups)"
    if not isinstance(scaler, dict):
        return f"scaler must be a dict (GradScaler.state_dict()), got {type(scaler).__name__}"
    return None


def state_problem(ckpt: dict, model: nn.Module, opt: torch.optim.Optimizer) -> str | None:
    """Whether a checkpoint's model and optimizer state fit ``model`` and ``opt``: the same
    parameter names and shapes, the same parameter groups, state tensors shaped like their
    parameters. None when they do."""
    want = model.state_dict()
    got = ckpt["model"]
    if set(got) != set(want):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        return (f"model tensors differ from the model's: missing {missing[:3]}, unexpected "
                f"{extra[:3]}")  # fmt: skip
    for name, tensor in want.items():
        if got[name].shape != tensor.shape or got[name].dtype != tensor.dtype:
            return (f"model tensor {name} is {got[name].dtype} {tuple(got[name].shape)}, the "
                    f"model's is {tensor.dtype} {tuple(tensor.shape)}")  # fmt: skip
    groups, saved = opt.state_dict()["param_groups"], ckpt["optimizer"]["param_groups"]
    sizes = [len(g["params"]) for g in groups]
    if not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in saved) or [
        len(g["params"]) for g in saved
    ] != sizes:
        return f"optimizer param_groups must be {len(sizes)} group(s) of {sizes} parameters"
    params = [p for group in opt.param_groups for p in group["params"]]
    ids = [i for g in saved for i in g["params"]]
    for key, state in ckpt["optimizer"]["state"].items():
        if key not in ids or not isinstance(state, dict):
            return f"optimizer state {key!r} belongs to no parameter"
        shape = params[ids.index(key)].shape
        for field_name, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != shape:
                return (f"optimizer state {key}.{field_name} is {tuple(value.shape)}, its "
                        f"parameter {tuple(shape)}")  # fmt: skip
    return None


def config_from_dict(d: dict) -> TrainConfig:
    """The TrainConfig of ``TrainConfig.to_dict()``'s output, each field checked by type and
    range (``validate``); TrainError naming the field otherwise."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise TrainError(f"unknown fields {unknown}")
    values = dict(d)
    for name, value in d.items():
        if name == "prune":
            if value is not None:
                if not isinstance(value, dict):
                    raise TrainError(f"must be a dict or None, got {value!r}", name)
                try:
                    values[name] = PruneConfig.from_dict(value)
                except (ValueError, TypeError) as err:
                    raise TrainError(str(err), name) from None
        elif name == "exclude":
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise TrainError(f"must be a list of name patterns, got {value!r}", name)
            values[name] = tuple(value)
        elif name == "model_overrides":
            if not (isinstance(value, dict) and set(value) <= set(MODEL_OVERRIDES)
                    and all(is_int(v) and v > 0 for v in value.values())):  # fmt: skip
                raise TrainError(
                    f"must map some of {', '.join(MODEL_OVERRIDES)} to positive integers, "
                    f"got {value!r}", name,
                )  # fmt: skip
        elif not _fits_type(value, fields[name].type):
            raise TrainError(f"has the wrong type: {value!r}", name)
    cfg = TrainConfig(**values)
    cfg.validate()  # ranges and choices; the types were checked above
    return cfg


def _fits_type(value: object, annotation: str) -> bool:
    """Whether value suits a TrainConfig field annotated ``annotation`` ("int | None", ...)."""
    kinds = [k.strip() for k in annotation.split("|")]
    checks = {
        "int": is_int(value),
        "float": is_number(value),
        "str": isinstance(value, str),
        "bool": isinstance(value, bool),
        "None": value is None,
    }
    return any(checks.get(k, False) for k in kinds)




def check_resumable(cfg: TrainConfig, ckpt: dict) -> None:
    """A resumed run continues the same run: refuse changed settings and fewer epochs."""
    saved, now = ckpt["config"], cfg.to_dict()
    changed = [
        f"{k} {saved.get(k)!r} -> {now[k]!r}"
        for k in now
        if k not in RESUMABLE_CHANGES and saved.get(k) != now[k]
    ]
    if changed:
        raise TrainError(
            f"the checkpoint was made with other settings ({'; '.join(changed)}); "
            "resume with the same ones or start afresh with --overwrite",
            "resume",
        )
    done = ckpt["epoch"] + 1
    if cfg.epochs < done:
        raise TrainError(
            f"the checkpoint has {done} epochs done; --epochs {cfg.epochs} would "
            f"undo them (pass --epochs {done} or more)",
            "resume",
        )


def append_metrics(run: Run, record: dict) -> None:
    """One line of metrics.jsonl (rank 0)."""
    if run.dist.main:
        with (run.out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")


def load_checkpoint(run: Run) -> Progress:
    """Restore weights, optimizer, scaler and RNG state; return the progress to continue from.

    metrics.jsonl is rewritten from the checkpoint's history, the record of what was done."""
    ckpt = read_checkpoint(run.checkpoint_path, run.device)
    check_resumable(run.cfg, ckpt)
    problem = state_problem(ckpt, run.core, run.opt)
    if problem:
        raise TrainError(f"{run.checkpoint_path} does not fit this run: {problem}", "resume")
    run.core.load_state_dict(ckpt["model"])
    run.opt.load_state_dict(ckpt["optimizer"])
    run.scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["cpu"])
    if run.device.type == "cuda":
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], run.device)
    rng.set_state(ckpt["rng"]["actprune"], run.core)  # the remainder's stochastic rounding
    if run.dist.main:
        lines = "".join(json.dumps(record) + "\n" for record in ckpt["history"])
        (run.out / "metrics.jsonl").write_text(lines)
    return Progress(ckpt["epoch"] + 1, ckpt["history"], ckpt["step_times"])


def train_one_epoch(run: Run, epoch: int, step_times: list[float]) -> dict[str, float]:
    """One pass over the epoch's order; appends each step's time. Returns train loss and accuracy.

    Under torchrun each of the W processes takes every W-th sample of each global batch and
    DistributedDataParallel averages the gradients; the loss is scaled so that the step equals one
    over the whole global batch."""
    cfg, dist, device = run.cfg, run.dist, run.device
    order = epoch_order(run.n_train, cfg.seed, epoch)
    total_steps, warmup = (
        cfg.epochs * run.steps_per_epoch,
        int(cfg.warmup_epochs * run.steps_per_epoch),
    )
    seen, correct, loss_sum = 0, 0, 0.0
    bar = tqdm(
        range(run.steps_per_epoch),
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        unit="step",
        disable=not (cfg.progress and dist.main),
        file=sys.stderr,
        leave=False,
    )
    for i in bar:
        batch = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
        x, y = run.dataset.train.batch(batch[dist.rank :: dist.world])  # this rank's share
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        for group in run.opt.param_groups:
            group["lr"] = lr_at(epoch * run.steps_per_epoch + i, total_steps, warmup, cfg.lr)
        _sync(device)
        t0 = time.perf_counter()
        with _autocast(cfg, device):
            logits = run.model(x)
            ce = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing, reduction="sum")
        run.scaler.scale(ce * (dist.world / batch.numel())).backward()
        run.scaler.step(run.opt)
        run.scaler.update()
        run.opt.zero_grad(set_to_none=True)
        _sync(device)
        step_times.append(time.perf_counter() - t0)
        seen, loss_sum = seen + y.numel(), loss_sum + ce.item()
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
        loss_sum, correct, seen = totals.tolist()
    return {"train_loss": loss_sum / seen, "train_acc": 100.0 * correct / seen}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def end_of_epoch(run: Run, epoch: int, train_stats: dict, probe: tuple) -> dict:
    """The epoch's record (for metrics.jsonl): train figures, test accuracy and loss, lr,
    and (compressed runs) each parameter's gradient cosine to the exact one on a fixed batch."""
    test_acc, test_loss = evaluate(run.core, run.dataset.test, run.cfg, run.device)
    record = {
        "epoch": epoch + 1,
        **train_stats,
        "test_loss": test_loss,
        "test_acc": test_acc,
        "lr": run.opt.param_groups[0]["lr"],
    }
    if run.cfg.prune is not None:
        record["grad_cosine"] = gradient_cosines(run.core, lambda: _probe_loss(run, *probe))
    if run.dist.main and run.cfg.progress:
        print(
            f"epoch {epoch + 1}/{run.cfg.epochs}: train loss {record['train_loss']:.4f} "
            f"acc {record['train_acc']:.2f}%  test loss {test_loss:.4f} acc {test_acc:.2f}%",
            file=sys.stderr,
        )
    return record


def _probe_loss(run: Run, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with _autocast(run.cfg, x.device):
        return F.cross_entropy(run.core(x), y, label_smoothing=run.cfg.label_smoothing)


def summarize(run: Run, progress: Progress) -> dict:
    """The run's summary: final accuracy, history, memory of one training step, step time."""
    cfg, dist = run.cfg, run.dist
    order = epoch_order(run.n_train, cfg.seed, 0)
    x, y = run.dataset.train.batch(order[: cfg.batch_size // dist.world])
    memory = measure_step(run.core, cfg, x.to(run.device), y.to(run.device))  # one process's step
    median_step = statistics.median(progress.step_times[1:] or progress.step_times)  # 1st: warm-up
    history = progress.history
    return {
        "model": cfg.model,
        "dataset": run.dataset.name,
        "data_source": run.dataset.source,
        "device": str(run.device),
        "processes": dist.world,
        "prune": None if cfg.prune is None else cfg.prune.to_dict(),
        "saved_tensors": describe_compression(run.core),
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "test_acc": history[-1]["test_acc"],
        "test_loss": history[-1]["test_loss"],
        "history": history,
        **memory,
        "median_step_s": median_step,
        "images_per_s": cfg.batch_size / median_step,
        "parameters": sum(p.numel() for p in run.core.parameters()),
        "config": cfg.to_dict(),
    }


def train(
    cfg: TrainConfig,
    dataset: data_lib.Dataset | None = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> dict:
    """Train per ``cfg``; return the summary (also written to out/summary.json).

    Args:
        cfg: the run's configuration.
        dataset: use this instead of loading ``cfg.dataset`` (compare loads it once for all runs).
        on_epoch_end: called as ``on_epoch_end(epoch, record)`` after each epoch's checkpoint.

    Returns:
        The summary dict (``summarize``). Raises ``TrainError`` for a run that cannot start.
    """
    run = setup_run(cfg, dataset)
    progress = load_checkpoint(run) if cfg.resume else Progress()
    probe_ids = epoch_order(run.n_train, cfg.seed, 0)[:256]
    probe = tuple(t.to(run.device) for t in run.dataset.train.batch(probe_ids))
    for epoch in range(progress.epoch, cfg.epochs):
        stats = train_one_epoch(run, epoch, progress.step_times)
        progress.history.append(end_of_epoch(run, epoch, stats, probe))
        progress.epoch = epoch + 1
        save_checkpoint(run, progress)  # first the checkpoint, then the record it vouches for
        append_metrics(run, progress.history[-1])
        if on_epoch_end:
            on_epoch_end(epoch, progress.history[-1])
    summary = summarize(run, progress)
    if run.dist.main:
        (run.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
