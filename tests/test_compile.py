"""torch.compile (inductor, CPU): the layers' autograd Functions are traced around the registered
kernel operators, so the graph has no breaks and the compiled step saves the same compressed
tensors as eager. With PyTorch's backend ("torch") the uniform compression and the activation
codes are traced too: the same codes and keys as eager, and rounding with eager's distribution
(also under CUDA graphs, where a GPU runs the tests marked for it)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from actprune import PruneConfig, models, ops, prune_activations_, saved_activation_bytes


@pytest.fixture(scope="module")
def models_and_batch():
    torch.manual_seed(0)
    dense = models.create("resmlp_tiny", width=32, depth=1)
    pruned = prune_activations_(copy.deepcopy(dense), PruneConfig(0.5, 16), exclude="head")
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    return dense, pruned, x, y


def test_compiled_fullgraph_matches_eager_and_saves_the_same_bytes(models_and_batch):
    dense, pruned, x, y = models_and_batch
    compiled_model = copy.deepcopy(pruned)
    compiled = torch.compile(compiled_model, backend="inductor", fullgraph=True)  # no graph break
    F.cross_entropy(compiled(x), y).backward()
    eager = copy.deepcopy(pruned)
    F.cross_entropy(eager(x), y).backward()
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled_model.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
    eager_bytes = saved_activation_bytes(lambda: pruned(x).sum())
    compiled_bytes = saved_activation_bytes(lambda: compiled(x).sum())
    dense_compiled = torch.compile(copy.deepcopy(dense), backend="inductor")
    assert compiled_bytes == eager_bytes  # what compile changes: nothing, on this model
    assert compiled_bytes < 0.85 * saved_activation_bytes(lambda: dense_compiled(x).sum())


def test_registered_ops_pass_opcheck():
    x = torch.randn(3, 20, 24, requires_grad=True)
    for config in (
        PruneConfig(0.5, 8),
        PruneConfig(0.5, 8, "max", "batch-major", "global", int8=True),
        PruneConfig(0.5, 8, remainder_bits=2),
    ):
        key = config.to_json()
        # the remainder's stochastic rounding differs between calls: only schema and fake checks
        checks = ("test_schema", "test_faketensor")
        if not config.remainder_bits:
            checks += ("test_autograd_registration", "test_aot_dispatch_dynamic")
        torch.library.opcheck(ops.compress_rows, (x.detach(), key, 0), test_utils=checks)
        parts = ops.compress_rows(x.detach(), key, 0)
        # dy as a row source [B, T, N] (token-major: 20 tokens of a batch of 3)
        for param, dy in (
            ("weight", torch.randn(3, 20, 10)),
            ("channel_scale", torch.randn(3, 20, 24)),
        ):
            torch.library.opcheck(ops.block_sparse_grad, (dy, *parts, key, 60, 24, param))
    for bits, function in ((2, "gelu"), (4, "gelu_tanh"), (2, "silu"), (1, "relu")):
        codes, nonfinite = ops.activation_code(x.detach(), bits, function)
        torch.library.opcheck(ops.activation_code, (x.detach(), bits, function))
        if function != "relu":
            torch.library.opcheck(
                ops.activation_grad, (x.detach(), codes, nonfinite, bits, function)
            )


def test_scope_all_compiles_without_graph_breaks():
    torch.manual_seed(0)
    model = models.create("resmlp_tiny", width=32, depth=1)
    prune_activations_(model, PruneConfig(0.5, 16, scope="all"), exclude="head")
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    eager = copy.deepcopy(model)
    F.cross_entropy(eager(x), y).backward()
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    F.cross_entropy(compiled(x), y).backward()
    for (name, a), (_, b) in zip(eager.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("preset", ["recommended", "paper", "blocks"])
def test_every_preset_compiles_fullgraph_and_matches_eager(preset):
    """fullgraph=True: no graph break with any preset; the compiled step draws the same keys from
    the model's random stream as eager (a copy in the same state), so the gradients agree.
    Inductor checks every op's output strides against its fake: the token-mixing Linear (16
    patches, 32-wide blocks) has a weight gradient cut from a padded one."""
    torch.manual_seed(0)
    model = models.create("resmlp_tiny", width=32, depth=1)
    prune_activations_(model, PruneConfig.preset(preset), exclude="head")
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    eager, compiled_model = copy.deepcopy(model), copy.deepcopy(model)
    F.cross_entropy(eager(x), y).backward()
    compiled = torch.compile(compiled_model, backend="inductor", fullgraph=True)
    F.cross_entropy(compiled(x), y).backward()
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled_model.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)


# --- the traced compression (PyTorch's backend: kernels.traced) -----------------------------------


CUDA = pytest.param(
    "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize(
    "shape, config",
    [
        ((4, 20, 24), PruneConfig(1.0, 8, remainder_bits=4)),  # token-major, padded edges
        ((3, 16, 48), PruneConfig(1.0, (16, 8), row_order="batch-major", remainder_bits=2)),
    ],
)
def test_traced_compression_writes_the_codecs_parts(shape, config, device):
    """The traced compression writes the codec's codes and scales (numba's on the CPU, Triton's
    on CUDA) bit for bit under the same key, and its gradients are the codec's (same X̃). Compiled
    by inductor: the same bytes on the CPU; on CUDA inductor may contract the code's multiply and
    add into one fused operation, which moves a code by at most one level, rarely."""
    from actprune import blocksparse, rng
    from actprune.bitpack import unpack_codes

    x = torch.randn(shape, device=device)
    x.view(-1)[5] = 40.0  # a block with a large scale next to small ones
    codec = blocksparse.codec_for(config, x.shape, x.dtype, x.device)
    expected = codec.compress(x, rng.Stream(seed=3))
    key = torch.tensor(rng.Stream(seed=3).next_key(), device=device)
    compiled = torch.compile(blocksparse.traced_compress, fullgraph=True)
    for fused, parts in enumerate((blocksparse.traced_compress(x, config, key),
                                   compiled(x, config, key))):  # fmt: skip
        for got, want in zip(parts[2:], expected[2:]):  # ccol, scales, codes, block scales
            if fused and device == "cuda" and want is expected[4]:
                n = want.numel() * 8 // config.remainder_bits
                got, want = (unpack_codes(c, config.remainder_bits, n).int() for c in (got, want))
                assert (got - want).abs().max() <= 1 and (got != want).float().mean() < 1e-2
            else:
                assert torch.equal(got, want)
    parts = blocksparse.traced_compress(x, config, key)
    dy = torch.randn(*shape[:-1], 10, device=device)
    torch.testing.assert_close(
        blocksparse.traced_param_grad(dy, parts, config, x.shape, "weight"),
        codec.weight_grad(dy, expected), rtol=1e-5, atol=1e-5,
    )  # fmt: skip
    dy = torch.randn(shape, device=device)
    torch.testing.assert_close(
        blocksparse.traced_param_grad(dy, parts, config, x.shape, "channel_scale"),
        codec.channel_scale_grad(dy, expected), rtol=1e-5, atol=1e-5,
    )  # fmt: skip


def test_traced_path_compiles_fullgraph_and_matches_eager(monkeypatch):
    """With PyTorch's backend, whose compressions are traced (kernels.traced), the
    compiled step calls no codec or backend kernel (the quantization, the activation codes and
    their read-back are PyTorch ops in the graph) and draws the same keys as eager, so the
    gradients agree to rounding. AOT autograd's graphs run as they are (``aot_eager``): inductor's
    code of the same ops is checked below, on smaller graphs (its compilation takes ~30 s here)."""
    from actprune import blocksparse, kernels

    kernels.set_backend("torch")
    torch.manual_seed(0)
    model = models.create("resmlp_tiny", width=32, depth=1)
    prune_activations_(model, PruneConfig.preset("recommended"), exclude="head")
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    eager, compiled_model = copy.deepcopy(model), copy.deepcopy(model)
    F.cross_entropy(eager(x), y).backward()

    def no_codec(*args, **kwargs):
        raise AssertionError("a backend kernel ran under torch.compile: not traced")

    for name in ("compress", "weight_grad", "channel_scale_grad"):
        monkeypatch.setattr(blocksparse.Codec, name, no_codec)
    for name in ("activation_codes", "activation_grad"):
        monkeypatch.setattr(kernels, name, no_codec)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    F.cross_entropy(compiled(x), y).backward()
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled_model.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_ops_that_draw_keys_on_the_host_are_cudagraph_unsafe():
    """A CUDA graph replays kernel arguments as captured: an operator that draws its key on the
    host must run outside inductor's graphs, or every replay would round with one key."""
    tag = getattr(torch.Tag, "cudagraph_unsafe", None)
    if tag is None:
        pytest.skip("this torch has no cudagraph_unsafe tag")
    for op in (ops.compress_rows, ops.next_key):
        assert tag in op.tags
    assert tag not in ops.block_sparse_grad.tags  # deterministic: safe to capture
    x, w = torch.randn(3, 4), torch.randn(2, 4)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(ops.next_key, (x, w, 0), test_utils=checks)
    first, second = ops.next_key(x, w, 0), ops.next_key(x, w, 0)
    assert first.dtype == torch.int64 and first.shape == () and first != second


