"""In-place model conversion: swap nn.Linear layers for PrunedLinear and back."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable

from torch import nn

from .config import PruneConfig
from .layers import PrunedLinear, rebuild_as

LinearFilter = Callable[[str, nn.Module], bool]


def _is_plain_linear(module: nn.Module) -> bool:
    """nn.Linear or a subclass that keeps nn.Linear's forward (so pruning cannot change outputs)."""
    return (
        isinstance(module, nn.Linear)
        and not isinstance(module, PrunedLinear)
        and type(module).forward is nn.Linear.forward
    )


def _swap_(model: nn.Module, make: Callable[[str, nn.Module], nn.Module | None]) -> nn.Module:
    """Replace each submodule m (qualified name q) for which make(q, m) returns a module.

    One traversal; a module registered under several names is converted once and the same new
    module is placed under every name. Returns the (possibly new) root.
    """
    replaced: dict[int, nn.Module | None] = {}
    root = make("", model)
    for parent_name, parent in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(parent._modules.items()):  # every name, duplicates included
            if child is None:
                continue
            if id(child) not in replaced:
                name = f"{parent_name}.{child_name}" if parent_name else child_name
                replaced[id(child)] = make(name, child)
            new = replaced[id(child)]
            if new is not None:
                setattr(parent, child_name, new)
    return model if root is None else root


def _patterns(value: str | Iterable[str] | None) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


def prune_activations_(
    model: nn.Module,
    config: PruneConfig,
    filter: LinearFilter | None = None,
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> nn.Module:
    """Make the Linear layers of ``model`` save block-sparse inputs for backward, in place.

    Every nn.Linear becomes a PrunedLinear that holds the same Parameter objects, so state_dict
    keys and optimizer references stay valid. Narrow the choice by qualified name with shell-style
    patterns (``include="blocks.*.fc*"``, ``exclude="head"``; a layer must match an include pattern
    if any are given, and no exclude pattern) and/or ``filter(qualified_name, module)``. Layers that
    are already PrunedLinear get the new config. Returns ``model`` (or the new module when
    ``model`` itself is a Linear).
    """
    if not isinstance(config, PruneConfig):
        raise TypeError(f"config must be an actprune.PruneConfig, got {type(config).__name__}")
    includes, excludes = _patterns(include), _patterns(exclude)

    def selected(name: str, module: nn.Module) -> bool:
        if includes and not any(fnmatch.fnmatchcase(name, p) for p in includes):
            return False
        if any(fnmatch.fnmatchcase(name, p) for p in excludes):
            return False
        return filter is None or filter(name, module)

    def make(name: str, module: nn.Module) -> nn.Module | None:
        if not selected(name, module):
            return None
        if isinstance(module, PrunedLinear):
            module.config = config
            return None
        if _is_plain_linear(module):
            pruned = PrunedLinear.from_linear(module, config)
            pruned._actprune_dense_class = type(module)
            return pruned
        return None

    return _swap_(model, make)


def restore_dense_(model: nn.Module) -> nn.Module:
    """Undo ``prune_activations_``: every PrunedLinear becomes its original Linear class again,
    holding the same Parameters. Returns ``model`` (or the new root when it was a PrunedLinear)."""

    def make(name: str, module: nn.Module) -> nn.Module | None:
        if not isinstance(module, PrunedLinear):
            return None
        dense_class = module.__dict__.get("_actprune_dense_class", nn.Linear)
        return rebuild_as(dense_class, module, drop=("config", "_actprune_dense_class"))

    return _swap_(model, make)
