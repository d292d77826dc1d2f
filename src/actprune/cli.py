"""``actprune`` command line: train, compare, bench memory, bench kernels, plan.

Every command takes the same compression flags, generated from ``PruneConfig``'s fields (help
text and choices included) with the same defaults: ``--preset`` (default "recommended") and any
field given explicitly on top. ``compare``, ``bench`` and ``plan`` accept several values per flag
and run every combination. User errors: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from . import models, rowcode
from .bench.kernels import linear_shapes, measure_kernels, write_results
from .bench.memory import run_memory_bench, write_memory_results
from .compare import compare, report_table
from .config import PRESETS, PruneConfig
from .data import DATASETS, DataError
from .lm import LMConfig, compare_lm, lm_table
from .methods import BASELINES, DEFAULT_BASELINES, frontier_methods, methods
from .plan import accuracy_deltas, parse_bytes, plan, require_fits, step_time_ratios
from .train import AMP_DTYPES, OPTIMIZERS, TrainConfig, TrainError, read_checkpoint, train
from .workloads import Workload, WorkloadError, build_workload

EPILOG = """examples:
  actprune compare                                   # resmlp_tiny on Fashion-MNIST, dense vs 4-bit
  actprune compare --epochs 10 --out runs/long --sparsity 0.9 0.8
  actprune compare --scope linear all                # Linear inputs only vs every saved tensor
  actprune compare --preset paper blocks             # the paper's method; top blocks exact + 4-bit
  actprune train --model resmlp_s12 --dataset cifar10 --data-dir ~/data --image-size 32 \\
                 --patch-size 4 --sparsity 0.9 --epochs 30 --out runs/s12
  actprune train --out runs/s12 --resume             # continue an interrupted run
  actprune bench memory --model resmlp_s24 --batch-size 32 --scope linear all
  actprune plan --model resmlp_b24 --batch-size 256 --memory 80GB
"""


class UserError(ValueError):
    """Bad input from the user: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        raise UserError(message)


# --- compression flags, from PruneConfig ----------------------------------------------------------


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _bool(text: str) -> bool:
    value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    if text.lower() not in value:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value[text.lower()]


def _block(text: str) -> int | tuple[int, int]:
    rows, _, cols = text.lower().partition("x")
    try:
        return int(rows) if not cols else (int(rows), int(cols))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or ROWSxCOLS, got {text!r}") from None


_PARSE = {"sparsity": float, "block_size": _block, "int8": _bool}


def add_compression_args(parser: argparse.ArgumentParser, *, sweep: bool) -> None:
    """``--preset``, one flag per PruneConfig field and ``--exclude``; with ``sweep`` each flag
    takes several values."""
    group = parser.add_argument_group(
        "compression (PruneConfig)",
        "Defaults come from --preset; a flag given replaces that field"
        + (" (several values: every combination is run)." if sweep else "."),
    )
    group.add_argument(
        "--preset",
        choices=list(PRESETS),
        nargs="+" if sweep else None,
        default=["recommended"] if sweep else "recommended",
        help="named setting(s) to start from (default recommended)",
    )
    recommended = PruneConfig.preset("recommended")
    for f in dataclasses.fields(PruneConfig):
        choices = f.metadata["choices"]
        shown = str(getattr(recommended, f.name)).lower()
        kw: dict = {"default": None, "dest": f.name, "choices": choices}
        kw["type"] = _PARSE.get(f.name) or type(choices[0])
        kw["help"] = f"{f.metadata['help']} (recommended: {shown})"
        if f.name == "int8":  # a bare --int8 means true
            kw.update({"nargs": "*"} if sweep else {"nargs": "?", "const": True})
            kw["metavar"] = "true|false"
        elif sweep:
            kw["nargs"] = "+"
        group.add_argument(_flag(f.name), **kw)
    group.add_argument(
        "--exclude",
        default="head",
        help="layers kept dense: comma-separated name patterns (default %(default)s)",
    )


