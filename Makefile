# The two set-up commands of the README: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install test lint data demo bench-kernels

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0 "triton==3.7.1; platform_system == 'Linux'"
	$(BIN)/python -m pip install -q -e '.[dev,hf]'  # transformers: the HF tests run too
	touch $(STAMP)

install: $(STAMP)

test: install lint
	$(BIN)/python -m pytest -q -n auto  # one worker per core, one thread each (tests/conftest.py)

lint: install
	$(BIN)/ruff check src tests benchmarks

# Fashion-MNIST from Debian's package when apt can install it; otherwise actprune downloads the
# official release files into ~/.cache/actprune (checksum-verified) on first use.
data:
	@test -d /usr/share/datasets/fashion-mnist \
	  || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
	       && (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
	           || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null)); } \
	  || echo "dataset-fashion-mnist not installed; actprune will download Fashion-MNIST"

demo: install data
	$(BIN)/actprune compare --out runs/demo --overwrite

bench-kernels: install
	$(BIN)/python benchmarks/kernel_speed.py
