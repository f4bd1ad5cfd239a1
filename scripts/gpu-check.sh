#!/usr/bin/env bash
# make gpu-check OUT=DIR: the CUDA paths on a machine with an NVIDIA GPU, Python and a CUDA
# PyTorch, but no internet and no package registry (e.g. a lent GPU box). Run
# `make gpu-wheels` on a connected machine first: it puts the wheels our code needs and such
# a machine may lack into .cache/gpu-wheels, which this script installs into a temporary
# site directory (never into the machine's Python).
#
# It runs, in under 5 minutes: the CUDA-marked tests (CUDA IPC export/import, the
# two-process store -> retrieve round trip with interprocess events, byte-exact; pinned L1;
# the connector's worker path on CUDA), then `lmcache-node bench --device cuda --json`
# (ratios against a D2H/H2D copy_ of the same bytes, measured in the same run). It writes
# env.json, pytest.log, junit.xml, bench.json, bench.log and summary.json to DIR.
#
#   scripts/gpu-check.sh OUT_DIR [--allow-no-cuda]
# --allow-no-cuda: on a machine without CUDA, run the CPU-safe part (wheels, imports, the
# environment report) and exit 0 instead of 2.
set -euo pipefail
usage() { echo "usage: $0 OUT_DIR [--allow-no-cuda]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
ALLOW_NO_CUDA=0
for arg in "$@"; do
  case "$arg" in --allow-no-cuda) ALLOW_NO_CUDA=1 ;; *) usage ;; esac
done
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${GPU_WHEELS:-.cache/gpu-wheels}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
start=$(date +%s)
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$WHEELS"/*.whl
fi
export PYTHONPATH="$site:$PWD/node:$PWD/operator${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" - "$OUT/env.json" <<'PY'
import json, platform, sys
import torch
info = {
    "python": platform.python_version(),
    "torch": torch.__version__,
    "torch_cuda": torch.version.cuda,
    "cuda_available": torch.cuda.is_available(),
    "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
}
import lmcache_node.serve, lmcache_node.client  # noqa: E401,F401 - imports work (no vLLM there)
from lmcache_node.devices import cuda_problem
info["cuda_problem"] = cuda_problem()
json.dump(info, open(sys.argv[1], "w"), indent=2)
print("gpu-check environment:", json.dumps(info))
PY
cuda=$("$PY" -c 'import json,sys; print(int(json.load(open(sys.argv[1]))["cuda_available"]))' "$OUT/env.json")
summary() {  # status, then key=value pairs
  "$PY" - "$OUT/summary.json" "$(( $(date +%s) - start ))" "$@" <<'PY'
import json, sys
path, seconds, status, *pairs = sys.argv[1:]
data = {"status": status, "seconds": int(seconds)}
data.update(dict(p.split("=", 1) for p in pairs))
json.dump(data, open(path, "w"), indent=2)
print("gpu-check:", json.dumps(data))
PY
}
if [ "$cuda" != 1 ]; then
  summary no-cuda "reason=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["cuda_problem"])' "$OUT/env.json")"
  [ "$ALLOW_NO_CUDA" = 1 ] && exit 0
  echo "gpu-check: no usable CUDA here (see $OUT/env.json)" >&2
  exit 2
fi
rc=0
"$PY" -m pytest -p no:cacheprovider -m gpu --timeout=240 -ra -o addopts="" \
  --junitxml="$OUT/junit.xml" tests/node >"$OUT/pytest.log" 2>&1 || rc=$?
tail -n 5 "$OUT/pytest.log"
bench_rc=0
"$PY" -m lmcache_node bench --device cuda --json >"$OUT/bench.json" 2>"$OUT/bench.log" || bench_rc=$?
cat "$OUT/bench.json"
if [ "$rc" = 0 ] && [ "$bench_rc" = 0 ]; then status=passed; else status=failed; fi
summary "$status" "pytest_rc=$rc" "bench_rc=$bench_rc"
[ "$status" = passed ]
