"""In-place model conversion: swap layers for their compressing versions (``layers``) and back.

Which dense class becomes which compressing class is a registry (``register_conversion``): actprune
registers nn.Linear (scopes "linear" and "all"), nn.GELU, nn.SiLU, nn.ReLU and nn.Dropout ("all"),
nn.RMSNorm (scope "all" or ``norm_bits``) and nn.LayerNorm (``norm_bits``); a model family
registers its own layers where it defines them (ResMLP's Affine and LayerScale, in
``models.resmlp``; the zoo transformers' attention and SwiGLU), and so can a user. The layers
of timm and Hugging Face transformers are registered in ``actprune.integrations``, imported on
the first conversion after the library itself was imported (actprune never imports them).
``config.scope`` and each class's ``applies(config)`` pick the registered conversions that
apply.
"""

from __future__ import annotations

import fnmatch
import importlib
import sys
import warnings
from collections.abc import Callable, Iterable
from typing import TypeVar

from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from . import rng
from .config import SCOPES, PruneConfig
from .dropout import CodedDropout
from .layers import (
    CodedGELU,
    CodedReLU,
    CodedSiLU,
    CompressedLayer,
    PrunedLinear,
    check_config,
    rebuild_as,
)
from .norms import CodedLayerNorm, CodedRMSNorm
from .swiglu import FusedSwiGLU

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
for _coded in (CodedGELU, CodedSiLU, CodedReLU, CodedDropout):
    register_conversion(_coded.dense_class)(_coded)
for _norm in (CodedLayerNorm, CodedRMSNorm):  # which config converts them: their ``applies``
    register_conversion(_norm.dense_class, scopes=SCOPES)(_norm)

# library -> the actprune module registering its layers; imported once the library is
_INTEGRATIONS = {"timm": "actprune.integrations.timm", "transformers": "actprune.integrations.hf"}


def _register_integrations() -> None:
    for library, integration in _INTEGRATIONS.items():
        if library in sys.modules and integration not in sys.modules:
            importlib.import_module(integration)


def _converts(compressed: type[nn.Module], scopes: tuple[str, ...], config: PruneConfig) -> bool:
    """Whether a registered class converts under ``config``: its scope, and what its own opt-in
    fields say (``CompressedLayer.applies``)."""
    return config.scope in scopes and compressed.applies(config)


def _conversion(module: nn.Module, config: PruneConfig) -> type[nn.Module] | None:
    """The compressing class for a dense module: the registered one of the nearest registered
    class in its MRO, provided the module keeps that class's forward (so outputs cannot change)."""
    if isinstance(module, CompressedLayer):
        return None
    for klass in type(module).__mro__:
        if klass in _REGISTRY:
            compressed, scopes = _REGISTRY[klass]
            same_forward = type(module).forward is klass.forward
            ok = _converts(compressed, scopes, config) and same_forward
            return compressed if ok and compressed.convertible(module) else None
    return None


