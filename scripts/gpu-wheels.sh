#!/usr/bin/env bash
# make gpu-wheels: download (here, with a package index) the wheels that `make gpu-check`
# installs on a GPU machine without one: what our code imports that such a machine's
# CUDA-PyTorch image may lack, pinned as in images/node/requirements.txt, for CPython 3.12
# on x86-64 Linux. Into .cache/gpu-wheels (ignored by git); about 15 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${GPU_WHEELS:-.cache/gpu-wheels}
PYVER=${GPU_PYTHON_VERSION:-3.12}
mkdir -p "$OUT"
pins=()
for name in pyzmq msgspec pydantic pydantic_core annotated-types typing-inspection \
    typing_extensions pydantic-settings python-dotenv redis zstandard lz4; do
  pin=$(grep -i -E "^${name//[-_]/[-_]}==" images/node/requirements.txt || true)
  [ -n "$pin" ] || { echo "gpu-wheels: $name is not pinned in images/node/requirements.txt" >&2; exit 2; }
  pins+=("$pin")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
  --platform any -d "$OUT" "${pins[@]}"
du -sh "$OUT"
ls "$OUT"
