"""Every kernel backend against the PyTorch reference: numba on CPU, Triton through the interpreter
on CPU (natively on CUDA). Scores to rounding; kept blocks, indices and remainder codes exact."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import DEVICE

from actprune import PruneConfig, compress, kernels, rng
from actprune.blocksparse import compress_rows_of, row_source
from actprune.kernels import reference

BACKENDS = [  # (module name, device, dtypes): the interpreter computes bf16 wrongly
    pytest.param(
        "cpu_blocks", "cpu", (torch.float32,), id="numba",
        marks=pytest.mark.skipif(not importlib.util.find_spec("numba"), reason="no numba"),
    ),
    pytest.param(
        "triton_blocks", DEVICE, (torch.float32, torch.float16), id="triton",
        marks=pytest.mark.skipif(not importlib.util.find_spec("triton"), reason="no triton"),
    ),
]  # fmt: skip
CASES = [  # (B, T, K, N, block): awkward shapes exercise every mask; B > 1 is token-major order
    (3, 23, 45, 23, (16, 16)),
    (1, 33, 100, 17, (32, 32)),
    (2, 20, 24, 20, (8, 8)),  # divisible: no edge blocks
    (5, 10, 48, 16, (24, 16)),
]


def _small_tiles(monkeypatch, elements):
    monkeypatch.setattr(reference, "TILE_ELEMENTS", dict.fromkeys(("cpu", "cuda"), elements))


def _backend(name):
    return importlib.import_module(f"actprune.kernels.{name}")


def _source(b, t, k, device, dtype, transposed=False):
    """A row source [B, T, K]; `transposed`: a non-contiguous view (strides are followed)."""
    if transposed:
        return torch.randn(b, k, t, device=device).to(dtype).transpose(1, 2)
    return torch.randn(b, t, k, device=device).to(dtype)


@pytest.mark.parametrize("backend, device, dtypes", BACKENDS)
@pytest.mark.parametrize(  # every criterion and every remainder width, not every pair
    "criterion, bits", [("l2", 0), ("l1", 1), ("max", 2), ("l2", 4), ("l1", 8)]
)
@pytest.mark.parametrize("b, t, k, n, block", CASES)
def test_score_blocks(backend, device, dtypes, bits, criterion, b, t, k, n, block):
    for dtype in dtypes:
        x3 = _source(b, t, k, device, dtype, transposed=criterion == "l1")
        got = _backend(backend).score_blocks(x3, block, criterion, bits, 1234)
        want = reference.score_blocks(x3, block, criterion, bits, 1234)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(got[1], want[1]), "remainder codes differ"
        assert torch.equal(got[2], want[2]), "remainder scales differ"
        x3[0, 1, 2] = float("nan")
        scores = _backend(backend).score_blocks(x3, block, criterion, bits, 1234)[0]
        assert scores[b // block[0], 2 // block[1]] == float("inf")  # row 1·B + 0


@pytest.mark.parametrize("backend, device, dtypes", BACKENDS)
@pytest.mark.parametrize("b, t, k, n, block", CASES)
def test_pack_blocks(backend, device, dtypes, b, t, k, n, block):
    for dtype in dtypes:
        x3 = _source(b, t, k, device, dtype, transposed=b == 3)
        scores = reference.score_blocks(x3, block, "l2", 0, 0)[0]
        rows, cols, _ = reference.select_blocks(scores, max(1, scores.numel() // 2))
        got = _backend(backend).pack_blocks(x3, rows, cols, block)
        assert torch.equal(got, reference.pack_blocks(x3, rows, cols, block))  # bit-exact


def _configs():
    return [
        PruneConfig(0.0, 16),
        PruneConfig(0.6, 16, selection="global"),
        PruneConfig(1.0, 16, remainder_bits=8),  # uniform quantization: no kept block
        PruneConfig(0.75, 8, int8=True, remainder_bits=4),
    ]


def _compressed(b, t, k, n, block, device, dtypes):
    """(dtype, dy3 [B, T, n] non-contiguous, X̃ of a random [B, T, k]) for every dtype and config."""
    for dtype in dtypes:
        x3 = _source(b, t, k, device, dtype)
        dy3 = _source(b, t, n, device, dtype, transposed=True)
        for config in _configs():
            config = PruneConfig(**{**config.to_dict(), "block_size": block})
            yield dtype, dy3, compress_rows_of(x3, config).dequantized(dtype)


@pytest.mark.parametrize("backend, device, dtypes", BACKENDS)
@pytest.mark.parametrize("b, t, k, n, block", CASES)
def test_weight_grad(monkeypatch, backend, device, dtypes, b, t, k, n, block):
    _small_tiles(monkeypatch, 512)  # several tiles even here
    for dtype, dy3, packed in _compressed(b, t, k, n, block, device, dtypes):
        got = _backend(backend).weight_grad(dy3, packed)
        want = reference.rows_of(dy3).double().t() @ packed.to_dense().double()
        assert got.dtype == dtype and got.shape == (n, k)
        tol = 2e-2 if dtype == torch.float16 else 1e-4
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * 4)


@pytest.mark.skipif(not importlib.util.find_spec("triton"), reason="no triton")
@pytest.mark.parametrize("block_kernel", [True, False], ids=["kept-blocks", "decoded-tiles"])
@pytest.mark.parametrize("b, t, k, n, block", CASES)
def test_triton_weight_grad_both_paths(monkeypatch, block_kernel, b, t, k, n, block):
    """Both ways to dW, forced: the kept-block kernel (any config without a remainder) and cuBLAS
    over decoded tiles (any config)."""
    triton_blocks = _backend("triton_blocks")
    choice = (lambda x, dtype: x.remainder is None) if block_kernel else (lambda x, dtype: False)
    monkeypatch.setattr(triton_blocks, "use_block_kernel", choice)
    _small_tiles(monkeypatch, 512)
    for _, dy3, packed in _compressed(b, t, k, n, block, DEVICE, (torch.float32,)):
        want = reference.rows_of(dy3).double().t() @ packed.to_dense().double()
        got = triton_blocks.weight_grad(dy3, packed)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=4e-4)


@pytest.mark.parametrize("backend, device, dtypes", BACKENDS)
@pytest.mark.parametrize("b, t, k, n, block", CASES)
def test_channel_scale_grad(monkeypatch, backend, device, dtypes, b, t, k, n, block):
    _small_tiles(monkeypatch, 512)  # several tiles even here
    for dtype, dy3, packed in _compressed(b, t, k, k, block, device, dtypes):
        inputs = [a.clone() for a in (dy3, *packed.tensors)]
        got = _backend(backend).channel_scale_grad(dy3, packed)
        # the kernel wrote nothing but its output (docs/reliability.md, item 29)
        assert all(torch.equal(a, c) for a, c in zip(inputs, (dy3, *packed.tensors)))
        want = (reference.rows_of(dy3).double() * packed.to_dense().double()).sum(0)
        assert got.dtype == dtype and got.shape == (k,)
        tol = 2e-2 if dtype == torch.float16 else 1e-5
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * 4)
        ref = reference.channel_scale_grad(dy3, packed)
        torch.testing.assert_close(ref.double(), want, rtol=tol, atol=tol * 4)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("row_order", ["token-major", "batch-major"])
@pytest.mark.parametrize(  # (input shape, N): around cpu_blocks.FUSED_GRAD_MAX_MACS, padded K
    "shape, n", [((8, 64), 64), ((3, 7, 40), 5), ((4, 16, 48), 24), ((2, 40, 64), 33)]
)
def test_codec_weight_grad_is_the_product_with_the_decoded_input(shape, n, row_order, bits):
    """The codec's eager routes to dW (numba: decode and product fused below
    ``FUSED_GRAD_MAX_MACS``, X̃ decoded whole and one product above; the backend's tiles past a
    tile) against dyᵀ·X̃ of the parts it compressed, for every backend on this machine."""
    from actprune.blocksparse import as_rows, codec_for
    from actprune.storage import BlockSparse

    config = PruneConfig.preset("uniform", remainder_bits=bits, row_order=row_order)
    x, dy = torch.randn(*shape, device=DEVICE), torch.randn(*shape[:-1], n, device=DEVICE)
    for choice in ("torch", "numba", "triton"):
        if choice != "torch" and not importlib.util.find_spec(choice):
            continue
        kernels.set_backend(choice)  # conftest resets it after the test
        codec = codec_for(config, x.shape, x.dtype, x.device)
        assert codec is codec_for(config, x.shape, x.dtype, x.device)  # built once
        parts = codec.compress(x)
        got = codec.weight_grad(dy, parts)
        x_tilde = BlockSparse.from_parts(parts, codec.shape, bits).to_dense()
        want = as_rows(dy, row_order).double().t() @ x_tilde.double()
        assert got.shape == (n, shape[-1]) and got.is_contiguous()
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_codecs_are_kept_up_to_a_bound(monkeypatch):
    """One codec per kind of input, but not one per sequence length for the whole process."""
    from actprune import blocksparse

    monkeypatch.setattr(blocksparse, "_codecs", {})
    monkeypatch.setattr(blocksparse, "MAX_CODECS", 4)
    config = PruneConfig.preset("recommended")
    codecs = [blocksparse.codec_for(config, (2, t, 32), torch.float32, torch.device("cpu"))
              for t in range(1, 7)]  # fmt: skip
    assert len(blocksparse._codecs) == 4
    assert list(blocksparse._codecs.values()) == codecs[2:]  # the oldest went first
    cpu = torch.device("cpu")
    assert blocksparse.codec_for(config, (2, 6, 32), torch.float32, cpu) is codecs[-1]


def test_codec_is_rebuilt_when_the_backend_changes():
    from actprune.blocksparse import codec_for

    config, x = PruneConfig.preset("recommended"), torch.randn(8, 64)
    kernels.set_backend("torch")
    first = codec_for(config, x.shape, x.dtype, x.device)
    assert first.kernels is reference
    kernels.set_backend("auto")
    second = codec_for(config, x.shape, x.dtype, x.device)
    assert second is not first and second.kernels is kernels.backend_module(x)


@pytest.mark.parametrize("choice", ["numba", "triton"])
@pytest.mark.parametrize("config", _configs(), ids=lambda c: c.label())
def test_compress_is_the_same_on_every_backend(choice, config):
    pytest.importorskip(choice)
    x3 = row_source(torch.randn(4, 30, 40, device=DEVICE), "token-major")
    kernels.set_backend("torch")
    rng.manual_seed(9)
    want = compress_rows_of(x3, config)
    kernels.set_backend(choice)
    rng.manual_seed(9)
    got = compress_rows_of(x3, config)
    assert kernels.backend_for(x3) == choice or x3.is_cuda
    assert all(torch.equal(g, w) for g, w in zip(got.tensors, want.tensors))


@pytest.mark.parametrize("backend, device, dtypes", BACKENDS)
@pytest.mark.parametrize("config", _configs(), ids=lambda c: c.label())
def test_decode_rows_is_the_reference(monkeypatch, backend, device, dtypes, config):
    _small_tiles(monkeypatch, 2048)
    for dtype in dtypes:
        x3 = torch.randn(3, 50, 40, device=device).to(dtype)
        x = compress_rows_of(x3, config).dequantized(dtype)
        tiles = list(reference.row_tiles(x, batch=3))
        assert len(tiles) > 1
        for start, stop in tiles:
            want = reference.decode_rows(x, start, stop, 3)
            assert torch.equal(_backend(backend).decode_rows(x, start, stop, 3), want)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_numba_row_chunks_are_the_reference(bits):
    """Rows wider than 128 elements make the numba kernels work a chunk of rows (not the whole
    block-row) at a time (``cpu_blocks._CODE_CHUNK``): codes, decoding and the channel-scale
    gradient across chunk boundaries, with a last block-row past M and kept blocks."""
    pytest.importorskip("numba")
    from actprune.kernels import cpu_blocks

    x3, dy3 = torch.randn(3, 50, 300), torch.randn(3, 50, 300)  # M = 150, K = 300
    want = reference.score_blocks(x3, (32, 32), "l2", bits, 99)
    got = cpu_blocks.score_blocks(x3, (32, 32), "l2", bits, 99)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    x = compress_rows_of(x3, PruneConfig(0.8, 32, remainder_bits=bits))
    n_br = x.grid_shape[0]
    assert torch.equal(cpu_blocks.decode_rows(x, 0, n_br, 3), reference.decode_rows(x, 0, n_br, 3))
    torch.testing.assert_close(
        cpu_blocks.channel_scale_grad(dy3, x), reference.channel_scale_grad(dy3, x),
        rtol=1e-5, atol=1e-4,
    )  # fmt: skip


def test_numba_random_words_are_the_reference_past_2_to_the_31():
    """The numba hash is 32-bit LLVM arithmetic on a truncated word index: the same words as
    ``rng.random_words`` for keys and word indices past 2^31 and past 2^32 (which wrap)."""
    pytest.importorskip("numba")
    import numba as nb
    import numpy as np

    from actprune.kernels import cpu_blocks

    @nb.njit
    def words(key, first, n):
        out = np.empty(n, np.uint32)
        for w in range(n):
            out[w] = cpu_blocks._random_word(key, first + w)
        return out

    for key, first in ((0, 0), (2**32 - 1, 2**31 - 3), (2**31 + 5, 2**32 - 2), (7, 3 * 2**32)):
        want = rng.random_words(key, torch.arange(first, first + 8) % 2**32)
        got = torch.from_numpy(words(np.uint32(key), first, 8).astype(np.int64))
        assert torch.equal(got, want), (key, first)


@pytest.mark.parametrize("backend, device, dtypes", BACKENDS)
@pytest.mark.parametrize("function, bits", [("gelu", 2), ("silu", 4)])
@pytest.mark.parametrize("shape", [(3, 7, 10), (17, 12), (9,), (2, 9, 5)])
def test_activation_codes_and_grad_are_the_reference(backend, device, dtypes, function, bits,
                                                     shape):  # fmt: skip
    from actprune import derivative_code

    code = derivative_code(function, bits)
    for dtype in dtypes:
        x = (torch.randn(shape, device=device) * 3).to(dtype)
        dy = torch.randn(shape, device=device).to(dtype)
        x.view(-1)[5] = float("inf")  # its row's flag is set; its code is whatever comparisons say
        got = _backend(backend).activation_codes(x, code)
        want = reference.activation_codes(x, code)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        dx = _backend(backend).activation_grad(dy, *want, code)
        want_dx = reference.activation_grad(dy, *want, code)
        torch.testing.assert_close(dx, want_dx, rtol=0, atol=0, equal_nan=True)  # bit-exact


def test_row_tiles_cover_every_block_row_once_on_whole_tokens(monkeypatch):
    _small_tiles(monkeypatch, 4096)
    x = compress(torch.randn(3 * 700, 64), PruneConfig(0.5, (32, 16), remainder_bits=1))
    tiles = list(reference.row_tiles(x, batch=3))
    assert tiles[0][0] == 0 and tiles[-1][1] == x.grid_shape[0] and len(tiles) > 1
    assert all(a[1] == b[0] for a, b in zip(tiles, tiles[1:]))
    assert all((start * 32) % 3 == 0 for start, _ in tiles)  # whole tokens of a batch of 3


@pytest.mark.parametrize("block, sparsity", [((32, 32), 0.95), ((16, 16), 0.5), ((8, 24), 0.9)])
def test_reference_weight_grad_both_paths(block, sparsity):
    x = torch.randn(300, 200)
    dy = torch.randn(300, 50)
    packed = compress(x, PruneConfig(sparsity, block))
    want = dy.double().t() @ packed.to_dense().double()
    tiled = reference.weight_grad_tiled(dy.unsqueeze(0), packed, reference.decode_rows)
    for got in (reference._weight_grad_by_blocks(dy, packed), tiled):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(
        reference.weight_grad(dy.unsqueeze(0), packed).double(), want, rtol=1e-5, atol=1e-4
    )


def test_block_path_chunks_keep_result():
    x, dy = torch.randn(256, 40), torch.randn(256, 500)  # wide dy: many small chunks
    packed = compress(x, PruneConfig(0.5, 32))
    torch.testing.assert_close(
        reference._weight_grad_by_blocks(dy, packed),
        dy.t() @ packed.to_dense(),
        atol=1e-4,
        rtol=1e-5,
    )


def test_dispatch(monkeypatch):
    cpu = torch.zeros(1)
    has_numba = importlib.util.find_spec("numba") is not None
    assert kernels.backend_for(cpu) == ("numba" if has_numba else "torch")
    assert kernels.backend_for(cpu.double()) == "torch"  # numba runs float32 only
    monkeypatch.setenv("ACTPRUNE_KERNELS", "triton")
    assert kernels.backend_for(cpu) != "triton"  # read at the first kernel call, not per call
    kernels.set_backend(None)  # read it again
    assert kernels.backend_for(cpu) == "triton" and kernels.backend_choice() == "triton"
    kernels.set_backend("torch")
    assert kernels.backend_for(cpu) == "torch"
    with pytest.raises(ValueError, match="ACTPRUNE_KERNELS must be one of"):
        kernels.set_backend("cuda")
    monkeypatch.setenv("ACTPRUNE_KERNELS", "cuda")
    kernels.set_backend(None)
    with pytest.raises(ValueError, match="ACTPRUNE_KERNELS"):
        kernels.backend_for(cpu)


@pytest.mark.parametrize("choice", ["numba", "triton"])
def test_pruned_linear_backward_on_every_backend(choice):
    pytest.importorskip(choice)
    from actprune import PrunedLinear

    layer = PrunedLinear(40, 24, config=PruneConfig(0.5, 16, remainder_bits=2), device=DEVICE)
    x, dy = torch.randn(3, 20, 40, device=DEVICE), torch.randn(3, 20, 24, device=DEVICE)
    kernels.set_backend("torch")
    rng.manual_seed(2)
    layer(x).backward(dy)
    want = layer.weight.grad.clone()
    layer.weight.grad = None
    kernels.set_backend(choice)
    rng.manual_seed(2)  # the same key: the same remainder codes
    layer(x).backward(dy)
    torch.testing.assert_close(layer.weight.grad, want, rtol=1e-4, atol=1e-4)


# Compiles the remainder's Triton kernels for sm_90 (triton ships its own ptxas: no GPU needed) and
# prints, per kernel, whether its PTX has plain float32 multiplies and fused multiply-adds, with
# the launchers' options and with fusion on. A process of its own: the tests' TRITON_INTERPRET=1
# makes every @triton.jit an interpreted function that cannot be compiled.
_PTX_PROBE = """
import json, triton
from triton.backends.compiler import GPUTarget
from actprune.kernels import triton_blocks as tb
args = tb._block_args((32, 32))
kernels = [
    (tb._score_blocks_kernel, "*fp32 *fp32 *fp32 *u8 *i32 i64" + " i32" * 7,
     {**args, "CRITERION": 2, "BITS": 4, "ZERO_CCOL": True}),
    (tb._decode_rows_kernel, "*fp32 *i32 *i32 *u8 *fp32 *fp32" + " i32" * 7, {**args, "BITS": 4}),
    (tb._compress_blocks_kernel, "*fp32 *fp32 *fp32 *u8 *i32 *i8 *i32 *i32 *i32 *fp32 i64"
     + " i32" * 11, {**args, "CRITERION": 0, "BITS": 4, "PER_COLUMN": True, "TILE_R": 512,
                    "NB": 8}),
    (tb._row_codes_kernel, "*fp32 *u8 *fp32 *fp32 i32 i32 fp32" + " i32" * 6,
     {"NORM": 2, "BITS": 4, "ROWS": 4, "TILE_C": 256}),
]
found = []
for kernel, types, constexprs in kernels:
    signature = dict(zip(kernel.arg_names, types.split())) | dict.fromkeys(constexprs, "constexpr")
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    for options in (tb.EXACT, {"enable_fp_fusion": True}):
        ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
        found.append(["mul.rn.f32" in ptx, "fma.rn.f32" in ptx])
        if kernel is tb._compress_blocks_kernel and options is tb.EXACT:
            lines = ptx.splitlines()

            def at(text, before=len(lines)):
                return [i for i, line in enumerate(lines[:before]) if text in line]

            def fenced(release):  # the stores before a release, then a bar.sync, then it
                return max(at("st.global", release)) < max(at("bar.sync", release))

            arrival, selected = at("atom.global.gpu.acq_rel.add")[0], at(".gpu.release.add")[0]
            order = [fenced(arrival), min(at("ld.global.cg")) > arrival, fenced(selected),
                     len(at("ld.global.gpu.acquire")) > 0]
