"""torch.compile (inductor, CPU): the pruned linear is a registered op, so the graph has no breaks
and the compiled step saves the same compressed tensors as eager."""

import copy

import pytest
import torch
import torch.nn.functional as F

from actprune import PruneConfig, models, ops, prune_activations_, saved_activation_bytes


@pytest.fixture(scope="module")
def models_and_batch():
    torch.manual_seed(0)
    dense = models.create("resmlp_tiny", width=32, depth=2)
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
    w = torch.randn(10, 24, requires_grad=True)
    b = torch.randn(10, requires_grad=True)
    torch.library.opcheck(ops.pruned_linear, (x, w, b, True, 0.5, 8, 8, "l2", "token-major"))
    frozen = w.detach()  # compress_input=False: the weight gets no gradient
    torch.library.opcheck(
        ops.pruned_linear, (x, frozen, None, False, 0.5, 8, 8, "max", "batch-major")
    )
