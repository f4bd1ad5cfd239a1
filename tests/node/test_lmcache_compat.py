"""LMCache 0.5.6 configs load unchanged: every key is mapped or ignored with one warning.

``data/lmcache-0.5.6-keys.txt`` is LMCache 0.5.6's own list of keys with their types and
defaults (from its config definitions), kept apart from the code under test.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from lmcache_node.config import ConfigError, NodeConfig, load_config
from lmcache_node.lmcache_compat import LMCACHE_KEYS, validate_mapping

REPO = Path(__file__).resolve().parents[2]
KEYS_FILE = Path(__file__).parent / "data" / "lmcache-0.5.6-keys.txt"
IGNORED = [key for key, rule in LMCACHE_KEYS.items() if rule.target is None]


def lmcache_defaults() -> dict[str, Any]:
    """LMCache 0.5.6's keys and default values, in its order."""
    defaults: dict[str, Any] = {}
    for line in KEYS_FILE.read_text(encoding="utf-8").splitlines():
        name, rest = line.split(" ", 1)
        text = rest.rsplit("default ", 1)[1].removesuffix(")")
        defaults[name] = float(text) if text == "inf" else ast.literal_eval(text)
    return defaults


def write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def test_every_lmcache_key_is_known_in_lmcache_order() -> None:
    defaults = lmcache_defaults()
    assert len(defaults) == 108
    assert list(LMCACHE_KEYS) == list(defaults)


@pytest.mark.parametrize("key", list(LMCACHE_KEYS))
def test_each_key_maps_onto_ours_or_says_why_it_is_ignored(key: str) -> None:
    rule = LMCACHE_KEYS[key]
    if rule.target is None:
        assert len(rule.reason) > 20, f"{key}: no reason given for ignoring it"
    else:
        assert rule.target in NodeConfig.model_fields, f"{key} maps to unknown {rule.target}"


def test_a_file_of_every_key_at_lmcache_defaults_loads_with_one_warning_per_ignored_key(
    tmp_path: Path,
) -> None:
    config_file = write(tmp_path / "lmcache.yaml", lmcache_defaults())
    config = load_config(config_file=config_file, environ={})
    assert (config.chunk_size, config.max_local_cpu_size, config.port) == (256, 5.0, 5555)
    assert config.local_cpu and config.local_disk is None and config.remote_url is None
    assert config.cache_policy == "LRU" and config.remote_serde == "naive"
    warnings = config.compat_warnings
    assert len(warnings) == len(IGNORED), "\n".join(warnings)
    for key, warning in zip(IGNORED, warnings, strict=True):
        assert warning.startswith(f"LMCache key {key!r} (from config file {config_file})")
        assert warning.endswith(LMCACHE_KEYS[key].reason)


def test_every_key_as_an_lmcache_env_variable_loads(tmp_path: Path) -> None:
    env = {
        f"LMCACHE_{key.upper()}": str(value)  # LMCache's env form: True, 5.0, builtin
        for key, value in lmcache_defaults().items()
        if value is not None
    }
    config = load_config(environ=env)
    assert (config.chunk_size, config.max_local_cpu_size, config.port) == (256, 5.0, 5555)
    ignored_set = [k for k in IGNORED if f"LMCACHE_{k.upper()}" in env]
    assert len(config.compat_warnings) == len(ignored_set), "\n".join(config.compat_warnings)
    for key in ignored_set:
        where = f"(environment variable LMCACHE_{key.upper()})"
        assert any(where in warning for warning in config.compat_warnings), key


