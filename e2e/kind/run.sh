#!/usr/bin/env bash
# `make e2e-kind`: the same end-to-end suite as `make e2e` (e2e/k8s/test_e2e.py), on kind.
# For users and CI with Docker; the build machine of this project has no Docker engine.
#   needs: docker, kind (v0.20+), kubectl, helm (v3.14+ or v4) on PATH
#   env:   KIND_CLUSTER (default lmcache-e2e), E2E_KEEP=1 (keep the cluster),
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
KUBECONFIG_FILE=$(mktemp /tmp/lmcache-kind-kubeconfig.XXXXXX)
TIMINGS=$(mktemp /tmp/lmcache-kind-timings.XXXXXX)

cleanup() {
  local rc=$?
  if [ -z "${E2E_KEEP:-}" ]; then kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true; fi
  cat "$TIMINGS" 2>/dev/null || true
  rm -f "$TIMINGS" "$KUBECONFIG_FILE"
  exit $rc
}
trap cleanup EXIT

IMAGE_BUILDER="docker build" IMAGE_REGISTRY=$REGISTRY IMAGE_TAG=$TAG \
  TORCH_INDEX_URL=${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu} \
  images/build.sh node operator
kind create cluster --name "$CLUSTER" --config e2e/kind/cluster.yaml --wait 180s \
  --kubeconfig "$KUBECONFIG_FILE"
kind load docker-image --name "$CLUSTER" "$REGISTRY/lmcache-node:$TAG" "$REGISTRY/lmcache-operator:$TAG"

# Only the set-up differs from e2e/k8s/run.sh: the real node is kind's worker, and this
# machine may not reach node IPs (Docker Desktop), so HTTP checks run from inside a pod.
E2E_KUBECONFIG=$KUBECONFIG_FILE KUBECONFIG=$KUBECONFIG_FILE E2E_NODE="$CLUSTER-worker" \
E2E_IMAGE_REGISTRY=$REGISTRY E2E_IMAGE_TAG=$TAG E2E_HOST_REACHES_NODE=0 E2E_TIMINGS=$TIMINGS \
  "$PY" -m pytest e2e/k8s -p no:cacheprovider -v --timeout=900 ${PYTEST_ARGS:-}
