import pytest
import torch

from actprune import PruneConfig, PrunedLinear, models, prune_activations_
from actprune.models.resmlp import Affine, LayerScale


@pytest.mark.parametrize("name", models.list_models("gpt*") + models.list_models("llama*"))
def test_every_language_model_builds_runs_and_trains(name):
    model = models.create(name, width=32, depth=2, heads=4, block_size=16)
    tokens = torch.randint(0, 256, (2, 16))
    out = model(tokens)
    assert out.shape == (2, 16, 256) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="longer than block_size"):
        model(torch.randint(0, 256, (1, 17)))
    model.zero_grad()
    targets = torch.randint(0, 256, (2, 16))  # with targets: the loss, without the logits
    loss = model(tokens, targets)
    want = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
    torch.testing.assert_close(loss, want)


@pytest.mark.parametrize("name", models.list_models("resmlp*"))
def test_every_image_model_builds_runs_and_trains(name):
    model = models.create(
        name, img_size=32, patch_size=8, in_chans=3, num_classes=7, width=32, depth=2
    )
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(
    "name, millions",
    [
        ("resmlp_s12", 15.35),
        ("resmlp_s24", 30.02),
        ("resmlp_s36", 44.69),
        ("resmlp_b24", 115.7),
        ("gpt_tiny", 3.36),
        ("gpt2_small", 86.24),
        ("llama_tiny", 3.30),
    ],  # fmt: skip
)
def test_published_sizes(name, millions):
    model = models.create(name, device="meta")  # no memory: shapes only
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - millions) / millions < 0.01, n


def test_layer_kinds_are_separate_modules_and_prunable():
    model = models.create("resmlp_tiny")
    kinds = {type(m) for m in model.modules()}
    assert {Affine, LayerScale, torch.nn.GELU, torch.nn.Linear} <= kinds
    prune_activations_(model, PruneConfig(0.9, 32))
    assert sum(isinstance(m, PrunedLinear) for m in model.modules()) == 4 * 3 + 1
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_registry_errors_and_listing():
    assert "resmlp_s24" in models.list_models("resmlp_s*")
    with pytest.raises(ValueError, match="unknown model 'nope'; available: gpt2_small, gpt_tiny"):
        models.create("nope")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        models.create("resmlp_tiny", patch_size=5)