def test_lmcache_names_and_values_become_ours(tmp_path: Path) -> None:
    config_file = write(
        tmp_path / "c.yaml",
        {
            "mp_port": 6001,
            "mp_host": "tcp://127.0.0.2",
            "local_disk": str(tmp_path / "disk"),
            "max_local_disk_size": 1,
            "remote_url": "lm://cache-server:65432",
            "remote_serde": "cachegen",
            "cache_policy": "LFU",
            "extra_config": {"use_odirect": False, "save_chunk_meta": True},
        },
    )
    config = load_config(config_file=config_file, environ={})
    assert (config.port, config.host) == (6001, "127.0.0.2")
    assert config.local_disk == f"file://{tmp_path}/disk/"
    assert config.remote_url is None  # an LMCache-only backend: no remote tier
    assert (config.remote_serde, config.cache_policy) == ("naive", "LRU")
    assert config.extra_config == {"use_odirect": False, "save_chunk_meta": True}
    text = "\n".join(config.compat_warnings)
    assert len(config.compat_warnings) == 4, text
    assert "'remote_url' = 'lm://cache-server:65432'" in text and "runs without one" in text
    assert "'remote_serde' = 'cachegen'" in text
    assert "'cache_policy' = 'LFU'" in text
    assert "save_chunk_meta are ignored" in text


def test_our_name_wins_over_the_lmcache_name(tmp_path: Path) -> None:
    config_file = write(tmp_path / "c.yaml", {"mp_port": 7000, "port": 6000})
    config = load_config(config_file=config_file, environ={})
    assert config.port == 6000
    [warning] = config.compat_warnings
    assert "'mp_port'" in warning and "'port' is also set (6000) and wins" in warning
    config_file = write(tmp_path / "d.yaml", {"mp_port": 6000, "port": 6000})
    assert load_config(config_file=config_file, environ={}).compat_warnings == []  # agreeing
    env = {"LMCACHE_MP_PORT": "7000", "LMCACHE_PORT": "6000"}
    config = load_config(environ=env)
    assert config.port == 6000
    assert config.compat_warnings == [
        "LMCACHE_MP_PORT is ignored: LMCACHE_PORT is also set and wins"
    ]


def test_lmcache_env_names_and_values(tmp_path: Path) -> None:
    env = {
        "LMCACHE_MP_PORT": "6002",
        "lmcache_use_layerwise": "True",  # names match in any case
        "LMCACHE_REMOTE_SERDE": "kivi",
        "LMCACHE_LOCAL_DISK": str(tmp_path),
        "LMCACHE_MAX_LOCAL_DISK_SIZE": "1",
        "LMCACHE_EXTRA_CONFIG": "",
        "LMCACHE_NODE_HOST": "tcp://10.0.0.1",  # the connector's, not ours: silent
        "LMCACHE_CHUNK_SZE": "512",  # a typo: warned with the right name
    }
    config = load_config(environ=env)
    assert config.port == 6002 and config.remote_serde == "naive"
    assert config.local_disk == f"file://{tmp_path}/" and config.extra_config == {}
    assert config.chunk_size == 256
    text = "\n".join(config.compat_warnings)
    assert len(config.compat_warnings) == 3, text
    assert "'use_layerwise' (environment variable lmcache_use_layerwise) is ignored" in text
    assert "'remote_serde' = 'kivi' (environment variable LMCACHE_REMOTE_SERDE)" in text
    assert (
        "LMCACHE_CHUNK_SZE is not a setting and is ignored: did you mean LMCACHE_CHUNK_SIZE?"
    ) in text


def test_precedence_holds_for_lmcache_names(tmp_path: Path) -> None:
    config_file = write(tmp_path / "c.yaml", {"port": 6003})
    env = {"LMCACHE_MP_PORT": "6004"}
    assert load_config(config_file=config_file, environ=env).port == 6003  # file > env
    assert load_config({"port": 6005}, config_file=config_file, environ=env).port == 6005
    assert load_config(environ=env).port == 6004


def test_bad_value_of_an_lmcache_name_names_it_and_its_origin(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ={"LMCACHE_MP_PORT": "99999"})
    assert "port = '99999' (from environment variable LMCACHE_MP_PORT)" in str(info.value)
    with pytest.raises(ConfigError, match="use a file:// URL"):
        load_config(config_file=write(tmp_path / "c.yaml", {"local_disk": "rel/dir"}), environ={})
    with pytest.raises(ConfigError, match="the scheme must be one of"):  # not LMCache's either
        load_config(config_file=write(tmp_path / "d.yaml", {"remote_url": "http://x"}), environ={})


