"""In-place model conversion: swap layers for their compressing versions (``layers``) and back.

Which dense class becomes which compressing class is a registry (``register_conversion``): actprune
registers nn.Linear (scopes "linear" and "all") and nn.GELU ("all"); a model family registers its
own layers where it defines them (ResMLP's Affine and LayerScale, in ``models.resmlp``), and so can
a user. ``config.scope`` picks the registered conversions that apply.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Iterable
from typing import TypeVar

from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from .config import SCOPES, PruneConfig
from .layers import CodedGELU, CompressedLayer, PrunedLinear, rebuild_as

LayerFilter = Callable[[str, nn.Module], bool]
C = TypeVar("C", bound=type)

# dense class -> (compressing class, the scopes that convert it)
_REGISTRY: dict[type[nn.Module], tuple[type[nn.Module], tuple[str, ...]]] = {}


def register_conversion(
    dense_class: type[nn.Module], *, scopes: Iterable[str] = ("all",)
) -> Callable[[C], C]:
    """Class decorator: convert ``dense_class`` modules to the decorated compressing class.

    The decorated class subclasses ``dense_class`` and an actprune layer base
    (``PrunedChannelScale`` for per-channel scales); its ``dense_class`` attribute is set to
    ``dense_class``. Registering a dense class again replaces the earlier entry.

    Args:
        dense_class: the module class to convert (subclasses with the same ``forward`` convert too).

    Keyword args:
        scopes: the ``PruneConfig.scope`` values under which it is converted (default ``("all",)``).

    Returns:
        The decorator, which returns the class unchanged but registered.

    Example:
        >>> from torch import nn
        >>> from actprune import PrunedLinear, register_conversion
        >>> register_conversion(nn.Linear, scopes=("linear", "all"))(PrunedLinear) is PrunedLinear
        True
    """
    scopes = tuple(scopes)
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        raise ValueError(f"register_conversion: scopes must be among {SCOPES}, got {scopes}")

    def register(cls: C) -> C:
        if not (issubclass(cls, CompressedLayer) and issubclass(cls, dense_class)):
            raise TypeError(
                f"{cls.__name__} must subclass an actprune layer base and {dense_class.__name__}"
            )
        declared = cls.__dict__.get("dense_class")
        if declared is not None and declared is not dense_class:
            raise TypeError(f"{cls.__name__}.dense_class is {declared.__name__}, not registered")
        cls.dense_class = dense_class
        _REGISTRY[dense_class] = (cls, scopes)
        return cls

    return register


register_conversion(nn.Linear, scopes=("linear", "all"))(PrunedLinear)
register_conversion(nn.GELU)(CodedGELU)


def _conversion(module: nn.Module, scope: str) -> type[nn.Module] | None:
    """The compressing class for a dense module: the registered one of the nearest registered
    class in its MRO, provided the module keeps that class's forward (so outputs cannot change)."""
    if isinstance(module, CompressedLayer):
        return None
    for klass in type(module).__mro__:
        if klass in _REGISTRY:
            compressed, scopes = _REGISTRY[klass]
            same_forward = type(module).forward is klass.forward
            return compressed if scope in scopes and same_forward else None
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


def _selector(
    filter: LayerFilter | None,
    include: str | Iterable[str] | None,
    exclude: str | Iterable[str] | None,
) -> LayerFilter:
    includes, excludes = _patterns(include), _patterns(exclude)

    def selected(name: str, module: nn.Module) -> bool:
        if includes and not any(fnmatch.fnmatchcase(name, p) for p in includes):
            return False
        if any(fnmatch.fnmatchcase(name, p) for p in excludes):
            return False
        return filter is None or filter(name, module)

    return selected


