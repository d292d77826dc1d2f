"""Bad inputs, edge cases and faults (issue 13): each test is named after the item it pins, and
docs/reliability.md lists them with what the user sees."""

import copy
import gzip
import json
import math
import os
import pickle
import shlex
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_cli import TINY, run
from test_data import make_idx_folder, write_idx
from torch import nn
from torch.nn.utils import parametrizations

from actprune import (
    CodedGELU,
    PruneConfig,
    PrunedLinear,
    SavedTensorLog,
    exact_gradients,
    models,
    prune_activations_,
    restore_dense_,
    saved_activation_bytes,
)
from actprune import train as train_module

# --- library --------------------------------------------------------------------------------------


@pytest.mark.parametrize("wrap", [parametrizations.weight_norm, parametrizations.spectral_norm])
def test_01_parametrized_linear_converts_and_trains_like_dense(wrap):
    dense = nn.Sequential(wrap(nn.Linear(24, 16)), nn.GELU(), nn.Linear(16, 4))
    model = prune_activations_(copy.deepcopy(dense), PruneConfig(0.0, 8))
    assert (
        isinstance(model[0], PrunedLinear) and type(model[0]).__name__ == "ParametrizedPrunedLinear"
    )
    x = torch.randn(6, 24, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    out, want = model(x), dense(x2)
    assert torch.equal(out, want)
    out.square().sum().backward()
    want.square().sum().backward()
    assert torch.equal(x.grad, x2.grad)
    for (name, a), (_, b) in zip(dense.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)
    restored = restore_dense_(model)
    assert type(restored[0]).__name__ == "ParametrizedLinear" and not isinstance(
        restored[0], PrunedLinear
    )


COMPILE_IN_A_FRESH_PROCESS = """
import torch, torch.nn.functional as F
from torch._dynamo.utils import counters
from actprune import PruneConfig, derivative_code, models, prune_activations_
for fullgraph in (True, False):
    derivative_code.cache_clear()  # as in a fresh process: the code is fitted on first use
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = models.create("resmlp_tiny", width=16, depth=1)
    prune_activations_(model, PruneConfig(0.5, 16, scope="all"), exclude="head")
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=fullgraph)
    F.cross_entropy(compiled(x), y).backward()
    graphs = counters["stats"]["unique_graphs"]
    print("fullgraph", fullgraph, "graphs", graphs, "breaks", sum(counters["graph_break"].values()))
"""


def test_02_compile_scope_all_in_a_fresh_process_is_one_graph(tmp_path):
    # aot_eager traces the backward as inductor does (where the GELU code used to be fitted, and
    # failed), without inductor's C++ build; test_compile.py runs inductor in-process.
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_IN_A_FRESH_PROCESS],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "fullgraph True graphs 1 breaks 0" in done.stdout
    assert "fullgraph False graphs 1 breaks 0" in done.stdout


# Item 3 (the remainder never draws from torch's RNG) is
# tests/test_train.py::test_remainder_rounding_leaves_torch_rng_alone.


def test_04_int8_keeps_non_finite_values_where_dense_puts_them():
    torch.manual_seed(0)
    dense = nn.Linear(64, 8)
    x = torch.randn(64, 64)
    x[3, 5], x[40, 50], x[20, 60] = math.inf, math.nan, -math.inf
    dy = torch.randn(64, 8)
    dy[7] = 0  # 0 · inf = nan in dense too
    dense(x).backward(dy)
    grads = {}
    for int8 in (False, True):
        layer = PrunedLinear.from_linear(copy.deepcopy(dense), PruneConfig(0.5, 16, int8=int8))
        layer.zero_grad()
        layer(x).backward(dy)
        grads[int8] = layer.weight.grad
    got, want = grads[True], dense.weight.grad
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    assert torch.equal(got.isposinf(), want.isposinf())
    finite = want.isfinite()  # elsewhere: the same kept blocks as without int8, rounded
    assert F.cosine_similarity(got[finite], grads[False][finite], dim=0) > 0.999


