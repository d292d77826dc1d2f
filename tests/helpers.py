"""Independent references for the tests: plain Python loops over blocks, small sizes only."""

from __future__ import annotations

import math

import torch


def naive_scores(x: torch.Tensor, block: tuple[int, int], criterion: str) -> torch.Tensor:
    bm, bk = block
    n_br, n_bc = math.ceil(x.shape[0] / bm), math.ceil(x.shape[1] / bk)
    out = torch.empty(n_br, n_bc, dtype=torch.float64)
    for i in range(n_br):
        for j in range(n_bc):
            b = x[i * bm : (i + 1) * bm, j * bk : (j + 1) * bk].double()
            if not torch.isfinite(b).all():
                out[i, j] = math.inf
            elif criterion == "l2":
                out[i, j] = b.pow(2).sum().sqrt()
            elif criterion == "l1":
                out[i, j] = b.abs().sum()
            else:
                out[i, j] = b.abs().max()
    return out


def naive_mask(
    x: torch.Tensor,
    sparsity: float,
    block: tuple[int, int],
    criterion: str,
    selection: str = "column",
):
    """Element mask of the top-k blocks of each block-column ("column") or of the whole grid
    ("global"); ties go to the earlier block in row-major order."""
    scores = naive_scores(x, block, criterion)
    n_br, n_bc = scores.shape
    groups = (
        [[(r, c) for r in range(n_br)] for c in range(n_bc)]
        if selection == "column"
        else [[(r, c) for r in range(n_br) for c in range(n_bc)]]
    )
    block_mask = torch.zeros(n_br, n_bc, dtype=torch.bool)
    for group in groups:
        k = math.ceil(round((1 - sparsity) * len(group), 9))
        ranked = sorted(group, key=lambda rc: (-scores[rc].item(), rc))
        for rc in ranked[:k]:
            block_mask[rc] = True
    elem = block_mask.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return block_mask, elem[: x.shape[0], : x.shape[1]]
