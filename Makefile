# Two set-up-and-go targets (see README): `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# DeepSpeed JIT-builds a CPU op on first use and keys the cache by path: keep it per checkout.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export DS_ACCELERATOR ?= cpu
# One intra-op thread per process: the multi-rank tests and the demo run one process per core.
export OMP_NUM_THREADS ?= 1

.PHONY: setup demo test
setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

demo: $(STAMP)
	$(VENV)/bin/piip6b demo

test: $(STAMP)
	$(PY) -m pytest -q -ra tests