def test_05_coded_gelu_never_hides_a_nan():
    gelu = CodedGELU.from_module(nn.GELU(), PruneConfig(0.9, scope="all"))
    x = torch.randn(5, 3, 16)
    x[0, 1, 4], x[2, 0, 0], x[4, 2, 15] = math.nan, math.inf, -math.inf
    x.requires_grad_()
    xd = x.detach().clone().requires_grad_()
    gelu(x).backward(torch.ones(5, 3, 16))
    F.gelu(xd).backward(torch.ones(5, 3, 16))
    assert xd.grad.isnan().sum() == 3  # dense: NaN exactly at the three inputs
    nan_rows = x.grad.isnan().any(-1)
    assert nan_rows.sum() == 3 and nan_rows[0, 1] and nan_rows[2, 0] and nan_rows[4, 2]
    assert x.grad.isnan().all(-1)[nan_rows].all()  # those rows entirely, the others finite
    assert x.grad[~nan_rows].isfinite().all()
    # a whole model: every parameter whose dense gradient is non-finite is non-finite here too
    torch.manual_seed(0)
    dense = models.create("resmlp_tiny", width=32, depth=2)
    pruned = prune_activations_(
        copy.deepcopy(dense), PruneConfig.preset("recommended", block_size=16)
    )
    images = torch.randn(4, 1, 28, 28)
    images[1, 0, 10, 10] = math.nan
    bad = []
    for model in (dense, pruned):
        F.cross_entropy(model(images), torch.arange(4)).backward()
        bad.append({n for n, p in model.named_parameters() if not p.grad.isfinite().all()})
    assert bad[0] and bad[0] <= bad[1]


def test_06_hook_handle_taken_before_conversion_still_removes_it():
    layer = nn.Linear(8, 4)
    calls = []
    handle = layer.register_forward_hook(lambda *a: calls.append("fwd"))
    model = prune_activations_(nn.Sequential(layer), PruneConfig(0.5, 4))
    handle.remove()
    model(torch.randn(2, 8))
    assert calls == []
    handle = model[0].register_forward_pre_hook(lambda *a: calls.append("pre"))
    restore_dense_(model)
    handle.remove()
    model(torch.randn(2, 8))
    assert calls == []


def test_07_exact_gradients_is_per_thread():
    model = prune_activations_(nn.Linear(256, 64), PruneConfig(0.9, 32))
    x = torch.randn(256, 256)
    inside, entered, measured = threading.Event(), threading.Event(), {}

    def other_thread():
        entered.wait()
        measured["other"] = saved_activation_bytes(model, x)
        inside.set()

    thread = threading.Thread(target=other_thread)
    thread.start()
    with exact_gradients():
        measured["here"] = saved_activation_bytes(model, x)
        entered.set()
        inside.wait()
    thread.join()
    assert measured["here"] == 256 * 256 * 4  # dense: the whole input
    assert measured["other"] < 0.2 * measured["here"]  # still compressed in the other thread


def test_08_lazy_linear_is_left_dense_with_a_warning():
    model = nn.Sequential(nn.LazyLinear(8), nn.GELU())
    with pytest.warns(UserWarning, match="left 0 dense: LazyLinear has uninitialized parameters"):
        prune_activations_(model, PruneConfig(0.5, 4))
    model(torch.randn(3, 16)).sum().backward()  # works, as a plain Linear
    assert type(model[0]) is nn.Linear
    prune_activations_(model, PruneConfig(0.5, 4))  # initialised now: converts
    assert isinstance(model[0], PrunedLinear)


def test_09_linear_with_zero_outputs_trains_like_dense():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Initializing zero-element tensors is a no-op"
        dense = nn.Linear(16, 0)
    model = prune_activations_(copy.deepcopy(dense), PruneConfig(0.5, 4))
    for lead in ((2,), (2, 3)):
        x = torch.randn(*lead, 16, requires_grad=True)
        model(x).sum().backward()
        assert x.grad.shape == x.shape and model.weight.grad.shape == (0, 16)


def test_10_and_26_in_place_changes_recompress_while_the_first_graph_lives():
    # The documented contract: add_ / mul_ (also on views) bump the version counter, so a layer
    # reading the tensor afterwards compresses it again; changes through .data are not tracked.
    a, b = nn.Linear(64, 8), nn.Linear(64, 8)
    model = prune_activations_(nn.ModuleList([a, b]), PruneConfig(0.5, 16))
    for change in (lambda t: t.add_(3.0), lambda t: t[:, :32].mul_(-2.0)):
        x = torch.randn(32, 64)
        out_a = model[0](x)
        change(x)
        model[1](x).sum().backward()
        alone = copy.deepcopy(model[1])
        alone.zero_grad()
        alone(x.clone()).sum().backward()
        torch.testing.assert_close(model[1].weight.grad, alone.weight.grad)
        model.zero_grad()
        del out_a


