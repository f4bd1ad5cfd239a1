"""A cluster's own server settings: ``spec.config`` over ``spec.configFrom``, under ours.

The user's keys (LMCache's or lmcache-node's) go into the node's config file; the keys the
operator writes win. Those keys are of two kinds:

- set by the spec (``SPEC_KEYS``): ``spec.config`` may repeat the spec's value (an LMCache
  config saying ``chunk_size: 256`` works), any other value is refused, naming the spec field;
- set by the operator alone (``OPERATOR_KEYS``: addresses, shm directory, credentials): refused
  whatever the value, because they are the cluster's identity and trust set-up.

:func:`check_user_config` validates with the node's own loader
(``lmcache_node.lmcache_compat.validate_mapping``, imported when called: the operator image
needs the ``lmcache_node`` package, without torch).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from lmcache_operator.api.lmcachecluster import MAX_CONFIG_KEYS, LMCacheClusterSpec

MAX_CONFIG_FROM_BYTES = 64 * 1024

SPEC_KEYS: dict[str, str] = {
    "chunk_size": "spec.server.chunkSize",
    "local_cpu": "the operator (always true)",
    "max_local_cpu_size": "spec.cache.cpuSize",
    "l1_persistent": "spec.cache.persistent",
    "cache_policy": "spec.cache.evictionPolicy",
    "port": "spec.server.port",
    "http_port": "spec.server.httpPort",
    "max_workers": "spec.server.maxWorkers",
    "device": "spec.device",
    "log_level": "spec.server.logLevel",
    "local_disk": "spec.cache.disk.path",
    "max_local_disk_size": "spec.cache.disk.size",
    "remote_url": "spec.cache.remote.url (or urlSecretRef)",
    "remote_serde": "spec.cache.remote.serde",
}
OPERATOR_KEYS: dict[str, str] = {
    "host": "the server binds the node's addresses (hostNetwork)",
    "http_host": "the operator chooses the HTTP API's addresses",
    "shm_dir": "each cluster has its own shm directory",
    "shm_group": "set spec.shmGroup",
    "curve_server_key": "the operator keeps the cluster's credentials (docs/security.md)",
    "curve_client_keys": "the operator keeps the cluster's credentials (docs/security.md)",
    "http_token_file": "the operator keeps the cluster's credentials (docs/security.md)",
    "remote_secret_file": "the operator keeps the cluster's credentials (docs/security.md)",
    "remote_key_prefix": "each cluster's remote keys are prefixed <namespace>/<name>",
    "insecure_allow_unauthenticated": "the operator never turns authentication off",
}


@dataclass
class UserConfig:
    """``values``: the user's mapping as written (LMCache and our keys); ``problems``: what
    makes it unusable (ConfigValid=False); ``warnings``: keys and values ignored or converted."""

    values: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def origin(spec: LMCacheClusterSpec) -> str:
    """How messages name where the user's settings came from."""
    ref = spec.config_from
    if ref is None:
        return "spec.config"
    source = f"spec.configFrom (ConfigMap {ref.name}, key {ref.key})"
    return f"spec.config over {source}" if spec.config else source


def _has_alias(text: str) -> bool:
    return any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, yaml.SafeLoader))


def parse_config_from(
    spec: LMCacheClusterSpec, text: str | None
) -> tuple[dict[str, Any], list[str]]:
    """The mapping in the ConfigMap key ``spec.configFrom`` names (``text``; None: the
    ConfigMap or key is missing), bounded: at most 64 KiB and 256 keys, no YAML aliases."""
    ref = spec.config_from
    if ref is None:
        return {}, []
    where = f"spec.configFrom: ConfigMap {ref.name!r}, key {ref.key!r}"
    if text is None:
        return {}, [f"{where} does not exist: create it, or fix spec.configFrom"]
    if len(text.encode("utf-8")) > MAX_CONFIG_FROM_BYTES:
        return {}, [f"{where} is over {MAX_CONFIG_FROM_BYTES // 1024} KiB: an LMCache config "
                    "is a few dozen keys"]  # fmt: skip
    try:
        if _has_alias(text):
            return {}, [f"{where}: YAML aliases (*name) are not accepted; write the values out"]
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return {}, [f"{where} is not valid YAML: {exc}"]
    if data is None:
        return {}, []
    if not isinstance(data, dict):
        return {}, [f"{where} must hold a mapping of keys to values, not a {type(data).__name__}"]
    if len(data) > MAX_CONFIG_KEYS:
        return {}, [f"{where} has {len(data)} keys; at most {MAX_CONFIG_KEYS} are accepted"]
    return {str(k): v for k, v in data.items()}, []


def merged_user_config(
    spec: LMCacheClusterSpec, config_from_text: str | None = None
) -> tuple[dict[str, Any], list[str]]:
    """``spec.config`` over the ``spec.configFrom`` mapping, and the problems reading it."""
    from_map, problems = parse_config_from(spec, config_from_text)
    return {**from_map, **spec.config}, problems


def owned_key_problems(
    spec: LMCacheClusterSpec,
    ours: Mapping[str, Any],
    values: Mapping[str, Any],
    sources: Mapping[str, str],
    defaults: Mapping[str, Any] | None = None,
) -> list[str]:
    """The user's settings of keys the operator writes (``ours``: the operator's node config;
    ``values``: our key -> the user's validated value; ``sources``: our key -> as written;
    ``defaults``: the node's defaults, which a key the operator leaves out keeps)."""
    defaults = defaults or {}
    where = origin(spec)
    problems: list[str] = []

    def shown(key: str) -> str:
        written = sources.get(key, key)
        return written if written == key else f"{written} (this node's {key})"

    for key in sources:  # also when a value was invalid: the key alone is refused
        if key in OPERATOR_KEYS:
            problems.append(
                f"{where}: {shown(key)} is set by the operator ({OPERATOR_KEYS[key]}); remove it"
            )
    for key, value in values.items():
        if key not in SPEC_KEYS:
            continue
        expected = ours[key] if key in ours else defaults.get(key)
        if value != expected:
            spec_value = f" ({ours[key]!r})" if key in ours else " (unset)"
            problems.append(
                f"{where}: {shown(key)} = {value!r} differs from {SPEC_KEYS[key]}{spec_value}: set "
                f"{SPEC_KEYS[key]} instead, or remove it"
            )
    return problems


def merge_into(ours: Mapping[str, Any], user: Mapping[str, Any]) -> dict[str, Any]:
    """The node's config file: the user's keys as written, ours over them."""
    return {**{k: v for k, v in user.items() if k not in ours}, **ours}


def check_user_config(
    spec: LMCacheClusterSpec, ours: Mapping[str, Any], config_from_text: str | None = None
) -> UserConfig:
    """Read, validate and check a cluster's own settings against ``ours`` (the operator's
    node config without them, ``lmcachecluster.node_config``)."""
    from lmcache_node.lmcache_compat import validate_mapping  # noqa: PLC0415 - node package

    user, problems = merged_user_config(spec, config_from_text)
    if not user:
        return UserConfig(problems=problems)
    check = validate_mapping(user, origin=origin(spec))
    problems += check.problems
    problems += owned_key_problems(spec, ours, check.values, check.sources, check.defaults)
    return UserConfig(values=user, problems=problems, warnings=check.warnings)
