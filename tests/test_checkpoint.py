"""Checkpointing with coded block inputs (``actprune.checkpoint``): exact forward, gradients of the
block at the decoded input, the bytes it holds, and the methods / HF blocks that use it."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from actprune import PruneConfig, coded_checkpoint, rowcode
from actprune.memory import saved_activation_bytes
from actprune.methods import Checkpointed, MemoryConfig, apply_method, methods
from actprune.plan import accuracy_delta
from actprune.workloads import build_workload


def _block() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 64), nn.GELU(), nn.Dropout(0.2),
                         nn.Linear(64, 32))  # fmt: skip


def _decoded(x: torch.Tensor, bits: int) -> torch.Tensor:
    return rowcode.decode(*rowcode.encode(x, bits), x.shape, x.dtype, bits)


@pytest.mark.parametrize("bits", [4, 8])
def test_forward_is_exact_and_gradients_are_the_blocks_at_the_decoded_input(bits):
    block, x = _block(), torch.randn(3, 10, 32, requires_grad=True)
    params = list(block.parameters())
    g = torch.randn(3, 10, 32)
    torch.manual_seed(7)
    y = coded_checkpoint(block, x, bits=bits)
    torch.manual_seed(8)  # the recompute must replay the forward's dropout mask, not this state
    got = torch.autograd.grad(y, [x, *params], g)
    after = torch.rand(1)  # the recompute restored torch's state: seed 8's first draw
    assert torch.equal(after, (torch.manual_seed(8), torch.rand(1))[1])
    torch.manual_seed(7)
    assert torch.equal(y, block(x))
    x_tilde = _decoded(x, bits).requires_grad_()
    torch.manual_seed(7)
    want = torch.autograd.grad(block(x_tilde), [x_tilde, *params], g)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_holds_only_the_codes_of_the_input():
    block, x = _block(), torch.randn(4, 16, 32, requires_grad=True)
    coded = saved_activation_bytes(lambda: coded_checkpoint(block, x, bits=8).sum())
    assert coded == 4 * 16 * 32 + 4 * 16 * 4  # int8 codes + one float32 scale per row
    four = saved_activation_bytes(lambda: coded_checkpoint(block, x, bits=4).sum())
    assert four == 4 * 16 * 32 // 2 + 4 * 16 * 4
    exact = saved_activation_bytes(lambda: coded_checkpoint(block, x, bits=0).sum())
    assert exact == 4 * 16 * 32 * 4  # PyTorch's checkpointing holds x


def test_other_arguments_and_nested_outputs():
    lin = nn.Linear(8, 8)
    mask = torch.randn(2, 5, 8)
    scale = torch.randn(8, requires_grad=True)

    def fn(x, mask, *, scale, tag):
        return {"out": (lin(x) + mask) * scale, "tag": tag, "aux": (x.sum(-1), None)}

    x = torch.randn(2, 5, 8, requires_grad=True)
    out = coded_checkpoint(fn, x, mask, scale=scale, tag="t", params=tuple(lin.parameters()))
    ref = fn(x, mask, scale=scale, tag="t")
    assert out["tag"] == "t" and out["aux"][1] is None
    assert torch.equal(out["out"], ref["out"]) and torch.equal(out["aux"][0], ref["aux"][0])
    (out["out"].sum() + out["aux"][0].sum()).backward()
    got = [t.grad.clone() for t in (x, scale, lin.weight)]
    for t in (x, scale, lin.weight):
        t.grad = None
    x_tilde = _decoded(x, 8).requires_grad_()
    ref = fn(x_tilde, mask, scale=scale, tag="t")
    (ref["out"].sum() + ref["aux"][0].sum()).backward()
    for a, b in zip(got, (x_tilde.grad, scale.grad, lin.weight.grad)):
        assert torch.equal(a, b)


def test_no_graph_and_errors():
    block = _block().eval()
    x = torch.randn(2, 32)
    with torch.no_grad():
        assert coded_checkpoint(block, x).grad_fn is None
    with pytest.raises(ValueError, match="bits must be 0, 4 or 8"):
        coded_checkpoint(block, x, bits=2)
    with pytest.raises(TypeError, match="first argument must be"):
        coded_checkpoint(block, torch.ones(2, 32, dtype=torch.long))


def test_non_finite_rows_reach_the_gradient():
    block, x = _block().eval(), torch.randn(2, 4, 32)
    x[0, 1, 3] = float("nan")
    x.requires_grad_()
    coded_checkpoint(block, x).sum().backward()
    assert torch.isnan(x.grad[0, 1]).all() and torch.isfinite(x.grad[1]).all()


def test_memory_configs_name_validate_and_rank():
    coded = MemoryConfig.checkpointing(boundary_bits=8)
    assert (coded.name, coded.family) == ("checkpoint_coded8", "coded_checkpoint")
    inside = MemoryConfig.composition(PruneConfig.preset("transformer"), 1, True, boundary_bits=8)
    assert inside.name.startswith("checkpoint_coded8+inside_") and inside.family == "composition"
    assert accuracy_delta(coded, {}) is None  # lossy: only a measurement counts
    assert accuracy_delta(inside, {"actprune_" + inside.prune.label(): 0.1}) is None
    with pytest.raises(ValueError, match="boundary_bits must be 0, or 4 or 8"):
        MemoryConfig("x", checkpoint="selective", boundary_bits=8)
    with pytest.raises(ValueError, match="boundary_bits must be 0, or 4 or 8"):
        MemoryConfig("x", checkpoint="full", boundary_bits=3)
    names = [c.name for c in methods([PruneConfig.preset("recommended")], ["coded_checkpoint"])]
    assert names == ["dense", "actprune_all_u4_b32", "checkpoint_coded8",
                     "checkpoint_coded8+inside_all_u4_b32"]  # fmt: skip


HF_SPECS = [
    "hf:gpt2:n_layer=2,n_embd=64,n_head=4,vocab_size=300",
    "hf:llama:num_hidden_layers=2,hidden_size=64,intermediate_size=176,num_attention_heads=4,"
    "num_key_value_heads=4,vocab_size=300",  # blocks take rotary embeddings as a kwarg tuple
]


@pytest.mark.parametrize("spec", ["llama_tiny", "gpt_tiny", *HF_SPECS])
def test_checkpointed_blocks_with_coded_inputs_train(spec):
    if spec.startswith("hf:"):
        pytest.importorskip("transformers", reason="transformers not installed")
    work = build_workload(spec, seq_len=32)
    batch = work.batch(4)
    grads = {}
    for config in (MemoryConfig.dense(), MemoryConfig.checkpointing(boundary_bits=8)):
        model = apply_method(copy.deepcopy(work.model), config)
        torch.manual_seed(3)  # HF GPT-2 drops out: the same masks in both
        loss = work.loss(model, batch)
        loss.backward()
        grads[config.name] = (loss, [p.grad for p in model.parameters()])
    (dense_loss, dense), (loss, coded) = grads.values()
    assert torch.equal(loss, dense_loss)
    assert any(isinstance(m, Checkpointed) and m.bits == 8 for m in model.modules())
    for a, b in zip(dense, coded):
        if a is not None and a.abs().max() > 1e-6:
            assert F.cosine_similarity(a.flatten(), b.flatten(), 0) > 0.99
