"""Kernel launches per compressed tensor: the CUDA code path, counted on the CPU.

Runs each compressing layer's forward and backward with the Triton kernels (ACTPRUNE_KERNELS=triton,
TRITON_INTERPRET=1: the kernels run in Triton's interpreter on CPU tensors, through the same
launchers as on a GPU) and counts, beside the dense layer doing the same: Triton launches, and aten
ops that launch a kernel on a GPU (views, metadata and allocations without a fill are left out).
Issue 25's budget per compressed tensor: forward at most 1 beyond what the dense layer runs,
backward at most 2. A layer whose children convert too (SwiGLU's gate and up, attention's
projections) counts theirs as well.

python benchmarks/launches.py
python benchmarks/launches.py --presets transformer --out docs/results/launches_transformer
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections import Counter
from pathlib import Path

os.environ["ACTPRUNE_KERNELS"] = "triton"
os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import actprune
from actprune import PruneConfig
from actprune.bench import save_results
from actprune.models.gpt import CausalSelfAttention, GPTConfig
from actprune.models.llama import LlamaConfig, SwiGLU
from actprune.models.resmlp import Affine

# Ops that launch nothing on a GPU: views, metadata, allocation without a fill.
_FREE = {"empty", "empty_strided", "new_empty", "new_empty_strided", "view", "_unsafe_view",
         "reshape", "alias", "detach", "t", "transpose", "permute", "expand", "unsqueeze",
         "squeeze", "slice", "select", "as_strided", "split", "unbind", "_reshape_alias",
         "view_as", "lift_fresh", "sym_size", "sym_stride", "sym_numel", "is_same_size",
         "_has_compatible_shallow_copy_type", "unflatten", "flatten", "split_with_sizes",
         "promote_types", "empty_like"}  # fmt: skip


_inside_triton = [False]  # the interpreter's own tensor traffic is not a launch


class Launches(TorchDispatchMode):
    """aten ops that launch a kernel, and Triton launches, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in _FREE and not _inside_triton[0]:
            self.ops[f"aten.{name}"] += 1
        return func(*args, **(kwargs or {}))


def _count_triton(counter: Counter) -> None:
    """Count every Triton kernel launch into ``counter`` (the interpreter's launch entry)."""
    from triton.runtime.interpreter import InterpretedFunction

    run = InterpretedFunction.run

    def counted(self, *args, **kwargs):
        counter[f"triton.{self.fn.__name__}"] += 1
        _inside_triton[0] = True
        try:
            return run(self, *args, **kwargs)
        finally:
            _inside_triton[0] = False

    InterpretedFunction.run = counted


def measure(layer: nn.Module, x: torch.Tensor, triton_launches: Counter) -> tuple[Counter, Counter]:
    """(forward, backward) launches of one step of ``layer`` on ``x``, after a first step: what
    a process does once per device (the code tables, the fused selection's arrival counters) is
    not a launch per tensor."""
    layer(x).sum().backward()
    counts = []
    y, x.grad = None, None
    layer.zero_grad(set_to_none=True)  # no accumulation into earlier gradients
    for phase in ("forward", "backward"):
        triton_launches.clear()
        with Launches() as mode:
            if phase == "forward":
                y = layer(x)
            else:
                y.backward(torch.ones_like(y))
        counts.append(mode.ops + triton_launches)
    return counts[0], counts[1]


def _extra(compressed: Counter, dense: Counter) -> tuple[int, str]:
    extra = compressed - dense
    return sum(compressed.values()) - sum(dense.values()), ", ".join(
        f"{name} ×{n}" if n > 1 else name for name, n in sorted(extra.items())
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=["recommended", "paper", "blocks"])
    parser.add_argument("--out", type=Path, default=Path("docs/results/launches"))
    args = parser.parse_args(argv)
    triton_launches: Counter = Counter()
    _count_triton(triton_launches)
    torch.manual_seed(0)
    x = torch.randn(4, 64, 64, requires_grad=True)  # [B, T, C]: 256 rows
    dense_layers = {"Linear": nn.Linear(64, 64), "Affine": Affine(64), "GELU": nn.GELU(),
                    "RMSNorm": nn.RMSNorm(64), "LayerNorm": nn.LayerNorm(64),
                    "SwiGLU": SwiGLU(LlamaConfig(width=64, hidden=176)),
                    "attention": CausalSelfAttention(GPTConfig(width=64, heads=4)),
                    "Dropout": nn.Dropout(0.1)}  # fmt: skip
    rows = []
    for kind, dense in dense_layers.items():
        dense_fwd, dense_bwd = measure(dense, x, triton_launches)
        for preset in args.presets:
            config = PruneConfig.preset(preset)
            layer = actprune.prune_activations_(nn.Sequential(dense), config)[0]
            if layer is dense or not isinstance(layer, actprune.layers.CompressedLayer):
                actprune.restore_dense_(layer)  # its children may have converted
                continue  # not compressed under this preset's scope
            fwd, bwd = measure(layer, x, triton_launches)
            (f_n, f_what), (b_n, b_what) = _extra(fwd, dense_fwd), _extra(bwd, dense_bwd)
            rows.append({"layer": kind, "preset": preset, "forward_extra": f_n,
                         "forward_ops": f_what, "backward_extra": b_n, "backward_ops": b_what,
                         "dense_forward": sum(dense_fwd.values()),
                         "dense_backward": sum(dense_bwd.values())})  # fmt: skip
            actprune.restore_dense_(nn.Sequential(layer))
    command = "python benchmarks/launches.py " + shlex.join(argv or sys.argv[1:])
    lines = [
        "Launches per compressed tensor beyond the dense layer's own (x [4, 64, 64]), Triton "
        "kernels under the interpreter (ACTPRUNE_KERNELS=triton TRITON_INTERPRET=1), aten ops "
        "that launch a kernel on a GPU. Budget (issue 25): forward +1, backward +2.",
        "",
        f"`{command.strip()}`",
        "",
        "| layer | preset | dense fwd / bwd | forward extra | which | backward extra | which |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['layer']} | {r['preset']} | {r['dense_forward']} / {r['dense_backward']} "
              f"| {r['forward_extra']:+d} | {r['forward_ops']} | {r['backward_extra']:+d} | "
              f"{r['backward_ops']} |" for r in rows]  # fmt: skip
    table = "\n".join(lines)
    print(table)
    save_results(args.out, "launches", table + "\n", {"command": command.strip(), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
