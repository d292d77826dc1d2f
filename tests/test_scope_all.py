"""--scope all: Affine / LayerScale inputs pruned, GELU inputs as a derivative code, int8 blocks,
deduplication of one input read by several layers."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import naive_mask
from torch import nn

from actprune import (
    CodedGELU,
    CodedReLU,
    CodedSiLU,
    PruneConfig,
    PrunedAffine,
    PrunedLayerScale,
    PrunedLinear,
    SavedTensorLog,
    describe_compression,
    exact_gradients,
    models,
    prune_activations_,
    restore_dense_,
    saved_activation_bytes,
)
from actprune.bitpack import pack_codes, unpack_codes
from actprune.blocksparse import as_rows
from actprune.derivative_code import ACTIVATIONS, activation_derivative, derivative_code
from actprune.models.resmlp import Affine, LayerScale


def _scale_pair(kind: str, config: PruneConfig, dim: int = 48):
    torch.manual_seed(0)
    dense = Affine(dim) if kind == "affine" else LayerScale(dim, 0.5)
    with torch.no_grad():
        for p in dense.parameters():
            p.copy_(torch.randn_like(p))
    pruned_cls = PrunedAffine if kind == "affine" else PrunedLayerScale
    return dense, pruned_cls.from_module(copy.deepcopy(dense), config)


@pytest.mark.parametrize("kind", ["affine", "layerscale"])
@pytest.mark.parametrize("shape", [(4, 20, 48), (70, 48)])
def test_channel_scale_at_sparsity_zero_matches_pytorch(kind, shape):
    dense, pruned = _scale_pair(kind, PruneConfig(0.0, 16))
    x = torch.randn(*shape, requires_grad=True)
    dy = torch.randn(*shape)
    x2 = x.detach().clone().requires_grad_()
    out_d, out_p = dense(x), pruned(x2)
    assert torch.equal(out_d, out_p)  # the forward is the same op
    out_d.backward(dy)
    out_p.backward(dy)
    torch.testing.assert_close(x2.grad, x.grad, rtol=0, atol=0)  # dx never reads the saved x
    for (name, a), (_, b) in zip(dense.named_parameters(), pruned.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("selection", ["column", "global"])
@pytest.mark.parametrize("kind", ["affine", "layerscale"])
def test_channel_scale_gradient_uses_exactly_the_kept_blocks(kind, selection):
    config = PruneConfig(0.6, (8, 16), selection=selection)
    dense, pruned = _scale_pair(kind, config)
    x = torch.randn(4, 20, 48)
    dy = torch.randn(4, 20, 48)
    pruned(x.requires_grad_()).backward(dy)
    rows = as_rows(x.detach(), config.row_order)
    _, mask = naive_mask(rows, 0.6, (8, 16), "l2", selection)
    want = (as_rows(dy, config.row_order) * rows * mask).sum(0)
    scale = pruned.alpha if kind == "affine" else pruned.scale
    torch.testing.assert_close(scale.grad, want, rtol=1e-5, atol=1e-5)
    if kind == "affine":  # dβ = Σ dy: exact
        torch.testing.assert_close(pruned.beta.grad, dy.sum((0, 1)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, dy * scale.detach())


def test_channel_scale_saved_bytes_are_exact():
    _, pruned = _scale_pair("affine", PruneConfig(0.9, 32), dim=64)
    x = torch.randn(8, 64, 64, requires_grad=True)  # rows 512 -> 16 block-rows, 2 block-columns
    kept = 2 * 2  # 2 columns × ceil(0.1 · 16)
    want = kept * 32 * 32 * 4 + kept * 4 + 3 * 4
    assert saved_activation_bytes(pruned, x) == want  # α itself is a Parameter: not counted


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("n", [1, 3, 4, 5, 1001])
def test_pack_codes_round_trip(bits, n):
    codes = torch.randint(0, 1 << bits, (n,), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, n), codes)


# The bounds docs/results/derivative_code.md states (the fit's own figures, rounded up).
DOCUMENTED = {  # max error, RMS error under N(0, 1)
    "gelu": {2: (0.190, 0.090), 4: (0.052, 0.025)},
    "gelu_tanh": {2: (0.190, 0.090), 4: (0.052, 0.025)},
    "gelu_new": {2: (0.190, 0.090), 4: (0.052, 0.025)},
    "silu": {2: (0.181, 0.096), 4: (0.049, 0.026)},
}
FUNCTIONS = sorted(ACTIVATIONS)


@pytest.mark.parametrize("function", FUNCTIONS)
@pytest.mark.parametrize("bits", [2, 4])
def test_derivative_code_error_within_documented_bound(bits, function):
    code = derivative_code(function, bits)
    assert len(code.values) == 1 << bits and len(code.boundaries) == (1 << bits) - 1
    assert list(code.boundaries) == sorted(code.boundaries)
    max_error, rms_error = DOCUMENTED[function][bits]
    assert code.max_error <= max_error and code.rms_error <= rms_error
    x = torch.cat([torch.randn(100_000, dtype=torch.float64) * 3, torch.linspace(-50, 50, 10001)])
    q = code.derivative(code.encode(x), x.numel(), torch.float64)
    err = (q - activation_derivative(function, x)).abs()
    assert err.max() <= code.max_error + 1e-12
    # activation_derivative is the true derivative of the forward: compare with autograd
    xs = torch.linspace(-5, 5, 201, dtype=torch.float64, requires_grad=True)
    ACTIVATIONS[function][0](xs).sum().backward()
    torch.testing.assert_close(activation_derivative(function, xs.detach()), xs.grad)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_coded_gelu_forward_exact_backward_is_the_code(bits, approximate, dtype):
    function = "gelu" if approximate == "none" else "gelu_tanh"
    _check_coded(CodedGELU, nn.GELU(approximate=approximate), function, bits, dtype)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_coded_silu_forward_exact_backward_is_the_code(bits, dtype):
    _check_coded(CodedSiLU, nn.SiLU(), "silu", bits, dtype)


def _check_coded(cls, dense, function, bits, dtype):
    config = PruneConfig(0.9, scope="all", activation_bits=bits)
    coded = cls.from_module(dense, config)
    x = (torch.randn(3, 7, 33) * 2).to(dtype).requires_grad_()
    dy = torch.randn(3, 7, 33).to(dtype)
    out = coded(x)
    assert torch.equal(out, dense(x.detach()))
    saved = saved_activation_bytes(coded, x)
    rows = x.numel() // x.shape[-1]  # + 1 bit per row: does it hold a NaN/Inf
    assert saved == math.ceil(x.numel() * bits / 8) + math.ceil(rows / 8)  # ~1/16 or 1/8 of fp32
    out.backward(dy)
    code = derivative_code(function, bits)
    bounds = torch.tensor(code.boundaries, dtype=torch.float64)
    piece = torch.bucketize(x.detach().double(), bounds)
    want = dy.double() * torch.tensor(code.values, dtype=torch.float64)[piece]
    torch.testing.assert_close(
        x.grad.double(),
        want,
        rtol=1e-2 if dtype != torch.float32 else 1e-6,
        atol=1e-2 if dtype != torch.float32 else 1e-6,
    )
    exact = dy.double() * activation_derivative(function, x.detach().double())
    assert ((x.grad.double() - exact).abs() <= dy.double().abs() * code.max_error + 1e-2).all()


@pytest.mark.parametrize("inplace", [False, True])
def test_coded_relu_is_exact_with_one_bit_per_element_nan_and_inf_as_dense(inplace):
    x = torch.randn(5, 9, 40)
    x[0, 0, :3] = torch.tensor([torch.nan, torch.inf, -torch.inf])
    x[1, 2, 5] = 0.0  # relu' at 0 is 0 in torch
    dy = torch.randn_like(x)
    dy[0, 0, 3] = torch.inf  # a non-finite gradient where the mask is 0 stays 0, as dense
    x[0, 0, 3] = -1.0
    grads = []
    for relu in (nn.ReLU(inplace), CodedReLU.from_module(nn.ReLU(inplace), PruneConfig(0.9))):
        xi = x.clone().requires_grad_()
        out = relu(xi * 1)  # a non-leaf, as in-place ReLU needs
        out.backward(dy)
        grads.append((out.detach(), xi.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=0, atol=0, equal_nan=True)
    coded = CodedReLU.from_module(nn.ReLU(), PruneConfig(0.9))
    assert saved_activation_bytes(coded, x.clone().requires_grad_()) == x.numel() // 8


def test_scope_all_converts_and_restores():
    torch.manual_seed(0)
    model = models.create("resmlp_tiny", width=32, depth=2)
    original = copy.deepcopy(model)
    params = dict(model.named_parameters())
    prune_activations_(model, PruneConfig(0.9, 16, scope="all"), exclude="head")
    kinds = {type(m) for m in model.modules()}
    assert {PrunedLinear, PrunedAffine, PrunedLayerScale, CodedGELU} <= kinds
    assert not isinstance(model.head, PrunedLinear)
    assert all(p is params[n] for n, p in model.named_parameters())  # same Parameter objects
    rows = {r["layer"]: r["count"] for r in describe_compression(model) if r["compressed"]}
    assert rows == {"Affine": 5, "Linear": 6, "LayerScale": 4, "GELU": 2}  # per block 2, 3, 2, 1
    x = torch.randn(5, 1, 28, 28)
    assert torch.equal(model(x), original(x))  # forward unchanged
    prune_activations_(model, PruneConfig(0.9, 16, scope="linear"), exclude="head")
    rows = describe_compression(model)
    assert {r["layer"] for r in rows if r["compressed"]} == {"Linear"}  # others back to dense
    dense = {r["layer"]: r["kept_as"] for r in rows if not r["compressed"]}
    assert dense["Affine"].startswith("dense: excluded") and "GELU" in dense
    assert type(model.blocks[0].aff1) is Affine and type(model.blocks[0].gelu) is nn.GELU
    restore_dense_(model)
    assert not any(r["compressed"] for r in describe_compression(model))
    assert {type(m) for m in model.modules()} == {type(m) for m in original.modules()}


def test_exact_gradients_context_matches_dense_model():
    torch.manual_seed(0)
    dense = models.create("resmlp_tiny", width=32, depth=2)
    pruned = prune_activations_(copy.deepcopy(dense), PruneConfig(0.9, 16, scope="all"))
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    F.cross_entropy(dense(x), y).backward()
    with exact_gradients():
        F.cross_entropy(pruned(x), y).backward()
    for (name, a), (_, b) in zip(dense.named_parameters(), pruned.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_scope_all_saves_far_less_than_linear():
    torch.manual_seed(0)
    dense = models.create("resmlp_tiny")
    x = torch.randn(32, 1, 28, 28)
    sizes = {"dense": saved_activation_bytes(lambda: dense(x).sum())}
    for scope in ("linear", "all"):
        model = prune_activations_(copy.deepcopy(dense), PruneConfig(0.9, 32, scope=scope))
        sizes[scope] = saved_activation_bytes(lambda m=model: m(x).sum())
    assert sizes["linear"] < 0.75 * sizes["dense"]
    assert sizes["all"] < 0.2 * sizes["dense"]


class QKV(nn.Module):
    """Three projections of one input, as in attention: the case deduplication is for."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(x).sum() + self.k(x).sum() + self.v(x).sum()


