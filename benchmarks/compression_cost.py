"""What compression costs in one training step, kernel by kernel, against the compiled dense
step, and the least it could cost on this machine: where the compiled-step targets of issue 25
stand.

Forward hooks record every tensor one step of the converted model compresses (a Linear's or a
channel scale's input, an activation's input). Each is then timed alone, in this process:

- **kernels**: the forward's compression (``Codec.compress``, ``activation_code_parts``) plus what
  the backward's read-back costs beyond the dense backward of the same layer (the weight
  gradient from the codes against dyᵀ·x, the channel-scale gradient against Σ dy ⊙ x, the coded
  derivative against aten's activation backward);
- **floor**: the memory passes no unfused design avoids: one more read of every compressed tensor
  (to code it) and one more write of every Linear input (the dense operand the GEMM reads).

Both are ratios to the compiled dense step: (dense + Σ) / dense. Alone, on warm caches, so the
kernels' sum is a lower bound of what they add inside a step.

python benchmarks/compression_cost.py                                  # demo model, b128
python benchmarks/compression_cost.py --model resmlp_s24 --image-size 224 --batch-size 32
"""

from __future__ import annotations

import argparse
import copy
import functools
import shlex
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from actprune import PruneConfig, PrunedLinear, ops
from actprune.bench import device_name, save_results, time_ms
from actprune.blocksparse import codec_for
from actprune.layers import CodedActivation, CompressedLayer
from actprune.methods import MemoryConfig, apply_method
from actprune.workloads import build_workload

aten = torch.ops.aten
DENSE_ACTIVATION_GRAD = {
    "gelu": lambda dy, x: aten.gelu_backward(dy, x),
    "gelu_tanh": lambda dy, x: aten.gelu_backward(dy, x, approximate="tanh"),
    "silu": aten.silu_backward,
}


def median_seconds(fn: Callable[[], object], reps: int) -> float:
    """Median wall time of ``fn()`` over ``reps`` calls, after one warm-up call."""
    return time_ms(fn, reps, warmup=1) / 1e3


def kernel_seconds(module: torch.nn.Module, x: torch.Tensor, reps: int) -> tuple[float, float]:
    """(forward compression, backward read-back beyond dense) of one compressed tensor."""
    if isinstance(module, CodedActivation):
        function, bits = module.function(), module.prune_config.activation_bits
        codes, nonfinite = ops.activation_code_parts(x, bits, function)
        forward = median_seconds(lambda: ops.activation_code_parts(x, bits, function), reps)
        dense_grad = DENSE_ACTIVATION_GRAD.get(function)
        if dense_grad is None:  # ReLU: its mask decodes inline (no kernel of its own)
            return forward, 0.0
        dy = torch.randn_like(x)
        ours = median_seconds(
            lambda: ops.activation_grad_eager(dy, codes, nonfinite, bits, function), reps
        )
        return forward, ours - median_seconds(lambda: dense_grad(dy, x), reps)
    codec = codec_for(module.prune_config, x.shape, x.dtype, x.device)
    parts = codec.compress(x)
    forward = median_seconds(lambda: codec.compress(x), reps)
    rows = x.reshape(-1, x.shape[-1])
    if isinstance(module, PrunedLinear):
        dy = torch.randn(*x.shape[:-1], module.out_features)
        ours = median_seconds(lambda: codec.weight_grad(dy, parts), reps)
        dy2 = dy.reshape(-1, dy.shape[-1])
        return forward, ours - median_seconds(lambda: dy2.t().mm(rows), reps)
    dy = torch.randn_like(x)
    ours = median_seconds(lambda: codec.channel_scale_grad(dy, parts), reps)
    return forward, ours - median_seconds(lambda: (dy * x).reshape(rows.shape).sum(0), reps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default="resmlp_tiny")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--preset", default="recommended")
    parser.add_argument("--steps", type=int, default=10, help="compiled dense steps timed")
    parser.add_argument("--reps", type=int, default=20, help="timings of each kernel")
    parser.add_argument("--out", type=Path, default=Path("docs/results/compiled"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    work = build_workload(args.model, args.image_size, None)
    dense = copy.deepcopy(work.model)
    pruned = apply_method(work.model, MemoryConfig.actprune(PruneConfig.preset(args.preset)))
    batch = work.batch(args.batch_size)

    inputs: list[tuple[torch.nn.Module, torch.Size]] = []

    def record(module: torch.nn.Module, args_: tuple) -> None:
        inputs.append((module, args_[0].shape))

    hooks = [m.register_forward_pre_hook(record) for m in pruned.modules()
             if isinstance(m, CompressedLayer)]  # fmt: skip
    work.loss(pruned, batch).backward()
    for hook in hooks:
        hook.remove()

    compiled = torch.compile(dense)
    opt = torch.optim.AdamW(dense.parameters())

    def step() -> None:
        work.loss(compiled, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # compilation
    dense_s = median_seconds(step, args.steps)
    by_kind: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0.0, 0.0, 0.0])
    for module, shape in inputs:
        kind = type(module).__name__
        x = torch.randn(shape)
        forward, backward = kernel_seconds(module, x, args.reps)
        floor = median_seconds(x.sum, args.reps)  # one read
        if isinstance(module, PrunedLinear):
            floor += median_seconds(functools.partial(x.fill_, 1.0), args.reps)  # one write
        row = by_kind[kind]
        row[0] += 1
        row[1] += x.numel()
        row[2] += forward
        row[3] += backward
        row[4] += floor
    total = [sum(r[i] for r in by_kind.values()) for i in range(5)]
    rows = [{"kind": k, "tensors": r[0], "elements": r[1], "forward_ms": r[2] * 1e3,
             "backward_extra_ms": r[3] * 1e3, "floor_ms": r[4] * 1e3}
            for k, r in [*by_kind.items(), ("all", total)]]  # fmt: skip
    kernels_x = (dense_s + total[2] + total[3]) / dense_s
    floor_x = (dense_s + total[4]) / dense_s
    command = "python benchmarks/compression_cost.py " + shlex.join(argv or sys.argv[1:])
    lines = [
        f"# Compression's cost per step: {args.model} {args.image_size} px, batch "
        f"{args.batch_size}, preset {args.preset}, on {device_name('cpu')}",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads. Command: "
        f"`{command.strip()}`",
        "",
        f"Compiled dense step: {dense_s * 1e3:.1f} ms (median of {args.steps}). Each kernel "
        f"timed alone (median of {args.reps}); backward = the read-back beyond the dense "
        "backward of the same layer; floor = one more read of each tensor, one more write of "
        "each Linear input.",
        "",
        "| tensors of | count | elements | forward ms | backward extra ms | floor ms |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['kind']} | {r['tensors']} | {r['elements']} | {r['forward_ms']:.2f} | "
              f"{r['backward_extra_ms']:.2f} | {r['floor_ms']:.2f} |" for r in rows]  # fmt: skip
    lines += [
        "",
        f"Kernels alone: **{kernels_x:.3f}×** compiled dense; floor: **{floor_x:.3f}×**.",
    ]
    md = "\n".join(lines) + "\n"
    print(md)
    stem = f"compression_cost_{args.model}_{args.image_size}px_b{args.batch_size}_{args.preset}"
    payload = {"command": command.strip(), "torch": torch.__version__,
               "dense_compiled_ms": dense_s * 1e3, "kernels_x": kernels_x, "floor_x": floor_x,
               "rows": rows}  # fmt: skip
    save_results(args.out, stem, md, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
