"""Reliability round 3 (issue 27): each test is named after the item it pins (item1 ... item5),
and docs/reliability.md lists them with what the user sees."""

import importlib.util
import os
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from test_cli import TINY, run
from test_reliability import _fails_cleanly, _train_run, documented_commands
from torch import nn

from actprune import (
    PruneConfig,
    PrunedLinear,
    PrunedTransposedLinear,
    compress,
    prune_activations_,
    register_conversion,
    restore_dense_,
    rng,
)
from actprune.blocksparse import as_rows
from actprune.kernels import reference
from actprune.workloads import language_model

HF = importlib.util.find_spec("transformers") is not None
needs_hf = pytest.mark.skipif(not HF, reason="transformers not installed (optional extra)")


# --- item 1: the README's plan --model hf:gpt2, and every model spec the README shows -----------


def readme_specs(command: str) -> list[str]:
    """The --model values of the documented `actprune <command>` lines (plan, bench memory);
    None where the line takes the command's default."""
    specs = []
    for line in documented_commands():
        words = shlex.split(line)
        if " ".join(words[1:]).startswith(command):
            specs.append(words[words.index("--model") + 1] if "--model" in words else None)
    return specs


def _skip_without_library(spec):
    library = {"hf": "transformers", "timm": "timm"}.get(spec.partition(":")[0])
    if library and importlib.util.find_spec(library) is None:
        pytest.skip(f"{library} not installed (optional extra)")


def _small(spec):
    """Size flags for a spec: a short sequence for language models, small images otherwise."""
    return ["--seq-len", "16"] if language_model(spec) else ["--image-size", "32"]


def _specs(*commands: str) -> list[str]:
    """The --model values the README shows for these commands (its default where it shows none)."""
    return list(dict.fromkeys(s or "resmlp_s24" for c in commands for s in readme_specs(c)))


SPECS = _specs("plan", "bench memory")


@pytest.mark.parametrize("spec", SPECS)
def test_item1_plan_runs_on_every_readme_model_spec(capsys, spec):
    _skip_without_library(spec)
    # selective checkpointing is where hf:gpt2 failed (the key/value cache grew on recompute)
    configs = ["dense", "selective", "checkpoint", "actprune_all_u4_b32",
               "checkpoint+inside_all_r4_s0.9_b32"]  # fmt: skip
    code, out, err = run(capsys, "plan", "--model", spec, *_small(spec), "--batch-size", "2",
                         "--max-batch", "8", "--configs", *configs)  # fmt: skip
    assert code == 0, err
    assert all(f"| {c} |" in out for c in configs), out


@pytest.mark.parametrize("spec", _specs("bench memory"))  # resmlp_b24: plan's only (41 s here)
def test_item1_bench_memory_runs_on_every_readme_model_spec(capsys, tmp_path, spec):
    _skip_without_library(spec)
    if spec.startswith("hf:"):  # one layer: the spec's path, at a size the CPU trains quickly
        spec += (":" if spec.count(":") == 1 else ",") + "num_hidden_layers=1"
    # (a stack of one block: checkpointing it is checkpointing the whole stack)
    code, out, err = run(capsys, "bench", "memory", "--model", spec, *_small(spec),
                         "--batch-size", "1", "--timing-steps", "1", "--baselines",
                         "checkpoint", "--out", str(tmp_path))  # fmt: skip
    assert code == 0, err
    assert "| checkpoint |" in out and "| actprune_all_u4_b32 |" in out


@needs_hf
def test_item1_hf_training_step_keeps_no_cache_and_checkpoints():
    from actprune.methods import MemoryConfig, apply_method
    from actprune.workloads import build_workload

    work = build_workload("hf:gpt2:n_layer=2,n_embd=32,n_head=2", seq_len=8)
    assert work.model.config.use_cache is False
    batch = work.batch(2)
    torch.manual_seed(0)
    work.loss(work.model, batch).backward()
    want = [p.grad.clone() for p in work.model.parameters()]
    work.model.zero_grad()
    apply_method(work.model, MemoryConfig.checkpointing(selective=True))
    torch.manual_seed(0)  # the same dropout masks
    work.loss(work.model, batch).backward()  # the recompute finds what the forward saved
    for g, p in zip(want, work.model.parameters()):
        torch.testing.assert_close(p.grad, g)


# --- item 2: checkpoints with bad fields --------------------------------------------------------


def _tamper(path, change):
    ckpt = torch.load(path, weights_only=True)
    change(ckpt)
    torch.save(ckpt, path)


def _other_model_tensors(ckpt):
    ckpt["model"] = {k: torch.zeros(*(s + 1 for s in v.shape)) for k, v in ckpt["model"].items()}


