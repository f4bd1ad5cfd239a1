#!/usr/bin/env bash
# `make e2e-kind`: the same end-to-end suite as `make e2e` (e2e/k8s/test_e2e.py), on kind.
# For users and CI with Docker; the build machine of this project has no Docker engine.
#   needs: docker, kind (v0.20+), kubectl, helm (v3.14+ or v4) on PATH
#   env:   KIND_CLUSTER (default lmcache-e2e), E2E_KEEP=1 (keep the cluster),
#          E2E_VLLM= (skip the VLLMDeployment part), E2E_VLLM_MODEL_SIZE (demo|tiny),
#          TORCH_INDEX_URL (default the PyTorch CPU index), PYTEST_ARGS
set -euo pipefail
cd "$(dirname "$0")/../.."
for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || { echo "e2e-kind: $tool not found on PATH" >&2; exit 2; }
done
docker info >/dev/null 2>&1 || { echo "e2e-kind: no Docker engine (docker info failed)" >&2; exit 2; }
CLUSTER=${KIND_CLUSTER:-lmcache-e2e}
REGISTRY=${IMAGE_REGISTRY:-lmcache.local}
TAG=${IMAGE_TAG:-0.1.0}
PY=${PY:-.venv/bin/python}
VLLM=${E2E_VLLM-1}
KUBECONFIG_FILE=$(mktemp /tmp/lmcache-kind-kubeconfig.XXXXXX)
KIND_CONFIG=$(mktemp /tmp/lmcache-kind-cluster.XXXXXX)
TIMINGS=$(mktemp /tmp/lmcache-kind-timings.XXXXXX)

cleanup() {
  local rc=$?
  if [ -z "${E2E_KEEP:-}" ]; then kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true; fi
  cat "$TIMINGS" 2>/dev/null || true
  rm -f "$TIMINGS" "$KUBECONFIG_FILE" "$KIND_CONFIG"
  exit $rc
}
trap cleanup EXIT

IMAGES=(node operator)
MODEL_DIR=$(pwd)/.cache/models/e2e-${E2E_VLLM_MODEL_SIZE:-demo}
if [ -n "$VLLM" ]; then
  IMAGES+=(vllm-cpu)
  scripts/vllm-venv.sh
  .venv-vllm/bin/python e2e/vllm/make_model.py --size "${E2E_VLLM_MODEL_SIZE:-demo}" --out "$MODEL_DIR"
  chmod -R a+rX "$MODEL_DIR"  # the vLLM pod runs as uid 65532
else
  mkdir -p "$MODEL_DIR"  # the worker's mount needs a folder either way
fi
sed "s|@MODEL_DIR@|$MODEL_DIR|" e2e/kind/cluster.yaml > "$KIND_CONFIG"

IMAGE_BUILDER="docker build" IMAGE_REGISTRY=$REGISTRY IMAGE_TAG=$TAG \
  TORCH_INDEX_URL=${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu} \
  images/build.sh "${IMAGES[@]}"
kind create cluster --name "$CLUSTER" --config "$KIND_CONFIG" --wait 180s \
  --kubeconfig "$KUBECONFIG_FILE"
refs=(); for name in "${IMAGES[@]}"; do refs+=("$REGISTRY/lmcache-$name:$TAG"); done
kind load docker-image --name "$CLUSTER" "${refs[@]}"

# Only the set-up differs from e2e/k8s/run.sh: the real node is kind's worker, and this
# machine may not reach node or pod IPs (Docker Desktop), so HTTP checks run from a pod on
# the worker (through status.hostIP, as vLLM reaches the cache) or through
# `kubectl port-forward` (the cache's metrics, the vLLM Service).
model_in_worker=""; [ -n "$VLLM" ] && model_in_worker=/models/e2e
# shellcheck disable=SC2086 # PYTEST_ARGS is a list of arguments
E2E_KUBECONFIG=$KUBECONFIG_FILE KUBECONFIG=$KUBECONFIG_FILE E2E_NODE="$CLUSTER-worker" \
E2E_IMAGE_REGISTRY=$REGISTRY E2E_IMAGE_TAG=$TAG E2E_HOST_REACHES_NODE=0 E2E_TIMINGS=$TIMINGS \
E2E_VLLM_MODEL_DIR=$model_in_worker \
  "$PY" -m pytest e2e/k8s -p no:cacheprovider -v --timeout=900 ${PYTEST_ARGS:-}
