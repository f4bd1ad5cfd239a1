"""Connector settings: ``kv_connector_extra_config`` keys, then ``LMCACHE_*`` env, then defaults.

A plain pydantic model (vLLM ships pydantic; nothing here needs more). Keys (extra config /
environment variable / default):

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
- ``lmcache.node.transfer_mode`` / ``LMCACHE_NODE_TRANSFER_MODE`` / ``auto`` — how KV bytes move:
  ``shared`` (the server maps vLLM's KV memory: shm on CPU, CUDA IPC on GPUs), ``engine``
  (vLLM copies through a server-owned shm area; the server needs no GPU), ``auto`` (shared,
  falling back to engine when the server cannot open the GPU memory).
- ``lmcache.node.credentials_dir`` / ``LMCACHE_NODE_CREDENTIALS_DIR`` / unset — a directory with
  ``client.key``, ``client.pub`` and ``server.pub`` (CURVE): the connection is encrypted and
  authenticated; a bad directory fails vLLM's start. Unset: no CURVE (only a server on
  loopback or started with ``--insecure-allow-unauthenticated`` accepts that).
- ``lmcache.node.verify`` / ``LMCACHE_NODE_VERIFY`` / ``false`` — verify mode: digest each
  chunk's KV bytes when saved, check them after every load; mismatches are counted in vLLM's
  metrics and the first is logged with its key (``verify.py``). Costs a copy and a hash per
  chunk moved: for tests and investigations.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from lmcache_node.protocol.credentials import ClientCredentials, CredentialsError

PREFIX = "lmcache.node."
DEFAULT_HOST = "tcp://127.0.0.1"
DEFAULT_PORT = 5555
TransferMode = Literal["auto", "shared", "engine"]


class ConnectorConfigError(ValueError):
    """A connector setting is invalid; the message names the key, its source and the fix."""


class ConnectorSettings(BaseModel):
    """One field per connector key (``lmcache.node.<field>``)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    host: str = DEFAULT_HOST
    port: int | None = Field(None, ge=1, le=65535)  # None: the host's port, else 5555
    chunk_size: int = Field(256, ge=1, le=1 << 20)
    timeout_s: float = Field(5.0, ge=0.01, le=3600)
    lookup_timeout_s: float = Field(1.0, ge=0.01, le=3600)
    lock_ttl_s: float = Field(30.0, ge=0.1, le=86400)
    model_name: str | None = None
    tenant_salt: str = ""
    reconnect_s: float = Field(2.0, ge=0.05, le=600)
    transfer_mode: TransferMode = "auto"
    credentials_dir: Path | None = None
    verify: bool = False

    @field_validator("port", "chunk_size", "timeout_s", "lookup_timeout_s", "lock_ttl_s",
                     "reconnect_s", mode="before")  # fmt: skip
    @classmethod
    def _no_bools(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool):  # pydantic would read True as 1
            raise ValueError(f"must be {_rule(str(info.field_name))}")
        return value

    @field_validator("model_name", "tenant_salt", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int | float) else value

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        host = value.strip()
        if "://" not in host:
            host = "tcp://" + host
        parsed = urlparse(host)
        if parsed.scheme not in ("tcp", "ipc") or not (parsed.netloc or parsed.path):
            raise ValueError("must look like tcp://10.0.0.7 (or tcp://host:port)")
        if parsed.scheme == "tcp":
            try:
                parsed.port  # noqa: B018 - raises on a bad port
            except ValueError:
                raise ValueError("has an invalid port: use tcp://host:5555") from None
            if not parsed.hostname:
                raise ValueError("names no host: use tcp://10.0.0.7")
        return host

    @property
    def url(self) -> str:
        """The ZMQ endpoint: ``tcp://host:port`` (or the ``ipc://`` path as given)."""
        parsed = urlparse(self.host)
        if parsed.scheme == "ipc":
            return self.host
        hostname = parsed.hostname or ""
        if ":" in hostname:  # IPv6 literal
            hostname = f"[{hostname}]"
        return f"tcp://{hostname}:{self.port or parsed.port or DEFAULT_PORT}"

    def client_credentials(self) -> ClientCredentials | None:
        """The CURVE keys of ``credentials_dir`` (None when unset); a bad directory raises."""
        if self.credentials_dir is None:
            return None
        try:
            return ClientCredentials.from_directory(self.credentials_dir)
        except CredentialsError as exc:
            raise ConnectorConfigError(
                f"{PREFIX}credentials_dir: {exc}; or unset {PREFIX}credentials_dir / "
                f"{env_name('credentials_dir')} to connect without CURVE (only a loopback or "
                "insecure server accepts that)"
            ) from None


KNOWN_KEYS = tuple(ConnectorSettings.model_fields)


def env_name(key: str) -> str:
    """The environment variable of a key (LMCache's ``LMCACHE_CHUNK_SIZE`` for the chunk size)."""
    return "LMCACHE_" + ("CHUNK_SIZE" if key == "chunk_size" else "NODE_" + key.upper())


def _rule(key: str) -> str:
    """What a key accepts, from the model's own field (type and bounds)."""
    info = ConnectorSettings.model_fields[key]
    low = next((m.ge for m in info.metadata if hasattr(m, "ge")), None)
    high = next((m.le for m in info.metadata if hasattr(m, "le")), None)
    bounds = f" between {low:g} and {high:g}" if low is not None and high is not None else ""
    if info.annotation in (int, int | None):
        return "an integer" + bounds
    if info.annotation is float:
        return "a number" + bounds
    if info.annotation is bool:
        return "true or false (1 or 0)"
    if key == "transfer_mode":
        return "one of auto, shared, engine"
    return "a string" if info.annotation in (str, str | None) else "a directory path"


def load_settings(
    extra_config: Mapping[str, Any] | None, env: Mapping[str, str] | None = None
) -> ConnectorSettings:
    """Settings from vLLM's ``kv_connector_extra_config`` and the environment."""
    extra = dict(extra_config or {})
    environ = os.environ if env is None else env
    unknown = sorted(
        k for k in extra if k.startswith(PREFIX) and k[len(PREFIX) :] not in KNOWN_KEYS
    )
    if unknown:
        raise ConnectorConfigError(
            f"unknown connector setting(s) {', '.join(unknown)} in kv_connector_extra_config; "
            f"known: {', '.join(PREFIX + k for k in KNOWN_KEYS)}"
        )
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key in KNOWN_KEYS:
        if PREFIX + key in extra:
            values[key] = extra[PREFIX + key]
            sources[key] = f"kv_connector_extra_config[{PREFIX + key!r}]"
        elif environ.get(env_name(key), "") != "":
            values[key] = environ[env_name(key)]
            sources[key] = f"environment variable {env_name(key)}"
    try:
        settings = ConnectorSettings.model_validate(values)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = str(error["loc"][0])
        raw = values.get(key)
        where = sources.get(key, "the default")
        if error["type"] == "value_error":  # our validators' own words
            reason = str(error["ctx"]["error"])
            raise ConnectorConfigError(
                f"{PREFIX}{key} {reason}; got {raw!r} from {where}"
            ) from None
        raise ConnectorConfigError(
            f"{PREFIX}{key} must be {_rule(key)}; got {raw!r} from {where}"
        ) from None
    try:
        settings.client_credentials()  # a bad directory fails vLLM's start, not a later connect
    except ConnectorConfigError as exc:
        raise ConnectorConfigError(f"{exc} (set by {sources['credentials_dir']})") from None
    return settings