def _other_groups(ckpt):
    ckpt["optimizer"]["param_groups"] = ckpt["optimizer"]["param_groups"] * 2


BAD_FIELDS = [
    ("config_list", lambda c: c.update(config=[1, 2]), "config must be a dict, got list"),
    ("epoch_str", lambda c: c.update(epoch="0"), "epoch (the last one done) must be an integer"),
    ("epoch_negative", lambda c: c.update(epoch=-5), "in [0, 1), got -5"),
    ("rng_actprune_missing", lambda c: c["rng"].pop("actprune"), "rng must be a dict holding"),
    ("rng_cpu_float", lambda c: c["rng"].update(cpu=c["rng"]["cpu"].float()),
     "rng.cpu must be a 1-D uint8 tensor"),
    ("rng_actprune_bad", lambda c: c["rng"].update(actprune={"seed": "x", "counter": 0}),
     "rng.actprune: seed must be an integer"),
    ("model_other_sizes", _other_model_tensors, "does not fit this run: model tensor"),
    ("model_empty", lambda c: c.update(model={}), "model must be a non-empty dict"),
    ("optimizer_other_groups", _other_groups, "optimizer param_groups must be 2 group(s)"),
    ("history_short", lambda c: c.update(history=[]), "history must be a list of 1 dicts"),
    ("config_lr_str", lambda c: c["config"].update(lr="fast"), "config: lr has the wrong type"),
    ("config_prune_bad", lambda c: c["config"]["prune"].update(sparsity=7),
     "config: prune PruneConfig.sparsity"),
    ("overrides_out", lambda c: c["config"]["model_overrides"].update(out="/tmp/elsewhere"),
     "model_overrides must map some of patch_size, width, depth"),
    ("overrides_overwrite", lambda c: c["config"]["model_overrides"].update(overwrite=True),
     "model_overrides must map some of patch_size, width, depth"),
]  # fmt: skip


@pytest.mark.parametrize("name, change, message", BAD_FIELDS, ids=[b[0] for b in BAD_FIELDS])
def test_item2_checkpoint_with_bad_fields_is_one_line(capsys, tmp_path, name, change, message):
    out = tmp_path / "t"
    assert _train_run(capsys, out)[0] == 0
    path = out / "checkpoint.pt"
    _tamper(path, change)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for argv in (["--resume"], [*TINY, "--epochs", "2", "--sparsity", "0.5", "--resume"]):
        _fails_cleanly(capsys, ["train", "--out", str(out), *argv], message)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written
    assert not (tmp_path / "elsewhere").exists()


# --- item 3: model specs and sizes -------------------------------------------------------------

HF_BAD_SPECS = [
    ("hf:gpt2:n_layer=-1", "n_layer must be an integer >= 1, got -1"),
    ("hf:gpt2:n_embd=abc", "n_embd must be an integer >= 1, got 'abc'"),
    ("hf:gpt2:n_embd=65", "must be divisible by num_heads"),
    ("hf:gpt2:n_embd=0", "n_embd must be an integer >= 1, got 0"),
    ("hf:gpt2:vocab_size=0", "vocab_size must be an integer >= 1, got 0"),
    ("hf:gpt2:n_layers=2", "GPT2Config has no field 'n_layers'"),
    ("hf:gpt2:layer_norm_epsilon=big", "layer_norm_epsilon must be a finite number"),
    ("hf:nosuchmodel", "Hugging Face has no model type 'nosuchmodel'"),
]
COMMANDS = {
    "plan": ["plan", "--batch-size", "2"],
    "bench memory": ["bench", "memory", "--batch-size", "2"],
    "compare lm": ["compare", "--task", "lm", "--steps", "1", "--no-progress"],
}


@needs_hf
@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("spec, message", HF_BAD_SPECS, ids=[s for s, _ in HF_BAD_SPECS])
def test_item3_bad_hf_spec_is_one_line(capsys, tmp_path, command, spec, message):
    argv = [*COMMANDS[command], "--model", spec, "--seq-len", "16"]
    if command != "plan":
        argv += ["--out", str(tmp_path / "out")]
    _fails_cleanly(capsys, argv, message)
    assert not (tmp_path / "out").exists() or command == "bench memory"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_item3_size_that_cannot_fit_is_refused_before_allocating(capsys, tmp_path, command):
    argv = [*COMMANDS[command], "--model", "gpt_tiny", "--seq-len", "99999999"]
    if command == "plan":  # plan allocates nothing: it says the step does not fit
        code, out, err = run(capsys, *argv, "--configs", "dense", "--memory", "80GB")
        assert code == 0 and "| dense | dense |" in out and "| no |" in out, err
        return
    _fails_cleanly(capsys, [*argv, "--out", str(tmp_path / "o")], "bytes (")
    assert not (tmp_path / "o" / "summary.json").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["plan", "--model", "resmlp_tiny", "--seq-len", "16"],
         "seq_len (--seq-len) applies to language models; resmlp_tiny is an image model"),
        (["bench", "memory", "--model", "resmlp_tiny", "--seq-len", "16"],
         "seq_len (--seq-len) applies to language models"),
        (["plan", "--model", "gpt_tiny", "--image-size", "32"],
         "image_size (--image-size) applies to image models; gpt_tiny is a language model"),
        (["plan", "--model", "timm:", "--batch-size", "2"], "unknown model 'timm:'"),
    ],
)  # fmt: skip
def test_item3_size_flag_of_the_other_kind_is_refused(capsys, argv, message):
    _fails_cleanly(capsys, argv, message)


