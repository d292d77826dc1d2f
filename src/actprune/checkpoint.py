"""Activation checkpointing whose held block input is itself a code: a lossy recompute (opt-in).

Checkpointing a block holds only its input and runs the block again in backward; over a stack of
checkpointed blocks what stays is one block input per block (B·T·C each, the residual stream).
``coded_checkpoint`` keeps that input as ``bits``-bit per-row codes (``rowcode``: one scale per
token) instead, a quarter (8 bits) or an eighth (4 bits) of its float32 bytes. The forward runs
from the exact input, so the outputs are dense ones bit for bit; backward decodes x̃ and
differentiates the block at x̃ (every x̃ within max|row| / 254 of x at 8 bits). So unlike
compressing a Linear's input, this changes dx as well as the parameter gradients: it is on the
input-gradient path, an explicit choice, never a default, measured in docs/design.md.

Every other tensor argument (attention masks, rotary embeddings: tensors shared by all blocks)
is held as it is. torch's random state is kept and restored around the recompute, so dropout
draws the forward's masks. Inside ``exact_gradients()`` the block runs without checkpointing
(its recompute would run outside that block, compressing). Under torch.compile the block runs
under PyTorch's own (exact) non-reentrant checkpointing: the recompute differentiates inside
backward, which TorchDynamo does not trace.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import checkpoint

from . import rng, rowcode
from .layers import autocast_of, compressing


class _Run:
    """The block as a function of tensors: the boundary input, then the other tensor arguments
    in their flattened order; returns the output's tensors. It holds no tensor itself (held ones
    would outlive the forward exactly): only the arguments' and the output's other leaves."""

    def __init__(self, function: Callable[..., Any], leaves: list, spec: pytree.TreeSpec) -> None:
        self.function, self.spec = function, spec
        self.leaves = [None if isinstance(t, torch.Tensor) else t for t in leaves]
        self.slots = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor)]
        self.out_leaves: list = []
        self.out_spec: pytree.TreeSpec | None = None

    def __call__(self, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        leaves = list(self.leaves)
        for slot, t in zip(self.slots, tensors):
            leaves[slot] = t
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        out_leaves, self.out_spec = pytree.tree_flatten(self.function(*args, **kwargs))
        self.out_leaves = [_TENSOR if isinstance(t, torch.Tensor) else t for t in out_leaves]
        return tuple(t for t in out_leaves if isinstance(t, torch.Tensor))

    def structure(self, outputs: tuple[torch.Tensor, ...]) -> Any:
        """The function's output with ``outputs`` in place of its tensors."""
        it = iter(outputs)
        leaves = [next(it) if t is _TENSOR else t for t in self.out_leaves]
        return pytree.tree_unflatten(leaves, self.out_spec)


_TENSOR = object()  # marks where a tensor was among a function's output leaves


class CodedCheckpointFunction(torch.autograd.Function):
    """Runs ``run`` without a graph, holding the boundary input as ``bits``-bit row codes and the
    other tensors exactly; backward runs it again from the decoded input and differentiates it.
    Inputs: the boundary input, the other tensor arguments, then the parameters (so their
    gradients come back through this Function, as ``torch.autograd.grad`` expects)."""

    @staticmethod
    def forward(ctx, run: _Run, bits: int, n_params: int, x: torch.Tensor, *rest: torch.Tensor):
        others, params = rest[: len(rest) - n_params], rest[len(rest) - n_params :]
        ctx.run, ctx.params, ctx.autocast = run, params, autocast_of(x)
        ctx.rng = rng.torch_state(x.device)
        with torch.no_grad():
            outputs = run((x, *others))
        rowcode.save_for_backward(ctx, ((x, bits),), *others)
        ctx.mark_non_differentiable(*[t for t in outputs if not t.is_floating_point()])
        return outputs

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        (x,), others = rowcode.saved_tensors(ctx)
        needs = ctx.needs_input_grad[3:]
        inputs = [t.detach().requires_grad_(n) for t, n in zip((x, *others), needs)]
        with rng.replaying(x.device, ctx.rng), torch.enable_grad(), ctx.autocast:
            outputs = ctx.run(tuple(inputs))
        pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
        wanted = [t for t in (*inputs, *ctx.params) if t.requires_grad]
        found = iter(
            torch.autograd.grad(
                [o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True
            )
            if pairs and wanted
            else [None] * len(wanted)
        )
        tensor_grads = [next(found) if t.requires_grad else None for t in (*inputs, *ctx.params)]
        return None, None, None, *tensor_grads


def coded_checkpoint(
    function: Callable[..., Any],
    *args: Any,
    bits: int = 8,
    params: tuple[torch.Tensor, ...] | None = None,
    **kwargs: Any,
) -> Any:
    """``function(*args, **kwargs)`` under activation checkpointing that holds ``args[0]`` (the
    block's input) as ``bits``-bit per-row codes; backward recomputes the block from the decoded
    input. The forward output is exact; every gradient is the block's at the decoded input.

    Args:
        function: the block (a module or any function of tensors); it may return a tensor or any
            nesting of tuples, lists and dicts holding tensors.
        *args: its positional arguments; ``args[0]`` must be a floating-point tensor: the one that
            is coded. Other tensors are held exactly.
        bits: 4 or 8 (``rowcode``); 0: PyTorch's exact checkpointing.
        params: the tensors ``function`` reads besides its arguments whose gradients it must
            compute; default: ``function.parameters()`` that require grad (empty for a plain
            function).
        **kwargs: its keyword arguments.

    Returns:
        What ``function`` returns.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from actprune.checkpoint import coded_checkpoint
        >>> block = nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 64), nn.GELU())
        >>> x = torch.randn(4, 16, 64, requires_grad=True)
        >>> y = coded_checkpoint(block, x, bits=8)
        >>> torch.equal(y, block(x))
        True
        >>> y.sum().backward()
    """
    if bits not in (0, *rowcode.BITS):
        raise ValueError(f"coded_checkpoint: bits must be 0, 4 or 8, got {bits!r}")
    if not (args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point()):
        raise TypeError("coded_checkpoint: the first argument must be the block's floating-point "
                        "input tensor (the one held as codes)")
    if params is None:
        parameters = getattr(function, "parameters", None)
        params = tuple(p for p in parameters() if p.requires_grad) if parameters else ()
    leaves, spec = pytree.tree_flatten((args, kwargs))
    tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
    if not (compressing() and (params or any(t.requires_grad for t in tensors))):
        return function(*args, **kwargs)  # no graph, or exact_gradients(): no checkpointing
    if bits == 0 or torch.compiler.is_compiling():
        return checkpoint(function, *args, use_reentrant=False, **kwargs)
    run = _Run(function, leaves, spec)
    outputs = CodedCheckpointFunction.apply(run, bits, len(params), *tensors, *params)
    return run.structure(outputs)
