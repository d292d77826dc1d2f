"""Data-parallel training with pruned layers: two CPU processes over gloo."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from actprune import PruneConfig, models, prune_activations_

WORLD, GLOBAL_BATCH = 2, 16


def make_model():
    torch.manual_seed(0)
    model = models.create("resmlp_tiny", width=32, depth=2)
    return prune_activations_(model, PruneConfig(0.5, 16), exclude="head")


def global_batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 1, 28, 28, generator=gen), torch.randint(
        0, 10, (16,), generator=gen
    )


def _worker(rank, init_file, out_dir, wrapper):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    model = make_model()
    if wrapper == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    else:  # FSDP2: every block sharded, then the root
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
    x, y = global_batch()
    loss = F.cross_entropy(wrapped(x[rank::WORLD]), y[rank::WORLD], reduction="sum")
    (loss * WORLD / GLOBAL_BATCH).backward()
    grads = {
        n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        for n, p in model.named_parameters()
    }
    torch.save(grads, os.path.join(out_dir, f"grads_{rank}.pt"))
    dist.barrier()
    # Leave without Python's teardown: freeing DDP's reducer after the gradients joins gloo's
    # worker thread while holding the GIL, and that thread can be waiting for the GIL to free a
    # finished allreduce (a deadlock in torch, seen once in this suite: the test hung).
    os._exit(0)


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_two_process_gradients_match_each_other_and_one_process(tmp_path, wrapper):
    args = (str(tmp_path / "init"), str(tmp_path), wrapper)
    mp.spawn(_worker, args=args, nprocs=WORLD, join=True)
    g0 = torch.load(tmp_path / "grads_0.pt")
    g1 = torch.load(tmp_path / "grads_1.pt")
    assert all(torch.equal(g0[n], g1[n]) for n in g0)  # every rank holds the same gradient
    # one process, same global batch, each rank's share compressed as that rank did
    model = make_model()
    x, y = global_batch()
    for rank in range(WORLD):
        loss = F.cross_entropy(model(x[rank::WORLD]), y[rank::WORLD], reduction="sum")
        (loss / GLOBAL_BATCH).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(g0[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_torchrun_train(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "actprune", "train", "--dataset", "synthetic", "--image-size", "28", "--width",
           "32", "--depth", "2", "--train-subset", "64", "--test-subset", "32", "--batch-size",
           "16", "--epochs", "2", "--sparsity", "0.9", "--block-size", "16", "--no-progress",
           "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and len(summary["history"]) == 2
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # written once, by rank 0
