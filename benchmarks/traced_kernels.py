"""Kernels inductor generates for the traced compression, counted on the CPU.

With PyTorch's backend (ACTPRUNE_KERNELS=torch) a compiled step traces the uniform compression and
the activation codes as PyTorch ops and inductor generates their code (docs/design.md, "The
compiled path"). This compiles one layer's forward and backward, dense and converted, and counts
in inductor's generated code the loop nests of each graph: on a GPU each is a kernel of its own.
Inductor writes a pointwise computation to memory once it exceeds `realize_opcount_threshold`
operations, 30 for a GPU and 50 for the CPU; the count runs under the GPU's, so the nests are the
kernels a GPU would launch (extern kernels, the matmuls, are counted apart). `launches.py` counts
the Triton kernels' launches of the same layers for comparison.

python benchmarks/traced_kernels.py
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path

os.environ["ACTPRUNE_KERNELS"] = "torch"

import torch
import torch._inductor.config as inductor_config
from torch import nn
from torch._inductor.utils import run_and_get_code

import actprune
from actprune import PruneConfig
from actprune.bench import save_results
from actprune.models.resmlp import Affine

# inductor's threshold for a GPU (its CPU's is realize_cpu_opcount_threshold)
GPU_THRESHOLD = getattr(inductor_config, "_realize_opcount_threshold_default", 30)


def nests(code: str) -> int:
    """Loop nests of one graph's C++ code: each a kernel on a GPU."""
    return len(re.findall(r"#pragma omp (?:for|single)\b", code))


def graphs(model: nn.Module, x: torch.Tensor) -> list[tuple[int, int]]:
    """(loop nests, extern kernels) of the forward's and the backward's graphs."""
    torch._dynamo.reset()
    compiled = torch.compile(model)

    def step() -> None:
        compiled(x).sum().backward()

    _, codes = run_and_get_code(step)
    return [(nests(c), len(re.findall(r"extern_kernels\.\w+\(", c))) for c in codes]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("docs/results/compiled"))
    args = parser.parse_args(argv)
    inductor_config.realize_opcount_threshold = GPU_THRESHOLD
    torch.manual_seed(0)
    x = torch.randn(4, 64, 64, requires_grad=True)
    layers = {"Linear": lambda: nn.Linear(64, 64), "Affine": lambda: Affine(64),
              "GELU": lambda: nn.GELU()}  # fmt: skip
    rows = []
    for name, make in layers.items():
        dense = graphs(nn.Sequential(make()), x)
        config = PruneConfig.preset("recommended")
        traced = graphs(actprune.prune_activations_(nn.Sequential(make()), config), x)
        rows.append({"layer": name, "dense": dense, "traced": traced,
                     "forward_extra": traced[0][0] - dense[0][0],
                     "backward_extra": traced[1][0] - dense[1][0]})  # fmt: skip
        print(rows[-1], flush=True)
    command = "python benchmarks/traced_kernels.py " + shlex.join(argv or sys.argv[1:])
    lines = [
        f"Inductor's kernels for the traced compression (preset recommended, "
        f"ACTPRUNE_KERNELS=torch, x [4, 64, 64], torch {torch.__version__}): loop nests of the "
        f"generated code per graph, each a kernel on a GPU, counted under the GPU's realization "
        f"threshold ({GPU_THRESHOLD} operations); extern kernels (matmuls) apart. A traced "
        "Linear or Affine input also takes its key from `ops.next_key`, a fill on a GPU. The "
        "Triton kernels' launches for the same layers: docs/results/launches.",
        "",
        f"`{command.strip()}`",
        "",
        "| layer | dense fwd / bwd nests | traced fwd / bwd nests | forward extra | "
        "backward extra |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['layer']} | {r['dense'][0][0]} / {r['dense'][1][0]} | {r['traced'][0][0]} "
              f"/ {r['traced'][1][0]} | {r['forward_extra']:+d} | {r['backward_extra']:+d} |"
              for r in rows]  # fmt: skip
    table = "\n".join(lines)
    print(table)
    save_results(args.out, "traced_kernels", table + "\n",
                 {"command": command.strip(), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