print(json.dumps(found))
print(json.dumps(order))
"""


@pytest.mark.skipif(not importlib.util.find_spec("triton"), reason="no triton")
def test_triton_remainder_kernels_compile_for_a_gpu_without_fused_multiply_add():
    # The codes and their decoding must round each float32 multiply and add as the reference
    # does; the interpreter never fuses, so only compiled code can show a fused one (an H200 did
    # once: docs/results/gpu-NVIDIA-H200/README.md).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _PTX_PROBE], env=env, capture_output=True,
                         text=True, check=True)  # fmt: skip
    found, order = run.stdout.splitlines()
    (score_exact, score_fused, decode_exact, decode_fused, compress_exact, compress_fused,
     rows_exact, rows_fused) = json.loads(found)  # fmt: skip
    assert score_exact == decode_exact == compress_exact == rows_exact == [True, False]
    assert score_fused[1] and decode_fused[1] and compress_fused[1] and rows_fused[1]
    # The fused selection's handoffs (docs/design.md): a scorer's stores, a barrier, then its
    # acq_rel arrival; the selector's score reads (.cg) after it; the selection's stores, a
    # barrier, then the release that packers wait for with acquire loads.
    assert json.loads(order) == [True, True, True, True]


@pytest.mark.parametrize("backend, device, dtypes", BACKENDS)
@pytest.mark.parametrize("per_column", [False, True])
def test_select_blocks_is_the_reference(backend, device, dtypes, per_column):
    """The numba selection (partition) and the Triton one (bisection on the scores' bits), neither
    sorting, keep exactly the reference's blocks, in BSC order, on grids full of ties (integer
    scores) and of +inf (non-finite blocks): numba on every k, Triton (a launch costs a second
    under the interpreter) on every k of small grids and about ten of larger ones, both ends
    included."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(60 if backend == "cpu_blocks" else 16):
        n_br, n_bc = torch.randint(1, 10, (2,), generator=gen).tolist()
        if trial % 2:
            scores = torch.randint(0, 3, (n_br, n_bc), generator=gen).float()
        else:
            scores = torch.rand(n_br, n_bc, generator=gen) * 5  # scores are >= 0
        scores[0, -1] = float("inf") if trial % 3 == 0 else scores[0, -1]
        total = n_br if per_column else n_br * n_bc
        stride = 1 if backend == "cpu_blocks" else max(1, total // 10)
        for k in sorted({*range(1, total + 1, stride), total}):
            scores = scores.to(device)
            want = reference.select_blocks(scores, k, per_column=per_column)
            got = _backend(backend).select_blocks(scores, k, per_column=per_column)
            for a, b in zip(got, want):
                assert a.dtype == torch.int32 and torch.equal(a, b), (trial, k)


@pytest.mark.skipif(not importlib.util.find_spec("triton"), reason="no triton")
def test_triton_global_selection_finds_the_kth_score_by_its_bytes():
    """Global selection finds the k-th largest score by radix selection, one byte of its bits a
    pass: exact on scores that share their high bytes (a narrow range), all zero, subnormal, or
    only zeros and +inf, for k at both ends and between."""
    from actprune.kernels import triton_blocks as tb

    gen = torch.Generator().manual_seed(1)
    grids = [torch.zeros(7, 9), 1 + torch.rand(30, 40, generator=gen) * 1e-4,
             torch.rand(33, 35, generator=gen) * 1e-38,
             torch.where(torch.rand(40, 30, generator=gen) < 0.5, float("inf"), 0.0)]  # fmt: skip
    for scores in grids:
        n = scores.numel()
        for k in (1, n // 2, n):
            want = reference.select_blocks(scores, k)
            got = tb.select_blocks(scores.to(DEVICE), k)
            assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want)), (scores[0, 0], k)


