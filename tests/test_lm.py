"""The language-model workload: the text corpus, the byte-level GPT, ``compare --task lm`` and
model specs (``workloads``) in ``bench memory`` and ``plan``."""

import json
import zlib

import pytest
import torch

from actprune import (
    PruneConfig,
    describe_compression,
    measure_training_step,
    models,
    prune_activations_,
)
from actprune.bench.memory import run_memory_bench
from actprune.cli import main
from actprune.methods import MemoryConfig, apply_method, methods
from actprune.plan import predict_step
from actprune.text import python_stdlib_corpus
from actprune.workloads import WorkloadError, build_workload

RECOMMENDED = PruneConfig.preset("recommended")
LM_TINY = ["compare", "--task", "lm", "--steps", "4", "--eval-every", "2", "--seq-len", "32",
           "--batch-size", "4", "--eval-windows", "16", "--no-progress"]  # fmt: skip


def test_corpus_split_is_by_file_and_fixed(tmp_path):
    names = [f"m{i}.py" for i in range(200)]
    held_out = {n for n in names if zlib.crc32(n.encode()) % 20 == 0}
    assert 0 < len(held_out) < len(names)
    for n in names:
        (tmp_path / n).write_text(f"# {n}\n")
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "x.py").write_text("left out\n")
    corpus = python_stdlib_corpus(tmp_path)
    val = bytes(corpus.val.tolist()).decode()
    train = bytes(corpus.train.tolist()).decode()
    assert {n for n in names if f"# {n}\n" in val} == held_out
    assert not any(f"# {n}\n" in train for n in held_out) and "left out" not in train
    starts = corpus.fixed_starts(8, 16)
    assert torch.equal(starts, corpus.fixed_starts(8, 16)) and int(starts.max()) + 16 < len(val)
    windows = corpus.windows("val", starts, 16)
    assert windows.shape == (8, 16) and windows.dtype == torch.int64


