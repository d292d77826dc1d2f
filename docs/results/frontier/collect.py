"""Accuracy summaries for the frontier (compare-style lists, dense first), from this round's runs
and, renamed to today's run names, the earlier runs of the same configurations."""
import json
from pathlib import Path
R = Path("/work/main/docs/results"); RUNS = Path("/work/main/runs"); OUT = R / "frontier"

def run(path, name=None):
    d = json.loads(Path(path).read_text())
    return {**d, "run": name or Path(path).parent.name}

def have(path):
    return Path(path).exists()

dense3 = run(RUNS / "frontier_3ep/dense/summary.json", "dense")
grid = [dense3] + [run(p / "summary.json") for p in sorted((RUNS / "frontier_3ep").iterdir())
                   if p.name != "dense" and have(p / "summary.json")]
# The default (uniform 4-bit) since its codes are rounded in fixed point: runs/accfx*; its earlier
# runs (the division rule: runs/frontier_3ep_uniform/actprune_all_u4_b32, runs/acc10_s*_u4) are
# superseded. The other remainder rows keep the division rule's runs.
FIXED_POINT = "actprune_all_u4_b32"
uni = [dense3] + [run(p / "summary.json") for p in sorted((RUNS / "frontier_3ep_uniform").iterdir())
                  if have(p / "summary.json") and p.name != FIXED_POINT]
uni.append(run(RUNS / f"accfx3_s0_u4/{FIXED_POINT}/summary.json"))
names = {r["run"] for r in grid + uni}
old3 = [dense3]
if "actprune_all_r4_s0.9_b32" not in names:
    old3.append(run(R / "train_3ep_variants/all_r4_g2/summary.json", "actprune_all_r4_s0.9_b32"))
old3.append(run(R / "train_3ep_variants/all_r4_int8/summary.json", "actprune_all_int8_r4_s0.9_b32"))
def old10(folder):
    d = json.loads((R / folder / "summary.json").read_text())
    return [{**d[0], "run": "dense"}, {**d[1], "run": "actprune_all_r4_s0.9_b32"}]
ten0, ten1 = old10("compare_fashion_mnist_10ep_r4"), old10("compare_fashion_mnist_10ep_r4_seed1")
ten0.append(run(R / "train_3ep_variants/all_r4_int8_10ep/summary.json", "actprune_all_int8_r4_s0.9_b32"))
for seed, ten in ((0, ten0), (1, ten1)):  # benchmarks/accuracy.py --epochs 10 --dense-from ...
    for p in sorted(RUNS.glob(f"acc10_s{seed}_*/actprune_*/summary.json")):
        if p.parent.name != FIXED_POINT:
            ten.append(run(p))
    ten.append(run(RUNS / f"accfx10_s{seed}_u4/{FIXED_POINT}/summary.json"))
files = {"accuracy_3ep_seed0.json": grid, "accuracy_3ep_seed0_uniform.json": uni,
         "accuracy_3ep_seed0_earlier.json": old3, "accuracy_10ep_seed0.json": ten0,
         "accuracy_10ep_seed1.json": ten1}
for name, runs in files.items():
    slim = [{k: r[k] for k in ("run", "model", "dataset", "epochs", "batch_size", "test_acc",
                               "peak_step_bytes", "saved_activation_bytes", "median_step_s", "config")}
            for r in runs]
    (OUT / name).write_text(json.dumps(slim, indent=1) + "\n")
    print(name, [(r["run"], r["test_acc"]) for r in runs])