@needs_hf
def test_item3_seq_len_beyond_the_models_positions(capsys, tmp_path):
    for argv in (["plan"], ["bench", "memory", "--out", str(tmp_path)],
                 ["compare", "--task", "lm", "--out", str(tmp_path / "lm")]):  # fmt: skip
        _fails_cleanly(capsys, [*argv, "--model", "hf:bert", "--seq-len", "1024"],
                       "must be at most hf:bert's 512 positions, got 1024 "
                       "(more positions: hf:bert:max_position_embeddings=N)")  # fmt: skip


# --- item 4: the random stream follows the user's seeding --------------------------------------


def _compressed_run(seed_torch=0, steps=3):
    """A run as a user writes it: seed, build, convert, train a few steps; the weight grads."""
    torch.manual_seed(seed_torch)
    model = nn.Sequential(nn.Linear(48, 64), nn.GELU(), nn.Linear(64, 8))
    prune_activations_(model, PruneConfig.preset("recommended"))
    grads = []
    for _ in range(steps):
        model(torch.randn(4, 10, 48)).square().sum().backward()
        grads.append(model[0].weight.grad.clone())
    return grads


def test_item4_reseeding_torch_repeats_a_compressed_run():
    first, second = _compressed_run(), _compressed_run()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_item4_models_in_threads_draw_their_own_streams():
    solo = {name: _thread_run(name) for name in ("a", "b")}
    results, barrier = {}, threading.Barrier(2)

    def work(name):
        results[name] = _thread_run(name, barrier)

    threads = [threading.Thread(target=work, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name in ("a", "b"):
        assert torch.equal(results[name], solo[name]), name


def _thread_run(name, barrier=None):
    gen = torch.Generator().manual_seed(ord(name))  # the thread's own data: no shared generator
    layer = nn.Linear(32, 16)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(16, 32, generator=gen))
    model = prune_activations_(nn.Sequential(layer), PruneConfig.preset("recommended"))
    rng.manual_seed(ord(name), model)
    for _ in range(4):
        if barrier is not None:
            barrier.wait()  # the two threads' steps interleave
        model(torch.randn(8, 32, generator=gen)).sum().backward()
    return model[0].weight.grad


def test_item4_two_seeds_give_different_codes():
    x, config = torch.randn(64, 64), PruneConfig(1.0, 32, remainder_bits=4)
    codes = [compress(x, config, rng.Stream(seed)).remainder.codes for seed in (1, 2, 1)]
    assert not torch.equal(codes[0], codes[1]) and torch.equal(codes[0], codes[2])
    rng.manual_seed(3)
    third = compress(x, config).remainder.codes
    assert not torch.equal(third, codes[0]) and not torch.equal(third, codes[1])


def test_item4_model_stream_is_saved_restored_and_copied():
    import copy

    model = prune_activations_(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)),
                               PruneConfig.preset("recommended"))  # fmt: skip
    assert model[0].stream is model[1].stream  # one per model
    rng.manual_seed(11, model)
    model(torch.randn(4, 8)).sum().backward()
    state = rng.get_state(model)
    assert state == {"seed": 11, "counter": 2}
    twin = copy.deepcopy(model)
    assert twin[0].stream is twin[1].stream and twin[0].stream is not model[0].stream
    assert rng.get_state(twin) == state
    rng.set_state({"seed": 11, "counter": 0}, model)
    assert rng.get_state(model) == {"seed": 11, "counter": 0}
    with pytest.raises(ValueError, match="counter must be an integer"):
        rng.set_state({"seed": 1, "counter": -1}, model)
    assert not hasattr(restore_dense_(model)[0], "stream")


# --- item 5: the tests that caught no planted bug ----------------------------------------------


