"""Test set-up: Triton kernels run through the interpreter on CPU when no GPU is present, and
torch.compile caches in a fresh folder per session."""

import atexit
import importlib.util
import os
import shutil
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`

# Inductor's on-disk cache was seen reusing a backward compiled from an older checkout (one that
# called an op since renamed); a clean folder makes the compile tests see this checkout's ops,
# as on CI.
_INDUCTOR_CACHE = tempfile.mkdtemp(prefix="actprune-inductor-")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = _INDUCTOR_CACHE
atexit.register(shutil.rmtree, _INDUCTOR_CACHE, ignore_errors=True)

if os.environ.get("PYTEST_XDIST_WORKER"):  # one worker per core (make test: pytest -n auto)
    os.environ["NUMBA_NUM_THREADS"] = "1"  # read when numba is first imported
    torch.set_num_threads(1)

# The numba kernels are compiled twice, parallel and serial, and pick one by size
# (cpu_blocks._Parallel). The tests run the serial ones throughout (each worker has one numba
# thread, and compiling both in every worker added about 40 s to CI); the parallel compilations
# are checked against them by test_numba_serial_and_parallel_compilations_agree.
if importlib.util.find_spec("numba"):
    from actprune.kernels import cpu_blocks

    cpu_blocks.SERIAL_BELOW = 2**62

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed() -> None:
    from actprune import rng

    torch.manual_seed(0)
    rng.manual_seed(0)  # actprune's own stream (the remainder's rounding)


@pytest.fixture(autouse=True)
def _backend_choice():
    """Every test starts from ACTPRUNE_KERNELS (or "auto"), whatever the last one chose with
    ``kernels.set_backend``."""
    from actprune import kernels

    kernels.set_backend(None)
    yield
    kernels.set_backend(None)
