from pathlib import Path

import pytest
from lmcache_node.config import ConfigError, NodeConfig, config_keys, load_config

LMCACHE_KEYS = [
    "chunk_size",
    "local_cpu",
    "max_local_cpu_size",
    "local_disk",
    "max_local_disk_size",
    "remote_url",
    "remote_serde",
    "save_unfull_chunk",
    "extra_config",
    "cache_policy",
    "blocking_timeout_secs",
    "internal_api_server_enabled",
    "internal_api_server_port_start",
]
SERVER_KEYS = [
    "host",
    "port",
    "http_port",
    "max_workers",
    "device",
    "model_name",
    "worker_id",
    "world_size",
    "kv_dtype",
    "kv_shape",
    "kvcache_shape_spec",
    "use_mla",
    "fmt",
]


def test_keys_keep_lmcache_names() -> None:
    keys = config_keys()
    for key in LMCACHE_KEYS + SERVER_KEYS:
        assert key in keys


def test_defaults() -> None:
    config = load_config(environ={})
    assert config.chunk_size == 256
    assert config.local_cpu is True
    assert config.max_local_cpu_size == 5.0
    assert config.local_disk is None
    assert config.port == 5555
    assert config.device == "cpu"
    assert config.cache_policy == "LRU"
    assert config.save_unfull_chunk is False
    assert config.l1_capacity_bytes == 5 * 1024**3


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_precedence_cli_over_file_over_env_over_default(tmp_path: Path) -> None:
    config_file = write(tmp_path / "c.yaml", "chunk_size: 128\nport: 6000\n")
    env = {
        "LMCACHE_CHUNK_SIZE": "64",
        "LMCACHE_PORT": "7000",
        "LMCACHE_MAX_WORKERS": "3",
    }
    config = load_config({"chunk_size": 512}, config_file=config_file, environ=env)
    assert config.chunk_size == 512  # CLI
    assert config.port == 6000  # file beats env
    assert config.max_workers == 3  # env beats default
    assert config.http_port == 8080  # default


def test_config_file_from_environment(tmp_path: Path) -> None:
    config_file = write(tmp_path / "c.yaml", "max_local_cpu_size: 2Gi\n")
    config = load_config(environ={"LMCACHE_CONFIG_FILE": str(config_file)})
    assert config.max_local_cpu_size == 2.0


def test_sizes_accept_quantities_and_floats() -> None:
    assert load_config({"max_local_cpu_size": "512Mi"}, environ={}).max_local_cpu_size == 0.5
    assert load_config({"max_local_cpu_size": 1.5}, environ={}).max_local_cpu_size == 1.5
    assert load_config({"l1_page_size": "64Ki"}, environ={}).l1_page_size == 65536


def test_env_parses_json_for_dicts() -> None:
    config = load_config(environ={"LMCACHE_EXTRA_CONFIG": '{"use_odirect": true}'})
    assert config.extra_config == {"use_odirect": True}


def test_error_names_key_value_and_origin_cli() -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"chunk_size": "abc"}, environ={})
    message = str(info.value)
    assert "chunk_size" in message
    assert "'abc'" in message
    assert "command line" in message


def test_error_names_env_origin() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ={"LMCACHE_DEVICE": "tpu"})
    message = str(info.value)
    assert "device" in message
    assert "LMCACHE_DEVICE" in message
    assert "cpu" in message and "cuda" in message  # what is allowed


def test_error_names_file_origin(tmp_path: Path) -> None:
    config_file = write(tmp_path / "c.yaml", "port: 99999\n")
    with pytest.raises(ConfigError) as info:
        load_config(config_file=config_file, environ={})
    assert "port" in str(info.value)
    assert str(config_file) in str(info.value)


def test_unknown_key_in_file_is_rejected_with_known_keys(tmp_path: Path) -> None:
    config_file = write(tmp_path / "c.yaml", "chunk_sizes: 256\n")
    with pytest.raises(ConfigError, match=r"unknown key.*chunk_sizes.*known keys: chunk_size"):
        load_config(config_file=config_file, environ={})


def test_unknown_cli_key_is_rejected() -> None:
    with pytest.raises(ConfigError, match="Unknown setting"):
        load_config({"nope": 1}, environ={})


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(config_file=tmp_path / "missing.yaml", environ={})


def test_required_config_file_absent() -> None:
    with pytest.raises(ConfigError, match="No config file specified"):
        load_config(environ={}, require_file=True)


def test_config_file_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mapping"):
        load_config(config_file=write(tmp_path / "c.yaml", "- 1\n- 2\n"), environ={})


def test_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(config_file=write(tmp_path / "c.yaml", "a: [1\n"), environ={})


def test_disk_tier_needs_a_cap() -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"local_disk": "file:///tmp/cache/"}, environ={})
    assert "max_local_disk_size" in str(info.value)
    config = load_config(
        {"local_disk": "file:///tmp/cache/", "max_local_disk_size": "1Gi"}, environ={}
    )
    assert config.disk_path == Path("/tmp/cache")
    assert config.disk_capacity_bytes == 1024**3


def test_local_disk_must_be_a_file_url() -> None:
    with pytest.raises(ConfigError, match="file://"):
        load_config({"local_disk": "/tmp/cache", "max_local_disk_size": 1}, environ={})


def test_remote_url_scheme_is_checked() -> None:
    with pytest.raises(ConfigError, match="redis"):
        load_config({"remote_url": "http://x"}, environ={})
    assert load_config({"remote_url": "valkey://h:6379"}, environ={}).remote_url


def test_invalid_shape_spec_shows_format_and_example() -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"kvcache_shape_spec": "(2,2,x):float16:2"}, environ={})
    message = str(info.value)
    assert "(shape):dtype:layer_count" in message
    assert "(2,2,256,4,16):float16:2" in message
    assert "kvcache_shape_spec" in message


def test_shape_spec_layer_count_must_match() -> None:
    with pytest.raises(ConfigError, match="layer count"):
        load_config({"kvcache_shape_spec": "(3,2,256,4,16):float16:2"}, environ={})


def test_shape_spec_groups() -> None:
    config = load_config(
        {"kvcache_shape_spec": "(2,2,256,4,16):float16:2;(3,2,256,4,4):float32:3"}, environ={}
    )
    groups = config.layer_groups()
    assert [g.num_layers for g in groups] == [2, 3]
    assert [g.dtype_name for g in groups] == ["float16", "float32"]


def test_mla_must_fit_the_shape() -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"use_mla": True}, environ={})
    assert "use_mla" in str(info.value) and "kv_shape" in str(info.value)
    ok = load_config({"use_mla": True, "kv_shape": "2,1,256,1,576"}, environ={})
    assert ok.use_mla


def test_redacted_hides_passwords() -> None:
    config = load_config({"remote_url": "redis://user:hunter2@host:6379/0"}, environ={})
    assert "hunter2" not in str(config.redacted())
    assert "user:***@host" in config.redacted()["remote_url"]
    query = "unix:///run/redis.sock?db=0&password=hunter2"
    config = load_config({"remote_url": query}, environ={})
    assert "hunter2" not in str(config.redacted())
    assert config.redacted()["remote_url"] == "unix:///run/redis.sock?db=0&password=***"


def test_environ_argument_does_not_leak() -> None:
    import os

    before = dict(os.environ)
    load_config(environ={"LMCACHE_PORT": "6001"})
    assert dict(os.environ) == before


def test_model_is_pydantic_settings() -> None:
    from pydantic_settings import BaseSettings

    assert issubclass(NodeConfig, BaseSettings)
