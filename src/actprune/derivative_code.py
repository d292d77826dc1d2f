"""Low-bit codes of activation derivatives: what backward keeps of an activation's input.

An activation's input x is on the *input*-gradient path: dx = dy ⊙ f'(x). Backward needs f'(x), not
x, and a piecewise-constant approximation of f' with 2^bits pieces is enough (Few-Bit Backward,
Novikov et al., ICML 2022). So forward stores, per element, only which piece x falls in — 2 bits
(default) or 4 bits, packed 4 or 2 to a byte — and backward multiplies dy by that piece's value.
The coded activations (``ACTIVATIONS``): GELU in its erf form, PyTorch's tanh form, Hugging Face's
``gelu_new`` (the tanh form written out, as GPT-2 computes it), and SiLU. ReLU needs no fit: its
derivative is exactly 0 or 1, a 1-bit mask (``layers.CodedActivation``).

How the pieces are chosen: boundaries t_1 < … < t_{L-1} and values v_1 … v_L minimise the mean
squared error E[(f'(x) − q(x))²] for x drawn from an equal mixture of N(0, 1), N(0, 2²) and
N(0, 4²): pre-activation scales differ between layers and change during training, and fitting to
N(0, 1) alone leaves the 4-bit GELU code a large error above its last boundary (its last piece sits
at gelu's overshoot; docs/results/derivative_code.md has the figures). For fixed boundaries the
best value of a piece is the mean of f' over it; the boundaries are found exactly on a
0.01-spaced grid over [−6, 6] by dynamic programming (optimal 1-D segmentation); the fit takes
well under a second and is cached. ``DerivativeCode`` records the RMS error under N(0, 1) and the
largest error anywhere on the real line, the bound the tests check (docs/results/derivative_code.md
has the measured tables).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _disable_current_modes

from .bitpack import pack_codes, unpack_codes
from .config import ACTIVATION_BITS

_GRID = (-6.0, 6.0, 1201)  # fit grid: start, stop, points (spacing 0.01)
_FIT_SIGMAS = (1.0, 2.0, 4.0)  # the fit weights x by an equal mixture of N(0, σ²)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _gelu_derivative(x: torch.Tensor) -> torch.Tensor:
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return cdf + x * pdf


def _gelu_tanh_derivative(x: torch.Tensor) -> torch.Tensor:
    t = torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)


def _silu_derivative(x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    """Hugging Face's ``NewGELUActivation`` (GPT-2's "gelu_new"), operation for operation, so the
    output is bit-identical to theirs."""
    return 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * torch.pow(x, 3.0))))


# name -> (the activation's forward, its exact derivative)
ACTIVATIONS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable]] = {
    "gelu": (F.gelu, _gelu_derivative),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), _gelu_tanh_derivative),
    "gelu_new": (_gelu_new, _gelu_tanh_derivative),
    "silu": (F.silu, _silu_derivative),
}


def activation_derivative(function: str, x: torch.Tensor) -> torch.Tensor:
    """The exact derivative of an activation, what its code approximates.

    Args:
        function: a key of ``ACTIVATIONS`` ("gelu", "gelu_tanh", "gelu_new", "silu").
        x: where to evaluate it.

    Returns:
        f'(x), elementwise, in x's dtype.

    Example:
        >>> import torch
        >>> from actprune import activation_derivative
        >>> activation_derivative("silu", torch.tensor([0.0])).item()
        0.5
    """
    return ACTIVATIONS[_known(function)][1](x)


def _known(function: str) -> str:
    if function not in ACTIVATIONS:
        raise ValueError(f"no derivative code for {function!r}; coded: {sorted(ACTIVATIONS)}")
    return function


@dataclass(frozen=True)
class DerivativeCode:
    """A fitted 2^bits-piece approximation of an activation's derivative f' and its errors.

    Attributes:
        bits: bits per code (2 or 4).
        function: the activation (a key of ``ACTIVATIONS``).
        boundaries: the 2^bits - 1 increasing thresholds; piece i is (t_i, t_{i+1}].
        values: the derivative value of each piece.
        rms_error: sqrt E[(f'(x) − q(x))²] for x ~ N(0, 1).
        max_error: sup over all real x of |f'(x) − q(x)|.

    Example:
        >>> import torch
        >>> from actprune import derivative_code
        >>> code = derivative_code("gelu", 2)
        >>> x = torch.tensor([-5.0, 0.0, 5.0])
        >>> [round(v, 2) for v in code.derivative(code.encode(x), 3, torch.float32).tolist()]
        [-0.04, 0.31, 1.05]
    """

    bits: int
    function: str
    boundaries: tuple[float, ...]  # L - 1 increasing thresholds; piece i is (t_i, t_{i+1}]
    values: tuple[float, ...]  # L derivative values, one per piece
    rms_error: float  # sqrt E[(f'(x) − q(x))²], x ~ N(0, 1)
    max_error: float  # sup over all real x of |f'(x) − q(x)|

    @property
    def codes_per_byte(self) -> int:
        return 8 // self.bits

    def packed_numel(self, numel: int) -> int:
        """Bytes that hold the codes of ``numel`` elements."""
        return -(-numel // self.codes_per_byte)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [packed_numel(x.numel())]: the piece index of every element of x, bit-packed.

        A NaN input gets some piece (its derivative is not representable). 16-bit inputs
        are compared in float32, so the boundaries are not rounded to the input's precision."""
        if x.element_size() < 4:
            x = x.float()
        x = x.reshape(-1)
        if self.bits == 2:  # three comparisons beat bucketize's search on CPU (docs/design.md)
            codes = (x > self.boundaries[0]).to(torch.uint8)
            for t in self.boundaries[1:]:
                codes += x > t
        else:
            bounds = torch.tensor(self.boundaries, dtype=x.dtype, device=x.device)
            codes = torch.bucketize(x, bounds, out_int32=True).to(torch.uint8)
        return pack_codes(codes.clamp_(max=len(self.values) - 1), self.bits)

    def derivative(self, packed: torch.Tensor, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """[numel] of ``dtype``: the coded f'(x) of each element ``encode`` saw."""
        table = torch.tensor(self.values, dtype=dtype, device=packed.device)
        codes = unpack_codes(packed, self.bits, numel)
        return torch.index_select(table, 0, codes.int())


@cache
def derivative_code(function: str = "gelu", bits: int = 2) -> DerivativeCode:
    """The least-squares 2^bits-piece code of ``function``'s derivative (see the module
    docstring); cached.

    Args:
        function: the activation, a key of ``ACTIVATIONS``: "gelu" (erf form), "gelu_tanh",
            "gelu_new" (Hugging Face's tanh form), "silu".
        bits: 2 or 4.

    Returns:
        The ``DerivativeCode``, with its measured error bounds.

    Example:
        >>> from actprune import derivative_code
        >>> derivative_code("gelu", 4).max_error < derivative_code("gelu", 2).max_error
        True
    """
    if bits not in ACTIVATION_BITS:
        raise ValueError(f"derivative code bits must be one of {ACTIVATION_BITS}, got {bits!r}")
    _known(function)
    # The fit computes with real tensors and reads values out of them; the first call may come
    # from inside torch.compile's tracing of the backward, so it runs outside every active mode.
    with _disable_current_modes():
        return _fit(function, bits)


@torch.compiler.assume_constant_result
def _pieces(function: str, bits: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    code = derivative_code(function, bits)
    return code.boundaries, code.values


def traced_code(function: str, bits: int) -> DerivativeCode:
    """``derivative_code(function, bits)`` for code that torch.compile traces: the fit's
    boundaries and values are constants to the compiler, which calls the (cached) fit once while
    tracing instead of tracing it (the fit reads numbers out of tensors: a graph break). The
    error figures are not carried (NaN); ``encode`` and ``derivative`` do not read them."""
    boundaries, values = _pieces(function, bits)
    return DerivativeCode(bits, function, boundaries, values, math.nan, math.nan)


def _fit(function: str, bits: int) -> DerivativeCode:
    derivative = ACTIVATIONS[function][1]
    x = torch.linspace(*_GRID, dtype=torch.float64)
    g = derivative(x)
    w = sum(torch.exp(-0.5 * (x / s) ** 2) / s for s in _FIT_SIGMAS)
    w = w / w.sum()
    cuts = _segment(g, w, 1 << bits)
    boundaries = [float((x[c - 1] + x[c]) / 2) for c in cuts[1:-1]]
    values = [float((w[a:b] * g[a:b]).sum() / w[a:b].sum()) for a, b in zip(cuts, cuts[1:])]
    code = DerivativeCode(bits, function, tuple(boundaries), tuple(values), 0.0, 0.0)
    # Errors of the code as it is applied (encode + table), on a fine grid; beyond ±40 every coded
    # f' is 0 or 1 to double precision, as are the end pieces' errors there.
    fine = torch.linspace(-40, 40, 320001, dtype=torch.float64)
    err = code.derivative(code.encode(fine), fine.numel(), torch.float64) - derivative(fine)
    density = torch.exp(-0.5 * fine * fine)
    rms = math.sqrt(float((density * err**2).sum() / density.sum()))
    # f' is continuous, so on each piece the sup is reached inside (the grid) or at an end: at a
    # boundary t_i, against both pieces meeting there.
    at = derivative(torch.tensor(boundaries, dtype=torch.float64))
    left, right = torch.tensor(values[:-1]), torch.tensor(values[1:])
    worst = max(
        float(err.abs().max()), float((at - left).abs().max()), float((at - right).abs().max())
    )
    return DerivativeCode(bits, function, code.boundaries, code.values, rms, worst)


def _segment(g: torch.Tensor, w: torch.Tensor, pieces: int) -> list[int]:
    """Cut points 0 = c_0 < … < c_L = n minimising Σ_pieces Σ w·(g − weighted mean)² (exact DP)."""
    n = g.numel()
    zero = g.new_zeros(1)
    sw = torch.cat([zero, torch.cumsum(w, 0)])
    s1 = torch.cat([zero, torch.cumsum(w * g, 0)])
    s2 = torch.cat([zero, torch.cumsum(w * g * g, 0)])
    # cost[a, b]: error of one piece over grid points a..b-1 (a < b), inf elsewhere
    a, b = torch.arange(n + 1).unsqueeze(1), torch.arange(n + 1).unsqueeze(0)
    dw, d1, d2 = sw[b] - sw[a], s1[b] - s1[a], s2[b] - s2[a]
    cost = torch.where(b > a, d2 - d1 * d1 / dw.clamp_min(1e-300), torch.inf)
    best = cost[0]  # best[b]: least error of one piece covering 0..b-1
    choices = []
    for _ in range(pieces - 1):
        total = best.unsqueeze(1) + cost  # [a, b]: best split of 0..a-1, then one piece a..b-1
        best, arg = total.min(0)
        choices.append(arg)
    cuts = [n]
    for arg in reversed(choices):
        cuts.append(int(arg[cuts[-1]]))
    cuts.append(0)
    return cuts[::-1]
