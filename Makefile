# lmcache-k8s — run `make help` for the list of targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.setup-stamp
TORCH_VERSION := 2.13.0
PYTEST_ARGS ?=

.PHONY: help
help: ## List the targets
	@awk 'BEGIN {FS = ":.*?## "} /^[a-zA-Z0-9_-]+:.*?## / {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	@scripts/system-deps.sh
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	@# torch first, pinned: the CPU wheel lies on this disk; never let pip resolve a CUDA build.
	$(PIP) install --quiet "torch==$(TORCH_VERSION)"
	$(PIP) install --quiet -e ".[dev]"
	@touch $(STAMP)

.PHONY: setup
setup: $(STAMP) ## Build .venv (torch pinned first, then the project with dev extras) and system packages
	@true

.PHONY: run
run: setup ## Run the cache server in CPU mode (the embedded default)
	$(VENV)/bin/lmcache-node serve --device cpu

.PHONY: lint
lint: setup ## ruff (lint + format check)
	$(VENV)/bin/ruff check node operator tests e2e
	$(VENV)/bin/ruff format --check node operator tests e2e

.PHONY: fmt
fmt: setup ## Format the code with ruff
	$(VENV)/bin/ruff format node operator tests e2e
	$(VENV)/bin/ruff check --fix node operator tests e2e

.PHONY: typecheck
typecheck: setup ## mypy --strict on both packages
	$(VENV)/bin/mypy node/lmcache_node operator/lmcache_operator

.PHONY: pytest
pytest: setup ## Unit + integration tests (real redis-server, real server processes, real API server)
	@rc=0; $(VENV)/bin/pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

.PHONY: test
test: setup lint typecheck pytest ## Everything CI runs: setup, lint, type check, all tests
	@echo "make test: all green"

.PHONY: bench
bench: setup ## Benchmarks: one JSON object with ratios against memcpy measured in the same run
	$(VENV)/bin/lmcache-node bench --json

.PHONY: clean
clean: ## Remove the virtual environment and caches
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info
