import copy

import pytest
import torch
from helpers import naive_mask
from torch import nn

from actprune import PruneConfig, PrunedLinear, compress, rng, saved_activation_bytes
from actprune.blocksparse import as_rows


def _pair(in_f, out_f, config, bias=True, dtype=torch.float32):
    dense = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    pruned = PrunedLinear.from_linear(copy.deepcopy(dense), config)
    return dense, pruned


def _grads(layer, x, dy):
    x = x.detach().clone().requires_grad_(True)
    out = layer(x)
    out.backward(dy)
    bias = None if layer.bias is None else layer.bias.grad
    return out, x.grad, layer.weight.grad, bias


@pytest.mark.parametrize(
    "lead, in_f, out_f, block",
    [
        ((64,), 64, 32, 16),
        ((37,), 50, 23, 16),
        ((3, 29), 45, 17, 8),
        ((2, 5, 7), 33, 40, (4, 32)),
        ((200,), 96, 64, 32),
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_sparsity_zero_matches_nn_linear(lead, in_f, out_f, block, bias):
    dense, pruned = _pair(in_f, out_f, PruneConfig(0.0, block), bias=bias)
    x, dy = torch.randn(*lead, in_f), torch.randn(*lead, out_f)
    for a, b in zip(_grads(dense, x, dy), _grads(pruned, x, dy)):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(b, a, rtol=1.3e-6, atol=1e-5)


@pytest.mark.parametrize("row_order", ["token-major", "batch-major"])
@pytest.mark.parametrize("criterion", ["l2", "l1", "max"])
@pytest.mark.parametrize("sparsity, block", [(0.5, 16), (0.9, 8), (0.75, (8, 16))])
def test_pruned_weight_grad_is_masked_and_rest_exact(sparsity, block, criterion, row_order):
    config = PruneConfig(sparsity, block, criterion, row_order)
    dense, pruned = _pair(48, 24, config)
    x, dy = torch.randn(4, 30, 48), torch.randn(4, 30, 24)
    out_d, dx_d, _, db_d = _grads(dense, x, dy)
    out_p, dx_p, dw_p, db_p = _grads(pruned, x, dy)
    assert torch.equal(out_p, out_d)  # forward bit-identical
    torch.testing.assert_close(dx_p, dx_d, rtol=1.3e-6, atol=1e-5)
    torch.testing.assert_close(db_p, db_d, rtol=1.3e-6, atol=1e-5)
    x2d, dy2d = as_rows(x, row_order), as_rows(dy, row_order)
    _, mask = naive_mask(x2d, sparsity, config.block_shape, criterion)
    want = dy2d.t() @ (x2d * mask)
    torch.testing.assert_close(dw_p, want, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(dw_p, dense.weight.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_dtypes(dtype):
    dense, pruned = _pair(64, 32, PruneConfig(0.0, 16), dtype=dtype)
    x, dy = torch.randn(40, 64).to(dtype), torch.randn(40, 32).to(dtype)
    gd, gp = _grads(dense, x, dy), _grads(pruned, x, dy)
    assert torch.equal(gp[0], gd[0])
    for a, b in zip(gd[1:], gp[1:]):
        assert b.dtype == dtype
        torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=5e-2)


def test_cpu_autocast_bf16_keeps_values_in_autocast_dtype():
    dense, pruned = _pair(64, 32, PruneConfig(0.0, 16))
    x, dy = torch.randn(40, 64), torch.randn(40, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_d = dense(x.requires_grad_(True))
        xp = x.detach().clone().requires_grad_(True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out_p = pruned(xp)
    assert torch.equal(out_p, out_d) and out_p.dtype == torch.bfloat16
    values = [t for t in saved if t.dim() == 3]
    assert len(values) == 1 and values[0].dtype == torch.bfloat16
    out_d.backward(dy.bfloat16())
    out_p.backward(dy.bfloat16())
    assert xp.grad.dtype == torch.float32 and pruned.weight.grad.dtype == torch.float32
    torch.testing.assert_close(xp.grad, x.grad, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(pruned.weight.grad, dense.weight.grad, rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(pruned.bias.grad, dense.bias.grad, rtol=2e-2, atol=5e-2)


def test_frozen_weight_saves_no_activation():
    dense, pruned = _pair(64, 32, PruneConfig(0.5, 16))
    pruned.weight.requires_grad_(False)
    x = torch.randn(50, 64, requires_grad=True)
    assert saved_activation_bytes(pruned, x) == 0
    dy = torch.randn(50, 32)
    pruned(x).backward(dy)
    xd = x.detach().clone().requires_grad_(True)
    dense(xd).backward(dy)
    torch.testing.assert_close(x.grad, xd.grad)
    assert pruned.weight.grad is None and pruned.bias.grad is not None


def test_input_without_grad_still_gives_weight_grad():
    dense, pruned = _pair(32, 16, PruneConfig(0.0, 8))
    x, dy = torch.randn(20, 32), torch.randn(20, 16)
    pruned(x).backward(dy)
    dense(x).backward(dy)
    torch.testing.assert_close(pruned.weight.grad, dense.weight.grad)


def test_no_grad_and_eval_run_plain_linear():
    dense, pruned = _pair(32, 16, PruneConfig(0.9, 8))
    x = torch.randn(20, 32)
    with torch.no_grad():
        assert torch.equal(pruned(x), dense(x))
    assert torch.equal(pruned(torch.randn(0, 32)), torch.empty(0, 16))


@pytest.mark.parametrize(
    "selection, kept",
    [("global", 410), ("column", 32 * 13)],  # ceil(0.1 · 128 · 32); 32 columns × ceil(0.1 · 128)
)
def test_saved_bytes_at_sparsity_09_within_budget(selection, kept):
    x = torch.randn(4096, 1024, requires_grad=True)
    dense, pruned = _pair(1024, 256, PruneConfig(0.9, 32, selection=selection))
    dense_bytes = saved_activation_bytes(dense, x)
    pruned_bytes = saved_activation_bytes(pruned, x)
    assert dense_bytes == 4096 * 1024 * 4
    # kept blocks of 32×32 fp32, an int32 block-row each, 33 int32 column offsets
    assert pruned_bytes == kept * 32 * 32 * 4 + kept * 4 + 33 * 4
    assert pruned_bytes <= 0.11 * dense_bytes


def test_int8_saved_bytes_and_gradient():
    x = torch.randn(4096, 1024, requires_grad=True)
    dense, pruned = _pair(1024, 256, PruneConfig(0.9, 32, int8=True))
    kept = 32 * 13
    assert saved_activation_bytes(pruned, x) == kept * 32 * 32 + kept * 4 + 33 * 4 + kept * 4
    dy = torch.randn(4096, 256)
    pruned(x).backward(dy)
    packed = compress(x.detach(), PruneConfig(0.9, 32))
    want = dy.t() @ packed.to_dense()  # the fp32-kept gradient; int8 rounds each value by <= s/2
    err = (pruned.weight.grad - want).norm() / want.norm()
    assert err < 0.01


def test_bad_inputs_and_config():
    with pytest.raises(TypeError, match="PruneConfig"):
        PrunedLinear(4, 4, config=0.5)
    layer = PrunedLinear(8, 4, config=PruneConfig(0.5, 4))
    with pytest.raises(ValueError, match=r"\(\.\.\., 8\), got \(3, 7\)"):
        layer(torch.randn(3, 7))
    with pytest.raises(ValueError, match="got \\(\\)"):
        layer(torch.tensor(1.0))
    with pytest.raises(TypeError, match="torch.nn.modules.linear.Linear"):
        PrunedLinear.from_linear(nn.Conv1d(2, 2, 1), PruneConfig(0.5))


def test_extra_repr_and_parameters_shared():
    lin = nn.Linear(8, 4)
    p = PrunedLinear.from_linear(lin, PruneConfig(0.8, (16, 8), "max"))
    assert "sparsity=0.8" in repr(p) and "block_size=(16, 8)" in repr(p) and "'max'" in repr(p)
    assert p.weight is lin.weight and p.bias is lin.bias
    assert list(p.state_dict()) == list(lin.state_dict())


def test_one_dim_input():
    dense, pruned = _pair(16, 8, PruneConfig(0.0, 4))
    x, dy = torch.randn(16), torch.randn(8)
    for a, b in zip(_grads(dense, x, dy), _grads(pruned, x, dy)):
        torch.testing.assert_close(b, a)


def test_row_orders():
    x = torch.arange(2 * 3 * 4).reshape(2, 3, 4)  # (batch, tokens, features)
    assert as_rows(x, "batch-major")[:, 0].tolist() == [0, 4, 8, 12, 16, 20]
    assert as_rows(x, "token-major")[:, 0].tolist() == [0, 12, 4, 16, 8, 20]  # token t, sample b
    assert torch.equal(as_rows(x[0], "token-major"), x[0])  # 2-D: unchanged


def test_remainder_bits_gradient_is_dyT_times_the_stored_approximation():
    torch.manual_seed(0)
    dense, pruned = _pair(64, 24, PruneConfig(0.9, 16, remainder_bits=2))
    x = torch.randn(6, 50, 64, requires_grad=True)
    dy = torch.randn(6, 50, 24)
    rng.manual_seed(1)
    pruned(x).backward(dy)
    rng.manual_seed(1)  # the same stochastic rounding
    stored = compress(as_rows(x.detach(), "token-major"), pruned.prune_config).to_dense()
    want = as_rows(dy, "token-major").t() @ stored
    # accumulated tile by tile in another order than one matmul: float32 rounding differs
    torch.testing.assert_close(pruned.weight.grad, want, rtol=1e-4, atol=1e-4)
    dense(x.detach()).backward(dy)
    exact = dense.weight.grad
    dropped = compress(as_rows(x.detach(), "token-major"), PruneConfig(0.9, 16)).to_dense()
    pruned_only = as_rows(dy, "token-major").t() @ dropped

    def cos(a):
        return torch.nn.functional.cosine_similarity(a.flatten(), exact.flatten(), dim=0)

    # Gaussian x: the top 10 % of blocks alone give a poor dW; all of x at 2 bits a far better one
    assert cos(pruned_only) < 0.5 and cos(want) > 0.7
