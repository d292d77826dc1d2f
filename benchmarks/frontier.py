"""The frontier tables and plots (``actprune.bench.frontier``) from runs already made.

python benchmarks/frontier.py \\
    --memory docs/results/memory_frontier_resmlp_s24_224px_b32_cpu.json \\
    --step-times docs/results/step_time_frontier_resmlp_s24_224px_b32_cpu.json \\
    --accuracy docs/results/frontier_accuracy_3ep/summary.json \\
    --out docs/results/frontier

Writes OUT/frontier.md (the tables, with the commands of the runs they come from),
OUT/frontier.json, OUT/frontier_step.png and OUT/frontier_accuracy.png.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

from actprune.bench.frontier import (
    accuracy_points,
    accuracy_table,
    budget_table,
    load_json,
    plot_frontier,
    step_points,
    step_table,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--memory", type=Path, required=True, help="bench memory --frontier JSON")
    parser.add_argument("--step-times", type=Path, required=True,
                        help="benchmarks/step_time.py --frontier JSON")  # fmt: skip
    parser.add_argument("--accuracy", type=Path, nargs="+", default=[],
                        help="compare summary.json files (dense first in each)")  # fmt: skip
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    memory, step_times = load_json(args.memory), load_json(args.step_times)
    step = step_points(memory, step_times)
    summaries = [load_json(p) for p in args.accuracy]
    accuracy = accuracy_points(summaries)
    args.out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "benchmarks/frontier.py", *(argv or sys.argv[1:])])
    sources = [f"- memory: `{memory['command']}`", f"- step time: `{step_times['command']}`"]
    sources += [f"- accuracy: {p} ({s[0]['epochs']} epochs, seed {s[0]['config']['seed']})"
                for p, s in zip(args.accuracy, summaries)]  # fmt: skip
    md = (
        f"# Frontier: {memory['model']} at {memory['input']}, batch {memory['batch']}, on "
        f"{memory['device_name']}; accuracy on {summaries[0][0]['model'] if summaries else '—'}"
        f"\n\nCommand: `{command}`. Runs it reads:\n\n" + "\n".join(sources) + "\n\n"
        "## Peak memory vs step time (one run each)\n\n" + step_table(step) + "\n\n"
        "## The fastest way to fit each budget\n\n" + budget_table(step) + "\n\n"
        "## Saved bytes vs accuracy (equal schedule, same seed and data order as dense)\n\n"
        + accuracy_table(accuracy)
        + "\n"
    )
    (args.out / "frontier.md").write_text(md)
    first = summaries[0][0] if summaries else {}
    task = (f"{first['model']} on {first['dataset']}, batch {first['batch_size']}"
            if first else "")  # fmt: skip
    payload = {"command": command, "accuracy_task": task, "step": [asdict(p) for p in step],
               "accuracy": [{**asdict(p), "delta": {f"{e}ep_seed{s}": v
                                                     for (e, s), v in p.delta.items()},
                             "accuracy": {f"{e}ep_seed{s}": v
                                          for (e, s), v in p.accuracy.items()}}
                            for p in accuracy]}  # fmt: skip
    (args.out / "frontier.json").write_text(json.dumps(payload, indent=2) + "\n")
    plot_frontier(step, accuracy, args.out)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
