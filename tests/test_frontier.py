"""The frontier analysis (``actprune.bench.frontier``): Pareto marks, budgets, accuracy merging."""

import pytest

from actprune.bench.frontier import (
    StepPoint,
    accuracy_points,
    accuracy_table,
    budget_table,
    budget_winners,
    pareto,
    step_points,
)


def test_pareto_marks_exactly_the_undominated_points():
    points = [(1.0, 1.0), (0.5, 2.0), (0.6, 2.5), (2.0, 0.9), (1.0, 1.0), (3.0, 3.0)]
    # (0.6, 2.5) is dominated by (0.5, 2.0); (3, 3) by all; the duplicate (1, 1) pair stays
    assert pareto(points) == [True, True, False, True, True, False]


def _points():
    return [
        StepPoint("dense", "dense", 1.0, 1.0, 1.0),
        StepPoint("checkpoint", "checkpoint", 0.3, 0.05, 1.3),
        StepPoint("selective", "selective", 0.6, 0.05, 1.1),
        StepPoint("actprune_x", "actprune", 0.35, 0.2, 1.02),
        StepPoint("actprune_u2", "uniform", 0.25, 0.1, 1.05),
    ]


def test_budget_winners_compare_with_the_fastest_checkpointing_that_fits():
    winners = {round(b, 3): (best.name, ck.name if ck else None)
               for b, best, ck in budget_winners(_points())}  # fmt: skip
    assert winners == {
        0.25: ("actprune_u2", None),  # only compression fits
        0.3: ("actprune_u2", "checkpoint"),
        0.35: ("actprune_x", "checkpoint"),
        0.6: ("actprune_x", "selective"),
        1.0: ("dense", "dense"),
    }
    table = budget_table(_points())
    assert "| 0.350 | actprune_x | 1.020 | checkpoint | 1.300 | 27.5 % |" in table
    assert "| 0.250 | actprune_u2 | 1.050 | none fits | — | only compression fits |" in table


def test_step_points_join_memory_and_step_time_runs_by_name():
    memory = {"rows": [
        {"config": {"name": "dense", "prune": None, "checkpoint": "none", "every": 1,
                    "compress_checkpointed": False, "exclude": ["head"]},
         "ratios": {"peak": 1.0, "saved": 1.0}},
        {"config": {"name": "checkpoint", "prune": None, "checkpoint": "full", "every": 1,
                    "compress_checkpointed": False, "exclude": ["head"]},
         "ratios": {"peak": 0.3, "saved": 0.1}},
    ]}  # fmt: skip
    times = {"rows": [{"config": "dense", "ratio": 1.0}, {"config": "checkpoint", "ratio": 1.3}]}
    points = step_points(memory, times)
    assert [(p.name, p.family, p.optimal) for p in points] == [
        ("dense", "dense", True),
        ("checkpoint", "checkpoint", True),
    ]
    with pytest.raises(ValueError, match="checkpoint has a memory row but no step time"):
        step_points(memory, {"rows": times["rows"][:1]})


def _run(name, acc, saved, epochs=3, seed=0):
    return {"run": name, "test_acc": acc, "saved_activation_bytes": saved,
            "peak_step_bytes": 2 * saved, "epochs": epochs, "config": {"seed": seed}}  # fmt: skip


def test_accuracy_points_merge_runs_and_mark_the_front():
    three = [_run("dense", 87.0, 100), _run("a", 86.9, 20), _run("b", 86.0, 30), _run("c", 85, 5)]
    ten = [_run("dense", 90.0, 100, 10), _run("a", 89.8, 20, 10)]
    points = {p.name: p for p in accuracy_points([three, ten])}
    assert points["a"].delta == {(3, 0): pytest.approx(-0.1), (10, 0): pytest.approx(-0.2)}
    assert points["a"].saved == 0.2 and points["b"].peak == 0.3
    # b is dominated by a (more bytes, less accuracy); dense, a and c are on the front
    assert {n: p.optimal for n, p in points.items()} == {
        "dense": True, "a": True, "b": False, "c": True,
    }  # fmt: skip
    table = accuracy_table(list(points.values()))
    assert "| a | 0.200 | 0.200 | 86.90 (-0.10) | 89.80 (-0.20) | **yes** |" in table
    assert "| b | 0.300 | 0.300 | 86.00 (-1.00) | — |  |" in table
    with pytest.raises(ValueError, match="starts with its dense run"):
        accuracy_points([three[1:]])