def test_gpt_converts_and_trains_at_sparsity_0_like_dense():
    torch.manual_seed(0)
    model = models.create("gpt_tiny", width=32, depth=2, heads=2, block_size=16)
    x = torch.randint(0, 256, (2, 16))
    dense = [p.grad for p in _grads(model, x)]
    converted = prune_activations_(model, PruneConfig(0.0, 16), exclude="head")
    rows = {(r["layer"], r["compressed"]): r["count"] for r in describe_compression(converted)}
    assert rows[("Linear", True)] == 2 * 4 and rows[("Linear", False)] == 1  # the head
    assert rows[("CausalSelfAttention", False)] == 2 and rows[("LayerNorm", False)] == 5
    for a, b in zip(dense, [p.grad for p in _grads(converted, x)]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def _grads(model, x):
    for p in model.parameters():
        p.grad = None
    logits = model(x)
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()
    return list(model.parameters())


def test_compare_lm_same_batches_as_dense_and_report(capsys, tmp_path):
    argv = [*LM_TINY, "--out", str(tmp_path), "--sparsity", "0", "0.9", "--scope", "linear",
            "--remainder-bits", "0"]  # fmt: skip
    assert main(argv) == 0
    runs = json.loads((tmp_path / "summary.json").read_text())
    assert [r["run"] for r in runs] == ["dense", "actprune_s0_b32", "actprune_s0.9_b32"]
    dense, exact, pruned = runs
    assert [h["step"] for h in dense["history"]] == [2, 4]
    # sparsity 0 keeps every block: the same weights, batches and gradients as dense
    assert exact["val_loss"] == pytest.approx(dense["val_loss"], rel=1e-4)
    assert pruned["saved_activation_bytes"] < exact["saved_activation_bytes"]
    assert pruned["grad_cosine"]["blocks.0.fc1.weight"] < 1.0
    assert "stdlib" in dense["corpus"] or "standard library" in dense["corpus"]
    report = (tmp_path / "report.md").read_text()
    assert "| actprune_s0.9_b32 |" in report and "CausalSelfAttention" in report
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_compare_lm_with_coded_checkpointing(tmp_path):
    argv = [*LM_TINY, "--model", "llama_tiny", "--out", str(tmp_path), "--preset", "transformer",
            "--boundary-bits", "8"]  # fmt: skip
    assert main(argv) == 0
    dense, coded = json.loads((tmp_path / "summary.json").read_text())
    label = PruneConfig.preset("transformer").label()
    assert coded["run"] == f"checkpoint_coded8+inside_{label}" and coded["config"]["boundary_bits"]
    inside_blocks = {"linear", "swiglu", "rotaryattention", "attention", "silu"}
    assert "checkpointed" in coded["saved_by_kind"]  # the blocks' codes...
    assert not inside_blocks & coded["saved_by_kind"].keys()  # ...and nothing of their insides
    assert inside_blocks & dense["saved_by_kind"].keys()
    assert coded["saved_activation_bytes"] < 0.1 * dense["saved_activation_bytes"]
    assert 0.5 < min(coded["grad_cosine"].values()) < 1.0
    assert (tmp_path / coded["run"] / "summary.json").is_file()
    assert "checkpointed MiB" in (tmp_path / "report.md").read_text()  # kinds dense lacks too


@pytest.mark.parametrize(
    "argv, message",
    [
        ([*LM_TINY, "--epochs", "2"], "--epochs does not apply to --task lm"),
        (["compare", "--boundary-bits", "8"], "--boundary-bits does not apply to --task image"),
        (["compare", "--steps", "5"], "--steps does not apply to --task image"),
        ([*LM_TINY, "--model", "resmlp_tiny"], "--model must be a causal language model"),
        ([*LM_TINY, "--model", "nope"], "unknown model 'nope'"),
    ],
)
def test_compare_lm_bad_flags_one_line(capsys, tmp_path, argv, message):
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_workload_specs():
    work = build_workload("gpt_tiny", seq_len=24, device="meta")
    assert (work.task, work.shape_label, work.classes) == ("causal_lm", "seq24", 256)
    x, y = work.batch(3)
    assert x.shape == (3, 24) and torch.equal(x, y) and torch.equal(x, work.batch(3)[0])
    image = build_workload("resmlp_tiny", image_size=56)
    assert image.shape_label == "56px" and image.batch(2)[0].shape == (2, 1, 56, 56)
    with pytest.raises(WorkloadError, match="unknown model"):
        build_workload("nope")
    with pytest.raises(WorkloadError, match="zoo models only"):
        build_workload("timm:vit_small_patch16_224", depth=2)


def test_bench_memory_and_plan_take_a_language_model(capsys):
    configs = methods([RECOMMENDED], ["checkpoint"])
    rows = run_memory_bench("gpt_tiny", 4, configs, seq_len=64, timing_steps=1, width=64, depth=2)
    by = {r.config.name: r for r in rows}
    default = f"actprune_{RECOMMENDED.label()}"
    assert list(by) == ["dense", "checkpoint", default]
    assert by[default].saved_bytes < 0.8 * by["dense"].saved_bytes
    assert {"linear", "gelu", "causalselfattention", "layernorm"} <= set(by["dense"].saved_by_kind)
    assert main(["plan", "--model", "gpt_tiny", "--seq-len", "16", "--batch-size", "1",
                 "--memory", "1GB", "--device", "cpu", "--max-batch", "1",
                 "--configs", "dense", "checkpoint"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "gpt_tiny, seq16" in out and "| checkpoint |" in out


@pytest.mark.parametrize("config", [MemoryConfig.dense(), MemoryConfig.actprune(RECOMMENDED)],
                         ids=lambda c: c.name)  # fmt: skip
def test_plan_predicts_a_language_model_within_10_percent(config):
    predicted = predict_step("gpt_tiny", 8, config, foreach=False, seq_len=64)
    torch.manual_seed(0)
    work = build_workload("gpt_tiny", seq_len=64)
    model = apply_method(work.model, config)
    batch = work.batch(8)
    opt = torch.optim.AdamW(model.parameters())
    measured = measure_training_step(model, opt, lambda: work.loss(model, batch), batch)
    assert predicted.resident_bytes == measured.resident_bytes
    assert abs(predicted.peak_step_bytes / measured.peak_step_bytes - 1) < 0.10