def test_one_input_read_by_three_layers_is_compressed_and_saved_once():
    torch.manual_seed(0)
    model = prune_activations_(QKV(), PruneConfig(0.75, 16))
    x = torch.randn(4, 32, 64)
    kept = 4 * 2  # 4 block-columns × ceil(0.25 · 8)
    one_copy = kept * 16 * 16 * 4 + kept * 4 + 5 * 4
    with SavedTensorLog() as log:
        out = model(x)
    assert log.live_bytes() == one_copy
    assert log.shared_bytes() == 2 * one_copy  # saved by 3 ops, held once
    out.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    # each projection alone (no sharing) gives the same gradients
    for name in ("q", "k", "v"):
        layer = copy.deepcopy(getattr(model, name))
        layer.zero_grad()
        layer(x).sum().backward()
        torch.testing.assert_close(layer.weight.grad, grads[f"{name}.weight"])
    x.mul_(-2.0).add_(1.0)  # changed in place: the next forward must compress again, not reuse
    model.zero_grad()
    with SavedTensorLog() as log:
        out = model(x)
    assert log.live_bytes() == one_copy
    out.backward()
    alone = copy.deepcopy(model.q)
    alone.zero_grad()
    alone(x).sum().backward()
    torch.testing.assert_close(model.q.weight.grad, alone.weight.grad)