def test_traced_keys_follow_eager_when_a_layer_runs_twice():
    """Inductor's code of a traced step: a layer applied twice in one graph draws two keys, as in
    eager mode (identical key calls would be merged by the graph's common-subexpression pass: the
    key takes the tensor it codes), the compiled gradients equal eager's, and the step saves no
    more than eager does (the codes, not x; not the empty selection's offsets either, which its
    backward never reads)."""
    from actprune import kernels, rng

    kernels.set_backend("torch")

    class Twice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.act = torch.nn.Linear(32, 32), torch.nn.GELU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(self.act(self.lin(x)))

    torch.manual_seed(0)
    model = prune_activations_(Twice(), PruneConfig.preset("recommended"))
    eager, compiled_model = copy.deepcopy(model), copy.deepcopy(model)
    x = torch.randn(64, 32)
    eager(x).sum().backward()
    compiled = torch.compile(compiled_model, fullgraph=True)
    compiled(x).sum().backward()
    assert rng.get_state(compiled_model) == rng.get_state(eager)  # two draws each
    torch.testing.assert_close(compiled_model.lin.weight.grad, eager.lin.weight.grad)
    torch.testing.assert_close(compiled_model.lin.bias.grad, eager.lin.bias.grad)
    assert saved_activation_bytes(lambda: compiled(x).sum()) <= saved_activation_bytes(
        lambda: eager(x).sum()
    )


