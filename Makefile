# Every target installs what it needs into a project-local virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Machines without an NVIDIA driver get the CPU build of torch 2.13.0 (a local wheel where one lies on disk);
# set TORCH_SPEC (and PIP_EXTRA_INDEX_URL) to choose another build.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.4" || echo "torch==2.13.0")
STAMP := $(VENV)/.installed

.PHONY: demo test test-all bench bench-env clean-demo lint slurm-deps browser-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

# the README's demo results (between its markers) and docs/images are rewritten from this run
demo: $(STAMP)
	$(BIN)/dpo-cli pipeline recipes/demo/pipeline.yaml
	$(BIN)/python scripts/demo_readme.py runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-all: $(STAMP) slurm-deps browser-deps
	$(BIN)/python -m pytest -q

# The real-Slurm preemption tests need Debian's slurmctld, slurmd and munge (they start a private cluster);
# installed here as root on Debian, else those tests skip and say why.
slurm-deps:
	@if command -v slurmctld >/dev/null 2>&1 || [ -x /usr/sbin/slurmctld ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null 2>&1 \
		 || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null 2>&1)) \
		|| echo "slurm-deps: could not install slurmctld/slurmd/munge; the real-Slurm tests will skip"; \
	else echo "slurm-deps: not root on Debian; the real-Slurm tests will skip (apt-get install slurmctld slurmd slurm-client munge)"; fi

# A headless browser for the web labeller's end-to-end test (Debian's chromium and its driver, selenium).
browser-deps: $(STAMP)
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null 2>&1 \
		 || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null 2>&1)) \
		|| echo "browser-deps: could not install chromium/chromium-driver; the browser test will skip"; \
	else echo "browser-deps: not root on Debian; the browser test will skip (apt-get install chromium chromium-driver)"; fi
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "selenium>=4.20"

# TRL 1.12, the last release with a PPOTrainer, in an environment of its own (the bench's PPO baseline).
TRL_PPO_VENV := .venv-trl112
$(TRL_PPO_VENV)/.installed: $(STAMP)
	$(PYTHON) -m venv $(TRL_PPO_VENV)
	$(TRL_PPO_VENV)/bin/python -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(TRL_PPO_VENV)/bin/python -m pip install --quiet --disable-pip-version-check trl==1.12.0 "transformers==$$($(BIN)/python -c 'import transformers; print(transformers.__version__)')"
	touch $@

bench-env: $(STAMP) $(TRL_PPO_VENV)/.installed

bench: bench-env
	$(BIN)/python benchmarks/bench.py

clean-demo:
	rm -rf runs/demo
