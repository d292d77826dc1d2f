# The two set-up commands of the README: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install test lint demo bench-kernels

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0 "triton==3.7.1; platform_system == 'Linux'"
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: install lint
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests benchmarks

demo: install
	$(BIN)/python benchmarks/kernels.py --out runs/demo

bench-kernels: install
	$(BIN)/python benchmarks/kernels.py