@pytest.mark.parametrize(
    ("written", "suggested"),
    [("chunk_sizes", "'chunk_size'"), ("enable_blendng", "'enable_blending'"),
     ("max_local_cpu", "'max_local_cpu_size'")],
)  # fmt: skip
def test_unknown_key_is_an_error_with_did_you_mean(
    tmp_path: Path, written: str, suggested: str
) -> None:
    config_file = write(tmp_path / "c.yaml", {written: 1})
    with pytest.raises(ConfigError) as info:
        load_config(config_file=config_file, environ={})
    message = str(info.value)
    assert f"unknown key {written!r}: did you mean {suggested}" in message
    assert "lmcache-keys.md" in message


def test_unknown_key_without_a_close_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key 'zzzz': check the name"):
        load_config(config_file=write(tmp_path / "c.yaml", {"zzzz": 1}), environ={})


def test_validate_mapping_reports_problems_warnings_and_values() -> None:
    check = validate_mapping(
        {"mp_port": "x", "chunk_sizes": 1, "use_layerwise": True, "max_local_cpu_size": "4Gi"},
        origin="spec.config",
    )
    assert not check.valid
    assert check.problems[0] == "spec.config: unknown key 'chunk_sizes': did you mean 'chunk_size'?"
    assert check.problems[1].startswith("mp_port (port) = 'x' (from spec.config)")
    assert len(check.problems) == 2
    assert check.warnings == [
        "LMCache key 'use_layerwise' (from spec.config) is ignored: "
        + LMCACHE_KEYS["use_layerwise"].reason
    ]
    good = validate_mapping({"max_local_cpu_size": "4Gi", "mp_port": 6000, "app_id": "a"})
    assert good.valid and good.values == {"max_local_cpu_size": 4.0, "port": 6000}
    assert good.sources == {"max_local_cpu_size": "max_local_cpu_size", "port": "mp_port"}
    assert len(good.warnings) == 1


def test_validate_mapping_checks_rules_across_keys() -> None:
    check = validate_mapping({"local_disk": "file:///var/cache/x/"})
    assert len(check.problems) == 1 and "max_local_disk_size" in check.problems[0]


def test_validate_mapping_never_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # read, these would fail the lock rule (30 > 10) and the type check
    monkeypatch.setenv("LMCACHE_MAX_LOCK_TTL_SECS", "10")
    monkeypatch.setenv("LMCACHE_CHUNK_SIZE", "not-a-number")
    assert validate_mapping({}).problems == []
    assert os.environ["LMCACHE_CHUNK_SIZE"] == "not-a-number"  # left as it was


@pytest.mark.integration
def test_validation_imports_no_torch_zmq_or_numpy() -> None:
    """The operator validates spec.config with the node's own rules, without the server's
    heavy dependencies; the compat table alone needs only the standard library."""
    script = (
        "import sys, json\n"
        "import lmcache_node.lmcache_compat as compat\n"
        "light = sorted(m for m in ('pydantic', 'yaml') if m in sys.modules)\n"
        "check = compat.validate_mapping({'chunk_size': 512, 'kv_shape': '2,2,512,4,16'})\n"
        "heavy = sorted(m for m in ('torch', 'zmq', 'numpy', 'msgspec') if m in sys.modules)\n"
        "print(json.dumps([light, heavy, check.problems]))\n"
    )
    path = os.pathsep.join([str(REPO / "node"), str(REPO / "operator")])
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path}, timeout=120,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    light, heavy, problems = json.loads(result.stdout)
    assert light == [] and heavy == [] and problems == []


def test_committed_key_table_is_current() -> None:
    from lmcache_node import docgen

    page = REPO / "docs" / "reference" / docgen.LMCACHE_FILE_NAME
    assert page.read_text(encoding="utf-8") == docgen.render_lmcache_keys(), "run `make docs`"
    for key in LMCACHE_KEYS:
        assert f"| `{key}` | `LMCACHE_{key.upper()}` |" in page.read_text(encoding="utf-8")
