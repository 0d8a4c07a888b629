# One-command set-up: `make demo` and `make test` create .venv when missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-fast lint bench bench-venv-trl112 browser clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# torch first and pinned: a looser requirement would fetch a multi-GB CUDA build.
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev,tracking]'
	touch $(STAMP)

# Debian's Chromium drives the browser tests; Playwright cannot download a browser here.
browser:
	@test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium missing: run 'sudo apt-get install chromium' for the browser tests"; fi; }

demo: $(STAMP)
	$(BIN)/alignflow quickstart

test: $(STAMP) browser
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder -q --durations=25

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile -q -m "not slow and not browser"

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

# TRL removed PPOTrainer after 1.12.0: the PPO comparison runs TRL 1.12 in its own venv (torch pinned first).
TRL112 := benchmarks/.venv-trl112
$(TRL112)/.installed:
	test -x $(TRL112)/bin/python || $(PYTHON) -m venv $(TRL112)
	$(TRL112)/bin/pip install -q torch==2.13.0
	$(TRL112)/bin/pip install -q trl==1.12.0 transformers==5.23.0 accelerate==1.15.0 datasets==5.2.0 tokenizers==0.23.3 safetensors==0.8.0
	touch $@

bench-venv-trl112: $(TRL112)/.installed

bench: $(STAMP) bench-venv-trl112
	$(BIN)/python benchmarks/run_all.py

clean-venv:
	rm -rf $(VENV)
