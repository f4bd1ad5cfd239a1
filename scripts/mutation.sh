#!/usr/bin/env bash
# `make mutation`: mutmut on the modules where a silent bug costs most (docs/testing.md).
# Not in CI: minutes to tens of minutes. mutmut 3 mutates code under ./, src/ or source/ only,
# so this lays out a scratch copy (src/lmcache_node, tests/) under MUTATION_DIR and runs there;
# the scores per module are printed at the end (and kept in MUTATION_DIR/scores.txt).
#
#   scripts/mutation.sh [MODULE...]   default: keys engine/memory protocol/codec tiers/frame
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
work=${MUTATION_DIR:-$repo/.cache/mutation}
modules=("$@")
[ ${#modules[@]} -gt 0 ] || modules=(keys engine/memory protocol/codec tiers/frame)

# The focused tests: the unit tests that exercise these modules (mutmut runs, per mutant, only
# the tests that reached the mutated function).
tests=(
  tests/node/test_keys.py tests/node/test_engine.py tests/node/test_memory.py tests/node/vllm/test_planner.py
  tests/node/server/test_protocol_codec.py tests/node/tiers/test_frame.py
  tests/node/tiers/test_disk.py tests/node/tiers/test_workers.py
)

rm -rf "$work"
mkdir -p "$work/src"
cp -r "$repo/node/lmcache_node" "$work/src/"
find "$work/src" -name __pycache__ -prune -exec rm -rf {} +
cp -r "$repo/tests" "$work/tests"
only=""
for module in "${modules[@]}"; do only+="\"src/lmcache_node/$module.py\", "; done
selection=""
for test in "${tests[@]}"; do selection+="\"$test\", "; done
{
  cat "$repo/pyproject.toml"
  cat <<TOML

[tool.mutmut]
source_paths = ["src/lmcache_node"]
only_mutate = [${only%, }]
pytest_add_cli_args_test_selection = [${selection%, }]
pytest_add_cli_args = ["-p", "no:cacheprovider", "-p", "no:xdist", "-m", "not slow and not integration", "-q"]
TOML
} > "$work/pyproject.toml"

cd "$work"
# the original package must not shadow the mutants: no PYTHONPATH into the repository
env -u PYTHONPATH "$python" -m mutmut run --max-children "${MUTATION_JOBS:-2}" || true
env -u PYTHONPATH "$python" -m mutmut results --all true > results.txt || true
"$python" - "${modules[@]}" <<'PY' | tee scores.txt
import re, sys
from collections import Counter
lines = open("results.txt").read().splitlines()
by_module = {m: Counter() for m in sys.argv[1:]}
for line in lines:
    match = re.match(r"\s*(lmcache_node\.\S+?)\.x\S*__mutmut_\d+: (\w[\w ]*)", line)
    if not match:
        continue
    name, status = match.groups()
    module = name.removeprefix("lmcache_node.").replace(".", "/")
    for wanted in by_module:
        if module == wanted:
            by_module[wanted][status.strip()] += 1
for module, counts in by_module.items():
    total = sum(counts.values())
    killed = counts.get("killed", 0) + counts.get("timeout", 0)
    score = f"{100 * killed / total:.1f}%" if total else "n/a"
    print(f"{module}: {score} ({killed} killed of {total}; {dict(counts)})")
PY
