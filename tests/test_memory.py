import pytest
import torch
from torch import nn

from actprune import (
    PruneConfig,
    SavedTensorLog,
    measure_training_step,
    peak_memory,
    prune_activations_,
)
from actprune import saved_activation_bytes as sab


def test_linear_saves_exactly_its_input():
    lin = nn.Linear(128, 64)
    x = torch.randn(32, 128, requires_grad=True)
    assert sab(lin, x) == 32 * 128 * 4  # weight.t() is a view of a Parameter: excluded


def test_storage_is_counted_once():
    x = torch.randn(100, 10, requires_grad=True)

    def two_users(x):
        y = x.exp()  # saves its output y
        return (y * y).sum()  # saves y twice more: still one storage

    assert sab(two_users, x) == 100 * 10 * 4


def test_graph_freed_after_backward_is_not_counted():
    lin = nn.Linear(16, 16)

    def step(x):
        lin(x).sum().backward()

    assert sab(step, torch.randn(8, 16, requires_grad=True)) == 0


def test_log_lists_live_tensors():
    with SavedTensorLog() as log:
        x = torch.randn(10, requires_grad=True)
        y = x.sin()
    assert [t.shape for t in log.live_tensors()] == [torch.Size([10])]
    del y


def test_pruned_model_saves_less():
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    x = torch.randn(512, 256)
    relu_out = 512 * 256 * 4  # ReLU saves its output; dense fc2 saves the same storage
    assert sab(model, x) == 512 * 256 * 4 + relu_out
    prune_activations_(model, PruneConfig(0.9, 32))
    kept = 16  # 8 block-columns × ceil(0.1 · 16) blocks of 32×32, int32 rows, 9 column offsets
    assert sab(model, x) == relu_out + 2 * (kept * 32 * 32 * 4 + kept * 4 + 9 * 4)


def test_cpu_peak_sees_a_transient_allocation():
    n = 1 << 22  # 16 MiB of fp32

    def transient():
        a = torch.ones(n)
        b = a * 2  # both alive: 32 MiB
        del a, b

    peak_memory(transient)  # warm-up
    peak = peak_memory(transient)
    assert 2 * n * 4 <= peak < 2 * n * 4 + (1 << 20)
    assert peak_memory(lambda: None) < (1 << 16)


def test_peak_of_pruned_training_step_is_lower():
    def make(config):
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(6)])
        if config:
            prune_activations_(model, config)
        return model

    x = torch.randn(4096, 256)  # activations dominate, as in real training

    def step(model):
        model(x).sum().backward()
        model.zero_grad(set_to_none=True)

    peaks = {}
    for name, cfg in [("dense", None), ("pruned", PruneConfig(0.9, 32))]:
        model = make(cfg)
        step(model)
        peaks[name] = peak_memory(step, model)
    assert peaks["pruned"] < 0.7 * peaks["dense"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_peak():
    def f():
        torch.ones(1 << 20, device="cuda")

    assert peak_memory(f) >= 4 << 20


def test_measuring_keeps_no_model_alive():
    """Tanh saves its output, whose grad_fn holds what the log packed: held as is, that cycle
    ran through C++ where gc cannot see it, and every measured model stayed in memory."""
    import functools
    import gc
    import weakref

    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    ref = weakref.ref(model[0].weight)
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(8, 16)
    loss = functools.partial(_square_mean, model, x)
    measure_training_step(model, opt, loss, [x], timing_steps=1)
    del model, opt, loss
    gc.collect()
    assert ref() is None


def _square_mean(model, x):
    return model(x).square().mean()