def test_int8_scope_all_trains_close_to_native():
    torch.manual_seed(0)
    dense = models.create("resmlp_tiny", width=32, depth=2)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    grads = {}
    for int8 in (False, True):
        model = prune_activations_(
            copy.deepcopy(dense), PruneConfig(0.5, 16, scope="all", int8=int8)
        )
        F.cross_entropy(model(x), y).backward()
        grads[int8] = {n: p.grad for n, p in model.named_parameters()}
    for name, g in grads[False].items():
        cos = F.cosine_similarity(g.flatten(), grads[True][name].flatten(), dim=0)
        assert cos > 0.999, name


def _prime_and_weight(function: str):
    """f' by autograd and the fit's weight (an equal mixture of N(0, 1), N(0, 2²), N(0, 4²)),
    on [-6, 6] like the fit: written out here, independent of the fit."""
    x = torch.linspace(-6, 6, 60001, dtype=torch.float64, requires_grad=True)
    ACTIVATIONS[function][0](x).sum().backward()
    w = sum(torch.exp(-0.5 * (x.detach() / s) ** 2) / s for s in (1.0, 2.0, 4.0))
    return x.detach(), x.grad, w


def _pieces(x, g, w, boundaries):
    """(weighted mean of f', weighted squared error) of each piece, by the trapezoid rule."""
    edges = [-6.0, *boundaries, 6.0]
    out = []
    for a, b in zip(edges, edges[1:]):
        m = (x >= a) & (x < b)
        mean = torch.trapezoid((w * g)[m], x[m]) / torch.trapezoid(w[m], x[m])
        out.append((float(mean), float(torch.trapezoid((w * (g - mean) ** 2)[m], x[m]))))
    return out


