# Every target installs what it needs into a project-local virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Machines without an NVIDIA driver get the CPU build of torch 2.13.0 (a local wheel where one lies on disk);
# set TORCH_SPEC (and PIP_EXTRA_INDEX_URL) to choose another build.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.4" || echo "torch==2.13.0")
STAMP := $(VENV)/.installed

.PHONY: demo test test-all bench clean-demo lint

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dpo-cli pipeline recipes/demo/pipeline.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py

clean-demo:
	rm -rf runs/demo
