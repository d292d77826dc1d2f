"""Third-party models convert in place and train like the original at sparsity 0.

timm and transformers are optional (`pip install actprune[timm]`, `transformers`); without them
these tests skip. timm needs torchvision: here the pair torch 2.14.1 / torchvision 0.29.1.
"""

import copy

import pytest
import torch

from actprune import PruneConfig, SavedTensorLog, describe_compression, prune_activations_
from actprune.layers import CompressedLayer


def _check_like_original(model, inputs, loss_of, scope="linear", **select):
    """Converted at sparsity 0: every gradient equals the original's; at 0.9 it still trains."""
    torch.manual_seed(0)
    reference = copy.deepcopy(model)
    converted = prune_activations_(
        copy.deepcopy(model), PruneConfig(0.0, 16, scope=scope), **select
    )
    n_pruned = sum(isinstance(m, CompressedLayer) for m in converted.modules())
    assert n_pruned > 0
    loss_of(reference(*inputs)).backward()
    loss_of(converted(*inputs)).backward()
    for (name, a), (_, b) in zip(reference.named_parameters(), converted.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
    sparse = prune_activations_(copy.deepcopy(model), PruneConfig(0.9, 16, scope=scope), **select)
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


def _exact_forward_and_dx(dense, converted, x):
    """Output and input gradient bit-identical to the dense module's (NaN where dense has NaN);
    returns the (dense, converted) modules after one backward, for their parameter gradients."""
    xs = [x.clone().requires_grad_() for _ in range(2)]
    outs = [dense(xs[0]), converted(xs[1])]
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0, equal_nan=True)
    dy = torch.randn_like(outs[0])
    for out in outs:
        out.backward(dy)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=0, atol=0, equal_nan=True)


def test_gpt2_conv1d_is_exact_and_gpt2_converts():
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    from transformers.pytorch_utils import Conv1D

    from actprune.integrations.hf import PrunedConv1D

    torch.manual_seed(0)
    dense = Conv1D(48, 64)
    converted = prune_activations_(copy.deepcopy(dense), PruneConfig(0.0, 16))
    assert type(converted) is PrunedConv1D and converted.weight is not dense.weight
    x = torch.randn(3, 5, 64)
    x[1, 2, :4] = torch.tensor([torch.nan, torch.inf, -torch.inf, 0.0])
    _exact_forward_and_dx(dense, converted, x)
    torch.testing.assert_close(converted.bias.grad, dense.bias.grad, rtol=0, atol=0)
    finite = (torch.randn(3, 5, 64), torch.randn(3, 5, 48))
    for m in (dense, converted):
        m.weight.grad = None
        m(finite[0]).backward(finite[1])
    torch.testing.assert_close(converted.weight.grad, dense.weight.grad, rtol=1e-5, atol=1e-5)

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    ))  # fmt: skip
    ids = torch.randint(0, 100, (2, 12))
    n = _check_like_original(gpt2, (ids,), lambda out: out.logits.square().mean(),
                             exclude="lm_head")  # fmt: skip
    assert n == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per layer
    every = prune_activations_(copy.deepcopy(gpt2), PruneConfig(0.9, 16, scope="all"),
                               exclude="lm_head")  # fmt: skip
    rows = {r["layer"]: r for r in describe_compression(every)}
    assert rows["Conv1D"]["count"] == 8 and rows["NewGELUActivation"]["count"] == 2
    assert not rows["LayerNorm"]["compressed"] and not rows["GPT2Attention"]["compressed"]
    every(ids).logits.square().mean().backward()


HF_ACTIVATIONS = [("GELUActivation", "gelu"), ("GELUTanh", "gelu_tanh"),
                  ("NewGELUActivation", "gelu_new"), ("SiLUActivation", "silu")]  # fmt: skip


@pytest.mark.parametrize("name, function", HF_ACTIVATIONS)
def test_hugging_face_activations_exact_forward_coded_dx(name, function):
    pytest.importorskip("transformers", reason="transformers not installed")
    from transformers import activations

    from actprune import activation_derivative, derivative_code

    dense = getattr(activations, name)()
    coded = prune_activations_(copy.deepcopy(dense), PruneConfig(0.9, scope="all"))
    assert type(coded).__name__.startswith("Coded") and coded.function() == function
    x = torch.randn(4, 6, 40) * 3
    x[2, 1, 7] = torch.nan
    xs = [x.clone().requires_grad_() for _ in range(2)]
    outs = [dense(xs[0]), coded(xs[1])]
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0, equal_nan=True)
    dy = torch.randn_like(x)
    for out in outs:
        out.backward(dy)
    assert xs[1].grad[2, 1].isnan().all() and xs[0].grad[2, 1, 7].isnan()  # the row is marked
    ok = ~x.isnan().any(-1, keepdim=True).expand_as(x)
    bound = derivative_code(function, 2).max_error
    exact = dy * activation_derivative(function, x)
    assert ((xs[1].grad - exact).abs()[ok] <= dy.abs()[ok] * bound + 1e-5).all()
    if name.startswith("GELU"):  # the pure-Python variants round differently: left dense
        kw = {"use_gelu_python": True} if name == "GELUActivation" else {
            "use_gelu_tanh_python": True}  # fmt: skip
        python = getattr(activations, name)(**kw)
        assert type(prune_activations_(python, PruneConfig(0.9, scope="all"))) is type(python)


def test_timm_affine_and_layerscale_are_exact_and_resmlp_converts():
    timm = pytest.importorskip("timm", reason="timm not installed (optional extra actprune[timm])")
    from timm.layers import LayerScale
    from timm.models.mlp_mixer import Affine

    torch.manual_seed(0)
    for dense in (Affine(40), LayerScale(40, init_values=0.5)):
        with torch.no_grad():
            for p in dense.parameters():
                p.add_(torch.randn_like(p))
        converted = prune_activations_(copy.deepcopy(dense), PruneConfig(0.0, 8, scope="all"))
        assert type(converted).__name__.startswith("PrunedTimm")
        x = torch.randn(3, 16, 40)
        x[0, 0, 0] = torch.nan
        _exact_forward_and_dx(dense, converted, x)
        finite = torch.randn(3, 16, 40)
        for m in (dense, converted):
            m.zero_grad()
            m(finite).backward(torch.ones(3, 16, 40))
        for (name, a), b in zip(dense.named_parameters(), converted.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-5, msg=name)
    model = timm.create_model("resmlp_12_224", pretrained=False, num_classes=10).eval()
    x = torch.randn(2, 3, 224, 224)
    dense = model(x)
    prune_activations_(model, PruneConfig(0.9, 16, scope="all"), exclude="head")
    rows = {r["layer"]: r["count"] for r in describe_compression(model) if r["compressed"]}
    assert rows == {"ResBlock": 12, "Linear": 12 * 3, "Affine": 12 * 2 + 1, "GELU": 12}
    assert torch.equal(model(x), dense)  # the blocks' own forward reproduces timm's exactly
    # at sparsity 0, GELU left exact: every gradient (ls1 and ls2 included) equals timm's
    small = timm.create_model("resmlp_12_224", pretrained=False, num_classes=10, img_size=64)
    n = _check_like_original(small, (torch.randn(2, 3, 64, 64),), lambda out: out.square().mean(),
                             exclude=["head", "*.act"], scope="all")  # fmt: skip
    assert n == 12 * (1 + 3 + 2) + 1
