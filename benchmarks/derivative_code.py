"""The activations' derivative codes: their pieces, and their error against the exact backward.

python benchmarks/derivative_code.py        # -> docs/results/derivative_code.{md,json}

Errors are measured three ways: on the real line (the largest error anywhere), under N(0, σ²) for
several σ (the fit weights σ = 1, 2, 4 equally), and, for GELU, on the GELU inputs of a ResMLP
(resmlp_tiny at initialisation, on Fashion-MNIST when it is available, else on random images) as
the relative error of dx = dy ⊙ gelu'(x) for a random dy.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

import torch

from actprune import activation_derivative, data, derivative_code, models
from actprune.bench import save_results
from actprune.config import ACTIVATION_BITS
from actprune.derivative_code import ACTIVATIONS

SIGMAS = (0.5, 1.0, 2.0, 4.0)


def gaussian_rms(code, sigma: float, n: int = 1_000_000) -> float:
    x = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * sigma
    q = code.derivative(code.encode(x), n, torch.float64)
    return math.sqrt(float(((q - activation_derivative(code.function, x)) ** 2).mean()))


def model_gelu_inputs() -> tuple[torch.Tensor, str]:
    """GELU inputs of resmlp_tiny at initialisation on one batch of 256 images."""
    try:
        ds = data.load_fashion_mnist(download=False)
        images, source = ds.train.batch(torch.arange(256))[0], "Fashion-MNIST"
    except data.DataError:
        images, source = torch.randn(256, 1, 28, 28), "random images"
    torch.manual_seed(0)
    model = models.create("resmlp_tiny")
    seen = []
    for block in model.blocks:
        block.gelu.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    with torch.no_grad():
        model(images)
    return torch.cat([t.reshape(-1) for t in seen]).double(), source


def dx_relative_error(code, x: torch.Tensor) -> float:
    dy = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = dy * activation_derivative(code.function, x)
    coded = dy * code.derivative(code.encode(x), x.numel(), torch.float64)
    return float((coded - exact).norm() / exact.norm())


def measure(x_model: torch.Tensor) -> list[dict]:
    rows = []
    for function in ACTIVATIONS:
        for bits in ACTIVATION_BITS:
            code = derivative_code(function, bits)
            rows.append({
                "function": function,
                "bits": bits,
                "boundaries": code.boundaries,
                "values": code.values,
                "max_error": code.max_error,
                "rms_error_n01": code.rms_error,
                "rms_error_by_sigma": {s: gaussian_rms(code, s) for s in SIGMAS},
                "model_dx_relative_error": (
                    dx_relative_error(code, x_model) if function == "gelu" else None
                ),
                "bytes_per_element": bits / 8,
            })  # fmt: skip
    return rows


def markdown(rows: list[dict], source: str, argv: list[str]) -> str:
    command = shlex.join(["python", "benchmarks/derivative_code.py", *argv])
    lines = [
        "# Activation derivative codes (`actprune.derivative_code`)",
        "",
        f"Command: `{command}`",
        "",
        "Pieces: least-squares fit of f' with x weighted by an equal mixture of N(0, 1), N(0, 2²), "
        "N(0, 4²); exact dynamic programming on a 0.01 grid. Piece i covers (t_i, t_{i+1}]; "
        "backward multiplies dy by its value. The max error is the supremum over the real line "
        "(a 0.00025 grid on [−40, 40] plus both sides of every boundary). gelu_new (Hugging "
        "Face's GPT-2 form) has the tanh form's derivative and code. ReLU needs no code: its "
        "1-bit mask is exact.",
        "",
    ]
    for r in rows:
        bounds = ", ".join(f"{t:.3f}" for t in r["boundaries"])
        values = ", ".join(f"{v:.4f}" for v in r["values"])
        lines += [f"- **{r['function']}, {r['bits']}-bit** boundaries: {bounds}",
                  f"  values: {values}"]  # fmt: skip
    sigmas = " | ".join(f"RMS, σ={s:g}" for s in SIGMAS)
    lines += [
        "",
        f"| function | bits | bytes/elem (fp32: 4) | max error (all x) | {sigmas} "
        f"| dx rel. error, resmlp_tiny GELU inputs ({source}) |",
        "|---|---|---|---|" + "---|" * len(SIGMAS) + "---|",
    ]
    for r in rows:
        sig = " | ".join(f"{r['rms_error_by_sigma'][s]:.4f}" for s in SIGMAS)
        model = r["model_dx_relative_error"]
        lines.append(
            f"| {r['function']} | {r['bits']} | {r['bytes_per_element']:.3f} "
            f"| {r['max_error']:.4f} | {sig} | {'—' if model is None else f'{model:.4f}'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    args = parser.parse_args(argv)
    x_model, source = model_gelu_inputs()
    rows = measure(x_model)
    md = markdown(rows, source, argv)
    payload = {"torch": torch.__version__, "gelu_input_source": source, "codes": rows}
    save_results(args.out, "derivative_code", md, payload)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
