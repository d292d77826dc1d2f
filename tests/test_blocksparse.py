import math

import pytest
import torch
from helpers import naive_mask, naive_scores

from actprune import BlockSparse, PruneConfig, compress, select_blocks
from actprune.kernels import reference
from actprune.storage import LowBitBlocks


@pytest.mark.parametrize("selection", ["column", "global"])
@pytest.mark.parametrize("criterion", ["l2", "l1", "max"])
@pytest.mark.parametrize(
    "shape, block, sparsity",
    [
        ((64, 64), (16, 16), 0.5),
        ((100, 70), (16, 16), 0.8),
        ((37, 53), (8, 12), 0.9),
        ((5, 3), (8, 8), 0.5),
        ((96, 40), (32, 8), 0.0),
        ((33, 65), (32, 32), 0.7),
    ],
)
def test_keeps_exactly_the_top_k_blocks(shape, block, sparsity, criterion, selection):
    x = torch.randn(*shape)
    packed = compress(x, PruneConfig(sparsity, block, criterion, selection=selection))
    block_mask, elem_mask = naive_mask(x, sparsity, block, criterion, selection)
    n_br, n_bc = block_mask.shape
    if selection == "column":
        assert packed.nnz_blocks == n_bc * math.ceil(round((1 - sparsity) * n_br, 9))
        per_column = packed.ccol_indices[1:] - packed.ccol_indices[:-1]
        assert torch.all(per_column == per_column[0])
    else:
        assert packed.nnz_blocks == math.ceil(round((1 - sparsity) * n_br * n_bc, 9))
    assert torch.equal(packed.block_mask(), block_mask)
    dense = packed.to_dense()
    assert dense.shape == x.shape and dense.dtype == x.dtype
    assert torch.equal(dense, x * elem_mask)  # exact values; padding never shows


@pytest.mark.parametrize("criterion", ["l2", "l1", "max"])
def test_scores_match_definition(criterion):
    x = torch.randn(45, 70, dtype=torch.float16)
    got = reference.block_scores(x, (16, 32), criterion)
    assert torch.allclose(got.double(), naive_scores(x, (16, 32), criterion), rtol=1e-5)


def test_storage_layout_is_bsc_with_int32_indices():
    x = torch.randn(64, 96)
    p = compress(x, PruneConfig(0.5, 16))
    assert p.values.shape == (p.nnz_blocks, 16, 16)
    assert p.row_indices.dtype == torch.int32 and p.ccol_indices.dtype == torch.int32
    assert p.ccol_indices.shape == (p.grid_shape[1] + 1,)
    assert p.ccol_indices[0] == 0 and p.ccol_indices[-1] == p.nnz_blocks
    cols = p.col_indices().long()
    key = cols * p.grid_shape[0] + p.row_indices.long()
    assert torch.all(key[1:] > key[:-1])  # column-major, strictly increasing
    xb = x.view(4, 16, 6, 16)
    for b in range(p.nnz_blocks):
        assert torch.equal(p.values[b], xb[p.row_indices[b], :, cols[b], :])


def test_nbytes_counts_every_tensor_including_edge_padding():
    p = compress(torch.randn(40, 40), PruneConfig(0.0, 32))  # 2×2 grid, three blocks partial
    assert p.nnz_blocks == 4
    assert p.nbytes == 4 * 32 * 32 * 4 + 4 * 4 + 3 * 4
    assert p.density == 1.0


def test_ties_are_broken_by_row_major_position():
    x = torch.ones(32, 32)  # 16 equal blocks of 8×8
    p = compress(x, PruneConfig(0.75, 8))
    # first four in row-major order: the whole first block-row
    assert p.block_mask()[0, :].all() and p.block_mask().sum() == 4
    again = compress(x, PruneConfig(0.75, 8))
    assert torch.equal(p.row_indices, again.row_indices)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_blocks_rank_first_and_are_kept(bad):
    x = torch.randn(64, 64) * 100
    x[40, 3] = bad  # a block that would otherwise be tiny
    x[32:48, 0:16] = 0
    x[40, 3] = bad
    p = compress(x, PruneConfig(0.9, 16))
    assert p.block_mask()[2, 0]
    dense = p.to_dense()
    assert (dense[40, 3] == bad) or (math.isnan(bad) and math.isnan(dense[40, 3]))


