"""spec.config and spec.configFrom: LMCache configs validated by the node's own loader, merged
under the operator's keys, and loaded by the node as written."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from lmcache_node.config import load_config
from lmcache_operator.api.lmcachecluster import LMCacheClusterSpec
from lmcache_operator.builders.common import CONFIG_HASH_ANNOTATION
from lmcache_operator.builders.lmcachecluster import (
    CONFIG_KEY,
    build_children,
    build_configmap,
    node_config,
)
from lmcache_operator.builders.user_config import (
    MAX_CONFIG_FROM_BYTES,
    OPERATOR_KEYS,
    check_user_config,
    parse_config_from,
)
from pydantic import ValidationError

# An LMCache deployment's lmcache.yaml, as its users write it.
LMCACHE_YAML = """\
chunk_size: 256
local_cpu: true
max_local_cpu_size: 4.0
use_layerwise: false
save_decode_cache: false
enable_blending: false
mp_port: 5555
pin_timeout_sec: 300
blocking_timeout_secs: 20
extra_config: {use_odirect: false}
"""


def spec_of(**fields: Any) -> LMCacheClusterSpec:
    return LMCacheClusterSpec.model_validate({"device": "cpu", **fields})


def check(spec: LMCacheClusterSpec, text: str | None = None) -> Any:
    return check_user_config(spec, node_config("c1", "ns", spec), text)


def test_an_lmcache_config_from_a_configmap_is_valid_and_reaches_the_node(tmp_path: Path) -> None:
    spec = spec_of(configFrom={"name": "lmcache-config"}, config={"lock_ttl_secs": 20})
    assert spec.config_from is not None and spec.config_from.key == "lmcache.yaml"
    result = check(spec, LMCACHE_YAML)
    assert result.problems == []
    assert [w.split(" (from")[0] for w in result.warnings] == [
        "LMCache key 'use_layerwise'", "LMCache key 'save_decode_cache'",
        "LMCache key 'enable_blending'", "LMCache key 'pin_timeout_sec'",
    ]  # fmt: skip
    assert "spec.config over spec.configFrom (ConfigMap lmcache-config" in result.warnings[0]
    text = build_configmap("c1", "ns", spec, result.values)["data"][CONFIG_KEY]
    written = yaml.safe_load(text)
    assert written["use_layerwise"] is False and written["mp_port"] == 5555  # as written
    assert written["port"] == 5555 and written["host"] == "0.0.0.0"  # ours
    path = tmp_path / CONFIG_KEY
    path.write_text(text, encoding="utf-8")
    config = load_config(config_file=path, environ={})
    assert (config.blocking_timeout_secs, config.lock_ttl_secs) == (20.0, 20.0)
    assert config.shm_dir == "/dev/shm/lmcache-ns.c1" and config.max_local_cpu_size == 4.0
    assert len(config.compat_warnings) == 4  # the node says the same in its log


def test_spec_config_wins_over_the_configmap() -> None:
    spec = spec_of(configFrom={"name": "m"}, config={"blocking_timeout_secs": 5})
    result = check(spec, "blocking_timeout_secs: 30\n")
    assert result.problems == [] and result.values == {"blocking_timeout_secs": 5}


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"chunk_size": 512}, "chunk_size = 512 differs from spec.server.chunkSize (256): set "
                              "spec.server.chunkSize instead"),
        ({"mp_port": 6000}, "mp_port (this node's port) = 6000 differs from spec.server.port"),
        ({"max_local_cpu_size": 5.0}, "differs from spec.cache.cpuSize (4.0)"),
        ({"remote_url": "redis://r:6379"}, "differs from spec.cache.remote.url (or urlSecretRef)"
                                           " (unset)"),
        ({"shm_dir": "/dev/shm/other"}, "shm_dir is set by the operator"),
        ({"mp_host": "0.0.0.0"}, "mp_host (this node's host) is set by the operator"),
        ({"insecure_allow_unauthenticated": True}, "never turns authentication off"),
        ({"chunk_sizes": 256}, "unknown key 'chunk_sizes': did you mean 'chunk_size'?"),
        ({"lock_ttl_secs": "soon"}, "lock_ttl_secs = 'soon' (from spec.config)"),
    ],
)  # fmt: skip
def test_refused_settings_name_the_key_and_the_fix(config: dict[str, Any], fragment: str) -> None:
    result = check(spec_of(config=config))
    assert len(result.problems) == 1, result.problems
    assert fragment in result.problems[0]
    assert "spec.config" in result.problems[0]


def test_repeating_the_specs_values_is_fine() -> None:
    spec = spec_of(
        server={"chunkSize": 512, "port": 6000},
        cache={"cpuSize": "2Gi", "evictionPolicy": "LRU"},
        config={"chunk_size": 512, "mp_port": 6000, "max_local_cpu_size": "2Gi",
                "cache_policy": "LFU", "local_cpu": True},
    )  # fmt: skip
    result = check(spec)
    assert result.problems == []
    assert len(result.warnings) == 1 and "LFU" in result.warnings[0]  # LFU becomes LRU


def test_every_operator_key_is_refused_even_with_its_own_value() -> None:
    spec = spec_of()
    ours = node_config("c1", "ns", spec)
    for key in OPERATOR_KEYS:
        value = ours.get(key, "x")
        result = check_user_config(spec_of(config={key: value}), ours)
        assert any(f"{key} is set by the operator" in p for p in result.problems), key


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (None, "does not exist: create it, or fix spec.configFrom"),
        ("chunk_size: [1\n", "is not valid YAML"),
        ("- 1\n", "must hold a mapping of keys to values, not a list"),
        ("a: &x {b: 1}\nc: *x\n", "YAML aliases (*name) are not accepted"),
        ("x: '" + "y" * MAX_CONFIG_FROM_BYTES + "'\n", "is over 64 KiB"),
        ("".join(f"k{i}: 1\n" for i in range(257)), "has 257 keys; at most 256"),
    ],
)
def test_configmap_text_problems(text: str | None, fragment: str) -> None:
    spec = spec_of(configFrom={"name": "m", "key": "my.yaml"})
    values, problems = parse_config_from(spec, text)
    assert values == {} and len(problems) == 1
    assert problems[0].startswith("spec.configFrom: ConfigMap 'm', key 'my.yaml'")
    assert fragment in problems[0]


def test_an_empty_configmap_key_means_no_settings() -> None:
    spec = spec_of(configFrom={"name": "m"})
    assert parse_config_from(spec, "") == ({}, [])
    assert check(spec, "# nothing yet\n").problems == []


def test_the_api_bounds_spec_config_and_checks_the_reference() -> None:
    with pytest.raises(ValidationError, match="at most 256 items"):
        spec_of(config={f"k{i}": 1 for i in range(257)})
    with pytest.raises(ValidationError, match="name"):
        spec_of(configFrom={"name": "Not_A_Name"})
    spec = spec_of(config={"extra_config": {"use_odirect": True}, "blend_thresholds": [0.1]})
    assert spec.config["blend_thresholds"] == [0.1]


def test_a_change_of_the_users_settings_rolls_the_pods() -> None:
    spec = spec_of(config={"blocking_timeout_secs": 5})

    def config_hash(values: dict[str, Any]) -> str:
        objects = build_children("c1", "ns", spec, service_monitor=False, user_config=values)
        [ds] = [o for o in objects if o["kind"] == "DaemonSet"]
        return str(ds["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION])

    assert config_hash({"blocking_timeout_secs": 5}) != config_hash({"blocking_timeout_secs": 6})
    assert config_hash({}) == config_hash({})


def test_lmcache_defaults_pass_where_the_spec_agrees(tmp_path: Path) -> None:
    """A file of every LMCache 0.5.6 key at its default: refused only where the spec differs
    (LMCache's 5 GB L1 against the spec's 4Gi), accepted once the spec says 5Gi."""
    from tests.node.test_lmcache_compat import lmcache_defaults

    defaults = lmcache_defaults()
    result = check(spec_of(config=defaults))
    assert len(result.problems) == 1, result.problems
    assert "max_local_cpu_size = 5.0 differs from spec.cache.cpuSize (4.0)" in result.problems[0]
    spec = spec_of(config=defaults, cache={"cpuSize": "5Gi"})
    assert check(spec).problems == []


def test_the_operator_loads_only_the_nodes_config_loader() -> None:
    """What the operator image keeps of lmcache_node (images/operator/Dockerfile) is all that
    validating a cluster's settings imports: the config loader, without torch."""
    code = (
        "import sys\n"
        "from lmcache_operator.api.lmcachecluster import LMCacheClusterSpec as S\n"
        "from lmcache_operator.builders.lmcachecluster import node_config\n"
        "from lmcache_operator.builders.user_config import check_user_config\n"
        "s = S.model_validate({'config': {'lock_ttl_secs': 20, 'use_layerwise': True}})\n"
        "r = check_user_config(s, node_config('c', 'ns', s))\n"
        "assert not r.problems and r.warnings, r\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lmcache_node', 'torch')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    imported = set(ast.literal_eval(result.stdout.strip().splitlines()[-1]))
    assert imported == {
        "lmcache_node",
        "lmcache_node.config",
        "lmcache_node.dtypes",
        "lmcache_node.kvspec",
        "lmcache_node.lmcache_compat",
        "lmcache_node.sizes",
    }
