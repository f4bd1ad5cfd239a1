"""The configuration reference (``docs/reference/configuration.md``), rendered from NodeConfig,
and the LMCache key table (``docs/reference/lmcache-keys.md``), rendered from
:mod:`lmcache_node.lmcache_compat`.

Keys, types, defaults, allowed values and descriptions come from the pydantic model in
:mod:`lmcache_node.config`; environment variable names from its settings configuration;
``serve`` flags from the parser ``lmcache-node serve`` builds. Regenerate the page with
``make docs`` (scripts/docgen.py); ``make docs-check`` fails when the committed page
differs.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from pydantic import AliasChoices
from pydantic.fields import FieldInfo

from lmcache_node.config import CONFIG_FILE_ENV, SECRET_KEYS, NodeConfig
from lmcache_node.lmcache_compat import KEYS_PAGE, LMCACHE_KEYS, LMCACHE_VERSION

FILE_NAME = "configuration.md"
LMCACHE_FILE_NAME = KEYS_PAGE.rsplit("/", 1)[-1]


def cell(text: str) -> str:
    """Text safe inside a Markdown table cell: pipes escaped, one line."""
    return " ".join(text.replace("|", "\\|").split())


def _value(value: Any) -> str:
    if isinstance(value, str):
        return value if value else '""'
    return json.dumps(value, sort_keys=True)


def env_names(key: str, field: FieldInfo) -> list[str]:
    """The environment variables pydantic-settings reads for ``key`` (upper-cased names;
    they match in any case unless the model is case sensitive)."""
    config = NodeConfig.model_config
    alias = field.validation_alias
    if isinstance(alias, str):
        names = [alias]
    elif isinstance(alias, AliasChoices):
        names = [choice for choice in alias.choices if isinstance(choice, str)]
    else:
        names = [f"{config.get('env_prefix', '')}{key}"]
    if not config.get("case_sensitive", False):
        names = [name.upper() for name in names]
    return names


def serve_flags() -> dict[str, list[str]]:
    """Config key -> the ``lmcache-node serve`` flags that set it."""
    from lmcache_node.serve import add_arguments  # noqa: PLC0415

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return {
        action.dest: list(action.option_strings)
        for action in parser._actions  # argparse exposes no public list of actions
        if action.dest in NodeConfig.model_fields
    }


def _type(schema: dict[str, Any]) -> str:
    variants = schema.get("anyOf")
    if variants is not None:
        return " or ".join(_type(v) for v in variants)
    kind = str(schema.get("type", "any"))
    if kind == "object" and schema.get("additionalProperties") is True:
        return "mapping"
    return kind


def _allowed(schema: dict[str, Any]) -> str:
    """Enum values and bounds (``null`` shows in the type)."""
    variants = [schema, *schema.get("anyOf", [])]
    parts: list[str] = []
    for sub in variants:
        if "const" in sub:
            parts.append(f"`{_value(sub['const'])}`")
        if "enum" in sub:
            parts.append(", ".join(f"`{_value(v)}`" for v in sub["enum"]))
        for key, op in (
            ("exclusiveMinimum", ">"),
            ("minimum", ">="),
            ("exclusiveMaximum", "<"),
            ("maximum", "<="),
        ):
            if key in sub:
                parts.append(f"{op} {_value(sub[key])}")
        for key in ("minLength", "maxLength"):
            if key in sub:
                parts.append(f"{key} {_value(sub[key])}")
    return ", ".join(parts)


def rows() -> list[dict[str, str]]:
    """One row per config key, in declaration order."""
    schema = NodeConfig.model_json_schema()["properties"]
    flags = serve_flags()
    out = []
    for key, field in NodeConfig.model_fields.items():
        description = field.description or ""
        if key in SECRET_KEYS:
            description += " (secret: credentials are redacted in /config and logs)"
        out.append(
            {
                "key": key,
                "env": ", ".join(env_names(key, field)),
                "flags": ", ".join(flags.get(key, [])),
                "type": _type(schema[key]),
                "default": _value(field.get_default(call_default_factory=True)),
                "allowed": _allowed(schema[key]),
                "description": description,
            }
        )
    return out


_HEADER = f"""\
# Configuration reference

Every setting of a cache node (`lmcache-node serve`, `lmcache-node standalone`), generated
from `NodeConfig` in `node/lmcache_node/config.py`. Keys keep LMCache's names where LMCache
has them (`chunk_size`, `max_local_cpu_size`, `local_disk`, `remote_url`, ...).

