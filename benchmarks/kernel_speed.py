"""Compression and block-sparse dW against the dense matmul and torch.sparse BSR.

python benchmarks/kernel_speed.py   # CPU, fp32 -> docs/results/kernels_cpu_float32.{md,json}
python benchmarks/kernel_speed.py --device cuda --dtype float16  # Triton vs cuBLAS vs torch.sparse

(Not named kernels.py: a script's folder comes first on sys.path, and that name hid Hugging Face's
``kernels`` package, which transformers 5 imports when it is installed.)
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from actprune.bench.kernels import measure_kernels, write_results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--stem", default=None, help="file name stem (default kernels_<device>)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    rows = measure_kernels(
        device=args.device,
        dtype=getattr(torch, args.dtype),
        repeats=args.repeats,
        progress=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    command = "python benchmarks/kernel_speed.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    stem = args.stem or f"kernels_{args.device.split(':')[0]}_{args.dtype}"
    print(write_results(rows, args.device, args.out, stem, command.strip()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
