"""The ways to train a model that ``bench memory`` measures and ``plan`` predicts, side by side.

A ``MemoryConfig`` says which of the model's repeated blocks run under activation checkpointing
(none; every ``every``-th one) and how (``"full"``: only the block input is held and the whole
block runs twice; ``"selective"``: PyTorch's selective checkpointing, the matmul outputs are held
and only the cheap elementwise ops run twice), and what is compressed (a ``PruneConfig``: in the
blocks that are not checkpointed and the layers outside the stack, or also inside the checkpointed
blocks, where it shrinks the recompute's transient). Its ``family`` names the method in tables:

- ``dense``: plain training;
- ``checkpoint`` / ``selective``: checkpointing alone (exact);
- ``coded_checkpoint``: full checkpointing holding each block input as ``boundary_bits``-bit row
  codes (``actprune.checkpoint``: a lossy recompute, opt-in);
- ``unstructured``: the Linear inputs kept as their top-k *elements* by magnitude, stored as
  values + int32 indices (the DropIT approach, i.e. actprune with 1×1 blocks and global top-k);
- ``uniform``: every saved tensor at b bits, no block kept exactly (``PruneConfig.uniform``);
- ``actprune``: ``prune_activations_`` with a ``PruneConfig`` that keeps blocks;
- ``composition``: checkpointing (exact or coded) and compression together.
Layers matching ``exclude`` (default: the classifier head) stay dense in every compressed method.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from . import rowcode
from .checkpoint import coded_checkpoint
from .config import PruneConfig
from .convert import prune_activations_
from .layers import compressing

CHECKPOINTS = ("none", "full", "selective")
# What ``methods`` can add beside dense and the compressions: checkpointing of every block, the
# unstructured top-k, (``composition``) checkpointing of every block with each compression
# inside it, and (``coded_checkpoint``) checkpointing with 8-bit block inputs, alone and with each
# compression inside. The first two are the default.
BASELINES = ("checkpoint", "unstructured", "composition", "coded_checkpoint")
CODED_CHECKPOINT_BITS = 8
DEFAULT_BASELINES = ("checkpoint", "unstructured")

# Selective checkpointing holds the outputs of these ops (the matmuls: what is expensive to
# recompute) and recomputes everything else, as torchtitan's and torchtune's policies do.
_SAVED_BY_SELECTIVE = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
}


def _selective_policy(ctx: object, op: object, *args: object, **kwargs: object) -> CheckpointPolicy:
    if op in _SAVED_BY_SELECTIVE:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


class Checkpointed(nn.Module):
    """Runs ``block`` under non-reentrant activation checkpointing: only the block's input is held
    for backward (saved through saved-tensor hooks, so it is counted, as kind "checkpointed").
    With ``selective``, the matmul outputs are held too and only the other ops are recomputed;
    with ``bits`` (4 or 8), the input is held as row codes (``coded_checkpoint``: lossy). Inside
    ``exact_gradients()`` the block runs without checkpointing: the recompute would run after
    that block ends, compressing what its forward kept exact."""

    def __init__(self, block: nn.Module, selective: bool = False, bits: int = 0) -> None:
        super().__init__()
        if bits and selective:
            raise ValueError("Checkpointed: coded block inputs (bits) need full checkpointing")
        self.block = block
        self.selective = selective
        self.bits = bits

    def forward(self, *args: object, **kwargs: object) -> object:
        if not compressing():  # no graph, or exact_gradients(): the recompute would compress
            return self.block(*args, **kwargs)
        if self.bits:
            return coded_checkpoint(self.block, *args, bits=self.bits, **kwargs)
        if self.selective:
            kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, _selective_policy)
        return checkpoint(self.block, *args, use_reentrant=False, **kwargs)


@dataclass(frozen=True)
class MemoryConfig:
    """One way to train: its name in tables, its checkpointing and its compression.

    Args:
        name: the row's name in tables (the constructors below name every configuration).
        prune: what compression does, or None.
        checkpoint: one of ``CHECKPOINTS``.
        every: checkpoint blocks 0, every, 2·every, ... of the stack (1: all of them).
        compress_checkpointed: also compress inside the checkpointed blocks (else they are left
            as they are and ``prune`` applies to the rest of the model).
        exclude: name patterns of layers never compressed.
        boundary_bits: hold each checkpointed block's input as 4- or 8-bit row codes (full
            checkpointing; a lossy recompute); 0: exactly.
    """

    name: str
    prune: PruneConfig | None = None
    checkpoint: str = "none"
    every: int = 1
    compress_checkpointed: bool = False
    exclude: tuple[str, ...] = ("head",)
    boundary_bits: int = 0

    def __post_init__(self) -> None:
        if self.checkpoint not in CHECKPOINTS:
            raise ValueError(
                f"MemoryConfig.checkpoint must be one of {CHECKPOINTS}, got {self.checkpoint!r}"
            )
        if not (isinstance(self.every, int) and self.every >= 1):
            raise ValueError(f"MemoryConfig.every must be a positive int, got {self.every!r}")
        if self.compress_checkpointed and (self.prune is None or self.checkpoint != "full"):
            raise ValueError(
                f"MemoryConfig {self.name!r}: compress_checkpointed needs a PruneConfig and full "
                "checkpointing"
            )
        if self.boundary_bits not in (0, *rowcode.BITS) or (
            self.boundary_bits and self.checkpoint != "full"
        ):
            raise ValueError(
                f"MemoryConfig {self.name!r}: boundary_bits must be 0, or 4 or 8 with full "
                f"checkpointing, got {self.boundary_bits!r} with checkpoint={self.checkpoint!r}"
            )

    @property
    def family(self) -> str:
        """dense, checkpoint, selective, coded_checkpoint, unstructured, uniform, actprune or
        composition."""
        if self.prune is None:
            if self.boundary_bits:
                return "coded_checkpoint"
            return {"none": "dense", "full": "checkpoint", "selective": "selective"}[
                self.checkpoint
            ]
        if self.checkpoint != "none":
            return "composition"
        if self.prune.block_shape == (1, 1) and self.prune.selection == "global":
            return "unstructured"
        return "uniform" if self.prune.uniform else "actprune"

    @classmethod
    def dense(cls) -> MemoryConfig:
        return cls("dense")

    @classmethod
    def checkpointing(
        cls, every: int = 1, selective: bool = False, boundary_bits: int = 0
    ) -> MemoryConfig:
        """Checkpoint every ``every``-th block, fully or selectively, the block inputs exact or
        (``boundary_bits``) coded: "checkpoint", "checkpoint_every2", "selective",
        "checkpoint_coded8", ..."""
        name = "selective" if selective else "checkpoint"
        name += f"_every{every}" if every > 1 else ""
        name += f"_coded{boundary_bits}" if boundary_bits else ""
        mode = "selective" if selective else "full"
        return cls(name, checkpoint=mode, every=every, boundary_bits=boundary_bits)

    @classmethod
    def unstructured(cls, sparsity: float) -> MemoryConfig:
        """Top-k elements of every Linear input: 1×1 blocks, global selection."""
        return cls(f"unstructured_s{sparsity:g}", PruneConfig(sparsity, 1, selection="global"))

    @classmethod
    def actprune(cls, prune: PruneConfig, exclude: Iterable[str] = ("head",)) -> MemoryConfig:
        """actprune with ``prune``, named ``actprune_<label>`` (as ``compare`` names its run)."""
        return cls(f"actprune_{prune.label()}", prune, exclude=tuple(exclude))

    @classmethod
    def composition(
        cls,
        prune: PruneConfig,
        every: int = 2,
        inside: bool = False,
        exclude: Iterable[str] = ("head",),
        boundary_bits: int = 0,
    ) -> MemoryConfig:
        """Checkpoint every ``every``-th block (their inputs exact or ``boundary_bits``-coded) and
        compress the rest with ``prune``, or (``inside``) checkpoint those blocks and compress
        inside them too: "checkpoint_every2+all_r4_s0.9_b32", "checkpoint+inside_all_r4_s0.9_b32",
        "checkpoint_coded8+inside_all_r4_s0.9_b32"."""
        ckpt = MemoryConfig.checkpointing(every, boundary_bits=boundary_bits).name
        name = f"{ckpt}+{'inside_' if inside else ''}{prune.label()}"
        return cls(name, prune, "full", every, inside, tuple(exclude), boundary_bits)


def methods(
    prunes: Iterable[PruneConfig],
    baselines: Iterable[str] = DEFAULT_BASELINES,
    exclude: Iterable[str] = ("head",),
) -> list[MemoryConfig]:
    """dense first (every ratio's baseline), then the ``baselines`` (unstructured at each
    sparsity of ``prunes``), then actprune with each of ``prunes``, then (baseline
    ``composition``) every block checkpointed with each of ``prunes`` inside, then (baseline
    ``coded_checkpoint``) every block checkpointed with 8-bit inputs, alone and with each of
    ``prunes`` inside."""
    prunes, baselines = list(prunes), set(baselines)
    unknown = baselines - set(BASELINES)
    if unknown:
        raise ValueError(f"unknown baselines {sorted(unknown)}; choose from {BASELINES}")
    configs = [MemoryConfig.dense()]
    if "checkpoint" in baselines:
        configs.append(MemoryConfig.checkpointing())
    if "unstructured" in baselines:
        sparsities = dict.fromkeys(p.sparsity for p in prunes if not p.uniform)  # in order, once
        configs += [MemoryConfig.unstructured(s) for s in sparsities]
    configs += [MemoryConfig.actprune(p, exclude) for p in prunes]
    if "composition" in baselines:
        configs += [MemoryConfig.composition(p, 1, inside=True, exclude=exclude) for p in prunes]
    if "coded_checkpoint" in baselines:
        bits = CODED_CHECKPOINT_BITS
        configs.append(MemoryConfig.checkpointing(boundary_bits=bits))
        configs += [
            MemoryConfig.composition(p, 1, inside=True, exclude=exclude, boundary_bits=bits)
            for p in prunes
        ]
    return configs


def frontier_prunes() -> list[PruneConfig]:
    """The compression settings the frontier compares (docs/results, "Frontier"): the seed paper's
    method at s = 0.5, 0.7, 0.8, 0.9; block selection with a 4-bit remainder (``"blocks"``), with
    float32 and int8 kept blocks; uniform quantization of every saved tensor at 2, 4 and 8 bits
    (4 bits: the default)."""
    paper = [PruneConfig.preset("paper", sparsity=s) for s in (0.5, 0.7, 0.8, 0.9)]
    blocks = [PruneConfig.preset("blocks"), PruneConfig.preset("blocks", int8=True)]
    uniform = [PruneConfig.preset("uniform", remainder_bits=b) for b in (2, 4, 8)]
    return paper + blocks + uniform


def frontier_methods(
    exclude: Iterable[str] = ("head",), language: bool = False
) -> list[MemoryConfig]:
    """Every configuration of the frontier: dense; full checkpointing of every 1st, 2nd and 4th
    block; selective checkpointing; each of ``frontier_prunes``; and compositions of block
    selection (``"blocks"``) with checkpointing (every 2nd / 4th block checkpointed, the rest
    compressed; every block checkpointed and compressed inside). For a language model
    (``language``) also the ``"transformer"`` preset, alone and inside checkpointed blocks."""
    blocks = PruneConfig.preset("blocks")
    checkpoints = [MemoryConfig.checkpointing(k) for k in (1, 2, 4)]
    compositions = [
        MemoryConfig.composition(blocks, 2, exclude=exclude),
        MemoryConfig.composition(blocks, 4, exclude=exclude),
        MemoryConfig.composition(blocks, 1, inside=True, exclude=exclude),
    ]
    transformer = PruneConfig.preset("transformer")
    lm = [
        MemoryConfig.actprune(transformer, exclude),
        MemoryConfig.composition(transformer, 1, inside=True, exclude=exclude),
    ]
    return [
        MemoryConfig.dense(),
        *checkpoints,
        MemoryConfig.checkpointing(selective=True),
        *[MemoryConfig.actprune(p, exclude) for p in frontier_prunes()],
        *compositions,
        *(lm if language else []),
    ]


def repeated_blocks(model: nn.Module) -> nn.ModuleList | nn.Sequential:
    """The model's stack of repeated blocks: the ModuleList / Sequential with the most children
    that all share one class (ResMLP's and timm's ``blocks``, Hugging Face's ``layers`` / ``h``;
    a stack of one block counts: a one-layer model checkpoints its layer)."""
    best: nn.Module | None = None
    for module in model.modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) >= 1:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best)):
                best = module
    if best is None:
        raise ValueError(f"{type(model).__name__} has no stack of repeated blocks to checkpoint")
    return best


def apply_method(model: nn.Module, config: MemoryConfig) -> nn.Module:
    """Convert ``model`` in place for ``config``; returns it.

    Compression is applied first, skipping the blocks to checkpoint unless
    ``config.compress_checkpointed``; then those blocks are wrapped in ``Checkpointed``."""
    chosen: list[int] = []
    if config.checkpoint != "none":
        blocks = repeated_blocks(model)
        chosen = list(range(0, len(blocks), config.every))
    if config.prune is not None:
        exclude = list(config.exclude)
        if not config.compress_checkpointed:
            names = {id(m): n for n, m in model.named_modules()}
            exclude += [f"{names[id(blocks[i])]}.*" for i in chosen]
        prune_activations_(model, config.prune, exclude=exclude)
    for i in chosen:
        selective = config.checkpoint == "selective"
        blocks[i] = Checkpointed(blocks[i], selective, config.boundary_bits)
    return model