def _swap_(model: nn.Module, make: Callable[[str, nn.Module], nn.Module | None]) -> nn.Module:
    """Replace each submodule m (qualified name q) for which make(q, m) returns a module.

    One traversal; a module registered under several names is converted once and the same new
    module is placed under every name. A converted container's children are converted inside its
    replacement (pre-order: the container is met before them). Returns the (possibly new) root.
    """
    replaced: dict[int, nn.Module | None] = {}
    root = make("", model)
    new_of = {} if root is None else {id(model): root}  # container -> its replacement
    for parent_name, old_parent in list(model.named_modules(remove_duplicate=False)):
        parent = new_of.get(id(old_parent), old_parent)
        for child_name, child in list(parent._modules.items()):  # every name, duplicates included
            if child is None:
                continue
            if id(child) not in replaced:
                name = f"{parent_name}.{child_name}" if parent_name else child_name
                replaced[id(child)] = make(name, child)
            new = replaced[id(child)]
            if new is not None:
                setattr(parent, child_name, new)
                new_of[id(child)] = new
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
    its compressing version: nn.Linear a PrunedLinear (and GPT-2's Conv1D a PrunedConv1D); with
    ``scope="all"`` also activations (nn.GELU, nn.SiLU, nn.ReLU, Hugging Face's) their coded
    versions and registered per-channel scales (ResMLP's, timm's) their pruned versions. Each
    holds the same Parameter objects, so state_dict keys and optimizer references stay valid.
    Layers converted before get the new config (or back to dense when the scope leaves them out).
    The layers of one model share one random stream (``actprune.rng``).

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
    config, selected = check_config(config), _selector(filter, include, exclude)
    _register_integrations()
    stream = rng.model_stream(model) or rng.Stream()  # one per model (``actprune.rng``)

    def make(name: str, module: nn.Module) -> nn.Module | None:
        if not selected(name, module):
            return None
        if isinstance(module, CompressedLayer):
            compressed, scopes = _REGISTRY[module.dense_class]
            if not _converts(compressed, scopes, config):
                return _dense(module)
            module.prune_config = config
            return None
        compressed = _conversion(module, config)
        if compressed is None or _left_dense(name, module):
            return None
        new = compressed.from_module(module, config)
        new._actprune_dense_class, new.stream = type(module), stream
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
    return rebuild_as(dense_class, module, drop=("prune_config", "_actprune_dense_class", "stream"))


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
    """What each kind of layer saves for backward, how it keeps it, and what stays dense and why.

    Args:
        model: any module.

    Returns:
        One dict per layer class, converted ones first, each in first-seen order: ``layer`` (the
        dense class's name), ``count``, ``compressed`` (bool), ``saved`` (which tensor, and what
        backward reads it for) and ``kept_as`` (how it is kept; for a dense layer, why it is
        not compressed). Tensors a model's own forward code saves (a product with a bare
        Parameter, a gate times an up-projection) belong to no layer and are not listed:
        ``SavedTensorLog(by_kind=True)`` attributes them to the module whose forward ran.

    Example:
        >>> import torch
        >>> from actprune import PruneConfig, describe_compression, prune_activations_
        >>> model = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 8))
        >>> model = prune_activations_(model, PruneConfig(0.5, 4))
        >>> [(r["layer"], r["compressed"], r["kept_as"]) for r in describe_compression(model)]
        ... # doctest: +NORMALIZE_WHITESPACE
        [('Linear', True, 'sparsity 0.5, 4x4 blocks, column top-k, native dtype'),
         ('LayerNorm', False, 'dense: on the input-gradient path (dx reads it); opt-in code:
         norm_bits')]
    """
    rows: dict[str, dict] = {}
    dense_rows: dict[str, dict] = {}
    bypassed = {id(c) for m in model.modules() if isinstance(m, FusedSwiGLU) for c in m.bypassed()}
    for module in model.modules():
        if id(module) in bypassed:  # a fused SwiGLU's down projection and SiLU: never run
            continue
        if isinstance(module, CompressedLayer):
            name = module.dense_class.__name__
            row = rows.setdefault(name, _row(name, True, module.saved_for, module.describe()))
        else:
            found = _why_dense(module)
            if found is None:
                continue
            name = type(module).__name__
            row = dense_rows.setdefault(name, _row(name, False, *found))
        row["count"] += 1
    return [*rows.values(), *dense_rows.values()]


def _row(layer: str, compressed: bool, saved: str, kept_as: str) -> dict:
    return {"layer": layer, "count": 0, "compressed": compressed, "saved": saved,
            "kept_as": kept_as}  # fmt: skip


_INPUT_GRADIENT_PATH = "dense: on the input-gradient path (dx reads it)"
_SAVES_NOTHING = (nn.Identity, nn.Flatten, nn.Unflatten, nn.ModuleList, nn.ModuleDict)


def _why_dense(module: nn.Module) -> tuple[str, str] | None:
    """(what it saves, why it stays dense) for a module that is not converted, or None when it
    saves nothing of its own (containers, identities)."""
    kind = type(module).__name__.lower()
    if "norm" in kind:
        return ("input and statistics (normalisation)",
                f"{_INPUT_GRADIENT_PATH}; opt-in code: norm_bits")  # fmt: skip
    if "attention" in kind:
        return ("queries, keys, values, attention probabilities",
                f"{_INPUT_GRADIENT_PATH}; opt-in code: attention_bits")  # fmt: skip
    if any(k in _REGISTRY for k in type(module).__mro__):
        return "as its dense class", "dense: excluded, not selected, or outside config.scope"
    if isinstance(module, nn.Dropout):
        return "mask", "dense: exact and already 1 byte per element"
    if isinstance(module, nn.Embedding):
        return "token indices", "dense: integers, small"
    has_children = next(module.children(), None) is not None
    if has_children or isinstance(module, _SAVES_NOTHING):
        return None
    if next(module.parameters(recurse=False), None) is not None:
        return "input", "dense: no conversion registered for this class"
    return "input or output", "dense: no conversion registered (register_conversion adds one)"
