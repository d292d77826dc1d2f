"""Third-party models convert in place and train like the original at sparsity 0.

timm and transformers are optional (`pip install actprune[timm]`, `transformers`); without them
these tests skip. timm needs torchvision: here the pair torch 2.14.1 / torchvision 0.29.1.
"""

import copy

import pytest
import torch

from actprune import PruneConfig, PrunedLinear, SavedTensorLog, prune_activations_


def _check_like_original(model, inputs, loss_of, **select):
    """Converted at sparsity 0: every gradient equals the original's; at 0.9 it still trains."""
    torch.manual_seed(0)
    reference = copy.deepcopy(model)
    converted = prune_activations_(copy.deepcopy(model), PruneConfig(0.0, 16), **select)
    n_pruned = sum(isinstance(m, PrunedLinear) for m in converted.modules())
    assert n_pruned > 0
    loss_of(reference(*inputs)).backward()
    loss_of(converted(*inputs)).backward()
    for (name, a), (_, b) in zip(reference.named_parameters(), converted.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
    sparse = prune_activations_(copy.deepcopy(model), PruneConfig(0.9, 16), **select)
    loss_of(sparse(*inputs)).backward()
    return n_pruned


@pytest.mark.parametrize(
    "name, select, expected",
    [
        ("resmlp_12_224", {}, 12 * 3 + 1),
        ("mixer_s16_224", {"exclude": "head"}, 8 * 4),
        ("deit_tiny_patch16_224", {"include": "blocks.*.mlp.*"}, 12 * 2),
    ],
)
def test_timm_models(name, select, expected):
    timm = pytest.importorskip("timm", reason="timm not installed (optional extra actprune[timm])")
    model = timm.create_model(name, pretrained=False, num_classes=10)
    x = torch.randn(2, 3, 224, 224)
    n = _check_like_original(model, (x,), lambda out: out.square().mean(), **select)
    assert n == expected


def test_hugging_face_llama_and_bert():
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    ids = torch.randint(0, 100, (2, 12))
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2,
    ))  # fmt: skip
    n = _check_like_original(llama, (ids,), lambda out: out.logits.square().mean(),
                             include="model.layers.*.mlp.*")  # fmt: skip
    assert n == 2 * 3  # gate, up and down projections of both layers
    # q, k, v read one tensor, gate and up another: each is compressed and held once
    every = prune_activations_(copy.deepcopy(llama), PruneConfig(0.9, 16), exclude="lm_head")
    with SavedTensorLog() as log:
        out = every(ids).logits
    blocks = [t for t in log.live_tensors() if t.dim() == 3 and t.shape[1:] == (16, 16)]
    # per layer: one copy for q, k, v; o; one for gate, up; down (7 layers' inputs, 4 copies)
    assert len(blocks) == 2 * 4
    one = min(t.untyped_storage().nbytes() for t in blocks)  # the 32-feature inputs
    assert log.shared_bytes() >= 2 * 3 * one  # RMSNorm's own shared saves come on top
    del out
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    ))  # fmt: skip
    n = _check_like_original(bert, (ids,), lambda out: out.last_hidden_state.square().mean())
    assert n == 2 * 6 + 1  # q, k, v, attention output, intermediate, output per layer + pooler
