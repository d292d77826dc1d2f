"""Issue 25's launch budget, on the CUDA code path run on the CPU: per compressed tensor, the
forward runs at most 1 kernel beyond the dense layer's, the backward at most 2
(``benchmarks/launches.py`` counts Triton launches under the interpreter and the aten ops that
launch a kernel; a process of its own, since it forces ACTPRUNE_KERNELS=triton)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "launches.py"


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("no triton")
    out = tmp_path_factory.mktemp("launches")
    presets = ["recommended", "paper", "blocks", "transformer"]
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--presets", *presets],
                   check=True, capture_output=True, timeout=600)  # fmt: skip
    rows = json.loads((out / "launches.json").read_text())["rows"]
    return {(r["layer"], r["preset"]): r for r in rows}


@pytest.mark.parametrize("layer", ["Linear", "Affine", "GELU"])
def test_default_preset_is_within_the_launch_budget(launches, layer):
    row = launches[(layer, "recommended")]
    assert row["forward_extra"] <= 1, row["forward_ops"]
    assert row["backward_extra"] <= 2, row["backward_ops"]


@pytest.mark.parametrize("layer, preset", [("Linear", "paper"), ("Linear", "blocks"),
                                           ("Affine", "blocks")])  # fmt: skip
def test_block_selection_presets_are_within_the_launch_budget(launches, layer, preset):
    # score, select and pack in one launch (triton_blocks.compress_blocks)
    row = launches[(layer, preset)]
    assert row["forward_extra"] <= 1, row["forward_ops"]
    assert row["backward_extra"] <= 2, row["backward_ops"]


# Tensors each layer keeps compressed under the transformer preset (the budget is per tensor):
# a norm's x̂, SwiGLU's g and u and its input's code, attention's q, k, v and its two Linear
# inputs, a dropout's mask. SwiGLU's backward also recomputes silu(g) ⊙ u by design (2 launches:
# the price of not keeping them, bit-identical to dense), on top of its codes.
TRANSFORMER_TENSORS = {"RMSNorm": 1, "LayerNorm": 1, "SwiGLU": 3, "attention": 5, "Dropout": 1}
RECOMPUTE = {"SwiGLU": 2}


@pytest.mark.parametrize("layer", sorted(TRANSFORMER_TENSORS))
def test_transformer_layers_are_within_the_launch_budget(launches, layer):
    row, n = launches[(layer, "transformer")], TRANSFORMER_TENSORS[layer]
    assert row["forward_extra"] <= n, row["forward_ops"]
    assert row["backward_extra"] <= 2 * n + RECOMPUTE.get(layer, 0), row["backward_ops"]
