"""How much validation loss each compression costs a language model, from `compare --task lm` runs:
the JSON `actprune plan` ranks language models by (its packaged default,
src/actprune/lm_quality.json, is a copy of docs/results/lm_quality.json).

python benchmarks/lm_quality.py docs/results/compare_lm_*_transformer_seed*

For every configuration the worst (largest) validation-loss increase over the runs given, in %
of the same run's dense loss, stored negated (higher is better, as Δ accuracy): `delta`. The
table also gives each run's numbers and how far the dense runs of one model differ.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="compare --task lm output folders")
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    args = parser.parse_args(argv)
    rows, worst, dense_by_model = [], {}, {}
    for folder in args.runs:
        try:
            runs = json.loads((folder / "summary.json").read_text())
        except (OSError, ValueError) as err:
            parser.error(f"{folder}: no compare --task lm summary.json ({err})")
        dense = runs[0]
        model, seed = dense["config"]["model"], dense["config"]["seed"]
        dense_by_model.setdefault(model, {}).setdefault(seed, []).append(dense["val_loss"])
        for run in runs[1:]:
            change = 100 * (run["val_loss"] / dense["val_loss"] - 1)
            saved = run["saved_activation_bytes"] / dense["saved_activation_bytes"]
            rows.append((run["run"], model, seed, dense["val_loss"], run["val_loss"], change,
                         saved))
            worst[run["run"]] = max(worst.get(run["run"], -1e9), change)
    command = "python benchmarks/lm_quality.py " + shlex.join(argv if argv else sys.argv[1:])
    task = ", ".join(sorted(dense_by_model)) + " on the Python standard library, "
    task += f"{len(args.runs)} runs (worst over models and seeds)"
    payload = {"command": command, "task": task,
               "delta": {name: -change for name, change in worst.items()},
               "runs": [dict(zip(("config", "model", "seed", "dense_val_loss", "val_loss",
                                  "change_pct", "saved_ratio"), r)) for r in rows]}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lm_quality.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        f"# Validation loss of language models, compressed against dense\n\nCommand: `{command}`\n",
        "| config | model | seed | dense val loss | val loss | Δ % | saved × dense |",
        "|---|---|---|---|---|---|---|",
        *(f"| {c} | {m} | {s} | {d:.4f} | {v:.4f} | {x:+.2f} | {r:.3f} |"
          for c, m, s, d, v, x, r in rows),  # fmt: skip
        "",
        "| config | worst Δ % |",
        "|---|---|",
        *(f"| {name} | {change:+.2f} |" for name, change in worst.items()),
        "",
        *_spread(dense_by_model),
    ]
    (args.out / "lm_quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _spread(dense: dict[str, dict[int, list[float]]]) -> list[str]:
    """How far dense runs differ: across seeds (each seed's first run), and within one seed."""
    lines = []
    for model, seeds in dense.items():
        firsts = [runs[0] for runs in seeds.values()]
        if len(firsts) > 1:
            lines.append(f"The dense runs of {model}'s seeds differ by "
                         f"{100 * (max(firsts) / min(firsts) - 1):.2f} %.")  # fmt: skip
        for seed, runs in seeds.items():
            if len(runs) > 1:
                lines.append(f"Two dense runs of {model}, seed {seed}, in separate processes "
                             f"differ by {100 * (max(runs) / min(runs) - 1):.2f} %.")  # fmt: skip
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