# --- command line: one line on stderr, exit code 2, nothing existing destroyed -------------------


def _fails_cleanly(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("actprune: error: ") and "Traceback" not in err
    assert message in err, err


def test_11_out_that_cannot_be_a_folder(capsys, tmp_path):
    (tmp_path / "afile").write_text("keep")
    for out, message in (
        (tmp_path / "afile", "is a file, not a folder"),
        (tmp_path / "afile" / "sub", "Not a directory"),
        (Path("/proc/actprune-test"), "cannot create /proc/actprune-test"),
    ):
        _fails_cleanly(capsys, ["train", *TINY, "--out", str(out)], message)
        _fails_cleanly(capsys, ["compare", *TINY, "--out", str(out)], message)
        bench = ["bench", "memory", "--model", "resmlp_tiny", "--image-size", "28"]
        _fails_cleanly(capsys, [*bench, "--out", str(out)], message)
    assert (tmp_path / "afile").read_text() == "keep"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--device", "foo"], "--device must be auto, cpu, cuda or cuda:N, got 'foo'"),
        (["bench", "kernels", "--device", "foo"], "--device must be cpu, cuda or cuda:N"),
        (["train", "--train-subset", "0"], "--train-subset must be positive, got 0"),
        (["train", "--train-subset", "-5"], "--train-subset must be positive, got -5"),
        (["compare", "--test-subset", "0"], "--test-subset must be positive, got 0"),
        (["train", "--lr", "-1"], "--lr must be a finite number in (0, inf), got -1.0"),
        (
            ["train", "--label-smoothing", "2"],
            "--label-smoothing must be a finite number in [0, 1)",
        ),
        (["train", "--weight-decay", "nan"], "--weight-decay must be a finite number"),
        (["train", "--warmup-epochs", "inf"], "--warmup-epochs must be a finite number"),
        (["train", "--image-size", "0"], "--image-size must be positive, got 0"),
        (["bench", "memory", "--batch-size", "0"], "--batch-size: must be a positive integer"),
        (["plan", "--image-size", "0"], "--image-size: must be a positive integer, got 0"),
        (["plan", "--model", "vgg16"], "unknown model 'vgg16'"),
        (["bench", "memory", "--model", "vgg16"], "unknown model 'vgg16'"),
        (["train", "--block-size", "0x4"], "--block-size must be a positive int"),
        (["train", "--block-size", "big"], "expected N or ROWSxCOLS"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_12_to_15_bad_options(capsys, tmp_path, argv, message):
    out = tmp_path / "o"
    extra = ["--out", str(out)] if argv[0] in ("train", "compare") else []
    _fails_cleanly(capsys, [*argv, *extra], message)
    assert not out.exists()  # refused before anything was written


def _imagefolder(root: Path, bad: bool) -> Path:
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("a", "b"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(folder / "0.png")
    if bad:
        (root / "train" / "a" / "1.png").write_bytes(b"not an image")
    return root


def test_16_garbage_data_files(capsys, tmp_path):
    short = ["--epochs", "1", "--batch-size", "8", "--no-progress", "--width", "16", "--depth", "1"]
    cases = []
    corrupt = make_idx_folder(tmp_path / "corrupt")
    (corrupt / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")
    cases.append((corrupt, "is corrupt"))
    header = make_idx_folder(tmp_path / "header")
    (header / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03\x00"))
    cases.append((header, "is truncated: its header promises 3 dimensions"))
    flat = make_idx_folder(tmp_path / "flat")
    (flat / "train-images-idx3-ubyte.gz").unlink()
    write_idx(flat / "train-images-idx3-ubyte", torch.zeros(20).numpy())
    cases.append((flat, "holds a 1-D array; train images are 3-D"))
    for folder, message in cases:
        argv = ["train", "--dataset", "mnist", "--data-dir", str(folder), *short]
        _fails_cleanly(capsys, [*argv, "--out", str(tmp_path / "o" / folder.name)], message)
    images = _imagefolder(tmp_path / "images", bad=True)
    argv = ["train", "--dataset", "imagefolder", "--data-dir", str(images), "--image-size", "14"]
    _fails_cleanly(capsys, [*argv, *short, "--out", str(tmp_path / "o" / "img")], "1.png")


def _train_run(capsys, out, *extra):
    argv = ["train", *TINY, "--epochs", "1", "--out", str(out), "--sparsity", "0.5", *extra]
    return run(capsys, *argv)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "cannot read"),
        (b"this is text, not a checkpoint\n", "cannot read"),
        ("truncated", "cannot read"),
        ("not ours", "is not an actprune training checkpoint"),
    ],
)
def test_17_corrupt_checkpoint(capsys, tmp_path, content, message):
    out = tmp_path / "t"
    assert _train_run(capsys, out)[0] == 0
    path = out / "checkpoint.pt"
    if content == "truncated":
        content = path.read_bytes()[:1000]
    elif content == "not ours":
        torch.save({"weights": torch.zeros(2)}, path)
        content = path.read_bytes()
    path.write_bytes(content)
    _fails_cleanly(
        capsys,
        ["train", *TINY, "--epochs", "2", "--out", str(out), "--resume", "--sparsity", "0.5"],
        message,
    )


def test_18_resume_with_another_model_says_what_differs(capsys, tmp_path):
    out = tmp_path / "t"
    assert _train_run(capsys, out)[0] == 0
    argv = ["train", *TINY, "--epochs", "2", "--out", str(out), "--resume", "--sparsity", "0.5"]
    _fails_cleanly(capsys, [*argv, "--width", "48"], "model_overrides")
    _fails_cleanly(capsys, [*argv, "--sparsity", "0.8"], "'sparsity': 0.5")
    assert run(capsys, *argv)[0] == 0  # the same settings (and more epochs) resume


def test_19_interruption_between_checkpoint_and_metrics(capsys, tmp_path, monkeypatch):
    out = tmp_path / "t"
    real = train_module.append_metrics

    def interrupted(run_, record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt
        real(run_, record)

    monkeypatch.setattr(train_module, "append_metrics", interrupted)
    argv = ["train", *TINY, "--epochs", "3", "--out", str(out), "--sparsity", "0.5"]
    assert run(capsys, *argv)[0] == 130
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1]  # checkpoint has 2 epochs
    with (out / "metrics.jsonl").open("a") as f:  # what an older run's stale line looks like
        f.write(json.dumps({"epoch": 2, "stale": True}) + "\n")
    monkeypatch.setattr(train_module, "append_metrics", real)
    assert run(capsys, *argv, "--resume")[0] == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3] and not any("stale" in r for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3]


def test_20_resume_with_fewer_epochs_is_refused(capsys, tmp_path):
    out = tmp_path / "t"
    argv = ["train", *TINY, "--out", str(out), "--sparsity", "0.5"]
    assert run(capsys, *argv, "--epochs", "2")[0] == 0
    _fails_cleanly(capsys, [*argv, "--epochs", "1", "--resume"], "has 2 epochs done")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 2 and len(summary["history"]) == 2


class _Touch:
    """Unpickling this calls Path.touch: a stand-in for any code a crafted file could run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_30_checkpoint_carrying_code_is_refused(capsys, tmp_path):
    out = tmp_path / "t"
    assert _train_run(capsys, out)[0] == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    marker = tmp_path / "code-ran"
    ckpt["history"].append(_Touch(marker))
    torch.save(ckpt, out / "checkpoint.pt")
    argv = ["train", *TINY, "--epochs", "2", "--out", str(out), "--resume", "--sparsity", "0.5"]
    _fails_cleanly(capsys, argv, "could run code")
    assert not marker.exists()


def test_31_crafted_cifar_pickle_is_refused(tmp_path):
    from actprune import data

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "code-ran"
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps({b"data": _Touch(marker), b"labels": [0]}))
    with pytest.raises(data.DataError, match="refused to load pathlib"):
        data.load("cifar10", tmp_path)
    assert not marker.exists()


# --- tests that pin the core (bugs planted one at a time used to survive the suite) -------------


def test_25_restore_dense_straight_from_scope_all():
    torch.manual_seed(0)
    dense = models.create("resmlp_tiny", width=32, depth=2)
    model = prune_activations_(copy.deepcopy(dense), PruneConfig(0.9, 16, scope="all"))
    assert type(model.blocks[0].gelu) is CodedGELU
    restore_dense_(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in dense.modules()]
    x = torch.randn(4, 1, 28, 28)
    with SavedTensorLog() as log:
        out = model(x)
    with SavedTensorLog() as log_dense:
        want = dense(x)
    assert torch.equal(out, want) and log.live_bytes() == log_dense.live_bytes()


# --- item 21: every documented command runs ------------------------------------------------------

README = Path(__file__).parent.parent / "README.md"
TINY_TRAIN = [
    "--dataset",
    "synthetic",
    "--image-size",
    "28",
    "--patch-size",
    "7",
    "--width",
    "16",
    "--depth",
    "1",
    "--train-subset",
    "32",
    "--test-subset",
    "16",
    "--batch-size",
    "16",
    "--epochs",
    "1",
    "--no-progress",
]
TINY_MODEL = ["--model", "resmlp_tiny", "--image-size", "28", "--device", "cpu"]
TINY_EXTRA = {
    "train": TINY_TRAIN,
    "compare": TINY_TRAIN,
    "memory": [*TINY_MODEL, "--batch-size", "4", "--timing-steps", "1", "--sparsity", "0.9"],
    "kernels": [*TINY_MODEL, "--batch-size", "4", "--repeats", "1"],
    "plan": [*TINY_MODEL, "--max-batch", "4"],
    "lm": ["--steps", "1", "--seq-len", "16", "--batch-size", "2", "--eval-windows", "2",
           "--no-progress"],
}  # fmt: skip


def documented_commands() -> list[str]:
    """The `actprune ...` lines of the README's shell blocks and of the --help epilog."""
    from actprune.cli import EPILOG

    text = README.read_text()
    blocks = text.split("```")[1::2]  # the fenced blocks
    lines = [
        line for block in blocks if not block.startswith("python") for line in block.splitlines()
    ]
    lines += EPILOG.splitlines()
    joined = "\n".join(line.strip() for line in lines).replace("\\\n", " ")
    commands = [line for line in joined.splitlines() if line.startswith("actprune ")]
    return list(dict.fromkeys(" ".join(shlex.split(c, comments=True)) for c in commands))


def test_21_documented_commands_cover_every_command():
    seen = {tuple(shlex.split(c, comments=True)[1:3]) for c in documented_commands()}
    assert {words[0] for words in seen} == {"train", "compare", "bench", "plan"}
    assert ("bench", "kernels") in seen and ("bench", "memory") in seen
    assert any("--resume" in c for c in documented_commands())


def test_21_every_documented_command_runs(capsys, tmp_path):
    for i, command in enumerate(documented_commands()):
        argv = [w for w in shlex.split(command, comments=True)[1:] if w != "..."]
        kind = argv[1] if argv[0] == "bench" else "lm" if "lm" in argv else argv[0]
        if "--out" in argv:  # keep the documented folder names, under tmp_path
            j = argv.index("--out") + 1
            argv[j] = str(tmp_path / argv[j])
        elif kind != "plan":  # plan writes nothing
            argv += ["--out", str(tmp_path / f"auto{i}")]
        if kind in ("train", "compare", "lm") and "--resume" not in argv:
            argv.append("--overwrite")
        extra = [] if kind == "train" and "--resume" in argv else TINY_EXTRA[kind]
        if "--seq-len" in argv and "--model" in extra:  # the tiny image model replaces it
            del argv[argv.index("--seq-len") : argv.index("--seq-len") + 2]
        code, _, err = run(capsys, *argv, *extra)
        assert code == 0, f"{command!r} -> {err}"


def test_21_readme_python_runs(capsys):
    blocks = [
        b[len("python") :] for b in README.read_text().split("```")[1::2] if b.startswith("python")
    ]
    exec(compile(blocks[0], "README.md", "exec"), {})  # the Use section, as written
    from actprune import convert

    class MyScale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(8))

        def forward(self, x):
            return x * self.weight

    scope = {"actprune": __import__("actprune"), "MyScale": MyScale}
    try:
        exec(compile(blocks[1], "README.md", "exec"), scope)
        model = prune_activations_(nn.Sequential(MyScale()), PruneConfig(0.5, 4, scope="all"))
        assert isinstance(model[0], scope["PrunedMyScale"])
    finally:
        convert._REGISTRY.pop(MyScale, None)
    assert "saved" not in capsys.readouterr().err
