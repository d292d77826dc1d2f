import json

import pytest
from test_data import make_idx_folder

from actprune.cli import main

TINY = [
    "--dataset",
    "synthetic",
    "--image-size",
    "28",
    "--width",
    "32",
    "--depth",
    "2",
    "--train-subset",
    "64",
    "--test-subset",
    "32",
    "--batch-size",
    "32",
    "--no-progress",
]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--model", "vgg16"], "unknown model 'vgg16'"),
        (["train", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["train", "--batch-size", "0"], "--batch-size must be positive"),
        (["train", "--sparsity", "1.5"], "--sparsity must be a number in [0, 1], got 1.5"),
        (["compare", "--sparsity", "1.5"], "--sparsity must be a number in [0, 1], got 1.5"),
        (["train", "--epochs", "x"], "invalid int value"),
        (["train", "--dataset", "cifar10"], "needs --data-dir"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, tmp_path, argv, message):
    code, out, err = run(capsys, *argv, "--out", str(tmp_path / "o"))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("actprune: error: ") and message in err
    assert "Traceback" not in err


def test_data_folder_with_missing_or_corrupt_files(capsys, tmp_path):
    folder = make_idx_folder(tmp_path / "fm")
    code, _, err = run(capsys, "train", "--data-dir", str(folder), "--out", str(tmp_path / "o"))
    assert code == 2 and "checksum" in err and err.count("\n") == 1
    (folder / "train-labels-idx1-ubyte.gz").unlink()
    code, _, err = run(capsys, "train", "--data-dir", str(folder), "--out", str(tmp_path / "o2"))
    assert code == 2 and "no train-labels-idx1-ubyte" in err


def test_existing_out_needs_overwrite(capsys, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "x").write_text("keep")
    code, _, err = run(capsys, "compare", *TINY, "--out", str(out))
    assert code == 2 and "--overwrite" in err


def test_compare_writes_report_plots_and_summary(capsys, tmp_path):
    out = tmp_path / "cmp"
    code, stdout, _ = run(
        capsys,
        "compare",
        *TINY,
        "--epochs",
        "2",
        "--out",
        str(out),
        "--sparsity",
        "0.9",
        "0.5",
        "--block-size",
        "16",
    )
    assert code == 0
    assert (
        "| dense |" in stdout and "| actprune_all_r4_s0.9_b16 |" in stdout
    )  # default: recommended
    runs = json.loads((out / "summary.json").read_text())
    assert [r["run"] for r in runs] == [
        "dense",
        "actprune_all_r4_s0.9_b16",
        "actprune_all_r4_s0.5_b16",
    ]
    assert runs[1]["saved_activation_bytes"] < runs[0]["saved_activation_bytes"]
    # identical seeds, weights and data order: the first epochs' training batches match, so the
    # runs differ only through the pruned weight gradient
    assert runs[0]["history"][0]["epoch"] == runs[1]["history"][0]["epoch"] == 1
    for name in ("report.md", "accuracy.png", "loss.png", "memory.png"):
        assert (out / name).stat().st_size > 0
    assert "ratio" in (out / "report.md").read_text()


def test_train_then_resume(capsys, tmp_path):
    out = str(tmp_path / "t")
    assert run(capsys, "train", *TINY, "--epochs", "1", "--out", out, "--sparsity", "0.8")[0] == 0
    code, stdout, _ = run(
        capsys, "train", *TINY, "--epochs", "2", "--out", out, "--sparsity", "0.8", "--resume"
    )
    assert code == 0 and "test accuracy" in stdout
    lines = (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_compare_scopes_reports_compression_and_gradient_cosines(capsys, tmp_path):
    out = tmp_path / "scopes"
    argv = ["compare", *TINY, "--epochs", "2", "--out", str(out), "--block-size", "16"]
    code, stdout, _ = run(
        capsys, *argv, "--scope", "linear", "all", "--remainder-bits", "2", "--preset", "blocks"
    )
    assert code == 0
    runs = json.loads((out / "summary.json").read_text())
    assert [r["run"] for r in runs] == ["dense", "actprune_r2_s0.9_b16", "actprune_all_r2_s0.9_b16"]
    assert runs[2]["saved_activation_bytes"] < runs[1]["saved_activation_bytes"]
    compressed = {c["layer"] for c in runs[2]["saved_tensors"] if c["compressed"]}
    assert compressed == {"Linear", "Affine", "LayerScale", "GELU"}
    assert "grad_cosine" not in runs[0]["history"][0]  # dense: nothing to compare
    for r in runs[1:]:
        for epoch in r["history"]:  # every parameter's cosine to the exact gradient, each epoch
            cosines = epoch["grad_cosine"]
            assert "blocks.0.fc1.weight" in cosines and all(-1 <= c <= 1 for c in cosines.values())
    report = (out / "report.md").read_text()
    assert "## What was compressed" in report and "2-bit code of gelu'" in report
    assert "## Gradient cosine" in report and "blocks.*.fc1.weight" in report
    assert "dropped blocks at 2 bits" in report
    assert (out / "grad_cosine.png").stat().st_size > 0
