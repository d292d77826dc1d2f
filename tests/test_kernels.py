"""Triton kernels against the PyTorch reference (interpreter on CPU, native on CUDA)."""

import pytest
import torch
from conftest import DEVICE

from actprune import PruneConfig, compress, kernels, select_blocks
from actprune.kernels import reference

triton_blocks = pytest.importorskip("actprune.kernels.triton_blocks", reason="triton not installed")

DTYPES = [torch.float32, torch.float16]  # the interpreter computes bf16 wrongly
CASES = [  # (M, K, N, block): awkward shapes exercise every mask
    (64, 64, 32, (16, 16)),
    (70, 45, 23, (16, 16)),
    (33, 100, 17, (32, 32)),
    (40, 24, 20, (8, 8)),
    (50, 36, 16, (24, 12)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("criterion", ["l2", "l1", "max"])
@pytest.mark.parametrize("m, k, n, block", CASES)
def test_block_scores(m, k, n, block, criterion, dtype):
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    x[1, 2] = float("nan")
    got = triton_blocks.block_scores(x, block, criterion)
    want = reference.block_scores(x, block, criterion)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got[0, 0] == float("inf")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, k, n, block", CASES)
def test_pack_blocks(m, k, n, block, dtype):
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    scores = reference.block_scores(x, block, "l2")
    rows, cols, _ = select_blocks(scores, max(1, scores.numel() // 2))
    got = triton_blocks.pack_blocks(x, rows, cols, block)
    want = reference.pack_blocks(x, rows, cols, block)
    assert torch.equal(got, want)  # a copy: bit-exact, padding zero


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.6])
@pytest.mark.parametrize("m, k, n, block", CASES)
def test_weight_grad(m, k, n, block, sparsity, dtype):
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    dy = torch.randn(m, n, device=DEVICE).to(dtype)
    packed = compress(x, PruneConfig(sparsity, block))
    got = triton_blocks.weight_grad(dy, packed)
    want = dy.double().t() @ packed.to_dense().double()
    assert got.dtype == dtype and got.shape == (n, k)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("selection", ["column", "global"])
@pytest.mark.parametrize("m, k, n, block", CASES)
def test_channel_scale_grad(m, k, n, block, selection, dtype):
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    dy = torch.randn(m, k, device=DEVICE).to(dtype)
    packed = compress(x, PruneConfig(0.6, block, selection=selection))
    # The reference first, then the kernel, then a check that the kernel wrote nothing but its
    # output: this test once failed with the reference wrong in every element and never again
    # (docs/reliability.md, item 29); if it recurs, these say which side went wrong.
    want = (dy.double() * packed.to_dense().double()).sum(0)
    ref = reference.channel_scale_grad(dy, packed)
    inputs = [t.clone() for t in (dy, *packed.tensors)]
    got = triton_blocks.channel_scale_grad(dy, packed)
    assert all(torch.equal(a, b) for a, b in zip(inputs, (dy, *packed.tensors)))
    assert got.dtype == dtype and got.shape == (k,)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * 4)
    torch.testing.assert_close(ref.double(), want, rtol=tol, atol=tol * 4)


@pytest.mark.parametrize("block, sparsity", [((32, 32), 0.95), ((16, 16), 0.5), ((8, 24), 0.9)])
def test_reference_weight_grad_both_paths(block, sparsity):
    x = torch.randn(300, 200)
    dy = torch.randn(300, 50)
    packed = compress(x, PruneConfig(sparsity, block))
    want = dy.double().t() @ packed.to_dense().double()
    for got in (reference._weight_grad_by_blocks(dy, packed), dy.t() @ packed.to_dense()):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(
        reference.weight_grad(dy, packed).double(), want, rtol=1e-5, atol=1e-4
    )


def test_block_path_chunks_keep_result():
    x, dy = torch.randn(256, 40), torch.randn(256, 500)  # wide dy: many small chunks
    packed = compress(x, PruneConfig(0.5, 32))
    torch.testing.assert_close(
        reference._weight_grad_by_blocks(dy, packed),
        dy.t() @ packed.to_dense(),
        atol=1e-4,
        rtol=1e-5,
    )


def test_dispatch(monkeypatch):
    cpu = torch.zeros(1)
    assert kernels.backend_for(cpu) == "torch"
    monkeypatch.setenv("ACTPRUNE_KERNELS", "triton")
    assert kernels.backend_for(cpu) == "triton"
    monkeypatch.setenv("ACTPRUNE_KERNELS", "cuda")
    with pytest.raises(ValueError, match="ACTPRUNE_KERNELS"):
        kernels.backend_for(cpu)


def test_compress_through_triton_dispatch_matches_torch(monkeypatch):
    x = torch.randn(70, 90, device=DEVICE)
    want = compress(x, PruneConfig(0.7, 16, "l1"))
    monkeypatch.setenv("ACTPRUNE_KERNELS", "triton")
    got = compress(x, PruneConfig(0.7, 16, "l1"))
    assert torch.equal(got.row_indices, want.row_indices)
    assert torch.equal(got.ccol_indices, want.ccol_indices)
    assert torch.equal(got.values, want.values)


def test_pruned_linear_backward_through_triton(monkeypatch):
    from actprune import PrunedLinear

    layer = PrunedLinear(40, 24, config=PruneConfig(0.5, 16), device=DEVICE)
    x, dy = torch.randn(3, 20, 40, device=DEVICE), torch.randn(3, 20, 24, device=DEVICE)
    layer(x).backward(dy)
    want = layer.weight.grad.clone()
    layer.weight.grad = None
    monkeypatch.setenv("ACTPRUNE_KERNELS", "triton")
    layer(x).backward(dy)
    torch.testing.assert_close(layer.weight.grad, want, rtol=1e-4, atol=1e-4)
