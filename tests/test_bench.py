import json

import torch
from torch import nn

from actprune import PruneConfig, SavedTensorLog
from actprune.bench.kernels import linear_shapes, measure_kernels, write_results
from actprune.bench.memory import run_memory_bench, write_memory_results
from actprune.cli import main
from actprune.methods import MemoryConfig, methods


def test_bytes_by_kind_attributes_to_innermost_module():
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    x = torch.randn(10, 8, requires_grad=True)
    with SavedTensorLog(by_kind=True) as log:
        out = model(x)
    kinds = log.bytes_by_kind()
    # linear: fc1's input x and fc2's input (the GELU output); gelu: its own input (fc1's output)
    assert kinds == {"linear": 10 * 8 * 4 + 10 * 16 * 4, "gelu": 10 * 16 * 4}
    assert sum(kinds.values()) == log.live_bytes()
    del out


def test_methods_list_dense_baselines_then_each_config():
    prunes = [PruneConfig(s, 32, scope=scope) for scope in ("linear", "all") for s in (0.9, 0.5)]
    names = [c.name for c in methods(prunes)]
    assert names == [
        "dense",
        "checkpoint",
        "unstructured_s0.9",
        "unstructured_s0.5",
        "actprune_s0.9_b32",
        "actprune_s0.5_b32",
        "actprune_all_s0.9_b32",
        "actprune_all_s0.5_b32",
    ]
    only = methods([PruneConfig(0.9, 32, scope="all", int8=True, remainder_bits=2)], ["checkpoint"])
    assert [c.name for c in only] == ["dense", "checkpoint", "actprune_all_int8_r2_s0.9_b32"]
    assert only[-1].prune == PruneConfig(0.9, 32, scope="all", int8=True, remainder_bits=2)
    assert methods([], []) == [MemoryConfig.dense()]


def test_memory_bench_small(tmp_path):
    configs = [
        MemoryConfig.dense(),
        MemoryConfig.checkpointing(),
        MemoryConfig.unstructured(0.9),
        MemoryConfig.actprune(PruneConfig(0.9, 16)),
        MemoryConfig("all", PruneConfig(0.9, 16, scope="all")),
    ]
    rows = run_memory_bench("resmlp_tiny", 32, configs, image_size=28, timing_steps=1)
    by = {r.config.name: r for r in rows}
    assert by["dense"].ratios == {"saved": 1.0, "peak": 1.0, "step_time": 1.0}
    assert by["checkpoint"].saved_bytes < by["dense"].saved_bytes
    pruned = by["actprune_s0.9_b16"]
    assert pruned.saved_by_kind["linear"] < 0.2 * by["dense"].saved_by_kind["linear"]
    assert pruned.saved_by_kind["gelu"] == by["dense"].saved_by_kind["gelu"]  # untouched
    every = by["all"]  # GELU input: a 2-bit code, 1/16 of fp32, + 1 bit per row (non-finite)
    gelu_rows = 4 * 32 * 16  # 4 blocks × batch 32 × 16 patches, one bit each
    want = by["dense"].saved_by_kind["gelu"] // 16 + gelu_rows // 8
    assert every.saved_by_kind["gelu"] == want
    assert every.saved_bytes < 0.2 * by["dense"].saved_bytes
    for r in rows:
        assert sum(r.saved_by_kind.values()) == r.saved_bytes
    setup = {"model": "resmlp_tiny", "input": "28px", "batch": 32, "device": "cpu"}
    md = write_memory_results(rows, tmp_path, "mem", "test", setup)
    assert "| actprune_s0.9_b16 |" in md and (tmp_path / "mem.png").stat().st_size > 0
    assert len(json.loads((tmp_path / "mem.json").read_text())["rows"]) == 5


def test_linear_shapes_of_resmlp_s24():
    assert linear_shapes("resmlp_s24", 8, 224) == [
        (8, 384, 196, 196),  # the token mixer reads channels as rows
        (8, 196, 384, 1536),
        (8, 196, 1536, 384),
        (1, 8, 384, 1000),  # the head's input is 2-D
    ]


def test_kernel_bench_small(tmp_path):
    configs = [PruneConfig(0.5, 16), PruneConfig(0.5, 16, remainder_bits=4)]
    rows = measure_kernels([(1, 64, 64, 32), (2, 20, 30, 20)], configs, repeats=1)
    assert len(rows) == 4 and rows[0].bsr_dw_ms is not None  # divisible: torch.sparse has it
    assert rows[1].bsr_dw_ms is None and rows[2].bsr_dw_ms is None  # remainder / not divisible
    assert all(0 < r.compress_of_copy for r in rows) and rows[2].m == 40
    md = write_results(rows, "cpu", tmp_path, "k", "test")
    assert "1×64×64 → 32" in md and "2×20×30 → 20" in md and (tmp_path / "k.json").is_file()


def test_cli_bench_and_plan(tmp_path, capsys):
    common = [
        "--model",
        "resmlp_tiny",
        "--image-size",
        "28",
        "--batch-size",
        "16",
        "--out",
        str(tmp_path),
    ]
    assert (
        main(
            [
                "bench",
                "memory",
                *common,
                "--sparsity",
                "0.9",
                "--block-size",
                "16",
                "--timing-steps",
                "1",
            ]
        )
        == 0
    )
    assert (tmp_path / "memory_resmlp_tiny_28px_b16_cpu.md").is_file()
    assert (
        main(
            [
                "bench",
                "kernels",
                *common,
                "--sparsity",
                "0.9",
                "--block-size",
                "16",
                "--repeats",
                "1",
            ]
        )
        == 0
    )
    assert (tmp_path / "kernels_resmlp_tiny_b16_cpu_float32.json").is_file()
    assert (
        main(
            [
                "plan",
                "--model",
                "resmlp_tiny",
                "--image-size",
                "28",
                "--batch-size",
                "64",
                "--memory",
                "100MiB",
                "--device",
                "cpu",
                "--max-batch",
                "4096",
                "--configs",
                "dense",
                "actprune_all_r4_s0.9_b32",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| dense |" in out and "| actprune_all_r4_s0.9_b32 |" in out
    assert main(["plan", "--memory", "lots"]) == 2
    assert "memory size" in capsys.readouterr().err
    assert main(["plan", "--configs", "dense", "nope"]) == 2
    assert "--configs: unknown nope; available: dense, checkpoint," in capsys.readouterr().err