## Where values come from

Each key is taken from the first of these that sets it:

1. **The command line.** `lmcache-node serve` has one flag per key (listed below, dashes or
   underscores; `--cpu-buffer-size` is LMCache's name for `max_local_cpu_size`);
   `lmcache-node standalone` takes a few flags and `key=value` overrides for any key.
   Only flags that are given override.
2. **The config file**: `--config FILE`, else the file named by `{CONFIG_FILE_ENV}`.
3. **`LMCACHE_*` environment variables**, one per key (the table's second column; names
   match in any case).
4. **The defaults** below.

Validation errors name the key, the value, what is allowed and which of these it came from.

## Config file format

A YAML mapping of the keys below to values; an empty file means no settings. Every LMCache
{LMCACHE_VERSION} key is accepted too, in the file and as an `LMCACHE_<KEY>` variable: mapped
onto the key below with the same meaning, or ignored with one warning in the log that names it
and says why ([{LMCACHE_FILE_NAME}]({LMCACHE_FILE_NAME})). A key neither knows is an error with a
did-you-mean. Sizes in GB also accept Kubernetes quantities (`4Gi`).

```yaml
chunk_size: 256
max_local_cpu_size: 4Gi
local_disk: file:///var/cache/lmcache/
max_local_disk_size: 100Gi
remote_url: redis://redis.cache:6379/0
extra_config: {{use_odirect: true}}
```

## Environment variable values

Values are parsed as pydantic-settings does: numbers and strings as written, booleans as
`true`/`false` (also `1`/`0`, `yes`/`no`, `on`/`off`), mappings (`extra_config`) as JSON,
e.g. `LMCACHE_EXTRA_CONFIG='{{"use_odirect": true}}'`.

## Keys
"""


def render() -> str:
    """The whole ``configuration.md`` page."""
    lines = [
        "<!-- Generated by `make docs` (scripts/docgen.py) from NodeConfig; do not edit. -->",
        "",
        _HEADER,
        "| Key | Environment variable | `serve` flags | Type | Default | Allowed values "
        "| Description |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows():
        flags = ", ".join(f"`{flag}`" for flag in row["flags"].split(", ") if flag)
        lines.append(
            f"| `{cell(row['key'])}` | `{cell(row['env'])}` | {cell(flags)} "
            f"| {cell(row['type'])} | `{cell(row['default'])}` | {cell(row['allowed'])} "
            f"| {cell(row['description'])} |"
        )
    return "\n".join(lines) + "\n"


_LMCACHE_HEADER = f"""\
# LMCache {LMCACHE_VERSION} configuration keys

An LMCache config works unchanged: `lmcache-node serve --config lmcache.yaml` (or
`LMCACHE_CONFIG_FILE`), `LMCACHE_<KEY>` variables, and an LMCacheCluster's `spec.config` /
`spec.configFrom` accept every key LMCache {LMCACHE_VERSION} defines, at any of its values.

- A key with the same meaning as one of ours sets it ([{FILE_NAME}]({FILE_NAME})); where
  LMCache's name differs, ours wins when both are given.
- A value only LMCache understands (a remote backend other than Redis/Valkey, the CacheGen
  or KIVI codec, the LFU/FIFO/MRU policies) gets this node's behaviour and one warning.
- A key that does not apply is ignored with one warning naming it and the reason below.
- A key LMCache does not define either is an error, with the closest known names.

Generated from `node/lmcache_node/lmcache_compat.py`.

| LMCache key | Environment variable | This node |
|---|---|---|
"""


def render_lmcache_keys() -> str:
    """The whole ``lmcache-keys.md`` page."""
    lines = [
        "<!-- Generated by `make docs` (scripts/docgen.py) from lmcache_compat; do not edit. -->",
        "",
        _LMCACHE_HEADER.rstrip("\n"),
    ]
    for key, rule in LMCACHE_KEYS.items():
        lines.append(f"| `{key}` | `LMCACHE_{key.upper()}` | {cell(rule.describe(key))} |")
    return "\n".join(lines) + "\n"


def files() -> dict[str, str]:
    """File name -> text of every generated reference page of the node."""
    return {FILE_NAME: render(), LMCACHE_FILE_NAME: render_lmcache_keys()}