def test_item5_two_configs_reading_one_tensor_equal_their_solo_gradients():
    torch.manual_seed(0)
    configs = (PruneConfig.preset("recommended"), PruneConfig(0.5, 16))
    layers = [PrunedLinear(32, 24, config=c) for c in configs]
    x, dy = torch.randn(6, 32), torch.randn(6, 24)
    rng.manual_seed(0)
    sum((layer(x) * dy).sum() for layer in layers).backward()  # one x, two configs
    together = [layer.weight.grad.clone() for layer in layers]
    for layer, want in zip(layers, together):
        layer.weight.grad = None
        rng.manual_seed(0)
        (layer(x) * dy).sum().backward()
        assert torch.equal(layer.weight.grad, want)


@pytest.mark.parametrize("backend", ["torch", "numba", "triton"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_item5_non_finite_block_scores_inf_with_nan_scale_and_zero_codes(backend, value):
    pytest.importorskip({"torch": "torch", "numba": "numba", "triton": "triton"}[backend])
    from test_kernels import _backend

    names = {"torch": "reference", "numba": "cpu_blocks", "triton": "triton_blocks"}
    module = _backend(names[backend])
    x3 = torch.randn(1, 32, 32)
    x3[0, :16, 16:] = value  # the whole block (0, 1) holds only the value
    x3[0, 16:, :16] = 0.0  # block (1, 0) all zero: scale 0, a finite block
    for criterion in ("l2", "l1", "max"):
        scores, codes, scales = module.score_blocks(x3, (16, 16), criterion, 4, 77)
        assert scores[0, 1] == float("inf") and torch.isfinite(scores[[0, 1, 1], [0, 0, 1]]).all()
        assert scales[0, 1].isnan() and torch.isfinite(scales[[0, 1, 1], [0, 0, 1]]).all()
        nibbles = torch.stack([codes & 15, codes >> 4], 1).view(32, 32)  # 4-bit codes, row-major
        assert (nibbles[:16, 16:] == 0).all()
        want = reference.score_blocks(x3, (16, 16), criterion, 4, 77)
        assert torch.equal(codes, want[1])  # the reference's contract, bit for bit
        torch.testing.assert_close(scales, want[2], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("n_in, n_out", [(40, 24), (32, 32)])  # square: a dropped .t() runs
def test_item5_conv1d_like_layer_converts_without_transformers(n_in, n_out):
    class Proj(nn.Module):  # GPT-2's Conv1D, restated: weight [in, out], y = x·W + b
        def __init__(self, n_in, n_out):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(n_in, n_out))
            self.bias = nn.Parameter(torch.randn(n_out))

        def forward(self, x):
            out = torch.addmm(self.bias, x.view(-1, x.shape[-1]), self.weight)
            return out.view(*x.shape[:-1], -1)

    from actprune import convert

    try:
        @register_conversion(Proj, scopes=("linear", "all"))
        class PrunedProj(PrunedTransposedLinear, Proj):
            pass

        dense = Proj(n_in, n_out)
        model = prune_activations_(nn.Sequential(dense), PruneConfig(0.5, 8))
        assert isinstance(model[0], PrunedProj) and model[0].weight is dense.weight
        x = torch.randn(3, 16, n_in, requires_grad=True)
        dy = torch.randn(3, 16, n_out)
        y = model(x)
        y.backward(dy)
        x2 = x.detach().clone().requires_grad_()
        want_y = torch.addmm(dense.bias.detach(), x2.view(-1, n_in), dense.weight.detach())
        assert torch.equal(y, want_y.view(3, 16, n_out))  # the output, bit for bit
        want_y.view(3, 16, n_out).backward(dy)
        assert torch.equal(x.grad, x2.grad)  # dx exact
        stored = compress(as_rows(x.detach(), "token-major"), PruneConfig(0.5, 8)).to_dense()
        want_dw = (as_rows(dy, "token-major").t() @ stored).t()  # [in, out], like the weight
        assert not torch.allclose(stored, as_rows(x.detach(), "token-major"))  # half is dropped
        torch.testing.assert_close(model[0].weight.grad, want_dw, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model[0].bias.grad, dy.sum((0, 1)))
    finally:
        convert._REGISTRY.pop(Proj, None)


def test_item5_numba_kernels_pass_under_boundscheck(tmp_path):
    """The numba kernel tests again with every array index checked (NUMBA_BOUNDSCHECK=1, its own
    cache): an index bug fails a test (IndexError) instead of crashing the whole run."""
    pytest.importorskip("numba")
    env = {**os.environ, "NUMBA_BOUNDSCHECK": "1", "NUMBA_CACHE_DIR": str(tmp_path)}
    env.pop("PYTEST_XDIST_WORKER", None)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
         str(Path(__file__).parent / "test_kernels.py"), "-k", "numba"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout
