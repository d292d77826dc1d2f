"""What to prune and how: the one configuration object every actprune entry point takes."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

CRITERIA = ("l2", "l1", "max")
ROW_ORDERS = ("token-major", "batch-major")
SELECTIONS = ("column", "global")
SCOPES = ("linear", "all")
GELU_BITS = (2, 4)
REMAINDER_BITS = (0, 1, 2, 4)


def _is_positive_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True)
class PruneConfig:
    """How the activations saved for backward are pruned.

    Example: ``PruneConfig(sparsity=0.9, block_size=32)`` keeps the 10 % of 32×32 blocks with the
    largest L2 norm (Barley & Fröning 2023, arXiv 2311.16883).
    """

    # Fraction of blocks dropped, in [0, 1). 0 keeps everything (exact gradients); 0.9 keeps
    # ceil(0.1 · n_blocks) blocks.
    sparsity: float
    # Block shape over the 2-D view (rows = tokens, cols = features) of a saved tensor: an int for
    # square blocks or a (rows, cols) pair. Stored normalised as a (rows, cols) tuple.
    block_size: int | tuple[int, int] = 32
    # Block score: "l2" (Frobenius norm; keeping the top blocks by it minimises the squared error of
    # the pruned tensor), "l1" (sum of |x|) or "max" (largest |x|).
    criterion: str = "l2"
    # How an N-D activation (batch, tokens..., features) becomes the 2-D matrix that is cut into
    # blocks. "token-major" puts the batch innermost, so a block spans bm samples at the same
    # token position: every sample keeps contributing to dW and the kept blocks follow positions
    # and features rather than whole loud samples (measured: token-mixing dW cosine to the exact
    # gradient 0.6 -> 0.95 on ResMLP). "batch-major" is the plain row-major flatten. 2-D inputs
    # are the same either way.
    row_order: str = "token-major"
    # How the kept blocks are spread. "column": every block-column (group of bk features) keeps
    # the same number of blocks, its highest-scoring ones, so every column slice of dW gets a
    # gradient and the Triton dW programs get equal work (measured on ResMLP fc layers: cosine of
    # the 12-step sum of dW to the exact one 0.39-0.69 -> 0.46-0.83; docs/design.md).
    # "global": the k highest-scoring blocks of the whole tensor, as in the seed paper.
    selection: str = "column"
    # Which saved tensors are compressed. "linear": Linear inputs only (the seed paper). "all":
    # also the inputs of per-channel scales (ResMLP's Affine and LayerScale), which only their
    # parameter gradient reads, and GELU inputs, kept as a `gelu_bits` code of gelu'.
    scope: str = "linear"
    gelu_bits: int = 2
    # Store the kept blocks as int8 with one float32 scale per block (4× fewer value bytes in
    # fp32); backward dequantises one layer at a time.
    int8: bool = False
    # Bits per element kept of the dropped blocks. 0: they are dropped (the seed paper). 1, 2, 4:
    # the whole tensor is also kept at that many bits (per-block scale, stochastic rounding, so
    # unbiased), and backward uses the kept blocks exactly and the rest at low precision. Costs
    # bits/8 bytes per element: at sparsity 0.9 fp32 storage goes from 0.10× to 0.17× (2 bits) or
    # 0.23× (4 bits), and dW sees all of x instead of 10 % of its blocks. 4 bits (the CLI default)
    # has 1/25 of 2 bits' rounding noise (see docs/design.md, "Remainder").
    remainder_bits: int = 0

    def __post_init__(self) -> None:
        s = self.sparsity
        if not isinstance(s, numbers.Real) or isinstance(s, bool) or not (0.0 <= s < 1.0):
            raise ValueError(f"PruneConfig.sparsity must be a number in [0, 1), got {s!r}")
        b = self.block_size
        if _is_positive_int(b):
            shape = (int(b), int(b))
        elif isinstance(b, (tuple, list)) and len(b) == 2 and all(map(_is_positive_int, b)):
            shape = (int(b[0]), int(b[1]))
        else:
            raise ValueError(
                "PruneConfig.block_size must be a positive int or a (rows, cols) pair of positive "
                f"ints, got {b!r}"
            )
        object.__setattr__(self, "sparsity", float(s))
        object.__setattr__(self, "block_size", shape)
        if self.criterion not in CRITERIA:
            raise ValueError(
                f"PruneConfig.criterion must be one of {', '.join(map(repr, CRITERIA))}, "
                f"got {self.criterion!r}"
            )
        if self.row_order not in ROW_ORDERS:
            raise ValueError(
                f"PruneConfig.row_order must be one of {', '.join(map(repr, ROW_ORDERS))}, "
                f"got {self.row_order!r}"
            )
        choices = (
            ("selection", SELECTIONS),
            ("scope", SCOPES),
            ("gelu_bits", GELU_BITS),
            ("remainder_bits", REMAINDER_BITS),
        )
        for name, allowed in choices:
            value = getattr(self, name)
            if value not in allowed or isinstance(value, bool):
                raise ValueError(
                    f"PruneConfig.{name} must be one of {', '.join(map(repr, allowed))}, "
                    f"got {value!r}"
                )
        if not isinstance(self.int8, bool):
            raise ValueError(f"PruneConfig.int8 must be True or False, got {self.int8!r}")

    @property
    def block_shape(self) -> tuple[int, int]:
        """(rows, cols) of one block."""
        return self.block_size  # type: ignore[return-value]  # normalised in __post_init__

    def kept_blocks(self, n_blocks: int) -> int:
        """k = ceil((1 - sparsity) · n_blocks), computed so that float error never adds a block."""
        if n_blocks <= 0:
            return 0
        dropped = math.floor(self.sparsity * n_blocks + 1e-9)
        return max(1, n_blocks - dropped)

    def kept_grid_blocks(self, n_br: int, n_bc: int) -> int:
        """Blocks kept of an n_br × n_bc grid: kept_blocks of each block-column ("column") or of
        the whole grid ("global")."""
        if self.selection == "column":
            return n_bc * self.kept_blocks(n_br)
        return self.kept_blocks(n_br * n_bc)