@pytest.mark.parametrize("device, mode, backend", [
    ("cpu", None, "torch"),
    pytest.param("cuda", "reduce-overhead", "torch", marks=CUDA.marks),
    pytest.param("cuda", "reduce-overhead", "auto", marks=CUDA.marks),
])  # fmt: skip
def test_compiled_rounding_is_unbiased_with_eagers_variance(device, mode, backend):
    """Over many compiled steps of one layer on the same input the weight gradient's mean
    converges to the exact dyᵀ·x and its spread is eager's: each call rounds with a new key (a
    key frozen into the graph, as a captured CUDA graph would replay it, has no spread at all).
    The traced compression ("torch"), and on CUDA under ``mode="reduce-overhead"`` (CUDA graphs
    around the host-side key draws) also the Triton kernel's operator ("auto")."""
    from actprune import PrunedLinear, kernels

    kernels.set_backend(backend)
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 16, device=device)
    layer = PrunedLinear.from_linear(linear, PruneConfig.preset("recommended"))
    x, dy = torch.randn(128, 64, device=device), torch.randn(128, 16, device=device)
    exact = dy.t() @ x

    def weight_grads(run, steps: int = 200) -> torch.Tensor:
        grads = []
        for _ in range(steps):
            layer.weight.grad = None
            if mode is not None:
                torch.compiler.cudagraph_mark_step_begin()
            run(x).backward(dy)
            grads.append(layer.weight.grad.clone())
        return torch.stack(grads)

    compiled = weight_grads(torch.compile(layer, fullgraph=True, mode=mode))
    eager = weight_grads(layer)
    for grads in (compiled, eager):
        spread = grads.std(0)
        # the mean's error within ~4 standard errors, element by element, on average
        assert ((grads.mean(0) - exact).abs() / (spread / 200**0.5)).mean() < 4
    ratio = compiled.var(0).mean() / eager.var(0).mean()
    assert 0.8 < ratio < 1.25


def test_packing_under_compile_writes_eagers_bytes():
    """``bitpack`` packs by per-lane shifts under torch.compile (they fuse; the eager form's
    dtype views cut kernels apart) and by wide-integer views in eager mode: the same bytes, and
    the same codes back, for every width and a length that pads. (AOT autograd's graph run as
    it is: the traced form's values; inductor's code of it runs in the model tests.)"""
    from actprune.bitpack import pack_codes, unpack_codes

    def both_ways(codes):
        return [(p, unpack_codes(p, bits, codes[bits].numel()))
                for bits in (1, 2, 4, 8) for p in [pack_codes(codes[bits], bits)]]  # fmt: skip

    codes = {bits: torch.randint(0, 1 << bits, (1001,), dtype=torch.uint8) for bits in (1, 2, 4, 8)}
    compiled = torch.compile(both_ways, fullgraph=True, backend="aot_eager")(codes)
    for (packed, back), (want_packed, want_back) in zip(compiled, both_ways(codes)):
        assert torch.equal(packed, want_packed) and torch.equal(back, want_back)


def test_converted_dropout_compiles_with_inductor():
    """A converted dropout's backward (its mask unpacked from bits) compiles with inductor on the
    CPU (its mask read as a bool view of bytes once made C++ that did not compile) and passes
    the gradient where the forward kept an element, scaled by 1 / (1 − p)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Dropout(0.3))
    prune_activations_(model, PruneConfig.preset("recommended"))
    assert type(model[1]).__name__ == "CodedDropout"
    x, w = torch.randn(4, 64, 64, requires_grad=True), torch.randn(4, 64, 64)
    y = torch.compile(model)(x)
    y.backward(w)
    dz = torch.where(y != 0, w / 0.7, 0.0)  # no output of the Linear is exactly 0
    torch.testing.assert_close(x.grad, dz @ model[0].weight.detach())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_replay_the_kernels_operators():
    """On CUDA under ``mode="reduce-overhead"`` the Triton kernels' operators (compression, the
    weight gradient, the GELU's derivative code and its gradient) run in and around CUDA graphs,
    step after step: the input gradient, which reads no rounded code, is eager's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).cuda()
    prune_activations_(model, PruneConfig.preset("recommended"))
    compiled = torch.compile(model, mode="reduce-overhead")
    for _ in range(3):
        x = torch.randn(32, 64, device="cuda", requires_grad=True)
        torch.compiler.cudagraph_mark_step_begin()
        compiled(x).square().sum().backward()
        got = x.grad.clone()
        x.grad = None
        model(x).square().sum().backward()
        torch.testing.assert_close(got, x.grad, rtol=1e-4, atol=1e-5)