@pytest.mark.skipif(not importlib.util.find_spec("triton"), reason="no triton")
@pytest.mark.parametrize("per_column", [False, True])
def test_triton_compress_blocks_is_score_select_pack(per_column):
    """The fused launch (each program scores its block; the last to arrive in its block-column,
    or in the grid, selects and packs) writes the bytes of the reference's score, select and
    pack: kept blocks, indices, remainder codes and scales, on awkward shapes, strided sources,
    ties and a non-finite block, for every k at the ends and one between; and leaves its
    arrival counters at zero for the next launch."""
    from actprune.kernels import triton_blocks as tb

    gen = torch.Generator().manual_seed(3)
    # On a GPU also ResMLP-S24's fc2 input at b64 (18816 programs racing to their counters).
    cases = CASES + ([(64, 196, 1536, 0, (32, 32))] if DEVICE == "cuda" else [])
    for trial, (b, t, k, _, block) in enumerate(cases):
        dtype = (torch.float32, torch.float16)[trial % 2]
        x3 = (_source(b, t, k, "cpu", torch.float32, transposed=trial % 2 == 0) * 2).round()
        x3[0, 1, 2] = float("nan") if trial == 1 else x3[0, 1, 2]
        x3 = x3.to(DEVICE, dtype)  # integers: ties
        criterion, bits = [("l2", 0), ("l1", 4), ("max", 2), ("l2", 8), ("l2", 4)][trial]
        scores, codes, low_scales = reference.score_blocks(x3, block, criterion, bits, 99)
        total = scores.shape[0] if per_column else scores.numel()
        for kept in sorted({1, int(torch.randint(1, total + 1, (1,), generator=gen)), total}):
            rows, cols, ccol = reference.select_blocks(scores, kept, per_column=per_column)
            want = (reference.pack_blocks(x3, rows, cols, block), rows, ccol, codes, low_scales)
            got = tb.compress_blocks(x3, block, criterion, bits, 99, kept, per_column)
            for name, a, w in zip(("values", "rows", "ccol", "codes", "scales"), got, want):
                assert a.dtype == w.dtype and torch.equal(a.nan_to_num(7), w.nan_to_num(7)), (
                    trial, kept, name)  # fmt: skip
    assert all(not counters.any() for counters in tb._sync.values())


