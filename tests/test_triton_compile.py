"""Every Triton kernel that a layer launches compiles for a GPU (sm_90, with triton's own ptxas: no
GPU needed), at the argument types the layers give it, float32 and under bfloat16 autocast.

The interpreter, which runs the kernels in the other tests on a CPU, accepts code the compiler
rejects (a loop-carried value that changes type, a constexpr where a tensor is needed): a GPU run
is scarce, so such an error is caught here, before one. The launches are recorded under the
interpreter (their argument types and constexprs), then compiled in a process of its own (with
TRITON_INTERPRET=1 every @triton.jit is an interpreted function that cannot be compiled).
"""

import contextlib
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

import actprune
from actprune import PruneConfig, kernels
from actprune.kernels import reference
from actprune.models.gpt import CausalSelfAttention, GPTConfig
from actprune.models.llama import LlamaConfig, SwiGLU
from actprune.models.resmlp import Affine

pytestmark = pytest.mark.skipif(
    not importlib.util.find_spec("triton") or not os.environ.get("TRITON_INTERPRET"),
    reason="needs triton under its interpreter (on a GPU the kernel tests compile every kernel)",
)

_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
          torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
          torch.uint8: "u8", torch.bool: "i1"}  # fmt: skip


def _type(value: object) -> str | None:
    """Triton's signature type of a runtime argument (None: a constexpr)."""
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    return None


def _record(launches: list, monkeypatch: pytest.MonkeyPatch) -> None:
    """Append (kernel, signature, constexprs, options) of every interpreted launch to launches."""
    from triton.runtime.interpreter import InterpretedFunction

    run = InterpretedFunction.run

    def recorded(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        values = dict(zip(params, args)) | {k: v for k, v in kwargs.items() if k in params}
        signature, constexprs = {}, {}
        for name, value in values.items():
            kind = None if "constexpr" in str(params[name].annotation) else _type(value)
            if kind is None:
                constexprs[name] = value
            signature[name] = kind or "constexpr"
        options = {k: v for k, v in kwargs.items() if k not in params}
        launches.append((self.fn.__name__, signature, constexprs, options))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recorded)


_COMPILE = """
import json, sys, triton
from triton.backends.compiler import GPUTarget
from actprune.kernels import triton_blocks as tb
failed = []
for name, signature, constexprs, options in json.load(sys.stdin):
    source = triton.compiler.ASTSource(fn=getattr(tb, name), signature=signature,
                                       constexprs=constexprs)
    try:
        triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    except Exception as error:
        failed.append([name, signature, str(error).strip().splitlines()[-1][:300]])
print(json.dumps(failed))
"""


def test_every_launched_triton_kernel_compiles_for_a_gpu(monkeypatch):
    launches: list = []
    _record(launches, monkeypatch)
    kernels.set_backend("triton")
    from actprune.kernels import triton_blocks
    torch.manual_seed(0)
    dense_layers = {"Linear": lambda: nn.Linear(64, 64), "Affine": lambda: Affine(64),
                    "GELU": nn.GELU, "RMSNorm": lambda: nn.RMSNorm(64),
                    "LayerNorm": lambda: nn.LayerNorm(64),
                    "SwiGLU": lambda: SwiGLU(LlamaConfig(width=64, hidden=176)),
                    "attention": lambda: CausalSelfAttention(GPTConfig(width=64, heads=4)),
                    "Dropout": lambda: nn.Dropout(0.1)}  # fmt: skip
    for preset in ("recommended", "paper", "blocks", "transformer"):
        config = PruneConfig.preset(preset)
        for amp in (contextlib.nullcontext, lambda: torch.autocast("cpu", torch.bfloat16)):
            for make in dense_layers.values():
                model = actprune.prune_activations_(nn.Sequential(make()), config)
                x = torch.randn(2, 16, 64, requires_grad=True)
                with amp():
                    y = model(x)
                y.float().sum().backward()
    # Selection and packing on their own, as compress() runs them where the fused kernel does not
    x3 = torch.randn(2, 16, 64)
    scores = reference.score_blocks(x3, (8, 8), "l2", 0, 0)[0]
    for per_column in (False, True):
        rows, cols, _ = triton_blocks.select_blocks(scores, 2, per_column=per_column)
    for dtype in (torch.float32, torch.bfloat16):
        triton_blocks.pack_blocks(x3.to(dtype), rows, cols, (8, 8))
    unique = {json.dumps(launch, sort_keys=True): launch for launch in launches}
    source = inspect.getsource(triton_blocks)
    launched_in_source = set(re.findall(r"\b(_\w+_kernel)\[", source))
    assert launched_in_source <= {name for name, *_ in unique.values()}  # every launch site ran
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE], input=json.dumps(list(unique.values())),
                         env=env, capture_output=True, text=True, check=True)  # fmt: skip
    assert json.loads(run.stdout) == []
