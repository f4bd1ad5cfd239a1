"""Settings the node cannot honour are refused with a reason, never accepted silently."""

from __future__ import annotations

from pathlib import Path

import pytest
from lmcache_node.config import ConfigError, load_config


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("local_cpu", False, "the L1 memory tier cannot be turned off"),
        ("save_unfull_chunk", True, "only whole chunks are cached"),
    ],
)
def test_unsupported_values_are_refused_from_every_source(
    key: str, value: bool, reason: str, tmp_path: Path
) -> None:
    config_file = tmp_path / "node.yaml"
    config_file.write_text(f"{key}: {str(value).lower()}\n")
    sources = [
        ({"cli": {key: value}}, "(from the command line)"),
        ({"environ": {f"LMCACHE_{key.upper()}": str(value).lower()}}, "(from environment"),
        ({"config_file": config_file}, f"(from config file {config_file})"),
    ]
    for kwargs, origin in sources:
        with pytest.raises(ConfigError) as info:
            load_config(kwargs.get("cli"), config_file=kwargs.get("config_file"),
                        environ=kwargs.get("environ", {}))  # fmt: skip
        message = str(info.value)
        assert f"{key} = " in message and origin in message and reason in message
        assert f"Remove {key}" in message


def test_the_supported_values_still_load() -> None:
    config = load_config({"local_cpu": True, "save_unfull_chunk": False}, environ={})
    assert config.local_cpu is True
    assert config.save_unfull_chunk is False
    assert config.l1_capacity_bytes == 5 * 1024**3
