"""Issue 26: transformers. Exact tricks (RMSNorm keeping x̂, SwiGLU keeping gate and up, dropout
masks as bits, the loss without logits on Hugging Face models) equal dense; the opt-in codes of
the input-gradient path (norm inputs, attention's q/k/v, SwiGLU's gate and up) stay within their
bound and propagate NaN/Inf; conversion follows the config's fields."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from torch import nn

from actprune import (
    PruneConfig,
    PrunedLinear,
    SavedTensorLog,
    exact_gradients,
    kernels,
    measure_training_step,
    prune_activations_,
    restore_dense_,
    rowcode,
    saved_activation_bytes,
)
from actprune import rng as actprune_rng
from actprune.attention import coded_attention
from actprune.dropout import CodedDropout
from actprune.methods import MemoryConfig, apply_method, frontier_methods, methods
from actprune.models.llama import CompactSwiGLU, LlamaConfig, SwiGLU
from actprune.norms import CodedLayerNorm, CodedRMSNorm
from actprune.plan import accuracy_deltas, predict_step, step_time_ratios
from actprune.workloads import build_workload

UNIFORM = PruneConfig.preset("uniform")


def _run(module, x, dy, params=()):
    """(output, dx, parameter gradients) of module at x against dy."""
    x = x.clone().requires_grad_()
    y = module(x)
    grads = torch.autograd.grad(y, [x, *params], dy)
    return y, grads[0], grads[1:]


def _cosine(a, b):
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def _close_to_dense(dense, coded, x, dy, floor):
    """The dense module's output exactly; dx and every parameter gradient at cosine > floor."""
    y0, dx0, g0 = _run(dense, x, dy, list(dense.parameters()))
    y1, dx1, g1 = _run(coded, x, dy, list(coded.parameters()))
    assert torch.equal(y0, y1)
    assert _cosine(dx1, dx0) > floor and all(_cosine(a, b) > floor for a, b in zip(g1, g0))


# --- row codes ------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rowcode_within_its_bound_and_exact_bytes(bits, dtype):
    torch.manual_seed(0)
    x = (torch.randn(3, 7, 40) * torch.logspace(-3, 3, 7)[None, :, None]).to(dtype)
    x[0, 0] = 0  # an all-zero row decodes to zeros
    codes, scales = rowcode.encode(x, bits)
    decoded = rowcode.decode(codes, scales, x.shape, dtype, bits)
    assert decoded.dtype == dtype and decoded.shape == x.shape
    assert torch.equal(decoded[0, 0], torch.zeros(40, dtype=dtype))
    bound = rowcode.error_bound(x, bits).unsqueeze(-1)
    err = (decoded.float() - x.float()).abs()
    # the bound of the float32 decode, plus the rounding of the output dtype
    assert (err <= bound * (1 + 1e-6) + x.float().abs() * torch.finfo(dtype).eps).all()
    assert codes.numel() * codes.element_size() == x.numel() * bits // 8
    assert scales.shape == x.shape[:-1] and scales.dtype == torch.float32


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_rowcode_nonfinite_rows_decode_to_nan_and_others_stay(bits, bad):
    x = torch.randn(4, 16)
    x[2, 5] = bad
    decoded = rowcode.decode(*rowcode.encode(x, bits), x.shape, x.dtype, bits)
    assert decoded[2].isnan().all()
    assert torch.isfinite(decoded[[0, 1, 3]]).all()


def test_rowcode_refuses_other_bits():
    with pytest.raises(ValueError, match="4 or 8 bits, got 2"):
        rowcode.encode(torch.randn(4, 8), 2)


# --- norms ----------------------------------------------------------------------------------


def _norm(kind: str, width: int = 64) -> nn.Module:
    torch.manual_seed(1)
    norm = nn.RMSNorm(width) if kind == "rms" else nn.LayerNorm(width)
    with torch.no_grad():
        for p in norm.parameters():
            p.normal_()
    return norm


