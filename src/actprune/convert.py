"""In-place model conversion: swap layers for their compressing versions (``layers``) and back.

``config.scope`` says which: "linear" converts nn.Linear (the seed paper); "all" also ResMLP's
Affine and LayerScale and every nn.GELU.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable

from torch import nn

from .config import PruneConfig
from .layers import CodedGELU, PrunedAffine, PrunedLayerScale, PrunedLinear, rebuild_as

LinearFilter = Callable[[str, nn.Module], bool]

# The compressing layer of each dense layer, per scope.
CONVERSIONS: dict[str, tuple[type[nn.Module], ...]] = {
    "linear": (PrunedLinear,),
    "all": (PrunedLinear, PrunedAffine, PrunedLayerScale, CodedGELU),
}
_COMPRESSING = CONVERSIONS["all"]


def _conversion(module: nn.Module, scope: str) -> type[nn.Module] | None:
    """The compressing class for a dense module: one whose class is the dense class or a subclass
    that keeps its forward (so conversion cannot change outputs)."""
    if isinstance(module, _COMPRESSING):
        return None
    for pruned in CONVERSIONS[scope]:
        dense = pruned.dense_class
        if isinstance(module, dense) and type(module).forward is dense.forward:
            return pruned
    return None


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
    """Make the layers of ``model`` save compressed activations for backward, in place.

    With ``config.scope == "linear"`` every nn.Linear becomes a PrunedLinear; with "all", ResMLP
    Affine / LayerScale also become PrunedAffine / PrunedLayerScale and nn.GELU a CodedGELU. Each
    holds the same Parameter objects, so state_dict keys and optimizer references stay valid.
    Narrow the choice by qualified name with shell-style patterns (``include="blocks.*.fc*"``,
    ``exclude="head"``; a layer must match an include pattern if any are given, and no exclude
    pattern) and/or ``filter(qualified_name, module)``. Layers converted before get the new config
    (or go back to dense when the new scope leaves them out). Returns ``model`` (or the new module
    when ``model`` itself is converted).
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
        if isinstance(module, _COMPRESSING):
            if isinstance(module, CONVERSIONS[config.scope]):
                module.config = config
                return None
            return _dense(module)
        pruned = _conversion(module, config.scope)
        if pruned is None:
            return None
        new = pruned.from_module(module, config)
        new._actprune_dense_class = type(module)
        return new

    return _swap_(model, make)


def _dense(module: nn.Module) -> nn.Module:
    dense_class = module.__dict__.get("_actprune_dense_class", module.dense_class)
    return rebuild_as(dense_class, module, drop=("config", "_actprune_dense_class"))


def restore_dense_(model: nn.Module) -> nn.Module:
    """Undo ``prune_activations_``: every converted layer becomes its original class again,
    holding the same Parameters. Returns ``model`` (or the new root when it was converted)."""
    return _swap_(model, lambda name, m: _dense(m) if isinstance(m, _COMPRESSING) else None)


def describe_compression(model: nn.Module) -> list[dict]:
    """One row per kind of converted layer: what its saved tensor is and how it is kept."""
    rows: dict[str, dict] = {}
    for module in model.modules():
        if not isinstance(module, _COMPRESSING):
            continue
        c = module.config
        if isinstance(module, CodedGELU):
            how = f"{c.gelu_bits}-bit code of gelu'"
            saved = "input (for dx)"
        else:
            bm, bk = c.block_shape
            values = "int8 + per-block scale" if c.int8 else "native dtype"
            how = f"sparsity {c.sparsity:g}, {bm}x{bk} blocks, {c.selection} top-k, {values}"
            if c.remainder_bits:
                how += f"; dropped blocks at {c.remainder_bits} bits"
            saved = (
                "input (for the weight gradient)"
                if isinstance(module, PrunedLinear)
                else ("input (for the scale gradient)")
            )
        name = module.dense_class.__name__
        row = rows.setdefault(name, {"layer": name, "count": 0, "saved": saved, "kept_as": how})
        row["count"] += 1
    return list(rows.values())