_COMPILE_PROBE = """
import triton
from triton.backends.compiler import GPUTarget
from actprune.kernels import triton_blocks as tb
args = tb._block_args((32, 32))
kernels = [
    (tb._score_blocks_kernel, "*fp32 *fp32 *fp32 *u8 *i32 i64" + " i32" * 7,
     {**args, "CRITERION": 0, "BITS": 4, "ZERO_CCOL": True}),
    (tb._activation_codes_kernel, "*fp32 *fp32 *u8 *u8 i32 i32",
     {"N_BOUNDS": 3, "BITS": 2, "BYTES": 64}),
    (tb._activation_codes_kernel, "*bf16 *fp32 *u8 *u8 i32 i32",
     {"N_BOUNDS": 15, "BITS": 4, "BYTES": 256}),
    (tb._activation_grad_kernel, "*bf16 *u8 *u8 *bf16 *bf16 i32 i32", {"BITS": 2, "BLOCK": 1024}),
    (tb._activation_grad_kernel, "*fp32 *u8 *u8 *fp32 *fp32 i32 i32", {"BITS": 4, "BLOCK": 1024}),
    (tb._select_column_kernel, "*fp32 *i32 *i32 *i32 i32 i32 i32", {"TILE": 256}),
    (tb._select_global_kernel, "*fp32 *i8 *i32 *i32 *i32 i32 i32 i32", {"BLOCK": 1024}),
    (tb._compress_blocks_kernel, "*fp16 *fp32 *fp32 *u8 *i32 *i8 *i32 *i32 *i32 *fp16 i64"
     + " i32" * 11, {**args, "CRITERION": 1, "BITS": 0, "PER_COLUMN": False, "TILE_R": 16,
                    "NB": 8}),
    (tb._row_codes_kernel, "*bf16 *bf16 *fp32 *fp32 i32 i32 fp32" + " i32" * 6,
     {"NORM": 1, "BITS": 0, "ROWS": 4, "TILE_C": 1024}),
    (tb._row_codes_kernel, "*fp16 *i8 *fp32 *fp32 i32 i32 fp32" + " i32" * 6,
     {"NORM": 0, "BITS": 8, "ROWS": 4, "TILE_C": 1024}),
    (tb._decode_row_codes_kernel, "*u8 *fp32 *bf16 i32 i32", {"BITS": 4, "ROWS": 64, "TILE_C": 64}),
    (tb._norm_grad_kernel, "*bf16 *u8 *fp32 *fp32 *fp32 *bf16 *fp32 *fp32 i32 i32",
     {"RMS": False, "BITS": 4, "HAS_W": True, "HAS_B": True, "ROWS": 4, "TILE_C": 1024}),
    (tb._pack_mask_kernel, "*u8 *u8 i32", {"BYTES": 512}),
    (tb._dropout_grad_kernel, "*bf16 *u8 *bf16 i32 fp32", {"BLOCK": 1024}),
]
for kernel, types, constexprs in kernels:
    signature = dict(zip(kernel.arg_names, types.split())) | dict.fromkeys(constexprs, "constexpr")
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    assert ".entry" in triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
print("compiled", len(kernels))
"""


