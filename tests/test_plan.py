import pytest
import torch
import torch.nn.functional as F

from actprune import PruneConfig, measure_training_step, models
from actprune.methods import MemoryConfig, apply_method
from actprune.plan import largest_batch, parse_bytes, predict_step

CONFIGS = [  # one of every family (MemoryConfig.family)
    MemoryConfig.dense(),
    MemoryConfig.checkpointing(),
    MemoryConfig.checkpointing(every=2, selective=True),
    MemoryConfig.unstructured(0.8),
    MemoryConfig.actprune(PruneConfig(0.9, 32, scope="all", int8=True, remainder_bits=2)),
    MemoryConfig.actprune(PruneConfig.preset("uniform")),
    MemoryConfig.composition(PruneConfig.preset("recommended"), every=2),
]
FAMILIES = {"dense", "checkpoint", "selective", "actprune", "unstructured", "uniform",
            "composition"}  # fmt: skip


def test_configs_cover_every_family():
    assert {c.family for c in CONFIGS} == FAMILIES


def measured_peak(name, batch, config, image_size=None, **overrides):
    torch.manual_seed(0)
    if image_size:
        overrides["img_size"] = image_size
    model = apply_method(models.create(name, **overrides), config)
    c, s = model.config.in_chans, model.config.img_size
    x, y = torch.randn(batch, c, s, s), torch.randint(0, model.config.num_classes, (batch,))
    opt = torch.optim.AdamW(model.parameters())
    return measure_training_step(model, opt, lambda: F.cross_entropy(model(x), y), (x, y))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize(
    "name, batch, overrides",
    [("resmlp_tiny", 64, {}), ("resmlp_s12", 4, {"image_size": 64, "depth": 4})],
)
def test_prediction_within_10_percent_of_cpu_measurement(name, batch, overrides, config):
    predicted = predict_step(name, batch, config, foreach=False, **overrides)
    measured = measured_peak(name, batch, config, **overrides)
    assert predicted.resident_bytes == measured.resident_bytes
    assert abs(predicted.peak_step_bytes / measured.peak_step_bytes - 1) < 0.10


def test_prediction_allocates_nothing_for_a_huge_model():
    plan = predict_step("resmlp_b24", 256, MemoryConfig.dense())
    assert plan.peak_step_bytes > 20 * 2**30  # tens of GiB, predicted on a 24 GB machine


def test_largest_batch_matches_brute_force():
    peaks = {b: 1000 + 37 * b + (b % 5) for b in range(1, 3000)}  # about linear
    for budget in (900, 1040, 5000, 60000):
        want = max([b for b, p in peaks.items() if p <= budget], default=0)
        assert largest_batch(peaks.__getitem__, budget, probe=16, limit=2999) == want
    assert largest_batch(lambda b: 1, 10, probe=4, limit=100) == 100  # never full: the limit


@pytest.mark.parametrize(
    "text, value",
    [
        ("80GB", 80 * 10**9),
        ("24GiB", 24 * 2**30),
        ("512 MiB", 512 * 2**20),
        ("1000", 1000),
        ("1.5gb", 1_500_000_000),
    ],
)
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "GB", "80 parsecs", "-1GB"])
def test_parse_bytes_errors(text):
    with pytest.raises(ValueError, match="memory size"):
        parse_bytes(text)