def test_select_blocks_is_stable_and_sorted():
    scores = torch.tensor([[1.0, 3.0, 3.0], [2.0, 3.0, 0.5]])
    rows, cols, ccol = select_blocks(scores, 2)
    # three blocks score 3; row-major ids (0,1)=1, (0,2)=2, (1,1)=4: the first two win
    assert rows.tolist() == [0, 0] and cols.tolist() == [1, 2]
    assert ccol.tolist() == [0, 0, 1, 2]
    rows, cols, ccol = select_blocks(scores, 4)  # all three 3s, then the 2 at (1,0)
    assert rows.tolist() == [1, 0, 1, 0] and cols.tolist() == [0, 1, 1, 2]
    assert ccol.tolist() == [0, 1, 3, 4]
    rows, cols, ccol = select_blocks(scores, 1, per_column=True)  # the tie in column 1: row 0
    assert rows.tolist() == [1, 0, 0] and cols.tolist() == [0, 1, 2]
    assert ccol.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_blocks_round_within_half_a_step(dtype):
    x = (torch.randn(96, 80) * torch.logspace(-3, 2, 80)).to(
        dtype
    )  # columns of very different size
    exact = compress(x, PruneConfig(0.5, 16))
    q = compress(x, PruneConfig(0.5, 16, int8=True))
    assert q.values.dtype == torch.int8 and q.scales.dtype == torch.float32
    assert torch.equal(q.block_mask(), exact.block_mask())  # selection is unchanged
    step = q.scales.view(-1, 1, 1)
    err = (q.dequantized(torch.float32).values - exact.values.float()).abs()
    assert torch.all(err <= step / 2 * (1 + 1e-5))
    nnz, bm, bk = q.values.shape
    assert q.nbytes == nnz * bm * bk + 4 * nnz + 4 * nnz + 4 * (q.grid_shape[1] + 1)
    assert q.to_dense().dtype == torch.float32


def test_to_sparse_bsr_round_trip_and_error():
    x = torch.randn(64, 96)
    p = compress(x, PruneConfig(0.6, (16, 32)))
    bsr = p.to_sparse_bsr()
    assert bsr.layout == torch.sparse_bsr
    assert torch.equal(bsr.to_dense(), p.to_dense())
    with pytest.raises(ValueError, match="divisible"):
        compress(torch.randn(30, 30), PruneConfig(0.5, 16)).to_sparse_bsr()


def test_constructor_round_trip_from_tensors():
    p = compress(torch.randn(50, 20), PruneConfig(0.5, 8))
    q = BlockSparse(*p.tensors, shape=p.shape)
    assert torch.equal(q.to_dense(), p.to_dense())


