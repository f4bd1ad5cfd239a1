#!/usr/bin/env bash
# Builds the images from their Dockerfiles (the same files users build with Docker).
#   images/build.sh [node|node-cuda|operator|vllm-cpu]...     (default: node operator)
# node: the cache server's CPU variant, tagged <tag>-cpu; node-cuda: its CUDA variant,
# tagged <tag>-cuda (downloads PyPI's CUDA torch, several GB; it builds here but runs only
# on a GPU node). The operator picks the variant by the cluster's device.
# Builder: $IMAGE_BUILDER (default: ../shared/k8s/image.sh build, i.e. buildah, daemonless),
# or IMAGE_BUILDER="docker build". Tags: $IMAGE_REGISTRY/lmcache-<name>:$IMAGE_TAG.
# Prints one line per image: name, seconds, size.
set -euo pipefail
cd "$(dirname "$0")/.."
REGISTRY=${IMAGE_REGISTRY:-lmcache.local}
TAG=${IMAGE_TAG:-0.1.0}
K8S_TOOLS=${K8S_TOOLS:-../shared/k8s}
BUILDER=${IMAGE_BUILDER:-$K8S_TOOLS/image.sh build}
# Empty torch index: here the CPU torch wheel comes from the local wheel folder; users
# building with Docker keep the Dockerfile default (download.pytorch.org/whl/cpu).
TORCH_INDEX_URL=${TORCH_INDEX_URL-}
REVISION=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
CREATED=$(git log -1 --format=%cI 2>/dev/null || echo unknown)
images=("$@"); [ ${#images[@]} -gt 0 ] || images=(node operator)
for name in "${images[@]}"; do
  dir=$name tag=$TAG variant=()
  case "$name" in
    node) tag="$TAG-cpu" ;;
    node-cuda) dir=node tag="$TAG-cuda"
      variant=(--build-arg VARIANT=cuda --build-arg TORCH_VERSION=2.13.0) ;;
  esac
  [ -f "images/$dir/Dockerfile" ] || { echo "build.sh: no images/$dir/Dockerfile" >&2; exit 2; }
  ref="$REGISTRY/lmcache-$dir:$tag"
  start=$(date +%s)
  # shellcheck disable=SC2086 # BUILDER is a command line
  $BUILDER -t "$ref" -f "images/$dir/Dockerfile" "${variant[@]}" \
    --build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL" --build-arg "VERSION=$TAG" \
    --build-arg "REVISION=$REVISION" --build-arg "CREATED=$CREATED" .
  secs=$(( $(date +%s) - start ))
  size=$(buildah images --format '{{.Size}}' "$ref" 2>/dev/null \
    || docker image ls --format '{{.Size}}' "$ref" 2>/dev/null || echo "?")
  printf 'image %-40s built in %4ss, %s\n' "$ref" "$secs" "$size"
done
