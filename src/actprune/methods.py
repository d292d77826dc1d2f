"""The ways to train a model that ``bench memory`` measures and ``plan`` predicts, side by side.

- ``dense``: plain training;
- ``checkpoint``: every repeated block under ``torch.utils.checkpoint`` (non-reentrant): only
  block inputs are held, each block's forward runs twice;
- ``unstructured``: the Linear inputs kept as their top-k *elements* by magnitude, stored as
  values + int32 indices (the DropIT approach, i.e. actprune with 1×1 blocks and global top-k);
- ``actprune``: ``prune_activations_`` with a ``PruneConfig``.
Layers matching ``exclude`` (default: the classifier head) stay dense in every compressed method.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import PruneConfig
from .convert import prune_activations_

METHODS = ("dense", "checkpoint", "unstructured", "actprune")
BASELINES = ("checkpoint", "unstructured")


class Checkpointed(nn.Module):
    """Runs ``block`` under non-reentrant activation checkpointing: only the block's input is held
    for backward (saved through saved-tensor hooks, so it is counted, as kind "checkpointed")."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, *args: object, **kwargs: object) -> object:
        return checkpoint(self.block, *args, use_reentrant=False, **kwargs)


@dataclass(frozen=True)
class MemoryConfig:
    """One method: its name in tables, the method, and its PruneConfig (None when it has none)."""

    name: str
    method: str  # one of METHODS
    prune: PruneConfig | None = None
    exclude: tuple[str, ...] = ("head",)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"MemoryConfig.method must be one of {METHODS}, got {self.method!r}")
        if (self.prune is None) != (self.method in ("dense", "checkpoint")):
            raise ValueError(f"MemoryConfig {self.name!r}: a PruneConfig iff the method compresses")

    @classmethod
    def dense(cls) -> MemoryConfig:
        return cls("dense", "dense")

    @classmethod
    def checkpoint(cls) -> MemoryConfig:
        return cls("checkpoint", "checkpoint")

    @classmethod
    def unstructured(cls, sparsity: float) -> MemoryConfig:
        """Top-k elements of every Linear input: 1×1 blocks, global selection."""
        prune = PruneConfig(sparsity, 1, selection="global")
        return cls(f"unstructured_s{sparsity:g}", "unstructured", prune)

    @classmethod
    def actprune(cls, prune: PruneConfig, exclude: Iterable[str] = ("head",)) -> MemoryConfig:
        """actprune with ``prune``, named ``actprune_<label>``."""
        return cls(f"actprune_{prune.label()}", "actprune", prune, tuple(exclude))


def methods(
    prunes: Iterable[PruneConfig],
    baselines: Iterable[str] = BASELINES,
    exclude: Iterable[str] = ("head",),
) -> list[MemoryConfig]:
    """dense first (every ratio's baseline), then the ``baselines`` (unstructured at each
    sparsity of ``prunes``), then actprune with each of ``prunes``."""
    prunes, baselines = list(prunes), set(baselines)
    unknown = baselines - set(BASELINES)
    if unknown:
        raise ValueError(f"unknown baselines {sorted(unknown)}; choose from {BASELINES}")
    configs = [MemoryConfig.dense()]
    if "checkpoint" in baselines:
        configs.append(MemoryConfig.checkpoint())
    if "unstructured" in baselines:
        sparsities = dict.fromkeys(p.sparsity for p in prunes)  # in order, once each
        configs += [MemoryConfig.unstructured(s) for s in sparsities]
    return configs + [MemoryConfig.actprune(p, exclude) for p in prunes]


def repeated_blocks(model: nn.Module) -> nn.ModuleList | nn.Sequential:
    """The model's stack of repeated blocks: the ModuleList / Sequential with the most children
    that all share one class (ResMLP's and timm's ``blocks``, Hugging Face's ``layers`` / ``h``)."""
    best: nn.Module | None = None
    for module in model.modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) >= 2:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best)):
                best = module
    if best is None:
        raise ValueError(f"{type(model).__name__} has no stack of repeated blocks to checkpoint")
    return best


def apply_method(model: nn.Module, config: MemoryConfig) -> nn.Module:
    """Convert ``model`` in place for ``config``; returns it."""
    if config.method == "checkpoint":
        blocks = repeated_blocks(model)
        for i, block in enumerate(list(blocks)):
            blocks[i] = Checkpointed(block)
    elif config.prune is not None:
        prune_activations_(model, config.prune, exclude=config.exclude)
    return model
