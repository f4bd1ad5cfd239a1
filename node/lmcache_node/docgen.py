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
import functools
import json
from typing import Any

import jinja2
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


def _flag_list(flags: str) -> str:
    return ", ".join(f"`{flag}`" for flag in flags.split(", ") if flag)


@functools.cache
def _templates() -> jinja2.Environment:
    """The page templates beside this module (``templates/*.md.j2``)."""
    env = jinja2.Environment(  # noqa: S701 - Markdown, not HTML: nothing to escape
        loader=jinja2.PackageLoader("lmcache_node", "templates"),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["cell"] = cell
    env.filters["flag_list"] = _flag_list
    return env


def render() -> str:
    """The whole ``configuration.md`` page."""
    return (
        _templates()
        .get_template(FILE_NAME + ".j2")
        .render(
            rows=rows(),
            config_file_env=CONFIG_FILE_ENV,
            lmcache_version=LMCACHE_VERSION,
            lmcache_file_name=LMCACHE_FILE_NAME,
        )
    )


def render_lmcache_keys() -> str:
    """The whole ``lmcache-keys.md`` page."""
    keys = [(key, rule.describe(key)) for key, rule in LMCACHE_KEYS.items()]
    return (
        _templates()
        .get_template(LMCACHE_FILE_NAME + ".j2")
        .render(keys=keys, lmcache_version=LMCACHE_VERSION, file_name=FILE_NAME)
    )


def files() -> dict[str, str]:
    """File name -> text of every generated reference page of the node."""
    return {FILE_NAME: render(), LMCACHE_FILE_NAME: render_lmcache_keys()}
