from __future__ import annotations

import pytest
from lmcache_node.vllm.settings import ConnectorConfigError, load_settings


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