def test_rmsnorm_exact_keeps_half_and_equals_dense_to_rounding():
    dense = _norm("rms")
    coded = prune_activations_(copy.deepcopy(dense), UNIFORM)
    assert isinstance(coded, CodedRMSNorm)
    x, dy = torch.randn(4, 16, 64) * 3 + 1, torch.randn(4, 16, 64)
    y0, dx0, (dw0,) = _run(dense, x, dy, [dense.weight])
    y1, dx1, (dw1,) = _run(coded, x, dy, [coded.weight])
    assert torch.equal(y0, y1)  # the dense module's own forward
    torch.testing.assert_close(dx1, dx0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw1, dw0, rtol=1e-5, atol=1e-4)
    # dense: x, x·rstd and rstd; coded: x̂ and rstd
    xr = x.clone().requires_grad_()
    assert saved_activation_bytes(coded, xr) == 4 * (64 * 64 + 64)
    assert saved_activation_bytes(dense, xr) == 4 * (2 * 64 * 64 + 64)


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("bits", [4, 8])
def test_coded_norm_bytes_and_gradients(kind, bits):
    dense = _norm(kind)
    coded = prune_activations_(copy.deepcopy(dense), PruneConfig.preset("uniform", norm_bits=bits))
    assert isinstance(coded, CodedRMSNorm if kind == "rms" else CodedLayerNorm)
    x, dy = torch.randn(4, 16, 64) * 3 + 1, torch.randn(4, 16, 64)
    _close_to_dense(dense, coded, x, dy, 0.9999 if bits == 8 else 0.99)
    rows = 4 * 16
    assert saved_activation_bytes(coded, x.clone().requires_grad_()) == (
        rows * 64 * bits // 8 + 4 * rows + 4 * rows  # codes, one scale and one rstd per row
    )


def test_coded_norm_saves_a_code_within_the_bound_of_x_hat():
    """What backward reads is x̃ with |x̃ − x̂| ≤ the rowcode bound of x̂ (hooks see the codes)."""
    norm = prune_activations_(nn.LayerNorm(64), PruneConfig.preset("uniform", norm_bits=8))
    x = torch.randn(32, 64, requires_grad=True) * 5
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        norm(x)
    codes, scales = saved[0], saved[1]
    x_hat = F.layer_norm(x.detach(), (64,))
    decoded = rowcode.decode(codes, scales, x_hat.shape, x_hat.dtype, 8)
    bound = rowcode.error_bound(x_hat, 8).unsqueeze(-1)
    assert ((decoded - x_hat).abs() <= bound + 1e-5).all()


def test_layernorm_stays_dense_when_exact():
    model = prune_activations_(nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8)), UNIFORM)
    assert type(model[0]) is nn.LayerNorm


def _never_hidden(dense_grad, coded_grad):
    """Every non-finite element of the dense gradient is non-finite in the coded one (a code
    turns a non-finite row into NaN as a whole, so it may mark more)."""
    assert coded_grad[~dense_grad.isfinite()].isfinite().sum() == 0


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_coded_norm_nonfinite_rows_propagate_as_dense(kind, bad):
    dense = _norm(kind)
    coded = prune_activations_(copy.deepcopy(dense), PruneConfig.preset("uniform", norm_bits=8))
    x, dy = torch.randn(6, 64), torch.randn(6, 64)
    x[3, 7] = bad
    _, dx0, (dw0, *_) = _run(dense, x, dy, list(dense.parameters()))
    _, dx1, (dw1, *_) = _run(coded, x, dy, list(coded.parameters()))
    assert torch.equal(dx0.isfinite().all(-1), dx1.isfinite().all(-1))
    assert not dx1[3].isfinite().any() and dx1[[0, 1, 2, 4, 5]].isfinite().all()
    _never_hidden(dw0, dw1)


# --- SwiGLU ---------------------------------------------------------------------------------


def _swiglu():
    torch.manual_seed(2)
    return SwiGLU(LlamaConfig(width=32, hidden=88))


def test_swiglu_exact_is_bit_identical_and_keeps_two_tensors():
    dense = _swiglu()
    fused = prune_activations_(copy.deepcopy(dense), PruneConfig.preset("uniform"))
    assert isinstance(fused, CompactSwiGLU)
    restore = copy.deepcopy(fused)
    x, dy = torch.randn(4, 16, 32), torch.randn(4, 16, 32)
    # the gate and up projections compress their input: compare with them exact too
    for name in ("gate", "up"):
        setattr(fused, name, getattr(dense, name))
    y0, dx0, g0 = _run(dense, x, dy, list(dense.parameters()))
    y1, dx1, g1 = _run(fused, x, dy, list(fused.parameters()))
    assert torch.equal(y0, y1) and torch.equal(dx0, dx1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))
    dense_bytes = saved_activation_bytes(dense, x.clone().requires_grad_())
    fused_bytes = saved_activation_bytes(fused, x.clone().requires_grad_())
    hidden = 4 * 16 * 88 * 4
    # dense: x (shared by gate and up), g, silu(g), u, h; fused: x, g, u
    assert dense_bytes - fused_bytes == 2 * hidden
    assert type(restore_dense_(restore)) is SwiGLU


