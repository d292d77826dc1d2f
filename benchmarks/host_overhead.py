"""Host time of one compressed layer: forward + backward of a small Linear, against nn.Linear.

At a small size the GPU (or the CPU's arithmetic) finishes in microseconds and what a layer costs
is host time: Python frames, operator dispatch, allocations, kernel launches. This measures it on
the CPU: `Linear(64, 64)` at batch 8, forward and backward, each preset against `nn.Linear` itself,
interleaved call by call (machine drift hits all alike), median over `--calls` calls. The target
of issue 25: the compressed layer's time minus nn.Linear's at most 1× nn.Linear's own time for the
default preset, 2× for the paper's.

python benchmarks/host_overhead.py                 # 1000 calls, presets recommended, paper, blocks
python benchmarks/host_overhead.py --calls 500 --features 64 --batch-size 8
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from actprune import PruneConfig, PrunedLinear
from actprune.bench import save_results

PRESETS = ("recommended", "paper", "blocks")


def step(layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor) -> float:
    """Seconds of one forward + backward (input gradient and parameter gradients)."""
    t0 = time.perf_counter()
    layer(x).backward(dy)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--out", type=Path, default=Path("docs/results/host_overhead"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    n = args.features
    dense = torch.nn.Linear(n, n)
    layers = {"nn.Linear": dense}
    for name in args.presets:
        layers[name] = PrunedLinear.from_linear(torch.nn.Linear(n, n), PruneConfig.preset(name))
    x = torch.randn(args.batch_size, n, requires_grad=True)
    dy = torch.randn(args.batch_size, n)
    times: dict[str, list[float]] = {name: [] for name in layers}
    for i in range(args.calls + 50):  # the first 50: warm-up (numba compile, caches)
        for name, layer in layers.items():
            seconds = step(layer, x, dy)
            if i >= 50:
                times[name].append(seconds)
        x.grad = None
        for layer in layers.values():
            layer.zero_grad(set_to_none=True)
    base = statistics.median(times["nn.Linear"])
    rows = []
    for name, values in times.items():
        median = statistics.median(values)
        rows.append({"layer": name, "median_us": median * 1e6,
                     "overhead_us": (median - base) * 1e6,
                     "overhead_x_linear": (median - base) / base})  # fmt: skip
    command = "python benchmarks/host_overhead.py " + shlex.join(argv or sys.argv[1:])
    lines = [
        f"Linear({n}, {n}), batch {args.batch_size}, forward + backward, median of {args.calls} "
        f"interleaved calls, {torch.get_num_threads()} threads, {platform.machine()} CPU, torch "
        f"{torch.__version__}. Overhead = median − nn.Linear's median; × = overhead / nn.Linear's.",
        "",
        f"`{command.strip()}`",
        "",
        "| layer | median µs | overhead µs | overhead × nn.Linear |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['layer']} | {r['median_us']:.1f} | {r['overhead_us']:.1f} | "
              f"{r['overhead_x_linear']:.2f} |" for r in rows]  # fmt: skip
    table = "\n".join(lines)
    print(table)
    meta = {"command": command.strip(), "features": n, "batch": args.batch_size,
            "calls": args.calls, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "rows": rows}  # fmt: skip
    save_results(args.out, f"host_overhead_linear{n}_b{args.batch_size}", table + "\n", meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
