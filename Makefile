# The README's two set-up commands: `make demo` (the main job) and `make test` (the whole suite).
# Both create or reuse .venv/ in the repo root and install everything into it.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.vqtok-installed
NATIVE := $(shell find kernels -type f) CMakeLists.txt setup.py pyproject.toml

.PHONY: install demo test bench build

$(STAMP): $(NATIVE)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -qq torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -qq setuptools wheel pybind11 cmake ninja
	$(PY) -m pip install -qq --no-build-isolation -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# rebuild the extension in place after editing kernels/ (incremental CMake build in build/)
build: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

# trains the demo image tokenizer on the bundled photos (CPU, a few minutes) into runs/demo-<date>-<time>
demo: $(STAMP)
	$(VENV)/bin/vqtok train --preset demo

test: $(STAMP)
	$(PY) -m pytest -q --timeout=1200 tests

bench: $(STAMP)
	$(VENV)/bin/vqtok bench
