from __future__ import annotations

import re
from pathlib import Path

import pytest
from lmcache_node.vllm.settings import KNOWN_KEYS, ConnectorConfigError, env_name, load_settings


def test_defaults() -> None:
    settings = load_settings({}, env={})
    assert settings.url == "tcp://127.0.0.1:5555"
    assert settings.chunk_size == 256
    assert settings.model_name is None


def test_extra_config_host_and_port() -> None:
    settings = load_settings(
        {"lmcache.node.host": "tcp://10.1.2.3", "lmcache.node.port": 6000}, env={}
    )
    assert settings.url == "tcp://10.1.2.3:6000"


def test_bare_host_gets_tcp_and_embedded_port_is_used() -> None:
    assert load_settings({"lmcache.node.host": "10.1.2.3"}, env={}).url == "tcp://10.1.2.3:5555"
    assert (
        load_settings({"lmcache.node.host": "tcp://node-a:7000"}, env={}).url == "tcp://node-a:7000"
    )


def test_ipv6_literal() -> None:
    assert load_settings({"lmcache.node.host": "tcp://[fd00::1]"}, env={}).url == (
        "tcp://[fd00::1]:5555"
    )


def test_env_is_used_when_extra_config_is_silent() -> None:
    env = {
        "LMCACHE_NODE_HOST": "10.0.0.9",
        "LMCACHE_NODE_PORT": "5601",
        "LMCACHE_CHUNK_SIZE": "512",
    }
    settings = load_settings({}, env=env)
    assert settings.url == "tcp://10.0.0.9:5601"
    assert settings.chunk_size == 512


def test_extra_config_wins_over_env() -> None:
    settings = load_settings(
        {"lmcache.node.port": 5700}, env={"LMCACHE_NODE_PORT": "5601", "LMCACHE_NODE_HOST": "h"}
    )
    assert settings.url == "tcp://h:5700"


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"lmcache.node.port": "http"}, "lmcache.node.port must be an integer"),
        ({"lmcache.node.port": 70000}, "between 1 and 65535"),
        ({"lmcache.node.chunk_size": 0}, "lmcache.node.chunk_size"),
        ({"lmcache.node.timeout_s": "soon"}, "lmcache.node.timeout_s must be a number"),
        ({"lmcache.node.host": "http://x"}, "lmcache.node.host must look like tcp://"),
        ({"lmcache.node.hots": "x"}, "unknown connector setting(s) lmcache.node.hots"),
        ({"lmcache.node.port": True}, "lmcache.node.port"),
    ],
)
def test_bad_values_name_the_key_and_source(extra: dict[str, object], needle: str) -> None:
    with pytest.raises(ConnectorConfigError) as info:
        load_settings(extra, env={})
    assert needle in str(info.value)
    assert "kv_connector_extra_config" in str(info.value)


def test_bad_env_value_names_the_variable() -> None:
    with pytest.raises(ConnectorConfigError, match="environment variable LMCACHE_NODE_PORT"):
        load_settings({}, env={"LMCACHE_NODE_PORT": "x"})


def test_other_keys_in_extra_config_are_ignored() -> None:
    settings = load_settings({"some.other.connector": 1}, env={})
    assert settings.url.endswith(":5555")


@pytest.mark.parametrize("mode", ["auto", "shared", "engine"])
def test_transfer_mode_from_the_operators_env(mode: str) -> None:
    """The operator sets LMCACHE_NODE_TRANSFER_MODE from the cluster's server.transferMode."""
    assert load_settings({}, env={"LMCACHE_NODE_TRANSFER_MODE": mode}).transfer_mode == mode
    assert load_settings({}, env={}).transfer_mode == "auto"


def test_bad_transfer_mode_names_the_choices() -> None:
    with pytest.raises(ConnectorConfigError) as info:
        load_settings({"lmcache.node.transfer_mode": "gpu"}, env={})
    assert "lmcache.node.transfer_mode must be one of auto, shared, engine; got 'gpu'" in str(
        info.value
    )


def test_missing_credentials_directory_names_key_source_and_fix(tmp_path: Path) -> None:
    with pytest.raises(ConnectorConfigError) as info:
        load_settings({"lmcache.node.credentials_dir": str(tmp_path / "nope")}, env={})
    message = str(info.value)
    assert "lmcache.node.credentials_dir" in message
    assert "does not exist: mount the cluster's client-credentials Secret there" in message
    assert "(set by kv_connector_extra_config['lmcache.node.credentials_dir'])" in message


def test_scheduler_copy_keeps_every_other_setting() -> None:
    settings = load_settings({"lmcache.node.transfer_mode": "engine"}, env={})
    copy = settings.model_copy(update={"timeout_s": settings.lookup_timeout_s})
    assert copy.timeout_s == 1.0
    assert copy.transfer_mode == "engine"
    assert copy.url == settings.url


def test_every_setting_is_documented_in_docs_vllm_md() -> None:
    docs = (Path(__file__).parents[3] / "docs" / "vllm.md").read_text()
    rows = set(re.findall(r"^\| `lmcache\.node\.(\w+)` \| `(\w+)` \|", docs, re.M))
    assert rows == {(key, env_name(key)) for key in KNOWN_KEYS}