@pytest.mark.skipif(not importlib.util.find_spec("triton"), reason="no triton")
def test_new_triton_kernels_compile_for_a_gpu():
    """The interpreter accepts more than the compiler does: the activation-code kernels, the
    score kernel that zeroes an empty selection's offsets, the two selection kernels, the fused
    score-select-pack kernel and the transformer layers' kernels (row codes, norm statistics and
    backward, dropout bits) compile to PTX for sm_90 (bundled ptxas, no GPU needed), for float32
    and 16-bit inputs."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_PROBE], env=env, capture_output=True,
                         text=True)  # fmt: skip
    assert run.returncode == 0 and "compiled 14" in run.stdout, run.stderr[-3000:]


def test_numba_serial_and_parallel_compilations_agree(monkeypatch):
    """Each numba kernel runs its serial compilation below ``SERIAL_BELOW`` elements and its
    parallel one above: both give the same bytes for every launcher (forced either way)."""
    pytest.importorskip("numba")
    from actprune import derivative_code
    from actprune.kernels import cpu_blocks

    x3, dy3 = torch.randn(3, 50, 72), torch.randn(3, 50, 72)
    x3[1, 7, 5] = float("nan")
    blocks = compress_rows_of(x3, PruneConfig(0.75, (16, 8), remainder_bits=4))
    rows, cols, _ = reference.select_blocks(torch.rand(10, 9), 3, per_column=True)
    code = derivative_code("gelu", 2)
    runs = []
    for serial_below in (0, 2**62):
        monkeypatch.setattr(cpu_blocks, "SERIAL_BELOW", serial_below)
        run = [
            *cpu_blocks.score_blocks(x3, (16, 8), "l2", 4, 77),
            cpu_blocks.pack_blocks(x3, rows, cols, (16, 8)),
            cpu_blocks.decode_rows(blocks, 0, blocks.grid_shape[0], 3),
            cpu_blocks.weight_grad(dy3, blocks),
            cpu_blocks.channel_scale_grad(dy3, blocks),
            *cpu_blocks.activation_codes(x3, code),
            cpu_blocks.activation_grad(dy3, *reference.activation_codes(x3, code), code),
        ]
        for bits in (4, 8):
            codes, scales = cpu_blocks.encode_row_codes(x3, bits)
            run += [codes, scales, cpu_blocks.decode_row_codes(codes, scales, 72, x3.dtype, bits)]
        runs.append(run)
    for serial, parallel in zip(*runs):
        torch.testing.assert_close(serial, parallel, rtol=0, atol=0, equal_nan=True)
