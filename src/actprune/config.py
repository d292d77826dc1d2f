"""What to compress and how: ``PruneConfig``, the one configuration every entry point takes.

Each field is declared once, here, with its allowed values and a one-line help text in its
metadata. The command line builds its compression flags from these declarations, checkpoints and
summaries store ``to_dict()``, and the registered operators take ``to_json()``. Named presets
(``PruneConfig.preset``) are the settings the measurements in docs/results chose.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

CRITERIA = ("l2", "l1", "max")
ROW_ORDERS = ("token-major", "batch-major")
SELECTIONS = ("column", "global")
SCOPES = ("linear", "all")
ACTIVATION_BITS = (2, 4)
REMAINDER_BITS = (0, 1, 2, 4, 8)
INPUT_PATH_BITS = (0, 4, 8)  # 0: exact; 4, 8: per-row codes (``rowcode``)


def _option(help: str, choices: tuple | None = None, **kwargs: Any) -> Any:
    """A dataclass field carrying its help text and allowed values (read by the CLI)."""
    return field(metadata={"help": help, "choices": choices}, **kwargs)


def is_int(value: object) -> bool:
    """An integer and not a bool (``True`` is an ``int`` to Python, never a size or a count)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite int or float, not a bool: what a numeric setting read from a file must be."""
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _is_positive_int(value: object) -> bool:
    return is_int(value) and value > 0


@dataclass(frozen=True)
class PruneConfig:
    """How the activations saved for backward are compressed.

    Frozen and validated on construction: a bad value raises ``ValueError`` naming the field, the
    value and what is allowed. Why each field exists, with measurements: docs/design.md.

    Args:
        sparsity: fraction of blocks dropped, in [0, 1]; 1 (keep no block exactly) only with a
            remainder, which is then uniform low-bit quantization of the whole tensor.
        block_size: an int (square blocks) or a (rows, cols) pair; stored as a pair.
        criterion: block score, one of ``CRITERIA``.
        row_order: how an N-D activation becomes rows, one of ``ROW_ORDERS``.
        selection: top-k per block-column or over the whole tensor, one of ``SELECTIONS``.
        scope: which saved tensors are compressed, one of ``SCOPES``.
        activation_bits: bits of the activations' derivative codes (GELU, SiLU; ``scope="all"``),
            one of ``ACTIVATION_BITS``.
        int8: keep the kept blocks as int8 with one float32 scale per block.
        remainder_bits: bits per element of the dropped blocks, one of ``REMAINDER_BITS``.
        norm_bits: 0 (exact) or the bits of a per-token code of the normalized input that
            LayerNorm / RMSNorm keep for dx (``INPUT_PATH_BITS``): lossy on the input-gradient
            path, an explicit opt-in.
        attention_bits: 0 (attention as dense) or the bits of per-(token, head) codes of the q, k
            and v that scaled-dot-product attention keeps; backward recomputes the attention
            from them (``INPUT_PATH_BITS``; lossy on the input-gradient path).
        swiglu_bits: bits of the codes of a SwiGLU MLP's gate and up, 0 for exact
            (``INPUT_PATH_BITS``; lossy on the input-gradient path when not 0).

    Example:
        >>> from actprune import PruneConfig
        >>> PruneConfig(0.9, 32).block_size
        (32, 32)
        >>> PruneConfig.preset("recommended").label()
        'all_u4_b32'
        >>> PruneConfig.preset("blocks").label()
        'all_r4_s0.9_b32'
        >>> PruneConfig(1.5)
        Traceback (most recent call last):
        ...
        ValueError: PruneConfig.sparsity must be a number in [0, 1], got 1.5
    """

    # 0 keeps every block (exact gradients); 0.9 keeps ceil(0.1 · n_blocks) blocks; 1 keeps none,
    # which with a remainder is plain uniform quantization (ActNN / GACT style, per-block scale,
    # stochastic rounding): the baseline that block selection has to beat at equal bytes.
    sparsity: float = _option("fraction of blocks dropped, in [0, 1]; 1 needs a remainder "
                              "(uniform quantization)")  # fmt: skip
    # Blocks are cut from the 2-D (rows = tokens, cols = features) view of a saved tensor.
    block_size: int | tuple[int, int] = _option("block side, or ROWSxCOLS", default=32)
    # "l2" (keeping the top blocks by it minimises the squared error of the pruned tensor), "l1"
    # (sum of |x|) or "max" (largest |x|). Blocks holding NaN/Inf always rank first.
    criterion: str = _option("block score", CRITERIA, default="l2")
    # "token-major" puts the batch innermost, so a block spans bm samples at one token position
    # and every sample keeps contributing to dW; "batch-major" is the plain row-major flatten.
    row_order: str = _option("how (batch, tokens, features) become rows", ROW_ORDERS,
                             default="token-major")  # fmt: skip
    # "column": every block-column keeps its own top blocks, so every column slice of dW gets a
    # gradient and the dW kernel's programs get equal work. "global": the seed paper's top-k.
    selection: str = _option("top-k within each block-column or over the whole tensor",
                             SELECTIONS, default="column")  # fmt: skip
    # "linear": Linear inputs only (the seed paper). "all": also every registered layer whose
    # saved input feeds only a parameter gradient (per-channel scales, GPT-2's Conv1D) and the
    # inputs of activations (GELU, SiLU: an `activation_bits` code of f'; ReLU: a 1-bit mask).
    scope: str = _option("linear = Linear inputs (the paper); all = also per-channel scale inputs "
                         "and activation inputs", SCOPES, default="linear")  # fmt: skip
    activation_bits: int = _option("bits of the GELU / SiLU derivative codes (scope all)",
                                   ACTIVATION_BITS, default=2)  # fmt: skip
    # Backward dequantises one layer at a time.
    int8: bool = _option("keep the kept blocks as int8 with a per-block scale", default=False)
    # 0: dropped blocks are zero (the seed paper). 1, 2, 4, 8: the whole tensor is also kept at that
    # many bits (per-block scale, stochastic rounding, so unbiased) and backward uses the kept
    # blocks exactly and the rest at low precision: dW sees all of x.
    remainder_bits: int = _option("also keep the dropped blocks at this many bits (0: drop them)",
                                  REMAINDER_BITS, default=0)  # fmt: skip
    # The input-gradient path (docs/design.md, "Transformers"): with scope "all" RMSNorm keeps
    # its normalized input instead of input and product, SwiGLU MLPs keep gate and up and
    # recompute the rest, dropout keeps 1-bit masks, all exact. These three fields make the
    # norm input, attention's q, k, v and SwiGLU's gate and up lossy: per-row codes, 0 = exact.
    norm_bits: int = _option("bits of the per-token code of LayerNorm / RMSNorm inputs (0: exact; "
                             "lossy dx)", INPUT_PATH_BITS, default=0)  # fmt: skip
    attention_bits: int = _option("bits of the per-head codes of attention's q, k, v (0: dense; "
                                  "lossy dx)", INPUT_PATH_BITS, default=0)  # fmt: skip
    swiglu_bits: int = _option("bits of the codes of SwiGLU's gate and up (0: exact; lossy dx)",
                               INPUT_PATH_BITS, default=0)  # fmt: skip

    def __post_init__(self) -> None:
        s = self.sparsity
        if not isinstance(s, numbers.Real) or isinstance(s, bool) or not (0.0 <= s <= 1.0):
            raise ValueError(f"PruneConfig.sparsity must be a number in [0, 1], got {s!r}")
        object.__setattr__(self, "sparsity", float(s))
        object.__setattr__(self, "block_size", _block_pair(self.block_size))
        for f in dataclasses.fields(self):
            allowed, value = f.metadata["choices"], getattr(self, f.name)
            if allowed is not None and (value not in allowed or isinstance(value, bool)):
                raise ValueError(
                    f"PruneConfig.{f.name} must be one of {', '.join(map(repr, allowed))}, "
                    f"got {value!r}"
                )
        if not isinstance(self.int8, bool):
            raise ValueError(f"PruneConfig.int8 must be True or False, got {self.int8!r}")
        if self.sparsity == 1.0 and not self.remainder_bits:
            raise ValueError(
                "PruneConfig.sparsity 1 keeps no block: it needs remainder_bits > 0 (uniform "
                "quantization), otherwise nothing of the tensor is saved; to keep blocks exact, "
                "set a sparsity below 1 (preset 'blocks' or 'paper')"
            )
        if self.sparsity == 1.0 and self.int8:
            raise ValueError(
                "PruneConfig.int8 stores the kept blocks as int8, and sparsity 1 keeps none "
                "(uniform quantization): set a sparsity below 1 (preset 'blocks')"
            )
        # Computed once: the ops take it on every call, also inside torch.compile'd code, which
        # cannot trace json.dumps.
        object.__setattr__(self, "_json", json.dumps(self.to_dict(), sort_keys=True,
                                                      separators=(",", ":")))  # fmt: skip

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> PruneConfig:
        """A named setting (``PRESETS``), with any field replaced by a keyword.

        Args:
            name: ``"paper"`` (the seed paper's method), ``"blocks"`` (top blocks exact, the
                rest at 4 bits), ``"uniform"`` (every element at 4 bits), ``"recommended"``
                (actprune's default on the command line, today ``"uniform"``) or
                ``"transformer"`` (8 bits everywhere, the input-gradient path included).
            **overrides: fields to change, e.g. ``sparsity=0.8``.

        Returns:
            The PruneConfig.

        Example:
            >>> PruneConfig.preset("paper", sparsity=0.8).selection
            'global'
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def block_shape(self) -> tuple[int, int]:
        """(rows, cols) of one block."""
        return self.block_size  # type: ignore[return-value]  # normalised in __post_init__

    @property
    def uniform(self) -> bool:
        """True when no block is kept exactly: the remainder alone, i.e. uniform quantization."""
        return self.sparsity == 1.0

    def kept_blocks(self, n_blocks: int) -> int:
        """k = ceil((1 - sparsity) · n_blocks), computed so that float error never adds a block;
        at least one block unless ``uniform``."""
        if n_blocks <= 0 or self.uniform:
            return 0
        dropped = math.floor(self.sparsity * n_blocks + 1e-9)
        return max(1, n_blocks - dropped)

    def kept_grid_blocks(self, n_br: int, n_bc: int) -> int:
        """Blocks kept of an n_br × n_bc grid: kept_blocks of each block-column ("column") or of
        the whole grid ("global")."""
        if self.selection == "column":
            return n_bc * self.kept_blocks(n_br)
        return self.kept_blocks(n_br * n_bc)

    def label(self) -> str:
        """A short name for tables and run folders: a tag for every field away from its default,
        then sparsity and block, e.g. ``"all_int8_r4_s0.9_b32"``; uniform quantization at b bits
        is ``u<b>`` without a sparsity, e.g. ``"all_u4_b32"``."""
        bm, bk = self.block_shape
        tags = [
            "all" if self.scope == "all" else "",
            "int8" if self.int8 else "",
            f"{'u' if self.uniform else 'r'}{self.remainder_bits}" if self.remainder_bits else "",
            f"a{self.activation_bits}" if self.scope == "all" and self.activation_bits != 2 else "",
            "global" if self.selection == "global" else "",
            self.criterion if self.criterion != "l2" else "",
            "batchmajor" if self.row_order == "batch-major" else "",
            f"n{self.norm_bits}" if self.norm_bits else "",
            f"att{self.attention_bits}" if self.attention_bits else "",
            f"sw{self.swiglu_bits}" if self.swiglu_bits else "",
            "" if self.uniform else f"s{self.sparsity:g}",
            f"b{bm}" if bm == bk else f"b{bm}x{bk}",
        ]
        return "_".join(t for t in tags if t)

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain values (JSON- and ``torch.load(weights_only=True)``-safe)."""
        d = dataclasses.asdict(self)
        d["block_size"] = list(self.block_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PruneConfig:
        """The inverse of ``to_dict``; unknown keys raise ``ValueError``. Reads the old name
        ``gelu_bits`` (checkpoints of versions before the SiLU code) as ``activation_bits``."""
        d = {_RENAMED.get(k, k): v for k, v in d.items()}
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown PruneConfig fields: {', '.join(sorted(unknown))}")
        return cls(**d)

    def to_json(self) -> str:
        """Compact, canonical JSON of ``to_dict()``: the form the registered operators take."""
        return self._json

    @staticmethod
    def from_json(text: str) -> PruneConfig:
        """The inverse of ``to_json`` (cached: the operators call it on every step)."""
        return _from_json(text)


_RENAMED = {"gelu_bits": "activation_bits"}


@lru_cache(maxsize=256)
def _from_json(text: str) -> PruneConfig:
    return PruneConfig.from_dict(json.loads(text))


def _block_pair(b: object) -> tuple[int, int]:
    if _is_positive_int(b):
        return (int(b), int(b))  # type: ignore[call-overload]
    if isinstance(b, (tuple, list)) and len(b) == 2 and all(map(_is_positive_int, b)):
        return (int(b[0]), int(b[1]))
    raise ValueError(
        f"PruneConfig.block_size must be a positive int or a (rows, cols) pair of positive ints, "
        f"got {b!r}"
    )


# Named settings. "paper": Barley & Fröning 2023 (Linear inputs, global top-k, dropped blocks
# zero). "blocks": every saved tensor, the top 10 % of blocks exact, the rest at 4 bits.
# "uniform": no block kept exactly, every saved tensor at 4 bits (ActNN / GACT-style
# quantization; --remainder-bits picks 2 or 8). "recommended": what the command line uses unless
# told otherwise: the setting with the fewest saved bytes whose 10-epoch Fashion-MNIST accuracy is
# within 0.3 point of dense on two seeds, today "uniform" (docs/design.md, "Presets").
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"sparsity": 0.9, "block_size": 32, "selection": "global"},
    "blocks": {"sparsity": 0.9, "block_size": 32, "scope": "all", "remainder_bits": 4},
    "uniform": {"sparsity": 1.0, "block_size": 32, "scope": "all", "remainder_bits": 4},
}
PRESETS["recommended"] = PRESETS["uniform"]
# "transformer": 8 bits everywhere: the parameter-gradient inputs at 8 bits (not "uniform"'s 4,
# which cost GPT's MLP output projection most of its gradient) plus 8-bit per-row codes of norm
# inputs, attention's q, k, v and SwiGLU's gate and up: lossy on the input-gradient path, so an
# explicit choice, never a default (docs/design.md, "Transformers").
PRESETS["transformer"] = {**PRESETS["uniform"], "remainder_bits": 8, "norm_bits": 8,
                          "attention_bits": 8, "swiglu_bits": 8}  # fmt: skip