@pytest.mark.parametrize(
    "x, err, match",
    [
        (torch.randn(4, 4, 4), ValueError, "2-D"),
        (torch.randn(8), ValueError, "2-D"),
        (torch.ones(4, 4, dtype=torch.int64), ValueError, "floating-point"),
        (torch.randn(0, 4), ValueError, "non-empty"),
        ([[1.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs(x, err, match):
    with pytest.raises(err, match=match):
        compress(x, PruneConfig(0.5, 2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_are_kept(dtype):
    x = torch.randn(48, 40).to(dtype)
    p = compress(x, PruneConfig(0.5, 16))
    assert p.dtype == dtype
    _, elem = naive_mask(x, 0.5, (16, 16), "l2")
    assert torch.equal(p.to_dense(), x * elem)


def test_non_contiguous_input():
    x = torch.randn(80, 64).t()
    p = compress(x, PruneConfig(0.5, 16))
    _, elem = naive_mask(x, 0.5, (16, 16), "l2")
    assert torch.equal(p.to_dense(), x * elem)


def test_selection_without_nonzero_static(monkeypatch):
    """CUDA before torch 2.6 lacks nonzero_static; the fallback must select the same blocks."""
    x = torch.randn(70, 90)
    want = compress(x, PruneConfig(0.7, 16))

    def missing(*args, **kwargs):
        raise NotImplementedError("aten::nonzero_static: no kernel for this backend")

    monkeypatch.setattr(torch, "nonzero_static", missing)
    got = compress(x, PruneConfig(0.7, 16))
    assert torch.equal(got.row_indices, want.row_indices)
    assert torch.equal(got.ccol_indices, want.ccol_indices)


@pytest.mark.parametrize("bits, sparsity", [(1, 0.75), (2, 0.75), (4, 0.75), (8, 0.75), (4, 1.0)])
def test_low_bit_remainder_is_unbiased_and_within_one_level(bits, sparsity):
    torch.manual_seed(0)
    x = torch.randn(40, 56) * torch.linspace(0.1, 3, 56)
    config = PruneConfig(sparsity, 8, remainder_bits=bits)
    p = compress(x, config)
    dense = p.to_dense()
    kept = p.block_mask().repeat_interleave(8, 0).repeat_interleave(8, 1)[:40, :56]
    assert torch.equal(dense[kept], x[kept])  # kept blocks exact
    scales = p.remainder.scales.repeat_interleave(8, 0).repeat_interleave(8, 1)[:40, :56]
    spacing = 2 * scales / ((1 << bits) - 1)
    assert torch.all((dense - x).abs()[~kept] <= spacing[~kept] * (1 + 1e-5))
    mean = sum(compress(x, config).to_dense() for _ in range(400)) / 400
    assert torch.all((mean - x).abs()[~kept] <= 0.25 * spacing[~kept])  # stochastic rounding
    n_br, n_bc = p.grid_shape
    code_bytes = math.ceil(n_br * 8 * n_bc * 8 * bits / 8)
    values = p.values.numel() * 4 + p.row_indices.numel() * 4 + (n_bc + 1) * 4
    assert p.nnz_blocks == (0 if sparsity == 1 else n_bc * 2)  # uniform keeps no block
    assert p.nbytes == values + code_bytes + 4 * n_br * n_bc
    with pytest.raises(ValueError, match="not sparse"):
        p.to_sparse_bsr()


@pytest.mark.parametrize(("bits", "low", "high"), [(1, 9.0, 13.0), (2, 0.8, 1.0), (4, 0.03, 0.045)])
def test_remainder_rounding_noise_matches_the_documented_figures(bits, low, high):
    # docs/design.md "Remainder": noise energy / signal energy on a Gaussian tensor of 32x32
    # blocks is 11.1 (1 bit), 0.91 (2 bits), 0.036 (4 bits); 4 bits is the CLI default.
    torch.manual_seed(0)
    x = torch.randn(1024, 384)
    coded = LowBitBlocks(*reference.low_bit_code(x, (32, 32), bits, key=7), bits)
    decoded = coded.decode((32, 32), x.dtype)
    ratio = (decoded.reshape(x.shape) - x).pow(2).sum() / x.pow(2).sum()
    assert low < ratio < high


def test_tie_slots_go_to_the_first_blocks_but_the_top_score_is_always_kept():
    rows, cols, ccol = select_blocks(torch.tensor([[1.0, 1.0, 1.0, 5.0]]), 2)
    assert list(zip(rows.tolist(), cols.tolist())) == [(0, 0), (0, 3)]  # 5 kept, then one tie
    assert ccol.tolist() == [0, 1, 1, 1, 2]


@pytest.mark.parametrize("selection", ["column", "global"])
def test_a_zero_tensor_keeps_its_only_non_zero_block_even_when_last(selection):
    x = torch.zeros(320, 64)
    x[-32:, -32:] = 1e-3  # the very last block, small
    packed = compress(x, PruneConfig(0.9, 32, selection=selection))
    assert torch.equal(packed.to_dense(), x)