def prune_configs(args: argparse.Namespace) -> list[PruneConfig]:
    """Every combination of the compression flags over each preset's values; duplicates once."""
    presets = args.preset if isinstance(args.preset, list) else [args.preset]
    configs = [c for name in presets for c in _grid(PRESETS[name], args)]
    return list(dict.fromkeys(configs))


def _grid(base: dict, args: argparse.Namespace) -> list[PruneConfig]:
    values = {}
    for f in dataclasses.fields(PruneConfig):
        given = getattr(args, f.name)
        if given is None:
            given = base.get(f.name, f.default)
        elif given == []:  # a bare --int8 in sweep mode
            given = True
        values[f.name] = given if isinstance(given, list) else [given]
    configs = []
    for combo in itertools.product(*values.values()):
        try:
            configs.append(PruneConfig(**dict(zip(values, combo))))
        except ValueError as err:
            raise UserError(re.sub(r"PruneConfig\.(\w+)", lambda m: _flag(m[1]), str(err))) from err
    return configs


def _exclude(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(p for p in args.exclude.split(",") if p)


# --- training ---------------------------------------------------------------------------------


def _add_training_args(p: argparse.ArgumentParser, default_out: str) -> None:
    d = TrainConfig()
    p.add_argument("--model", default=d.model, help="registered model (default %(default)s)")
    p.add_argument("--dataset", default=d.dataset, help=", ".join(DATASETS))
    p.add_argument("--data-dir", default=None, help="folder holding the dataset's files")
    p.add_argument("--out", default=default_out, help="output folder (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace results in an existing --out")
    for name, kind in (
        ("epochs", int),
        ("batch_size", int),
        ("lr", float),
        ("seed", int),
        ("weight_decay", float),
        ("warmup_epochs", float),
        ("label_smoothing", float),
    ):
        p.add_argument(_flag(name), type=kind, default=getattr(d, name), help="default %(default)s")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    p.add_argument("--amp", choices=list(AMP_DTYPES), default=d.amp)
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--image-size", type=int, default=None, help="resize / synthetic image side")
    for name in ("patch_size", "width", "depth"):
        p.add_argument(_flag(name), type=int, default=None, help=f"model {name} override")
    p.add_argument("--train-subset", type=int, default=None, help="use the first N training images")
    p.add_argument("--test-subset", type=int, default=None, help="use the first N test images")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def train_config(args: argparse.Namespace, prune: PruneConfig | None) -> TrainConfig:
    """The TrainConfig of the parsed flags: every TrainConfig field the flags name."""
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if f.name in vars(args) and f.name not in ("prune", "exclude")
    }
    overrides = {k: getattr(args, k) for k in ("patch_size", "width", "depth")}
    return TrainConfig(
        **given,
        prune=prune,
        exclude=_exclude(args),
        progress=not args.no_progress,
        model_overrides={k: v for k, v in overrides.items() if v is not None},
    )


def cmd_train(args: argparse.Namespace) -> int:
    checkpoint = Path(args.out) / "checkpoint.pt"
    if args.resume and checkpoint.is_file():  # the checkpoint's settings, then the given flags
        saved = read_checkpoint(checkpoint, torch.device("cpu"))["config"]
        argv = args.argv
        args = build_parser(resume_defaults=_flag_values(saved)).parse_args(argv)
        args.argv = argv
    prune = None if args.dense else _one(prune_configs(args))
    summary = train(train_config(args, prune))
    print(
        f"test accuracy {summary['test_acc']:.2f}%, peak step memory "
        f"{summary['peak_step_bytes'] / 2**20:.1f} MiB, saved activations "
        f"{summary['saved_activation_bytes'] / 2**20:.1f} MiB, "
        f"{summary['images_per_s']:.0f} images/s -> {args.out}/summary.json"
    )
    return 0


def _flag_values(saved: dict) -> dict:
    """Parser defaults (argparse dests) that reproduce a checkpoint's TrainConfig."""
    own = ("prune", "exclude", "model_overrides", "out", "resume", "overwrite", "progress")
    values = {k: v for k, v in saved.items() if k not in own}
    values["exclude"] = ",".join(saved.get("exclude", ()))
    values.update(saved.get("model_overrides", {}))
    prune = saved.get("prune")
    values["dense"] = prune is None
    if prune is not None:
        values.update({**prune, "block_size": tuple(prune["block_size"])})
    return values


def _one(configs: list[PruneConfig]) -> PruneConfig:
    (config,) = configs  # train's flags take one value each
    return config


def cmd_compare(args: argparse.Namespace) -> int:
    command = "actprune " + shlex.join(args.argv)
    if args.task == "lm":
        cfg = lm_config(args)
        print(lm_table(compare_lm(cfg, prune_configs(args), command=command)))
        print(f"\nreport: {cfg.out}/report.md, plot: {cfg.out}/loss.png")
        return 0
    _refuse_flags(args, (*_LM_ONLY, "boundary_bits"), "image")
    args = _with_defaults(args, _IMAGE_DEFAULTS)
    runs = compare(train_config(args, None), prune_configs(args), command=command)
    print(report_table(runs))
    print(f"\nreport: {args.out}/report.md, plots: {args.out}/*.png")
    return 0


# Flags both tasks of compare take, whose defaults differ by task (None on the parser).
_SHARED = ("model", "out", "batch_size", "lr", "weight_decay")
_IMAGE_DEFAULTS = TrainConfig(out="runs/compare")
_LM_ONLY = ("steps", "seq_len", "eval_every", "eval_windows")
_IMAGE_ONLY = ("dataset", "data_dir", "epochs", "warmup_epochs", "label_smoothing", "optimizer",
               "amp", "image_size", "patch_size", "width", "depth", "train_subset",
               "test_subset")  # fmt: skip


def _add_lm_args(p: argparse.ArgumentParser) -> None:
    """compare's --task and the language-model flags; the shared flags' defaults become None."""
    p.add_argument("--task", choices=["image", "lm"], default="image",
                   help="image: classification (default); lm: byte-level causal LM on the "
                   "Python standard library's source")  # fmt: skip
    lm = LMConfig()
    for name in _LM_ONLY:
        p.add_argument(_flag(name), type=_positive_int, default=None,
                       help=f"--task lm only (default {getattr(lm, name)})")  # fmt: skip
    p.add_argument("--boundary-bits", type=int, choices=(0, *rowcode.BITS), default=0,
                   help="--task lm only: the compressed runs also checkpoint every block, holding "
                   "its input as row codes of these bits (a lossy recompute, opt-in; default 0: "
                   "no checkpointing)")  # fmt: skip
    for action in p._actions:
        if action.dest in _SHARED:
            action.help = (f"image default {getattr(_IMAGE_DEFAULTS, action.dest)}, lm default "
                           f"{getattr(lm, action.dest)}")  # fmt: skip
            action.default = None
    p.set_defaults(parser=p)


def _with_defaults(args: argparse.Namespace, defaults: object) -> argparse.Namespace:
    """args with every None of a shared or --task lm flag replaced by the task's default."""
    filled = {k: getattr(defaults, k) for k in (*_SHARED, *_LM_ONLY) if hasattr(defaults, k)}
    filled = {k: v for k, v in filled.items() if getattr(args, k, None) is None}
    return argparse.Namespace(**{**vars(args), **filled})


def _refuse_flags(args: argparse.Namespace, names: tuple[str, ...], task: str) -> None:
    """A UserError for any of ``names`` given a value other than its default."""
    for name in names:
        if getattr(args, name) != args.parser.get_default(name):
            raise UserError(f"{_flag(name)} does not apply to --task {task}")


def lm_config(args: argparse.Namespace) -> LMConfig:
    """The LMConfig of compare's parsed flags (--task lm)."""
    _refuse_flags(args, _IMAGE_ONLY, "lm")
    args = _with_defaults(args, LMConfig())
    names = ("seed", "device", "overwrite", "boundary_bits", *_SHARED, *_LM_ONLY)
    given = {k: getattr(args, k) for k in names}
    return LMConfig(**given, exclude=_exclude(args) + ("lm_head",), progress=not args.no_progress)


# --- benchmarks and the planner -----------------------------------------------------------------


def cmd_bench_memory(args: argparse.Namespace) -> int:
    device, out = _device(args.device), _out_folder(args.out)
    work = _workload(args)
    require_fits(args.model, args.batch_size, device, args.image_size, args.seq_len)
    if args.frontier:
        configs = frontier_methods(_exclude(args))
    else:
        configs = methods(prune_configs(args), args.baselines, _exclude(args))
    rows = run_memory_bench(
        args.model,
        args.batch_size,
        configs,
        device=device,
        timing_steps=args.timing_steps,
        image_size=args.image_size,
        seq_len=args.seq_len,
        progress=_progress,
        amp=AMP_DTYPES[args.amp],
    )
    setup = {
        "model": args.model,
        "input": work.shape_label,
        "batch": args.batch_size,
        "device": device,
        **({"amp": args.amp} if args.amp != "none" else {}),
    }
    kind, name = device.split(":")[0], re.sub(r"[^A-Za-z0-9_.-]+", "_", args.model)
    stem = args.stem or f"memory_{name}_{work.shape_label}_b{args.batch_size}_{kind}"
    stem += f"_{args.amp}" if args.amp != "none" and not args.stem else ""
    command = "actprune " + shlex.join(args.argv)
    print(write_memory_results(rows, out, stem, command, setup))
    return 0


def _workload(args: argparse.Namespace) -> Workload:
    """The model spec of --model, built on the meta device (validates it before any run)."""
    return build_workload(args.model, args.image_size, args.seq_len, device="meta")


def cmd_bench_kernels(args: argparse.Namespace) -> int:
    device, out = _device(args.device), _out_folder(args.out)
    _model(args.model)
    shapes = linear_shapes(args.model, args.batch_size, args.image_size)
    rows = measure_kernels(
        shapes,
        prune_configs(args),
        device=device,
        dtype=getattr(torch, args.dtype),
        repeats=args.repeats,
        progress=_progress,
    )
    kind = device.split(":")[0]
    stem = args.stem or f"kernels_{args.model}_b{args.batch_size}_{kind}_{args.dtype}"
    command = "actprune " + shlex.join(args.argv)
    print(write_results(rows, device, out, stem, command))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    work = _workload(args)
    language = work.task != "image"
    # image models: test accuracy in points; language models: validation loss in % of dense's
    measure, unit = ("−Δ val loss", "%") if language else ("Δ acc", "point")
    tol = args.accuracy_tolerance if args.accuracy_tolerance is not None else (
        1.0 if language else 0.3)  # fmt: skip
    try:
        budget = parse_bytes(args.memory)
        ratios, source = step_time_ratios(args.step_times, language)
        accuracy, accuracy_source = accuracy_deltas(args.accuracy, language)
    except ValueError as err:
        raise UserError(str(err)) from err
    configs = frontier_methods(_exclude(args), language)
    names = {c.name for c in configs}
    configs += [m for m in methods(prune_configs(args), [], _exclude(args)) if m.name not in names]
    if args.configs:
        unknown = set(args.configs) - {c.name for c in configs}
        if unknown:
            raise UserError(f"--configs: unknown {', '.join(sorted(unknown))}; available: "
                            f"{', '.join(c.name for c in configs)}")  # fmt: skip
        configs = [c for c in configs if c.name in args.configs]
    print(
        f"{args.model}, {work.shape_label}, AdamW; budget {args.memory} = "
        f"{budget / 2**30:.2f} GiB; peaks predicted on the meta device (nothing is allocated); "
        f"step time × dense measured: {source}; {measure} measured: {accuracy_source} "
        f"(exact methods: 0; a composition: as its compression alone)\n"
    )
    rows = plan(args.model, args.batch_size, budget, configs, ratios, accuracy, tol,
                foreach=args.device != "cpu",  # AdamW's default implementation on each device
                image_size=args.image_size, seq_len=args.seq_len, max_batch=args.max_batch,
                progress=_progress)  # fmt: skip
    print(f"| rank | config | family | peak at batch {args.batch_size} | fits | largest batch "
          f"| step × dense | {measure} ({'%' if language else 'pts'}) |\n"
          "|---|---|---|---|---|---|---|---|")  # fmt: skip
    for i, r in enumerate(rows, 1):
        shown = r.largest_batch if r.largest_batch < args.max_batch else f">= {r.largest_batch}"
        ratio = "not measured" if r.step_ratio is None else f"{r.step_ratio:.2f}"
        delta = "not measured" if r.accuracy_delta is None else f"{r.accuracy_delta:+.2f}"
        print(f"| {i} | {r.config.name} | {r.config.family} | {r.peak_step_bytes / 2**30:.2f} GiB "
              f"| {'yes' if r.fits else 'no'} | {shown} | {ratio} | {delta} |")  # fmt: skip
    best = next((r for r in rows if r.fits and r.step_ratio is not None and r.accurate(tol)), None)
    if best:
        quality = "validation loss" if language else "accuracy"
        print(f"\nFastest that fits batch {args.batch_size} within {tol:g} {unit} of dense "
              f"{quality}: {best.config.name} (step × {best.step_ratio:.2f} dense, peak "
              f"{best.peak_step_bytes / 2**30:.2f} GiB).")  # fmt: skip
    else:
        print(f"\nNo measured configuration fits batch {args.batch_size} in {args.memory} "
              f"within {tol:g} {unit} of dense (largest batches: the table).")  # fmt: skip
    return 0


