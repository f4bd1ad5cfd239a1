"""Connector settings: ``kv_connector_extra_config`` keys, then ``LMCACHE_*`` env, then defaults.

Keys (extra config / environment variable / default):

- ``lmcache.node.host`` / ``LMCACHE_NODE_HOST`` / ``tcp://127.0.0.1`` — the node server; a bare
  address (``10.0.0.7``) gets ``tcp://``; a port in the host (``tcp://h:5555``) is accepted.
- ``lmcache.node.port`` / ``LMCACHE_NODE_PORT`` / ``5555``.
- ``lmcache.node.chunk_size`` / ``LMCACHE_CHUNK_SIZE`` / ``256`` — must match the server's and be a
  multiple of vLLM's block size.
- ``lmcache.node.timeout_s`` / ``LMCACHE_NODE_TIMEOUT_S`` / ``5.0`` — per call to the server.
- ``lmcache.node.lookup_timeout_s`` / ``LMCACHE_NODE_LOOKUP_TIMEOUT_S`` / ``1.0`` — lookups run in
  vLLM's scheduler loop, so they give up sooner (a miss, never a stall).
- ``lmcache.node.lock_ttl_s`` / ``LMCACHE_NODE_LOCK_TTL_S`` / ``30.0`` — lookup locks.
- ``lmcache.node.model_name`` / ``LMCACHE_NODE_MODEL_NAME`` / vLLM's ``--model`` — key namespace;
  set it when instances load the same weights from different paths.
- ``lmcache.node.tenant_salt`` / ``LMCACHE_NODE_TENANT_SALT`` / ``""`` — isolates tenants.
- ``lmcache.node.reconnect_s`` / ``LMCACHE_NODE_RECONNECT_S`` / ``2.0`` — retry period while the
  server is unreachable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

PREFIX = "lmcache.node."


class ConnectorConfigError(ValueError):
    """A connector setting is invalid; the message names the key, its source and the fix."""


@dataclass(frozen=True)
class ConnectorSettings:
    url: str = "tcp://127.0.0.1:5555"
    chunk_size: int = 256
    timeout_s: float = 5.0
    lookup_timeout_s: float = 1.0
    lock_ttl_s: float = 30.0
    model_name: str | None = None
    tenant_salt: str = ""
    reconnect_s: float = 2.0


def _source(key: str, extra: Mapping[str, Any], env: Mapping[str, str]) -> tuple[Any, str] | None:
    if PREFIX + key in extra:
        return extra[PREFIX + key], f"kv_connector_extra_config[{PREFIX + key!r}]"
    env_name = "LMCACHE_" + ("CHUNK_SIZE" if key == "chunk_size" else "NODE_" + key.upper())
    if env.get(env_name, "") != "":
        return env[env_name], f"environment variable {env_name}"
    return None


def _number(key: str, extra: Mapping[str, Any], env: Mapping[str, str], default: float, *,
            integer: bool, low: float, high: float) -> Any:  # fmt: skip
    found = _source(key, extra, env)
    if found is None:
        return default
    raw, where = found
    try:
        value = int(raw) if integer else float(raw)
        if isinstance(raw, bool) or (integer and isinstance(raw, float) and raw != int(raw)):
            raise ValueError
    except (TypeError, ValueError):
        kind = "an integer" if integer else "a number"
        raise ConnectorConfigError(
            f"{PREFIX}{key} must be {kind} between {low:g} and {high:g}; got {raw!r} from {where}"
        ) from None
    if not low <= value <= high:
        raise ConnectorConfigError(
            f"{PREFIX}{key} must be between {low:g} and {high:g}; got {value!r} from {where}"
        )
    return value


def _url(extra: Mapping[str, Any], env: Mapping[str, str]) -> str:
    found = _source("host", extra, env)
    raw, where = found if found is not None else ("tcp://127.0.0.1", "the default")
    host = str(raw).strip()
    if "://" not in host:
        host = "tcp://" + host
    parsed = urlparse(host)
    if parsed.scheme not in ("tcp", "ipc") or not (parsed.netloc or parsed.path):
        raise ConnectorConfigError(
            f"{PREFIX}host must look like tcp://10.0.0.7 (or tcp://host:port); got {raw!r} "
            f"from {where}"
        )
    if parsed.scheme == "ipc":
        return host
    try:
        embedded_port = parsed.port
    except ValueError:
        raise ConnectorConfigError(
            f"{PREFIX}host {raw!r} from {where} has an invalid port; use tcp://host:5555"
        ) from None
    port = _number("port", extra, env, embedded_port or 5555, integer=True, low=1, high=65535)
    hostname = parsed.hostname or ""
    if not hostname:
        raise ConnectorConfigError(f"{PREFIX}host {raw!r} from {where} names no host")
    if ":" in hostname:  # IPv6 literal
        hostname = f"[{hostname}]"
    return f"tcp://{hostname}:{port}"


def load_settings(
    extra_config: Mapping[str, Any] | None, env: Mapping[str, str] | None = None
) -> ConnectorSettings:
    """Settings from vLLM's ``kv_connector_extra_config`` and the environment."""
    extra = dict(extra_config or {})
    environ = os.environ if env is None else env
    unknown = sorted(
        k[len(PREFIX) :]
        for k in extra
        if k.startswith(PREFIX) and k[len(PREFIX) :] not in _KNOWN_KEYS
    )
    if unknown:
        raise ConnectorConfigError(
            f"unknown connector setting(s) {', '.join(PREFIX + k for k in unknown)} in "
            f"kv_connector_extra_config; known: {', '.join(PREFIX + k for k in _KNOWN_KEYS)}"
        )
    model = _source("model_name", extra, environ)
    salt = _source("tenant_salt", extra, environ)
    return ConnectorSettings(
        url=_url(extra, environ),
        chunk_size=_number("chunk_size", extra, environ, 256, integer=True, low=1, high=1 << 20),
        timeout_s=_number("timeout_s", extra, environ, 5.0, integer=False, low=0.01, high=3600),
        lookup_timeout_s=_number(
            "lookup_timeout_s", extra, environ, 1.0, integer=False, low=0.01, high=3600
        ),
        lock_ttl_s=_number("lock_ttl_s", extra, environ, 30.0, integer=False, low=0.1, high=86400),
        model_name=str(model[0]) if model is not None else None,
        tenant_salt=str(salt[0]) if salt is not None else "",
        reconnect_s=_number("reconnect_s", extra, environ, 2.0, integer=False, low=0.05, high=600),
    )


_KNOWN_KEYS = (
    "host",
    "port",
    "chunk_size",
    "timeout_s",
    "lookup_timeout_s",
    "lock_ttl_s",
    "model_name",
    "tenant_salt",
    "reconnect_s",
)
