import json

import pytest
import torch

from actprune import PruneConfig, compress, data
from actprune.train import TrainConfig, TrainError, train


def tiny_dataset():
    return data.synthetic((1, 28, 28), num_classes=10, train_size=96, test_size=48, seed=1)


def config(tmp_path, name, **kw):
    prune_fields = {k: kw.pop(k) for k in list(kw) if k in PruneConfig.__dataclass_fields__}
    prune = PruneConfig.preset("recommended", **{"sparsity": 0.5, "block_size": 16, **prune_fields})
    base = dict(
        model="resmlp_tiny",
        dataset="synthetic",
        out=str(tmp_path / name),
        epochs=3,
        batch_size=32,
        prune=prune,
        progress=False,
        model_overrides={"width": 32, "depth": 2},
    )
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "kw",
    # the default (scope all, 4-bit remainder) draws random numbers for its rounding
    [{"scope": "linear", "remainder_bits": 0}, {}],
    ids=["paper", "default"],
)
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, kw):
    ds = tiny_dataset()
    full = train(config(tmp_path, "full", **kw), dataset=ds)

    class Stop(Exception):
        pass

    def stop_after_first(epoch, record):
        if epoch == 0:
            raise Stop

    with pytest.raises(Stop):
        train(config(tmp_path, "cut", **kw), dataset=ds, on_epoch_end=stop_after_first)
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    resumed = train(config(tmp_path, "cut", resume=True, **kw), dataset=ds)
    assert resumed["history"] == full["history"]  # every epoch's loss and accuracy, exactly
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == 3


def test_summary_fields_and_files(tmp_path):
    s = train(config(tmp_path, "run", epochs=1, optimizer="lamb"), dataset=tiny_dataset())
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["test_acc"] == s["test_acc"]
    for key in ("peak_step_bytes", "saved_activation_bytes", "median_step_s", "images_per_s"):
        assert s[key] > 0
    assert s["peak_step_bytes"] > s["resident_bytes"]


def test_same_seed_same_initial_weights_dense_and_pruned(tmp_path):
    from actprune.train import build_model, resolve_device

    ds = tiny_dataset()
    dense = build_model(config(tmp_path, "a", prune=None), ds, resolve_device("cpu"))
    pruned = build_model(config(tmp_path, "b", sparsity=0.9), ds, resolve_device("cpu"))
    for (_, p), (_, q) in zip(dense.state_dict().items(), pruned.state_dict().items()):
        assert torch.equal(p, q)


def test_bf16_autocast_on_cpu(tmp_path):
    s = train(config(tmp_path, "bf16", epochs=1, amp="bf16"), dataset=tiny_dataset())
    assert 0 <= s["test_acc"] <= 100


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"batch_size": 0}, "batch_size must be positive"),
        ({"prune": {"sparsity": 0.5}}, "prune must be a PruneConfig"),
        ({"model": "vgg"}, "unknown model"),
        ({"dataset": "imagenet"}, "unknown dataset"),
        ({"amp": "fp16"}, "needs a CUDA"),
        ({"resume": True}, "no checkpoint"),
    ],
)
def test_user_errors(tmp_path, kw, match):
    with pytest.raises(TrainError, match=match):
        train(config(tmp_path, "err", **kw), dataset=tiny_dataset())


def test_existing_output_is_not_overwritten(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(TrainError, match="--overwrite"):
        train(config(tmp_path, "busy"), dataset=tiny_dataset())
    train(config(tmp_path, "busy", epochs=1, overwrite=True), dataset=tiny_dataset())
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"


def test_head_stays_dense_unless_exclude_is_cleared(tmp_path):
    from torch import nn

    from actprune import PrunedLinear
    from actprune.train import build_model, resolve_device

    ds, cpu = tiny_dataset(), resolve_device("cpu")
    model = build_model(config(tmp_path, "a", sparsity=0.9), ds, cpu)
    assert type(model.head) is nn.Linear and isinstance(model.blocks[0].fc1, PrunedLinear)
    model = build_model(config(tmp_path, "b", sparsity=0.9, exclude=("head", "*.tok")), ds, cpu)
    assert type(model.blocks[1].tok) is nn.Linear and isinstance(model.blocks[1].fc2, PrunedLinear)
    model = build_model(config(tmp_path, "c", sparsity=0.9, exclude=()), ds, cpu)
    assert isinstance(model.head, PrunedLinear)


def test_remainder_rounding_leaves_torch_rng_alone():
    """Same seed: a model with Dropout gets the same masks compressed as dense, and the user's next
    torch.rand is the same (the rounding draws from actprune.rng only)."""
    import copy

    from torch import nn

    from actprune import prune_activations_

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(64, 64), nn.Dropout(0.5), nn.Linear(64, 8))
    pruned = prune_activations_(copy.deepcopy(dense), PruneConfig(0.5, 16, remainder_bits=4))
    x = torch.randn(32, 64)
    after = []
    for model in (dense, pruned):
        torch.manual_seed(1)
        masks = []
        model[1].register_forward_hook(lambda m, i, o, masks=masks: masks.append(o != 0))
        model(x).sum().backward()
        after.append((masks[0], torch.rand(5)))
    assert torch.equal(after[0][0], after[1][0])  # identical dropout masks
    assert torch.equal(after[0][1], after[1][1])  # the user's next random numbers


def test_actprune_rng_state_round_trips():
    from actprune import rng

    config = PruneConfig(0.5, 32, remainder_bits=2)
    x = torch.randn(64, 64)
    rng.manual_seed(5)
    state = rng.get_state()
    first = compress(x, config).remainder.codes
    second = compress(x, config).remainder.codes
    assert not torch.equal(first, second)  # a new key each call
    rng.set_state(state)
    assert torch.equal(compress(x, config).remainder.codes, first)  # the state is the whole story