def _device(name: str) -> str:
    try:
        kind = torch.device(name).type
    except (RuntimeError, ValueError):
        kind = None
    if kind not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu, cuda or cuda:N, got {name!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA GPU is visible")
    return name


def _model(name: str) -> None:
    if name not in models.list_models():
        raise UserError(f"unknown model {name!r}; available: {', '.join(models.list_models())}")


def _out_folder(text: str) -> Path:
    """--out of bench: an existing folder or one that can be created (nothing is removed)."""
    out = Path(text)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out cannot create {out}: {err.strerror or err}") from None
    return out


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the parser ---------------------------------------------------------------------------------


def _add_model_args(p: argparse.ArgumentParser, model: str, batch: int, specs: bool) -> None:
    """--model, --image-size, --batch-size; with ``specs`` also timm:/hf: models and --seq-len."""
    if specs:
        help = "zoo model, timm:NAME or hf:TYPE[:key=value,...] (default %(default)s)"
        p.add_argument("--model", default=model, help=help)
        p.add_argument("--image-size", type=_positive_int, default=None,
                       help="image side (default: the model's own)")  # fmt: skip
        p.add_argument("--seq-len", type=_positive_int, default=None,
                       help="language model sequence length (default: its longest)")  # fmt: skip
    else:
        p.add_argument("--model", default=model, help="registered model (default %(default)s)")
        p.add_argument("--image-size", type=_positive_int, default=224, help="default %(default)s")
    p.add_argument("--batch-size", type=_positive_int, default=batch, help="default %(default)s")


def _add_bench_parsers(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="memory and kernel benchmarks")
    commands = bench.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    for name, func in (("memory", cmd_bench_memory), ("kernels", cmd_bench_kernels)):
        p = commands.add_parser(name, help=f"{name} benchmark (writes JSON, markdown, PNG)")
        _add_model_args(p, "resmlp_s24", 8, specs=name == "memory")
        p.add_argument("--device", default="cpu")
        p.add_argument("--out", default="docs/results")
        p.add_argument("--stem", default=None, help="output file name stem")
        add_compression_args(p, sweep=True)
        p.set_defaults(func=func)
    p = commands.choices["memory"]
    p.add_argument("--timing-steps", type=_positive_int, default=3)
    p.add_argument("--amp", choices=["none", "bf16"], default="none",
                   help="autocast dtype of the forward (default %(default)s)")  # fmt: skip
    p.add_argument(
        "--baselines",
        nargs="*",
        choices=BASELINES,
        default=list(DEFAULT_BASELINES),
        help="comparisons besides dense (default: checkpoint unstructured; composition: every "
        "block checkpointed with each compression inside; coded_checkpoint: every block "
        "checkpointed holding its input as 8-bit codes, a lossy recompute, alone and with each "
        "compression inside; none: --baselines with no value)",
    )
    p.add_argument(
        "--frontier",
        action="store_true",
        help="measure every frontier configuration (checkpointing variants, selective "
        "checkpointing, the paper's method, the default, uniform quantization, compositions) "
        "instead of dense + --baselines + the compression flags",
    )
    p = commands.choices["kernels"]
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--repeats", type=_positive_int, default=10)


def _add_plan_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="rank the ways to train by step time among those that fit "
        "a memory budget; predict peaks and the largest batch",
    )
    _add_model_args(p, "resmlp_b24", 256, specs=True)
    p.add_argument("--memory", default="80GB", help="budget: 80GB (10^9), 80GiB (2^30), 512MiB")
    p.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        default="cuda",
        help="the device the step would run on (AdamW's implementation differs)",
    )
    p.add_argument("--max-batch", type=_positive_int, default=1 << 16)
    p.add_argument(
        "--step-times",
        default=None,
        metavar="JSON",
        help="measured step times × dense (a benchmarks/step_time.py JSON; default: the packaged "
        "CPU run of every frontier configuration on ResMLP-S24, for language models on "
        "llama_tiny)",
    )
    p.add_argument(
        "--accuracy",
        default=None,
        metavar="JSON",
        help="measured Δ accuracy per configuration (a benchmarks/frontier.py JSON; default: "
        "the packaged Fashion-MNIST runs of the demo model; language models: a "
        "benchmarks/lm_quality.py JSON, default the packaged gpt_tiny / llama_tiny runs)",
    )
    p.add_argument(
        "--configs",
        nargs="+",
        metavar="NAME",
        help="rank only these configurations (names as in the table; default: every frontier "
        "configuration and those of the compression flags)",
    )
    p.add_argument(
        "--accuracy-tolerance",
        type=float,
        default=None,
        metavar="POINTS",
        help="accuracy loss still ranked as kept: points of test accuracy (default 0.3), for "
        "language models %% of validation loss (default 1)",
    )
    add_compression_args(p, sweep=True)
    p.set_defaults(func=cmd_plan)


