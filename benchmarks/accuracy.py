"""Accuracy at equal schedule: dense and every frontier configuration (``methods.frontier_prunes``)
trained from the same seed, initial weights and data order (``actprune compare``).

python benchmarks/accuracy.py --epochs 3 --seed 0 --out runs/frontier_3ep
python benchmarks/accuracy.py --epochs 10 --seed 1 --only all_u4_b32 all_u8_b32 --out runs/u_10ep_s1
    --dense-from docs/results/compare_fashion_mnist_10ep_r4_seed1/summary.json

Writes OUT/report.md and OUT/summary.json (``compare``). Step times in the report are only valid
when nothing else ran on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from actprune.compare import compare
from actprune.methods import frontier_prunes
from actprune.train import TrainConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", metavar="LABEL",
                        help="train only these frontier configurations (their labels)")  # fmt: skip
    parser.add_argument("--dense-from", type=Path, metavar="SUMMARY",
                        help="reuse the dense run of this summary.json (a compare run's list, or "
                        "the dense run's own; same seed and schedule) instead of training it "
                        "again")  # fmt: skip
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    prunes = frontier_prunes()
    if args.only:
        unknown = set(args.only) - {p.label() for p in prunes}
        if unknown:
            parser.error(f"not frontier labels: {', '.join(sorted(unknown))}; "
                         f"available: {', '.join(p.label() for p in prunes)}")  # fmt: skip
        prunes = [p for p in prunes if p.label() in args.only]
    base = TrainConfig(epochs=args.epochs, seed=args.seed, out=str(args.out), overwrite=True,
                       progress=False)  # fmt: skip
    command = shlex.join(["python", "benchmarks/accuracy.py", *(argv or sys.argv[1:])])
    dense = None
    if args.dense_from:
        summary = json.loads(args.dense_from.read_text())
        if isinstance(summary, dict):  # a run's own summary.json, not a compare run's list
            summary = [{**summary, "run": "dense"}] if summary.get("prune") is None else []
        dense = next((r for r in summary if r.get("run") == "dense"), None)
        if dense is None:
            parser.error(f"--dense-from {args.dense_from}: no dense run in it")
    runs = compare(base, prunes, command, dense)
    for r in runs:
        print(f"{r['run']:32s} {r['test_acc']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
