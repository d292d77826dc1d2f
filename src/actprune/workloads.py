"""What ``bench memory`` and ``plan`` train: a model from a spec, a batch for it and its loss.

A spec is one of
- a name of actprune's zoo (``actprune.models``): ResMLP image classifiers, the byte-level GPTs;
- ``timm:NAME``: ``timm.create_model(NAME, pretrained=False)`` (random init; no download);
- ``hf:TYPE[:key=value,...]``: a Hugging Face model of ``model_type`` TYPE from its default
  config with the overrides given (``AutoConfig.for_model``; random init; no download), with its
  language-modelling head: masked where the type has one (bert), else causal (gpt2, llama, ...).
  Example: ``hf:llama:hidden_size=768,intermediate_size=2048,num_hidden_layers=12``.
Image models get a batch of random images and class labels (cross-entropy); language models random
token ids, with next-token labels (causal) or 15 % of positions as labels (masked). Memory and step
time do not depend on the values, only on the shapes.

Language models compute their loss without the [B, T, vocabulary] logits
(``loss.linear_cross_entropy``) where the head is a plain Linear of the last hidden state: the
zoo's, Hugging Face's ``FUSED_LOSS`` types (causal) and BERT (masked); other Hugging Face types
use their own loss, which keeps the logits. Hugging Face models train with attention dropout 0
unless a spec sets it (``ATTENTION_DROPOUT`` fields): with dropout, SDPA takes its math path on
CPU and keeps the T×T probabilities, which a GPU's flash kernel would not.
"""

from __future__ import annotations

import ast
import importlib
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import models
from .config import is_int, is_number
from .loss import linear_cross_entropy

TASKS = ("image", "causal_lm", "masked_lm")
# Hugging Face causal LMs whose logits are lm_head(last hidden state), nothing more (no scaling or
# soft-capping): their loss is computed without logits.
FUSED_LOSS = ("gpt2", "llama", "mistral", "qwen2", "qwen3")
# Config fields of the attention-probability dropout, set to 0 unless a spec gives them.
ATTENTION_DROPOUT = ("attn_pdrop", "attention_probs_dropout_prob", "attention_dropout")


class WorkloadError(ValueError):
    """A model spec that cannot be built (unknown name, missing library, bad override)."""