@pytest.mark.parametrize("bits", [4, 8])
def test_swiglu_codes_bytes_and_gradients(bits):
    dense = _swiglu()
    config = PruneConfig.preset("uniform", swiglu_bits=bits)
    fused = prune_activations_(copy.deepcopy(dense), config)
    for name in ("gate", "up"):
        setattr(fused, name, getattr(dense, name))
    x, dy = torch.randn(4, 16, 32), torch.randn(4, 16, 32)
    _close_to_dense(dense, fused, x, dy, 0.999 if bits == 8 else 0.98)
    rows = 4 * 16
    codes = 2 * (rows * 88 * bits // 8 + 4 * rows)
    saved = saved_activation_bytes(fused, x.clone().requires_grad_())
    assert saved == 4 * rows * 32 + codes  # x (exact: the dense gate and up) and the codes


def test_swiglu_nonfinite_propagates():
    dense = _swiglu()
    fused = prune_activations_(copy.deepcopy(dense), PruneConfig.preset("uniform", swiglu_bits=8))
    for name in ("gate", "up"):
        setattr(fused, name, getattr(dense, name))
    x, dy = torch.randn(6, 32), torch.randn(6, 32)
    x[2, 3] = float("inf")
    _, dx0, _ = _run(dense, x, dy)
    _, dx1, _ = _run(fused, x, dy)
    assert torch.equal(dx0.isfinite().all(-1), dx1.isfinite().all(-1))
    assert not dx1[2].isfinite().all()


# --- attention ------------------------------------------------------------------------------


def _qkv(shape=(2, 4, 32, 16)):
    torch.manual_seed(3)
    return [torch.randn(shape) for _ in range(3)]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("options", [{"is_causal": True}, {}, {"scale": 0.3}])
def test_coded_attention_output_exact_and_gradients_close(bits, options):
    q, k, v = _qkv()
    dy = torch.randn_like(q)

    def grads(fn):
        args = [t.clone().requires_grad_() for t in (q, k, v)]
        y = fn(*args, **options)
        return y, torch.autograd.grad(y, args, dy)

    y0, g0 = grads(F.scaled_dot_product_attention)
    y1, g1 = grads(lambda *a, **o: coded_attention(*a, bits=bits, **o))
    assert torch.equal(y0, y1)
    floor = 0.999 if bits == 8 else 0.95
    assert all(_cosine(a, b) > floor for a, b in zip(g1, g0))


def test_coded_attention_saves_only_the_codes():
    q, k, v = (t.requires_grad_() for t in _qkv())
    rows = 2 * 4 * 32
    for bits in (4, 8):
        got = saved_activation_bytes(coded_attention, q, k, v, bits=bits, is_causal=True)
        assert got == 3 * (rows * 16 * bits // 8 + 4 * rows)


def test_coded_attention_with_dropout_replays_the_mask():
    """Backward recomputes with the forward's random state: exact codes would give dense's
    gradients; 8-bit ones stay close, and a different mask would not."""
    q, k, v = _qkv()
    dy = torch.randn_like(q)

    def grads(fn, seed):
        args = [t.clone().requires_grad_() for t in (q, k, v)]
        torch.manual_seed(seed)
        y = fn(*args, dropout_p=0.3)
        torch.manual_seed(seed + 100)  # backward must not draw from the current state
        return y, torch.autograd.grad(y, args, dy)

    y0, g0 = grads(F.scaled_dot_product_attention, 7)
    y1, g1 = grads(lambda *a, **o: coded_attention(*a, bits=8, **o), 7)
    _, g2 = grads(F.scaled_dot_product_attention, 8)
    assert torch.equal(y0, y1)
    assert all(_cosine(a, b) > 0.999 for a, b in zip(g1, g0))
    assert all(_cosine(a, b) < 0.99 for a, b in zip(g2, g0))


def test_coded_attention_nonfinite_propagates():
    q, k, v = _qkv()
    q[0, 1, 5, 2] = float("nan")
    dy = torch.randn_like(q)
    out = []
    for fn in (F.scaled_dot_product_attention, lambda *a: coded_attention(*a, bits=8)):
        args = [t.clone().requires_grad_() for t in (q, k, v)]
        out.append(torch.autograd.grad(fn(*args), args, dy))
    for a, b in zip(*out):
        assert torch.equal(a.isnan().any(-1), b.isnan().any(-1))


def test_attention_converts_only_with_attention_bits():
    model = build_workload("llama_tiny", seq_len=16, depth=1).model
    prune_activations_(model, UNIFORM)
    assert type(model.blocks[0].attn).__name__ == "RotaryAttention"
    prune_activations_(model, PruneConfig.preset("transformer"))
    assert type(model.blocks[0].attn).__name__ == "CodedRotaryAttention"
    prune_activations_(model, UNIFORM)  # converted layers follow a new config, back to dense
    assert type(model.blocks[0].attn).__name__ == "RotaryAttention"
    assert type(model.blocks[0].norm1) is CodedRMSNorm
    prune_activations_(model, PruneConfig.preset("paper"))  # scope linear: no exact tricks
    assert type(model.blocks[0].norm1) is nn.RMSNorm
    assert type(model.blocks[0].mlp) is SwiGLU


# --- a Linear reading a norm's output ------------------------------------------------------


class _NormThenProjections(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm, self.q, self.k = norm, nn.Linear(64, 32), nn.Linear(64, 16)

    def forward(self, x):
        y = self.norm(x)
        return self.q(y).sum(-1) + self.k(y).square().sum(-1)


def test_linears_after_an_exact_norm_keep_nothing_and_are_exact():
    torch.manual_seed(0)
    dense = _NormThenProjections(nn.RMSNorm(64))
    with torch.no_grad():
        dense.norm.weight.add_(torch.randn(64) * 0.3)
    model = prune_activations_(copy.deepcopy(dense), UNIFORM)  # scope all: exact RMSNorm
    assert isinstance(model.norm, CodedRMSNorm) and isinstance(model.q, PrunedLinear)
    x = torch.randn(4, 16, 64)
    (dense(x).sum()).backward()
    (model(x).sum()).backward()
    for (name, a), b in zip(dense.named_parameters(), model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert torch.equal(model.q.weight.grad, dense.q.weight.grad)  # y rebuilt as RMSNorm made it
    # x̂ and rstd, nothing of the two Linears (they read the norm's x̂), k's output for square
    assert saved_activation_bytes(model, x.clone().requires_grad_()) == (
        4 * 16 * 64 * 4 + 4 * 16 * 4 + 4 * 16 * 16 * 4)  # fmt: skip


def test_linears_after_a_coded_norm_read_its_code():
    torch.manual_seed(0)
    dense = _NormThenProjections(nn.LayerNorm(64))
    model = prune_activations_(copy.deepcopy(dense), PruneConfig.preset("transformer"))
    x = torch.randn(4, 16, 64)
    assert saved_activation_bytes(model, x.clone().requires_grad_()) == (
        4 * 16 * 64 + 4 * 16 * 4 * 2 + 4 * 16 * 16 * 4)  # codes, scale and rstd, k's output
    dense(x).sum().backward()
    model(x).sum().backward()
    assert _cosine(model.q.weight.grad, dense.q.weight.grad) > 0.9999  # 8 bits, not 4


def test_a_norm_output_changed_in_place_is_compressed_by_the_linear():
    torch.manual_seed(0)
    norm = prune_activations_(nn.RMSNorm(64), UNIFORM)
    lin = prune_activations_(nn.Linear(64, 8), UNIFORM)
    x = torch.randn(8, 64, requires_grad=True)
    y = norm(x)
    y.mul_(2.0)  # y is no longer x̂ ⊙ γ: the Linear must not rebuild it from the norm
    with SavedTensorLog(by_kind=True) as log:
        out = lin(y)
    assert log.bytes_by_kind().get("linear", 0) > 0  # its own 4-bit copy of the doubled y
    out.sum().backward()
    want = torch.ones(8, 8) @ (2 * F.rms_norm(x, (64,)))  # dW of the doubled y (4-bit noise)
    assert _cosine(lin.weight.grad, want) > 0.9
    assert 0.9 < lin.weight.grad.norm() / want.norm() < 1.1  # not the undoubled x̂


# --- dropout --------------------------------------------------------------------------------


def test_dropout_mask_as_bits_is_bit_identical():
    dense = nn.Dropout(0.2)
    coded = prune_activations_(copy.deepcopy(dense), UNIFORM)
    assert isinstance(coded, CodedDropout)
    x, dy = torch.randn(8, 33), torch.randn(8, 33)
    torch.manual_seed(4)
    y0, dx0, _ = _run(dense, x, dy)
    torch.manual_seed(4)
    y1, dx1, _ = _run(coded, x, dy)
    assert torch.equal(y0, y1) and torch.equal(dx0, dx1)
    assert saved_activation_bytes(coded, x.clone().requires_grad_()) == 8 * 33 // 8  # a bit each
    coded.eval()
    assert torch.equal(coded(x), x)
    assert type(prune_activations_(nn.Dropout(0.0), UNIFORM)) is nn.Dropout  # saves nothing


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy, on the Inf row
@pytest.mark.parametrize("rms", [True, False])
@pytest.mark.parametrize("bits", [0, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_norm_statistics_and_codes_are_the_reference(rms, bits, dtype):
    """One launch for a norm's rstd, x̂ and its codes: the statistics to float rounding of
    PyTorch's (another summation order), x̂ within a rounding of the reference's, the codes
    within one step of it (a tie may round the other way), NaN rows NaN."""
    pytest.importorskip("triton")
    from actprune.kernels import reference, triton_blocks

    x = (torch.randn(3, 10, 1030) * 4 + 1).to(dtype)  # 1030 columns: two steps of a row
    x[1, 2, 5] = float("inf")
    want, want_scales, want_rstd = reference.normalized_row_codes(x, 1e-5, rms, bits)
    got, scales, rstd = (t.cpu() for t in triton_blocks.normalized_row_codes(
        x.to(DEVICE), 1e-5, rms, bits))  # fmt: skip
    finite = want_rstd.isfinite().squeeze(-1).flatten() & (x.isfinite().all(-1).flatten())
    torch.testing.assert_close(rstd.flatten()[finite], want_rstd.flatten()[finite], rtol=1e-6,
                               atol=0)  # fmt: skip
    if not bits:
        torch.testing.assert_close(got.float().view(-1, 1030)[finite],
                                   want.float().view(-1, 1030)[finite], rtol=2e-3, atol=1e-5)
        return
    assert torch.equal(scales.isnan(), want_scales.flatten().isnan()) and scales.isnan().any()
    decoded = reference.decode_row_codes(got, scales, 1030, torch.float32, bits)
    expected = reference.decode_row_codes(want, want_scales.flatten(), 1030, torch.float32, bits)
    assert torch.equal(decoded.isnan(), expected.isnan())
    step = want_scales.flatten()[finite][:, None]
    assert ((decoded[finite] - expected[finite]).abs() <= step * 1.001).all()


@pytest.mark.parametrize("rms", [True, False])
@pytest.mark.parametrize("bits", [0, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_norm_backward_is_the_reference(rms, bits, dtype):
    """dx, dγ and dβ in one launch (and a sum per parameter): to float rounding of the reference,
    from x̂ or its codes; a NaN row of dy stays NaN in dx."""
    pytest.importorskip("triton")
    from actprune.kernels import reference, triton_blocks

    x, dy = torch.randn(3, 9, 1030).to(dtype), torch.randn(3, 9, 1030).to(dtype)
    dy[2, 4, 7] = float("nan")
    weight = torch.rand(1030) + 0.5
    saved, scales, rstd = reference.normalized_row_codes(x, 1e-5, rms, bits)
    args = (saved, scales, rstd, weight, rms, bits, not rms, dtype)
    want = reference.norm_grad(dy, *args)
    got = triton_blocks.norm_grad(dy.to(DEVICE), *(a.to(DEVICE) if torch.is_tensor(a) else a
                                                   for a in args))  # fmt: skip
    tol = {"rtol": 2e-3, "atol": 2e-3} if dtype == torch.float16 else {"rtol": 1e-4, "atol": 1e-5}
    dx, want_dx = got[0].cpu().float(), want[0].float()
    assert torch.equal(dx.isnan(), want_dx.isnan()) and dx.isnan().any()
    torch.testing.assert_close(dx.nan_to_num(), want_dx.nan_to_num(), **tol)
    for a, b in zip(got[1:], want[1:]):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a.cpu().isnan(), b.isnan())
            torch.testing.assert_close(a.cpu().nan_to_num(), b.nan_to_num(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("model", ["llama_tiny", "gpt_tiny", "hf:gpt2:n_layer=1,n_embd=64,n_head=4,"
                                   "vocab_size=300"])  # fmt: skip
def test_transformer_layers_on_the_triton_path_match_the_reference(model):
    """Every coded layer of the preset (norm statistics and codes, norm backward, attention and
    SwiGLU codes, dropout bits) through the CUDA code path's kernels (the interpreter on CPU):
    the same loss, gradients to float rounding of the PyTorch reference path."""
    pytest.importorskip("triton")
    if model.startswith("hf:"):  # LayerNorm, and dropout (HF GPT-2 keeps its residual dropout)
        pytest.importorskip("transformers", reason="transformers not installed")
    w = build_workload(model, seq_len=16, **({} if model.startswith("hf:") else {"depth": 1}))
    model = prune_activations_(w.model, PruneConfig.preset("transformer"), exclude="*head")
    batch = w.batch(2)
    grads = {}
    for backend in ("torch", "triton"):
        kernels.set_backend(backend)
        actprune_rng.manual_seed(0, model)
        torch.manual_seed(1)
        loss = w.loss(model, batch)
        grads[backend] = (loss, torch.autograd.grad(loss, list(model.parameters())))
    (loss_t, g_t), (loss_tr, g_tr) = grads["torch"], grads["triton"]
    assert torch.equal(loss_t, loss_tr)
    for a, b in zip(g_t, g_tr):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_dropout_mask_kernels_are_the_reference(monkeypatch, dtype):
    pytest.importorskip("triton")
    from actprune.kernels import reference, triton_blocks

    x = torch.randn(5, 1031).to(DEVICE, dtype)  # not a multiple of 8, nor of a program's bytes
    dy = torch.randn(5, 1031).to(DEVICE, dtype)
    dy[0, :16] = float("nan")  # dropped or not: NaN, as dense
    _, mask = torch.native_dropout(x, 0.3, True)
    packed = triton_blocks.pack_mask(mask)
    assert torch.equal(packed.cpu(), reference.pack_mask(mask.cpu()))
    got = triton_blocks.dropout_grad(dy, packed, 1 / 0.7).cpu()
    want = torch.ops.aten.native_dropout_backward(dy.cpu(), mask.cpu(), 1 / 0.7)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


# --- whole models ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["llama_tiny", "gpt_tiny"])
def test_transformer_preset_saves_under_a_quarter(model):
    w = build_workload(model, seq_len=32, depth=2)
    batch = w.batch(4)
    saved = {}
    for name in ("dense", "transformer"):
        m = copy.deepcopy(w.model)
        if name != "dense":
            prune_activations_(m, PruneConfig.preset(name), exclude="head")
        with SavedTensorLog() as log:
            loss = w.loss(m, batch)
            saved[name] = log.live_bytes()
        loss.backward()
        assert all(p.grad is not None and p.grad.isfinite().all() for p in m.parameters())
    assert saved["transformer"] < 0.25 * saved["dense"]


def test_transformer_preset_compiles_fullgraph():
    """Norm and SwiGLU codes trace; attention keeps dense SDPA under compile and the Linears
    after a norm keep their own 8-bit copies (documented): both paths close to exact."""
    torch.manual_seed(0)
    w = build_workload("llama_tiny", seq_len=16, depth=1)
    model = prune_activations_(w.model, PruneConfig.preset("transformer"), exclude="head")
    batch = w.batch(2)
    eager, exact = copy.deepcopy(model), copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    w.loss(compiled, batch).backward()
    w.loss(eager, batch).backward()
    with exact_gradients():
        w.loss(exact, batch).backward()
    named = zip(exact.named_parameters(), eager.parameters(), model.parameters())
    for (name, want), a, b in named:
        assert b.grad is not None and b.grad.isfinite().all(), name
        assert _cosine(want.grad, a.grad) > 0.9 and _cosine(want.grad, b.grad) > 0.9, name  # 4 bits


# --- Hugging Face ---------------------------------------------------------------------------

HF = {
    "gpt2": "hf:gpt2:n_layer=2,n_embd=64,n_head=4,vocab_size=300",
    "llama": "hf:llama:num_hidden_layers=2,hidden_size=64,intermediate_size=176,"
    "num_attention_heads=4,num_key_value_heads=4,vocab_size=300",
    "bert": "hf:bert:num_hidden_layers=2,hidden_size=64,intermediate_size=256,"
    "num_attention_heads=4,vocab_size=300",
}


@pytest.mark.parametrize("name", sorted(HF))
def test_hf_loss_without_logits_equals_theirs(name):
    pytest.importorskip("transformers", reason="transformers not installed")
    w = build_workload(HF[name], seq_len=24)
    x, y = w.batch(2)
    params = list(w.model.parameters())
    torch.manual_seed(5)
    ours = w.loss(w.model, (x, y))
    g_ours = torch.autograd.grad(ours, params, allow_unused=True)
    torch.manual_seed(5)
    theirs = w.model(input_ids=x, labels=y).loss
    g_theirs = torch.autograd.grad(theirs, params, allow_unused=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    scale = max(g.abs().max() for g in g_theirs if g is not None)
    for a, b in zip(g_ours, g_theirs):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)


def test_hf_attention_dropout_is_zero_unless_given():
    pytest.importorskip("transformers", reason="transformers not installed")
    assert build_workload(HF["gpt2"], seq_len=8).model.config.attn_pdrop == 0.0
    given = build_workload(HF["gpt2"] + ",attn_pdrop=0.1", seq_len=8)
    assert given.model.config.attn_pdrop == 0.1
    assert build_workload(HF["bert"], seq_len=8).model.config.attention_probs_dropout_prob == 0.0


@pytest.mark.parametrize("name", sorted(HF))
def test_hf_models_convert_and_train_with_the_transformer_preset(name):
    pytest.importorskip("transformers", reason="transformers not installed")
    w = build_workload(HF[name], seq_len=24)
    batch = w.batch(2)
    dense = copy.deepcopy(w.model)
    model = prune_activations_(w.model, PruneConfig.preset("transformer"), exclude="*head*")
    kinds = {type(m).__name__ for m in model.modules()}
    expected = {
        "gpt2": {"CodedGPT2Attention", "CodedLayerNorm", "CodedDropout", "PrunedConv1D"},
        "llama": {"CodedLlamaAttention", "CodedLlamaRMSNorm", "CompactLlamaMLP"},
        "bert": {"CodedBertSelfAttention", "CodedLayerNorm", "CodedDropout"},
    }[name]
    assert expected <= kinds
    torch.manual_seed(6)
    loss = w.loss(model, batch)
    loss.backward()
    torch.manual_seed(6)
    dense_loss = w.loss(dense, batch)
    dense_loss.backward()
    assert torch.equal(loss, dense_loss)  # every forward is the dense module's
    for (n, a), (_, b) in zip(dense.named_parameters(), model.named_parameters()):
        if a.grad is not None and a.grad.abs().max() > 1e-6:
            assert _cosine(a.grad, b.grad) > 0.9, n  # 8-bit codes, a tiny random model


def test_timm_vit_converts_and_trains_with_the_transformer_preset():
    timm = pytest.importorskip("timm", reason="timm not installed (optional extra actprune[timm])")
    torch.manual_seed(0)
    dense = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10,
                              img_size=32, patch_size=8, depth=2)  # fmt: skip
    model = prune_activations_(copy.deepcopy(dense), PruneConfig.preset("transformer"),
                               exclude="head")  # fmt: skip
    kinds = [type(m).__name__ for m in model.modules()]
    assert kinds.count("CodedTimmAttention") == 2 and kinds.count("CodedTimmLayerNorm") == 5
    x = torch.randn(4, 3, 32, 32)
    out, want = model(x), dense(x)
    assert torch.equal(out, want)  # every forward is the dense module's
    out.square().mean().backward()
    want.square().mean().backward()
    for (n, a), (_, b) in zip(dense.named_parameters(), model.named_parameters()):
        if a.grad is not None and a.grad.abs().max() > 1e-6:
            assert _cosine(a.grad, b.grad) > 0.9, n


# --- planner and benchmarks -----------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        MemoryConfig.actprune(PruneConfig.preset("transformer")),
        MemoryConfig.composition(PruneConfig.preset("transformer"), 1, inside=True),
    ],
    ids=lambda c: c.name,
)
@pytest.mark.parametrize("spec", ["llama_tiny", "gpt_tiny"])
def test_plan_predicts_the_transformer_preset_within_10_percent(spec, config):
    predicted = predict_step(spec, 4, config, foreach=False, seq_len=64, depth=2)
    torch.manual_seed(0)
    w = build_workload(spec, seq_len=64, depth=2)
    model = apply_method(w.model, config)
    batch = w.batch(4)
    opt = torch.optim.AdamW(model.parameters(), foreach=False)
    measured = measure_training_step(model, opt, lambda: w.loss(model, batch), batch)
    assert predicted.resident_bytes == measured.resident_bytes
    assert abs(predicted.peak_step_bytes / measured.peak_step_bytes - 1) < 0.10


def test_language_models_get_the_transformer_preset_in_the_frontier():
    names = [c.name for c in frontier_methods(language=True)]
    assert "actprune_all_u8_n8_att8_sw8_b32" in names
    assert "checkpoint+inside_all_u8_n8_att8_sw8_b32" in names
    assert not set(names) - {c.name for c in frontier_methods()} - {names[-2], names[-1]}
    composed = methods([PruneConfig.preset("transformer")], ["composition"])
    assert [c.name for c in composed] == [
        "dense",
        "actprune_all_u8_n8_att8_sw8_b32",
        "checkpoint+inside_all_u8_n8_att8_sw8_b32",
    ]


def test_packaged_language_model_measurements_name_frontier_configs():
    ratios, _ = step_time_ratios(language=True)
    deltas, source = accuracy_deltas(language=True)
    names = {c.name for c in frontier_methods(language=True)}
    assert "dense" in ratios and set(ratios) <= names
    # the default and the preset are measured (the 4-bit candidate too, outside the frontier)
    assert {"actprune_all_u4_b32", "actprune_all_u8_n8_att8_sw8_b32"} <= set(deltas) & names
    assert "standard library" in source


def test_exact_gradients_runs_every_transformer_layer_dense():
    """compare's gradient cosines measure against exact_gradients(): attention included."""
    torch.manual_seed(0)
    w = build_workload("llama_tiny", seq_len=16, depth=1)
    dense = copy.deepcopy(w.model)
    model = prune_activations_(w.model, PruneConfig.preset("transformer"), exclude="head")
    batch = w.batch(2)
    w.loss(dense, batch).backward()
    with exact_gradients():
        w.loss(model, batch).backward()
    for (name, a), (_, b) in zip(dense.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_cli_bench_memory_takes_bf16_autocast_and_compositions(tmp_path):
    from actprune.cli import main

    args = ["bench", "memory", "--model", "llama_tiny", "--seq-len", "8", "--batch-size", "1",
            "--amp", "bf16", "--preset", "transformer", "--baselines", "composition",
            "--timing-steps", "1", "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    (stem,) = [p.stem for p in tmp_path.glob("*.json")]
    assert stem == "memory_llama_tiny_seq8_b1_cpu_bf16"
    run = json.loads((tmp_path / f"{stem}.json").read_text())
    assert run["amp"] == "bf16"
    assert [r["config"]["name"] for r in run["rows"]] == [
        "dense",
        "actprune_all_u8_n8_att8_sw8_b32",
        "checkpoint+inside_all_u8_n8_att8_sw8_b32",
    ]
    assert "autocast bf16" in (tmp_path / f"{stem}.md").read_text()


def test_hf_eager_attention_is_not_converted():
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    model = transformers.GPT2LMHeadModel(config).train()
    model.config._attn_implementation = "eager"  # what attn_implementation="eager" sets
    prune_activations_(model, PruneConfig.preset("transformer"))
    assert type(model.transformer.h[0].attn).__name__ == "GPT2Attention"


@pytest.mark.parametrize("model", ["llama_tiny", "gpt_tiny"])
def test_transformer_conversion_round_trip(model):
    w = build_workload(model, seq_len=16, depth=1)
    classes = [type(m) for m in w.model.modules()]
    keys = list(w.model.state_dict())
    converted = prune_activations_(w.model, PruneConfig.preset("transformer"))
    assert list(converted.state_dict()) == keys
    assert [type(m) for m in restore_dense_(converted).modules()] == classes


@pytest.mark.parametrize("backend", ["numba", "triton"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(7, 33), (64, 64), (1, 5), (9, 1030)])
def test_row_code_kernels_match_the_reference_bit_for_bit(backend, bits, shape):
    pytest.importorskip(backend)
    from actprune.kernels import _module, reference

    fast_kernels = _module(backend)  # Triton: the interpreter on CPU; 1030 columns: two steps

    torch.manual_seed(shape[0])
    x = torch.randn(shape) * 10
    x[0, 0] = 0.5 * 10 / 127 * 3  # near a rounding tie
    if shape[0] > 2:
        x[1] = 0.0
        x[2, 1] = float("nan") if bits == 8 else float("inf")
    ref = reference.encode_row_codes(x, bits)
    fast = fast_kernels.encode_row_codes(x.to(DEVICE), bits)
    fast = fast[0].cpu(), fast[1].cpu()
    assert torch.equal(ref[0], fast[0])
    assert torch.equal(ref[1].isnan(), fast[1].isnan())
    assert torch.equal(ref[1].nan_to_num(), fast[1].nan_to_num())
    cols = shape[1]
    permuted = torch.randn(2, 7, 3, 16).transpose(1, 2)  # attention's q: a view, rows (b, h, t)
    want = reference.encode_row_codes(permuted, bits)
    got = fast_kernels.encode_row_codes(permuted.to(DEVICE), bits)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want))
    for dtype in (torch.float32, torch.float16) if backend == "triton" else (torch.float32,):
        codes = [t.to(DEVICE) for t in ref]
        decoded = fast_kernels.decode_row_codes(*codes, cols, dtype, bits).cpu()
        expected = reference.decode_row_codes(*ref, cols, dtype, bits)
        assert torch.equal(decoded.isnan(), expected.isnan())
        assert torch.equal(decoded.nan_to_num(), expected.nan_to_num())