def build_parser(resume_defaults: dict | None = None) -> argparse.ArgumentParser:
    """The parser; ``resume_defaults`` (argparse dests) replace the defaults of ``train``."""
    parser = _Parser(
        prog="actprune",
        description="Compress saved activations to cut training memory.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def training_command(name: str, help: str, func: Callable[[argparse.Namespace], int]):
        p = sub.add_parser(name, help=help, epilog=EPILOG, formatter_class=parser.formatter_class)
        _add_training_args(p, f"runs/{name}")
        add_compression_args(p, sweep=name == "compare")
        p.set_defaults(func=func)
        return p

    p = training_command("train", "train one model", cmd_train)
    p.add_argument("--dense", action="store_true", help="train without compression")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/checkpoint.pt, with its settings (only --epochs, "
        "--test-subset, --device and --data-dir may change)",
    )
    p.set_defaults(**(resume_defaults or {}))
    p = training_command("compare", "dense vs compressed, same seeds and data order", cmd_compare)
    _add_lm_args(p)
    _add_bench_parsers(sub)
    _add_plan_parser(sub)
    return parser


def _error_line(err: Exception) -> str:
    if isinstance(err, TrainError) and err.field:
        return f"{_flag(err.field)} {err.message}"
    return str(err)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (2: bad input, 130: interrupted)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv
        return args.func(args)
    except (UserError, TrainError, DataError, WorkloadError) as err:
        print(f"actprune: error: {_error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("actprune: interrupted (resume with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