@pytest.mark.parametrize("function", ["gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("bits", [2, 4])
def test_derivative_code_values_are_the_weighted_means_of_the_derivative(bits, function):
    code = derivative_code(function, bits)
    x, g, w = _prime_and_weight(function)
    means = [mean for mean, _ in _pieces(x, g, w, code.boundaries)]
    # within 1e-4: a piece changed by 10 % (0.0014 for the smallest, -0.0138) fails
    assert max(abs(a - b) for a, b in zip(code.values, means)) < 1e-4
    # and the boundaries are optimal: moving any one of them never lowers the squared error
    best = sum(err for _, err in _pieces(x, g, w, code.boundaries))
    for i in range(len(code.boundaries)):
        for step in (-0.02, 0.02):
            moved = list(code.boundaries)
            moved[i] += step
            assert sum(err for _, err in _pieces(x, g, w, moved)) >= best - 1e-12


@pytest.mark.parametrize("kind", ["affine", "layerscale"])
def test_channel_scale_gradient_with_remainder_is_dy_times_the_stored_approximation(kind):
    from actprune import rng

    config = PruneConfig(0.75, (8, 16), remainder_bits=2)
    _, pruned = _scale_pair(kind, config)
    x, dy = torch.randn(4, 20, 48), torch.randn(4, 20, 48)
    rng.manual_seed(3)
    pruned(x.requires_grad_()).backward(dy)
    rng.manual_seed(3)  # the same stochastic rounding
    from actprune import compress

    stored = compress(as_rows(x.detach(), config.row_order), config).to_dense()
    want = (as_rows(dy, config.row_order) * stored).sum(0)
    scale = pruned.alpha if kind == "affine" else pruned.scale
    torch.testing.assert_close(scale.grad, want, rtol=1e-5, atol=1e-5)
    exact = (dy * x.detach()).sum((0, 1))
    assert not torch.allclose(scale.grad, exact, atol=1e-3)  # the approximation is in use


@pytest.mark.parametrize("row_order", ["token-major", "batch-major"])
def test_row_order_decides_which_rows_share_a_block(row_order):
    """Expected values by plain indexing (no as_rows): one block-row of 4 rows is kept of 8."""
    batch, tokens, k = 4, 8, 32
    x = torch.randn(batch, tokens, k) * 0.01
    dy = torch.randn(batch, tokens, 8)
    if row_order == "token-major":  # a block-row = one token position across the 4 samples
        x[:, 3, :] += 10
        want = dy[:, 3, :].t() @ x[:, 3, :]
    else:  # a block-row = 4 consecutive tokens of one sample: sample 2, tokens 4-7
        x[2, 4:8, :] += 10
        want = dy[2, 4:8, :].t() @ x[2, 4:8, :]
    layer = PrunedLinear.from_linear(
        nn.Linear(k, 8), PruneConfig(7 / 8, (4, 32), row_order=row_order)
    )
    layer(x).backward(dy)
    torch.testing.assert_close(layer.weight.grad, want, rtol=1e-5, atol=1e-5)