@dataclass
class Workload:
    """A model and what one of its training steps consumes.

    Attributes:
        spec: the spec it was built from.
        model: the model (random init).
        task: one of ``TASKS``.
        size: image side (image) or sequence length (language models).
        classes: number of classes, or the vocabulary size.
    """

    spec: str
    model: nn.Module
    task: str
    size: int
    classes: int

    @property
    def shape_label(self) -> str:
        """ "224px" or "seq512": for tables and file names."""
        return f"{self.size}px" if self.task == "image" else f"seq{self.size}"

    def batch(self, n: int, device: str | torch.device = "cpu") -> tuple[torch.Tensor, ...]:
        """A fixed random batch of n examples (inputs, labels), the same on every call."""
        gen = torch.Generator().manual_seed(0)
        if self.task == "image":
            chans = _in_chans(self.model)
            x = torch.randn(n, chans, self.size, self.size, generator=gen)
            y = torch.randint(0, self.classes, (n,), generator=gen)
        else:
            x = torch.randint(0, self.classes, (n, self.size), generator=gen)
            y = x.clone()
            if self.task == "masked_lm":
                y[torch.rand(x.shape, generator=gen) > 0.15] = -100
        return x.to(device), y.to(device)

    def empty_batch(self, n: int, device: str | torch.device) -> tuple[torch.Tensor, ...]:
        """A batch of the right shapes and dtypes with no values (for the meta device)."""
        if self.task == "image":
            chans = _in_chans(self.model)
            x = torch.empty(n, chans, self.size, self.size, device=device)
            return x, torch.zeros(n, dtype=torch.long, device=device)
        x = torch.zeros(n, self.size, dtype=torch.long, device=device)
        return x, torch.zeros(n, self.size, dtype=torch.long, device=device)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The training loss of ``model`` (this workload's model, converted or not) on a batch."""
        x, y = batch
        if self.task == "image":
            return F.cross_entropy(model(x), y)
        if self.task == "masked_lm" and model.config.model_type == "bert":
            head = model.cls.predictions
            hidden = head.transform(model.bert(input_ids=x).last_hidden_state)
            return linear_cross_entropy(hidden, head.decoder.weight, y, head.decoder.bias)
        # causal: predict token t+1 from tokens <= t (nothing after the last)
        targets = torch.cat([y[:, 1:], y.new_full((y.shape[0], 1), -100)], dim=1)
        if not self.spec.startswith("hf:"):  # actprune's GPT or Llama
            return model(x, targets)
        head = model.get_output_embeddings()
        # a PrunedLinear head is an nn.Linear too
        if model.config.model_type in FUSED_LOSS and isinstance(head, nn.Linear):
            hidden = model.base_model(input_ids=x).last_hidden_state
            return linear_cross_entropy(hidden, head.weight, targets, head.bias)
        return model(input_ids=x, labels=y).loss


def _in_chans(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    return getattr(config, "in_chans", None) or getattr(model, "in_chans", 3)


def build_workload(
    spec: str,
    image_size: int | None = None,
    seq_len: int | None = None,
    num_classes: int | None = None,
    device: str | torch.device | None = None,
    **overrides: object,
) -> Workload:
    """The ``Workload`` of a model spec (see the module docstring).

    Args:
        spec: a zoo name, ``timm:NAME`` or ``hf:TYPE[:key=value,...]``.
        image_size: image side for image models (default: the model's own).
        seq_len: sequence length for language models (default: the model's longest).
        num_classes: classes of an image model's head (default: the model's own).
        device: where the parameters are created ("meta": shapes only).
        overrides: more arguments of a zoo model (``models.create``), e.g. ``depth=4``.

    Returns:
        The workload, its model in training mode.

    Example:
        >>> from actprune.workloads import build_workload
        >>> w = build_workload("gpt_tiny", seq_len=64)
        >>> w.task, w.shape_label, [tuple(t.shape) for t in w.batch(2)]
        ('causal_lm', 'seq64', [(2, 64), (2, 64)])
    """
    kind, _, rest = spec.partition(":")
    if overrides and rest:
        raise WorkloadError(f"{spec}: model overrides {sorted(overrides)} apply to zoo models only")
    if not (rest and kind in ("timm", "hf")) and spec not in models.list_models():
        raise WorkloadError(
            f"unknown model {spec!r}: give a zoo name ({', '.join(models.list_models())}), "
            "timm:NAME or hf:TYPE[:key=value,...]"
        )
    language = language_model(spec)
    if language and image_size is not None:
        raise WorkloadError(f"image_size (--image-size) applies to image models; {spec} is a "
                            "language model (its length: --seq-len)")  # fmt: skip
    if not language and seq_len is not None:
        raise WorkloadError(f"seq_len (--seq-len) applies to language models; {spec} is an "
                            "image model (its input: --image-size)")  # fmt: skip
    if kind == "timm":
        return _timm(spec, rest, image_size, num_classes, device)
    if kind == "hf":
        return _hf(spec, rest, seq_len, device)
    given = _given(block_size=seq_len) if language else _given(num_classes=num_classes,
                                                                img_size=image_size)
    try:
        model = models.create(spec, device=device, **(overrides | given))
    except (ValueError, TypeError) as err:  # the zoo configs name the field and its range
        raise WorkloadError(f"{spec}: {err}") from None
    if language:
        return Workload(spec, model, "causal_lm", model.config.block_size, model.config.vocab_size)
    return Workload(spec, model, "image", model.config.img_size, model.config.num_classes)


def language_model(spec: str) -> bool:
    """Whether a spec names a language model (hf:..., the zoo's GPTs and Llamas) rather than an
    image one."""
    return spec.startswith(("hf:", "gpt", "llama"))


def _given(**kwargs: object) -> dict:
    return {k: v for k, v in kwargs.items() if v is not None}


def _library(name: str, extra: str):
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise WorkloadError(f"{name} is not installed ({err}); pip install {extra}") from err


def _timm(spec: str, name: str, image_size, num_classes, device) -> Workload:
    timm = _library("timm", "timm torchvision")
    if name not in timm.list_models():
        raise WorkloadError(f"timm has no model {name!r} (timm.list_models() lists them)")
    kw = _given(num_classes=num_classes, img_size=image_size)
    with torch.device(device or "cpu"):
        model = timm.create_model(name, pretrained=False, **kw)
    size = image_size or model.pretrained_cfg["input_size"][-1]
    return Workload(spec, model.train(), "image", size, model.num_classes)


def _hf(spec: str, rest: str, seq_len, device) -> Workload:
    transformers = _library("transformers", "transformers")
    model_type, _, args = rest.partition(":")
    overrides = dict(_override(kv) for kv in args.split(",") if kv)
    try:
        defaults = transformers.AutoConfig.for_model(model_type)
    except ValueError:
        raise WorkloadError(f"{spec}: Hugging Face has no model type {model_type!r}") from None
    for key, value in overrides.items():
        _check_override(spec, defaults, key, value)
    try:
        config = transformers.AutoConfig.for_model(model_type, **overrides)
    except Exception as err:  # the library's own validation of a user's field
        raise WorkloadError(f"{spec}: {_first_line(err)}") from None
    for field in ATTENTION_DROPOUT:
        if hasattr(config, field) and field not in overrides:
            setattr(config, field, 0.0)
    if hasattr(config, "use_cache") and "use_cache" not in overrides:
        # Training keeps no key/value cache; with one, a checkpointed block's recompute would
        # append to the cache its forward filled and attend over twice the keys.
        config.use_cache = False
    heads = importlib.import_module("transformers.models.auto.modeling_auto")
    masked = model_type in heads.MODEL_FOR_MASKED_LM_MAPPING_NAMES  # encoders: BERT's own task
    causal = not masked and model_type in heads.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if not (masked or causal):
        raise WorkloadError(f"{spec}: {model_type} has no causal or masked LM head")
    longest = getattr(config, "max_position_embeddings", None)
    if seq_len is not None and longest is not None and seq_len > longest:
        field = config.attribute_map.get("max_position_embeddings", "max_position_embeddings")
        raise WorkloadError(
            f"seq_len (--seq-len) must be at most {spec}'s {longest} positions, got {seq_len} "
            f"(more positions: {spec}{',' if args else ':'}{field}=N)"
        )
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModelForMaskedLM
    try:
        with torch.device(device or "cpu"):
            model = auto.from_config(config, attn_implementation="sdpa")
    except Exception as err:  # e.g. a width the heads do not divide: the library says which
        raise WorkloadError(f"{spec}: cannot build the model: {_first_line(err)}") from None
    task = "causal_lm" if causal else "masked_lm"
    return Workload(spec, model.train(), task, seq_len or longest, config.vocab_size)


# A field named like a size (n_embd, num_heads, vocab_size, head_dim, max_position_embeddings):
# a count of something, so a positive integer.
_SIZE_FIELD = re.compile(r"^(n|num)_|_(size|dim|embeddings|positions)$")


def _check_override(spec: str, defaults: object, key: str, value: object) -> None:
    """WorkloadError unless ``key`` is a field of the config and ``value`` fits its type."""
    if not hasattr(defaults, key):
        raise WorkloadError(f"{spec}: {type(defaults).__name__} has no field {key!r}")
    default = getattr(defaults, key)
    if _SIZE_FIELD.search(key) and (default is None or is_int(default)):
        if not (is_int(value) and value >= 1) and not (default is None and value is None):
            raise WorkloadError(f"{spec}: {key} must be an integer >= 1, got {value!r}")
    elif isinstance(default, bool) and not isinstance(value, bool):
        raise WorkloadError(f"{spec}: {key} must be True or False, got {value!r}")
    elif is_int(default) and not is_int(value):
        raise WorkloadError(f"{spec}: {key} must be an integer, got {value!r}")
    elif isinstance(default, float) and not is_number(value):
        raise WorkloadError(f"{spec}: {key} must be a finite number, got {value!r}")


def _first_line(err: Exception) -> str:
    """An exception's message as one line of at most 300 characters."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise WorkloadError(f"hf override {text!r} is not key=value")
    try:
        return key.strip(), ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        return key.strip(), value.strip()
