"""torch.compile (inductor, CPU): the layers' autograd Functions are traced around the registered
kernel operators, so the graph has no breaks and the compiled step saves the same compressed
tensors as eager."""

import copy

import pytest
import torch
import torch.nn.functional as F

from actprune import PruneConfig, models, ops, prune_activations_, saved_activation_bytes


@pytest.fixture(scope="module")
def models_and_batch():
    torch.manual_seed(0)
    dense = models.create("resmlp_tiny", width=32, depth=1)
    pruned = prune_activations_(copy.deepcopy(dense), PruneConfig(0.5, 16), exclude="head")
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    return dense, pruned, x, y


def test_compiled_fullgraph_matches_eager(models_and_batch):
    _, pruned, x, y = models_and_batch
    compiled_model = copy.deepcopy(pruned)
    compiled = torch.compile(compiled_model, backend="inductor", fullgraph=True)  # no graph break
    F.cross_entropy(compiled(x), y).backward()
    eager = copy.deepcopy(pruned)
    F.cross_entropy(eager(x), y).backward()
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled_model.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_compiled_saves_compressed_bytes(models_and_batch):
    dense, pruned, x, _ = models_and_batch
    eager_bytes = saved_activation_bytes(lambda: pruned(x).sum())
    compiled = torch.compile(copy.deepcopy(pruned), backend="inductor")
    compiled_bytes = saved_activation_bytes(lambda: compiled(x).sum())
    dense_compiled = torch.compile(copy.deepcopy(dense), backend="inductor")
    assert compiled_bytes == eager_bytes  # what compile changes: nothing, on this model
    assert compiled_bytes < 0.85 * saved_activation_bytes(lambda: dense_compiled(x).sum())


def test_registered_ops_pass_opcheck():
    x = torch.randn(3, 20, 24, requires_grad=True)
    for config in (
        PruneConfig(0.5, 8),
        PruneConfig(0.5, 8, "max", "batch-major", "global", int8=True),
        PruneConfig(0.5, 8, remainder_bits=2),
    ):
        key = config.to_json()
        # the remainder's stochastic rounding differs between calls: only schema and fake checks
        checks = ("test_schema", "test_faketensor")
        if not config.remainder_bits:
            checks += ("test_autograd_registration", "test_aot_dispatch_dynamic")
        torch.library.opcheck(ops.compress_rows, (x.detach(), key, 0), test_utils=checks)
        parts = ops.compress_rows(x.detach(), key, 0)
        # dy as a row source [B, T, N] (token-major: 20 tokens of a batch of 3)
        for param, dy in (
            ("weight", torch.randn(3, 20, 10)),
            ("channel_scale", torch.randn(3, 20, 24)),
        ):
            torch.library.opcheck(ops.block_sparse_grad, (dy, *parts, key, 60, 24, param))
    for bits, function in ((2, "gelu"), (4, "gelu_tanh"), (2, "silu"), (1, "relu")):
        codes, nonfinite = ops.activation_code(x.detach(), bits, function)
        torch.library.opcheck(ops.activation_code, (x.detach(), bits, function))
        if function != "relu":
            torch.library.opcheck(
                ops.activation_grad, (x.detach(), codes, nonfinite, bits, function)
            )


def test_scope_all_compiles_without_graph_breaks():
    torch.manual_seed(0)
    model = models.create("resmlp_tiny", width=32, depth=1)
    prune_activations_(model, PruneConfig(0.5, 16, scope="all"), exclude="head")
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    eager = copy.deepcopy(model)
    F.cross_entropy(eager(x), y).backward()
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    F.cross_entropy(compiled(x), y).backward()
    for (name, a), (_, b) in zip(eager.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("preset", ["recommended", "paper", "blocks"])
def test_every_preset_compiles_fullgraph_and_matches_eager(preset):
    """fullgraph=True: no graph break with any preset; the compiled step draws the same keys from
    the model's random stream as eager (a copy in the same state), so the gradients agree.
    Inductor checks every op's output strides against its fake: the token-mixing Linear (16
    patches, 32-wide blocks) has a weight gradient cut from a padded one."""
    torch.manual_seed(0)
    model = models.create("resmlp_tiny", width=32, depth=1)
    prune_activations_(model, PruneConfig.preset(preset), exclude="head")
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    eager, compiled_model = copy.deepcopy(model), copy.deepcopy(model)
    F.cross_entropy(eager(x), y).backward()
    compiled = torch.compile(compiled_model, backend="inductor", fullgraph=True)
    F.cross_entropy(compiled(x), y).backward()
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled_model.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
