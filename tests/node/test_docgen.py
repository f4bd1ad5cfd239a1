"""docs/reference/configuration.md is generated from NodeConfig and kept current."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from lmcache_node import docgen
from lmcache_node.config import CONFIG_FILE_ENV, ConfigError, NodeConfig, load_config

REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / "docs" / "reference" / docgen.FILE_NAME
FIX = "make docs"


def _committed() -> str:
    assert PAGE.is_file(), f"{PAGE.relative_to(REPO)} is missing; run `{FIX}`"
    return PAGE.read_text(encoding="utf-8")


def _rows() -> dict[str, list[str]]:
    """Config key -> the cells of its row in the committed page."""
    rows = {}
    for line in _committed().splitlines():
        match = re.match(r"\| `([a-z0-9_]+)` \|", line)
        if match:
            rows[match.group(1)] = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
    return rows


def test_committed_page_is_current() -> None:
    assert _committed() == docgen.render(), f"{PAGE.relative_to(REPO)} is stale: run `{FIX}`"


def test_every_key_has_a_row_with_its_env_var_default_and_description() -> None:
    rows = _rows()
    assert list(rows) == list(NodeConfig.model_fields)
    for key, field in NodeConfig.model_fields.items():
        cells = rows[key]
        assert cells[1] == f"`LMCACHE_{key.upper()}`", cells
        assert field.description, f"NodeConfig.{key} has no description"
        assert field.description.replace("|", "\\|") in cells[6]
    assert rows["chunk_size"][3:6] == ["integer", "`256`", "> 0, <= 1048576"]
    assert rows["remote_serde"][5] == "`naive`, `zstd`, `lz4`"
    assert "`--cpu-buffer-size`" in rows["max_local_cpu_size"][2]


@pytest.mark.parametrize("key", list(NodeConfig.model_fields))
def test_documented_env_var_is_the_one_read(key: str) -> None:
    """Each documented variable reaches its key: the value is taken, or it is rejected
    with an error naming that variable."""
    env = _rows()[key][1].strip("`")
    marker = "@@not-a-valid-value@@"
    try:
        config = load_config(environ={env: marker})
    except ConfigError as exc:
        # a validation error names the variable; a parse error (JSON of a mapping) the key
        names = (f"environment variable {env}", f'field "{key}" from source "EnvSettingsSource"')
        assert any(name in str(exc) for name in names), str(exc)
    else:
        assert getattr(config, key) == marker


def test_header_states_precedence_and_file_format() -> None:
    page = _committed()
    order = [
        "**The command line.**",
        "**The config file**",
        "**`LMCACHE_*` environment",
        "**The defaults**",
    ]
    positions = [page.index(item) for item in order]
    assert positions == sorted(positions)
    assert CONFIG_FILE_ENV in page
    assert "```yaml" in page