def prune_activations_(
    model: nn.Module,
    config: PruneConfig,
    filter: LayerFilter | None = None,
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> nn.Module:
    """Make the layers of ``model`` save compressed activations for backward, in place.

    Every module whose class is registered for ``config.scope`` (``register_conversion``) becomes
    its compressing version: nn.Linear a PrunedLinear; with ``scope="all"`` also nn.GELU a
    CodedGELU and registered per-channel scales (ResMLP's Affine and LayerScale) their pruned
    versions. Each holds the same Parameter objects, so state_dict keys and optimizer references
    stay valid. Layers converted before get the new config (or go back to dense when the new
    scope leaves them out).

    Args:
        model: the model (or a single layer) to convert.
        config: how to compress.
        filter: ``filter(qualified_name, module) -> bool``; only modules it accepts convert.

    Keyword args:
        include: shell-style patterns on qualified names; if given, a layer must match one.
        exclude: patterns of layers kept dense (e.g. ``"head"``).

    Returns:
        ``model``, or the new module when ``model`` itself is converted.

    Example:
        >>> import torch
        >>> from actprune import PruneConfig, PrunedLinear, prune_activations_
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 2))
        >>> _ = prune_activations_(model, PruneConfig(0.9, 4), exclude="2")
        >>> [type(m).__name__ for m in model]
        ['PrunedLinear', 'GELU', 'Linear']
    """
    if not isinstance(config, PruneConfig):
        raise TypeError(f"config must be an actprune.PruneConfig, got {type(config).__name__}")
    selected = _selector(filter, include, exclude)

    def make(name: str, module: nn.Module) -> nn.Module | None:
        if not selected(name, module):
            return None
        if isinstance(module, CompressedLayer):
            _, scopes = _REGISTRY[module.dense_class]
            if config.scope in scopes:
                module.config = config
                return None
            return _dense(module)
        compressed = _conversion(module, config.scope)
        if compressed is None or _left_dense(name, module):
            return None
        new = compressed.from_module(module, config)
        new._actprune_dense_class = type(module)
        return new

    return _swap_(model, make)


def _left_dense(name: str, module: nn.Module) -> bool:
    """A lazy module cannot be converted before its first forward (its parameters have no shape
    yet, and on that forward it turns itself into its dense class): warn and leave it."""
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        warnings.warn(
            f"actprune: left {name or type(module).__name__} dense: {type(module).__name__} has "
            "uninitialized parameters; run one forward pass before prune_activations_",
            stacklevel=4,
        )
        return True
    return False


def _dense(module: nn.Module) -> nn.Module:
    dense_class = module.__dict__.get("_actprune_dense_class", module.dense_class)
    return rebuild_as(dense_class, module, drop=("config", "_actprune_dense_class"))


def restore_dense_(model: nn.Module) -> nn.Module:
    """Undo ``prune_activations_``: every converted layer becomes its original class again.

    Args:
        model: a model converted by ``prune_activations_`` (or a converted layer).

    Returns:
        ``model``, or the new root when ``model`` itself was converted. The restored layers hold
        the same Parameters.

    Example:
        >>> import torch
        >>> from actprune import PruneConfig, prune_activations_, restore_dense_
        >>> layer = prune_activations_(torch.nn.Linear(8, 8), PruneConfig(0.5, 4))
        >>> type(restore_dense_(layer)).__name__
        'Linear'
    """
    return _swap_(model, lambda name, m: _dense(m) if isinstance(m, CompressedLayer) else None)


def describe_compression(model: nn.Module) -> list[dict]:
    """What each kind of converted layer saves for backward, and how it keeps it.

    Args:
        model: any module.

    Returns:
        One dict per dense class converted, in first-seen order: ``layer`` (the dense class's
        name), ``count``, ``saved`` (which tensor, and what backward reads it for) and
        ``kept_as``.

    Example:
        >>> import torch
        >>> from actprune import PruneConfig, describe_compression, prune_activations_
        >>> model = prune_activations_(torch.nn.Linear(8, 8), PruneConfig(0.5, 4))
        >>> describe_compression(model)[0]["kept_as"]
        'sparsity 0.5, 4x4 blocks, column top-k, native dtype'
    """
    rows: dict[str, dict] = {}
    for module in model.modules():
        if isinstance(module, CompressedLayer):
            name = module.dense_class.__name__
            row = rows.setdefault(
                name,
                {
                    "layer": name,
                    "count": 0,
                    "saved": module.saved_for,
                    "kept_as": module.describe(),
                },
            )
            row["count"] += 1
    return list(rows.values())
