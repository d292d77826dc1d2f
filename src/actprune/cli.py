"""``actprune`` command line: ``train`` and ``compare``. User errors: one line, exit code 2."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable

from .train import TrainConfig, UserError

EPILOG = """examples:
  actprune compare                                   # resmlp_tiny on Fashion-MNIST, dense vs s=0.9
  actprune compare --epochs 10 --out runs/long --sparsity 0.9 0.8
  actprune train --model resmlp_s12 --dataset cifar10 --data-dir ~/data --image-size 32 \\
                 --patch-size 4 --sparsity 0.9 --epochs 30 --out runs/s12
  actprune train --out runs/s12 --resume             # continue an interrupted run
"""


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


def _config(args: argparse.Namespace, sparsity: float) -> TrainConfig:
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

    summary = train(_config(args, args.sparsity))
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
    runs = compare(_config(args, 0.0), args.sparsity, command=command.strip())
    print(report_table(runs))
    print(f"\nreport: {args.out}/report.md, plots: {args.out}/*.png")
    return 0


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
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p = training_command("compare", "dense vs pruned, same seeds and data order", cmd_compare)
    p.add_argument(
        "--sparsity",
        type=float,
        nargs="+",
        default=[0.9],
        help="pruned runs to compare with dense (default 0.9)",
    )
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
