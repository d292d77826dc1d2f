"""``actprune`` command line: ``train`` and ``compare``. User errors: one line, exit code 2."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from .train import TrainConfig, UserError

EPILOG = """examples:
  actprune compare                                   # resmlp_tiny on Fashion-MNIST, dense vs s=0.9
  actprune compare --epochs 10 --out runs/long --sparsity 0.9 0.8
  actprune compare --scope linear all                # Linear inputs only (the paper) vs everything
  actprune compare --scope linear --remainder-bits 0 --selection global  # the seed paper's method
  actprune train --model resmlp_s12 --dataset cifar10 --data-dir ~/data --image-size 32 \\
                 --patch-size 4 --sparsity 0.9 --epochs 30 --out runs/s12
  actprune train --out runs/s12 --resume             # continue an interrupted run
"""


SCOPES = ["linear", "all"]
SCOPE_HELP = (
    "tensors compressed: linear = Linear inputs (the seed paper); all = also Affine and "
    "LayerScale inputs, and GELU inputs as a --gelu-bits derivative code (default %(default)s)"
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        raise UserError(message)


def _add_training_args(p: argparse.ArgumentParser, default_out: str) -> None:
    d = TrainConfig()
    p.add_argument("--model", default=d.model, help="registered model (default %(default)s)")
    p.add_argument(
        "--dataset",
        default=d.dataset,
        help="fashion-mnist, mnist, cifar10, cifar100, imagefolder, synthetic",
    )
    p.add_argument("--data-dir", default=None, help="folder holding the dataset's files")
    p.add_argument("--out", default=default_out, help="output folder (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace results in an existing --out")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--optimizer", choices=["adamw", "lamb"], default=d.optimizer)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default=d.amp)
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--block-size", type=int, default=d.block_size)
    p.add_argument("--criterion", choices=["l2", "l1", "max"], default=d.criterion)
    p.add_argument("--row-order", choices=["token-major", "batch-major"], default=d.row_order)
    p.add_argument(
        "--selection",
        choices=["column", "global"],
        default=d.selection,
        help="top-k per block-column or over the whole tensor (default %(default)s)",
    )
    p.add_argument(
        "--gelu-bits", type=int, choices=[2, 4], default=d.gelu_bits, help="with --scope all"
    )
    p.add_argument("--int8", action="store_true", help="keep the kept blocks in int8")
    p.add_argument(
        "--remainder-bits",
        type=int,
        choices=[0, 1, 2, 4],
        default=d.remainder_bits,
        help="also keep the dropped blocks at this many bits (0: drop them; default %(default)s)",
    )
    p.add_argument(
        "--exclude",
        default=d.exclude,
        help="Linear layers kept dense: comma-separated name patterns (default %(default)s)",
    )
    p.add_argument("--image-size", type=int, default=None, help="resize / synthetic image side")
    p.add_argument("--patch-size", type=int, default=None, help="model patch size override")
    p.add_argument("--width", type=int, default=None, help="model width override")
    p.add_argument("--depth", type=int, default=None, help="model depth override")
    p.add_argument("--train-subset", type=int, default=None, help="use the first N training images")
    p.add_argument("--test-subset", type=int, default=None, help="use the first N test images")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _config(args: argparse.Namespace, sparsity: float, scope: str) -> TrainConfig:
    overrides = {
        k: v for k in ("patch_size", "width", "depth") if (v := getattr(args, k)) is not None
    }
    return TrainConfig(
        model=args.model,
        dataset=args.dataset,
        data_dir=args.data_dir,
        out=args.out,
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        label_smoothing=args.label_smoothing,
        seed=args.seed,
        amp=args.amp,
        device=args.device,
        sparsity=sparsity,
        block_size=args.block_size,
        criterion=args.criterion,
        row_order=args.row_order,
        selection=args.selection,
        scope=scope,
        gelu_bits=args.gelu_bits,
        int8=args.int8,
        remainder_bits=args.remainder_bits,
        exclude=args.exclude,
        image_size=args.image_size,
        train_subset=args.train_subset,
        test_subset=args.test_subset,
        overwrite=args.overwrite,
        resume=getattr(args, "resume", False),
        progress=not args.no_progress,
        model_overrides=overrides,
    )


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    summary = train(_config(args, args.sparsity, args.scope))
    print(
        f"test accuracy {summary['test_acc']:.2f}%, peak step memory "
        f"{summary['peak_step_bytes'] / 2**20:.1f} MiB, saved activations "
        f"{summary['saved_activation_bytes'] / 2**20:.1f} MiB, "
        f"{summary['images_per_s']:.0f} images/s -> {args.out}/summary.json"
    )
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare, report_table

    command = "actprune " + shlex.join(args.argv)
    runs = compare(
        _config(args, 0.0, TrainConfig.scope), args.sparsity, args.scope, command=command.strip()
    )
    print(report_table(runs))
    print(f"\nreport: {args.out}/report.md, plots: {args.out}/*.png")
    return 0


def cmd_bench_memory(args: argparse.Namespace) -> int:
    from .bench.memory import default_configs, run_memory_bench, write_memory_results

    device = _device(args.device)
    configs = default_configs(
        args.sparsity,
        args.block,
        args.scope,
        args.int8,
        baselines=args.baselines,
        remainder_bits=args.remainder_bits,
    )
    rows = run_memory_bench(
        args.model,
        args.image_size,
        args.batch,
        configs,
        device=device,
        timing_steps=args.timing_steps,
        progress=_progress,
    )
    setup = {
        "model": args.model,
        "image_size": args.image_size,
        "batch": args.batch,
        "device": device,
    }
    stem = (
        args.stem or f"memory_{args.model}_{args.image_size}px_b{args.batch}_{device.split(':')[0]}"
    )
    command = "actprune " + shlex.join(args.argv)
    print(write_memory_results(rows, Path(args.out), stem, command, setup))
    return 0


def cmd_bench_kernels(args: argparse.Namespace) -> int:
    import torch

    from .bench.kernels import linear_shapes, measure_kernels, write_results

    device = _device(args.device)
    shapes = linear_shapes(args.model, args.batch, args.image_size)
    rows = measure_kernels(
        shapes,
        args.block,
        args.sparsity,
        device=device,
        dtype=getattr(torch, args.dtype),
        repeats=args.repeats,
        progress=_progress,
    )
    stem = args.stem or f"kernels_{args.model}_b{args.batch}_{device.split(':')[0]}_{args.dtype}"
    print(write_results(rows, device, Path(args.out), stem, "actprune " + shlex.join(args.argv)))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .bench.memory import MemoryConfig, actprune_config
    from .plan import largest_batch, parse_bytes, predict_step

    try:
        budget = parse_bytes(args.memory)
    except ValueError as err:
        raise UserError(str(err)) from err
    configs = [MemoryConfig("dense", "dense"), MemoryConfig("checkpoint", "checkpoint")]
    block = args.block_size
    configs += [actprune_config(s, block, scope) for scope in args.scope for s in args.sparsity]
    foreach = args.device != "cpu"  # AdamW's default implementation on each device
    print(
        f"{args.model}, {args.image_size} px, AdamW; budget {args.memory} = {budget / 2**30:.2f} "
        "GiB; predicted on the meta device (nothing is allocated)\n"
    )
    print(f"| config | peak at batch {args.batch} | fits | largest batch that fits |")
    print("|---|---|---|---|")
    for config in configs:

        def peak(batch: int, config: MemoryConfig = config) -> int:
            plan = predict_step(args.model, batch, config, foreach, img_size=args.image_size)
            return plan.peak_step_bytes

        _progress(f"{config.name}: predicting ...")
        at_batch = peak(args.batch)
        best = largest_batch(peak, budget, probe=max(1, args.batch // 2), limit=args.max_batch)
        fits = "yes" if at_batch <= budget else "no"
        shown = best if best < args.max_batch else f">= {best}"
        print(f"| {config.name} | {at_batch / 2**30:.2f} GiB | {fits} | {shown} |")
    return 0


def _device(name: str) -> str:
    import torch

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA GPU is visible")
    return name


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="actprune",
        description="Prune saved activations to cut training memory.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def training_command(name: str, help: str, func: Callable[[argparse.Namespace], int]):
        p = sub.add_parser(name, help=help, epilog=EPILOG, formatter_class=parser.formatter_class)
        _add_training_args(p, f"runs/{name}")
        p.set_defaults(func=func)
        return p

    p = training_command("train", "train one model", cmd_train)
    p.add_argument("--sparsity", type=float, default=0.0, help="0 = dense (default)")
    p.add_argument("--scope", choices=SCOPES, default=TrainConfig.scope, help=SCOPE_HELP)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p = training_command("compare", "dense vs pruned, same seeds and data order", cmd_compare)
    p.add_argument(
        "--sparsity",
        type=float,
        nargs="+",
        default=[0.9],
        help="pruned runs to compare with dense (default 0.9)",
    )
    p.add_argument(
        "--scope", choices=SCOPES, nargs="+", default=[TrainConfig.scope], help=SCOPE_HELP
    )

    bench = sub.add_parser("bench", help="memory and kernel benchmarks").add_subparsers(
        dest="bench", required=True, parser_class=_Parser
    )
    for name, func, default_batch in (
        ("memory", cmd_bench_memory, 8),
        ("kernels", cmd_bench_kernels, 8),
    ):
        p = bench.add_parser(name, help=f"{name} benchmark (writes JSON, markdown, PNG)")
        p.add_argument("--model", default="resmlp_s24")
        p.add_argument("--image-size", type=int, default=224)
        p.add_argument("--batch", type=int, default=default_batch)
        p.add_argument("--device", default="cpu")
        p.add_argument("--out", default="docs/results")
        p.add_argument("--stem", default=None, help="output file name stem")
        p.set_defaults(func=func)
    p = bench.choices["memory"]
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.8, 0.9, 0.95])
    p.add_argument("--block", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--timing-steps", type=int, default=3)
    p.add_argument("--scope", choices=SCOPES, nargs="+", default=["linear"], help=SCOPE_HELP)
    p.add_argument("--int8", action="store_true", help="add the int8 variant of each config")
    p.add_argument(
        "--remainder-bits", type=int, nargs="+", choices=[0, 1, 2, 4], default=[0],
        help="PruneConfig.remainder_bits values to measure (default 0)",
    )  # fmt: skip
    p.add_argument(
        "--baselines", nargs="*", choices=["checkpoint", "unstructured"],
        default=["checkpoint", "unstructured"],
        help="comparisons besides dense (default: both; none: --baselines with no value)",
    )  # fmt: skip
    p = bench.choices["kernels"]
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.8, 0.9])
    p.add_argument("--block", type=int, nargs="+", default=[16, 32])
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--repeats", type=int, default=10)

    p = sub.add_parser("plan", help="predict peak memory and the largest batch that fits")
    p.add_argument("--model", default="resmlp_b24")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--memory", default="80GB", help="budget: 80GB (10^9), 80GiB (2^30), 512MiB")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.9])
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--scope", choices=SCOPES, nargs="+", default=["linear"], help=SCOPE_HELP)
    p.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        default="cuda",
        help="the device the step would run on (AdamW's implementation differs)",
    )
    p.add_argument("--max-batch", type=int, default=1 << 16)
    p.set_defaults(func=cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv
        return args.func(args)
    except UserError as err:
        print(f"actprune: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("actprune: interrupted (resume with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
