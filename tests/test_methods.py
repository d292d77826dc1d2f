"""The ways to train (``actprune.methods``): checkpointing variants, selective checkpointing,
uniform quantization and compositions; and the planner's ranking of them (``actprune.plan``)."""

import json

import pytest
import torch
import torch.nn.functional as F

from actprune import PruneConfig, models
from actprune.cli import main
from actprune.layers import CompressedLayer
from actprune.methods import Checkpointed, MemoryConfig, apply_method, frontier_methods
from actprune.plan import PlanRow, accuracy_delta, accuracy_deltas, rank, step_time_ratios

RECOMMENDED = PruneConfig.preset("recommended")


def _model_and_grads(config):
    torch.manual_seed(0)
    model = apply_method(models.create("resmlp_tiny", depth=4), config)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    F.cross_entropy(model(x), y).backward()
    return model, [p.grad for p in model.parameters()]


def _compressed_layers(module):
    return sum(isinstance(m, CompressedLayer) for m in module.modules())


@pytest.mark.parametrize("config", [MemoryConfig.checkpointing(2), MemoryConfig.checkpointing(
    selective=True)], ids=lambda c: c.name)  # fmt: skip
def test_checkpointing_variants_are_exact(config):
    dense_grads = _model_and_grads(MemoryConfig.dense())[1]
    model, grads = _model_and_grads(config)
    for got, want in zip(grads, dense_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # recompute: same math
    wrapped = [isinstance(b, Checkpointed) for b in model.blocks]
    assert wrapped == ([True, False, True, False] if config.every == 2 else [True] * 4)


def test_composition_compresses_the_blocks_it_does_not_checkpoint():
    model, _ = _model_and_grads(MemoryConfig.composition(RECOMMENDED, every=2))
    ckpt = [b for b in model.blocks if isinstance(b, Checkpointed)]
    rest = [b for b in model.blocks if not isinstance(b, Checkpointed)]
    assert len(ckpt) == len(rest) == 2
    assert all(_compressed_layers(b) == 0 for b in ckpt)
    assert all(_compressed_layers(b) > 0 for b in rest)
    inside, _ = _model_and_grads(MemoryConfig.composition(RECOMMENDED, every=1, inside=True))
    assert all(isinstance(b, Checkpointed) and _compressed_layers(b) > 0 for b in inside.blocks)


def test_families_names_and_validation():
    names = {c.name: c.family for c in frontier_methods()}
    assert names["checkpoint_every4"] == "checkpoint" and names["selective"] == "selective"
    assert names["actprune_all_u2_b32"] == "uniform"
    assert names["actprune_all_r4_s0.9_b32"] == "actprune"
    assert names["checkpoint_every2+all_r4_s0.9_b32"] == "composition"
    assert names["checkpoint+inside_all_r4_s0.9_b32"] == "composition"
    assert MemoryConfig.unstructured(0.9).family == "unstructured"
    with pytest.raises(ValueError, match="checkpoint must be one of"):
        MemoryConfig("x", checkpoint="some")
    with pytest.raises(ValueError, match="every must be a positive int"):
        MemoryConfig("x", checkpoint="full", every=0)
    with pytest.raises(ValueError, match="compress_checkpointed needs a PruneConfig"):
        MemoryConfig("x", checkpoint="full", compress_checkpointed=True)


def _row(name, fits, ratio, peak=1, batch=8, delta=0.0):
    return PlanRow(MemoryConfig(name), peak, fits, batch, ratio, delta)


def test_rank_puts_the_fastest_fitting_that_keeps_accuracy_first():
    rows = [
        _row("slow", True, 1.4),
        _row("too_big", False, 0.9, batch=100),
        _row("unmeasured", True, None),
        _row("fast", True, 1.05, peak=5),
        _row("fast_small", True, 1.05, peak=3, delta=-0.3),  # at the tolerance: kept
        _row("fastest_lossy", True, 0.9, delta=-1.6),
        _row("accuracy_unknown", True, 0.95, delta=None),
        _row("too_big_2", False, 1.0, batch=200),
    ]
    order = [r.config.name for r in rank(rows, tolerance=0.3)]
    assert order == ["fast_small", "fast", "slow", "unmeasured", "fastest_lossy",
                     "accuracy_unknown", "too_big_2", "too_big"]  # fmt: skip
    assert rank(rows, tolerance=2)[0].config.name == "fastest_lossy"


def test_accuracy_of_exact_methods_and_compositions():
    measured = {"actprune_all_r4_s0.9_b32": -0.2, "actprune_all_u2_b32": -1.0}
    by_name = {c.name: accuracy_delta(c, measured) for c in frontier_methods()}
    assert by_name["checkpoint_every2"] == by_name["selective"] == by_name["dense"] == 0.0
    assert by_name["checkpoint_every2+all_r4_s0.9_b32"] == -0.2  # as its compression alone
    assert by_name["actprune_all_u2_b32"] == -1.0 and by_name["actprune_all_u8_b32"] is None


def test_accuracy_deltas_take_the_longest_schedule_and_the_worst_seed(tmp_path):
    path = tmp_path / "frontier.json"
    delta = {"3ep_seed0": -0.1, "10ep_seed0": -0.2, "10ep_seed1": -0.4}
    path.write_text(json.dumps({"accuracy_task": "t", "accuracy": [{"name": "a", "delta": delta}]}))
    assert accuracy_deltas(path) == ({"a": -0.4}, f"{path}: t")
    assert "actprune_all_r4_s0.9_b32" in accuracy_deltas()[0]  # the packaged runs
    path.write_text("[]")
    with pytest.raises(ValueError, match="not a benchmarks/frontier.py JSON"):
        accuracy_deltas(path)


def test_step_time_ratios_read_a_step_time_json(tmp_path):
    ratios, source = step_time_ratios()  # the packaged run
    assert ratios["dense"] == 1.0 and {c.name for c in frontier_methods()} <= set(ratios)
    assert "resmlp_s24" in source
    path = tmp_path / "st.json"
    rows = [{"config": "dense", "ratio": 1.0}, {"config": "x", "ratio": 1.5}]
    path.write_text(json.dumps({"model": "m", "rows": rows}))
    assert step_time_ratios(path)[0] == {"dense": 1.0, "x": 1.5}
    path.write_text("{}")
    with pytest.raises(ValueError, match="not a benchmarks/step_time.py JSON"):
        step_time_ratios(path)
    with pytest.raises(ValueError, match="cannot read step times"):
        step_time_ratios(tmp_path / "missing.json")


def test_cli_plan_ranks_by_accuracy_kept_then_step_time(capsys, tmp_path):
    path, accuracy = tmp_path / "st.json", tmp_path / "frontier.json"
    ratios = {"dense": 1.0, "checkpoint": 1.3, "actprune_all_u4_b32": 1.1, "actprune_all_u2_b32": 1}
    path.write_text(json.dumps({"rows": [{"config": k, "ratio": v} for k, v in ratios.items()]}))
    deltas = [{"name": "actprune_all_u4_b32", "delta": {"3ep_seed0": -0.2}},
              {"name": "actprune_all_u2_b32", "delta": {"3ep_seed0": -0.9}}]  # fmt: skip
    accuracy.write_text(json.dumps({"accuracy": deltas}))
    names = ["dense", "checkpoint", "actprune_all_u4_b32", "actprune_all_u2_b32", "selective"]
    argv = ["plan", "--model", "resmlp_tiny", "--image-size", "28", "--device", "cpu",
            "--batch-size", "64", "--max-batch", "512", "--step-times", str(path),
            "--accuracy", str(accuracy), "--configs", *names]  # fmt: skip
    assert main([*argv, "--memory", "30MiB"]) == 0  # dense needs 37 MiB at batch 64
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| ") and "rank" not in line]
    assert [line.split(" | ")[1] for line in table][:3] == [
        "actprune_all_u4_b32",  # fits, keeps accuracy, fastest measured
        "checkpoint",
        "selective",  # fits, exact, step time not measured here
    ]  # fmt: skip
    # u2 is faster but loses 0.9 points
    assert ("Fastest that fits batch 64 within 0.3 point of dense accuracy: actprune_all_u4_b32 "
            "(step × 1.10 dense") in out  # fmt: skip
    assert "| actprune_all_u2_b32 | uniform |" in out and "| 1.00 | -0.90 |" in out
    assert main([*argv, "--memory", "1MiB"]) == 0  # nothing fits: said, not an error
    assert "No measured configuration fits batch 64 in 1MiB" in capsys.readouterr().out


def test_uniform_quantization_trains_like_any_config():
    model, grads = _model_and_grads(MemoryConfig.actprune(PruneConfig.preset("uniform")))
    dense = _model_and_grads(MemoryConfig.dense())[1]
    flat = torch.cat([g.flatten() for g in grads])
    want = torch.cat([g.flatten() for g in dense])
    assert F.cosine_similarity(flat, want, dim=0) > 0.99
    assert all(m.prune_config.uniform for m in model.modules() if isinstance(m, CompressedLayer))
