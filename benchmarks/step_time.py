"""Training-step time of dense, checkpointing and actprune configurations, interleaved.

`actprune bench memory` times each configuration in its own block of steps; on a shared 2-core VM
the machine's speed drifts between blocks (dense ResMLP-S24 steps measured 12.9–17.7 s in
different runs). Here every round runs one step of each configuration in turn, so drift hits all
of them alike, and the ratios are medians over rounds of the per-round ratio to dense.

python benchmarks/step_time.py --model resmlp_s24 --batch-size 32 --rounds 5
python benchmarks/step_time.py --model resmlp_tiny --image-size 28 --batch-size 128 --rounds 40
python benchmarks/step_time.py --frontier --rounds 3     # every configuration of the frontier

With --frontier the JSON is also what `actprune plan --step-times` reads (its packaged default,
src/actprune/step_times.json, is a copy of one such run).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from actprune import PruneConfig, models
from actprune.bench import device_name
from actprune.methods import MemoryConfig, apply_method, frontier_methods


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default="resmlp_s24")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--frontier", action="store_true",
                        help="every frontier configuration (methods.frontier_methods)")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    args = parser.parse_args(argv)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    torch.manual_seed(0)
    configs = frontier_methods() if args.frontier else [
        MemoryConfig.dense(),
        MemoryConfig.checkpointing(),
        MemoryConfig.actprune(PruneConfig.preset("recommended")),
        MemoryConfig.actprune(PruneConfig.preset("blocks")),
        MemoryConfig.actprune(PruneConfig.preset("paper")),
    ]  # fmt: skip
    runs = []  # timing only: each model has its own random initialisation
    for config in configs:
        model = apply_method(models.create(args.model, img_size=args.image_size), config)
        model.to(args.device)
        runs.append((config.name, model, torch.optim.AdamW(model.parameters())))
    c = model.config
    x = torch.randn(args.batch_size, c.in_chans, args.image_size, args.image_size)
    x, y = x.to(args.device), torch.randint(0, c.num_classes, (args.batch_size,)).to(args.device)

    def step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> float:
        sync()
        start = time.perf_counter()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - start

    for _, model, opt in runs:  # warm-up: optimizer state, kernel compilation, allocator
        step(model, opt)
    times: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    for r in range(args.rounds):
        for name, model, opt in runs:
            times[name].append(step(model, opt))
        latest = ", ".join(f"{n} {t[-1]:.3f}s" for n, t in times.items())
        print(f"round {r + 1}/{args.rounds}: {latest}", file=sys.stderr, flush=True)
    dense = times["dense"]
    rows = [
        {
            "config": name,
            "median_s": statistics.median(t),
            "ratio": statistics.median(a / d for a, d in zip(t, dense)),
        }
        for name, t in times.items()
    ]
    command = "python benchmarks/step_time.py " + shlex.join(argv if argv else sys.argv[1:])
    which = "step_time_frontier" if args.frontier else "step_time"
    kind = args.device.split(":")[0]
    stem = f"{which}_{args.model}_{args.image_size}px_b{args.batch_size}_{kind}"
    head = (
        f"# Step time, interleaved: {args.model} at {args.image_size}px, batch "
        f"{args.batch_size}, on {device_name(args.device)}\n\ntorch {torch.__version__}, "
        f"{args.rounds} rounds, AdamW. Command: `{command.strip()}`\n\n"
        "Each round runs one step of every configuration in turn; ratio = median over rounds "
        "of step / the same round's dense step.\n\n"
        "| config | median step s | × dense |\n|---|---|---|\n"
    )
    table = [f"| {r['config']} | {r['median_s']:.3f} | {r['ratio']:.3f} |\n" for r in rows]
    md = head + "".join(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.md").write_text(md)
    setup = {"model": args.model, "image_size": args.image_size, "batch": args.batch_size,
             "device_name": device_name(args.device)}  # fmt: skip
    payload = {"command": command.strip(), "torch": torch.__version__, **setup, "rows": rows,
               "times": times}  # fmt: skip
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
