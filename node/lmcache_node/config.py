# Long on purpose: one NodeConfig field per config key, each with its description, bounds and
# validator (docs/reference/configuration.md is generated from them), then the loader.
"""The node's configuration: one pydantic-settings model, keys named as in LMCache.

Precedence: CLI > config file (``--config`` or ``LMCACHE_CONFIG_FILE``, YAML) >
``LMCACHE_*`` environment variables > defaults. Errors name the key, the value, what is
allowed and where the value came from. Every LMCache 0.5.6 key is accepted in the file and the
environment (:mod:`lmcache_node.lmcache_compat`): mapped onto ours, or ignored with a warning
(``NodeConfig.compat_warnings``); an unknown key is an error with a did-you-mean.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlparse

import yaml
from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from lmcache_node.dtypes import BufferDtype
from lmcache_node.kvspec import (
    KVSpecError,
    LayerGroup,
    check_mla,
    groups_from_kv_shape,
    parse_shape_spec,
)
from lmcache_node.lmcache_compat import (
    KEYS_PAGE,
    LMCACHE_VERSION,
    MappingCheck,
    Translation,
    translate,
    translate_env,
    unknown_key_message,
)
from lmcache_node.sizes import SizeError, size_to_bytes, size_to_gb

ENV_PREFIX = "LMCACHE_"
CONFIG_FILE_ENV = "LMCACHE_CONFIG_FILE"
SECRET_KEYS = frozenset({"remote_url"})

Device = Literal["cpu", "cuda", "xpu", "auto"]
KVDtype = BufferDtype  # lmcache_node.dtypes: the one dtype table


class ConfigError(ValueError):
    """The configuration is invalid; the message says what, where from and what to do."""


class NodeConfig(BaseSettings):
    """Every setting of a cache node (server, engine and tiers)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        validate_default=True,
        case_sensitive=False,
        allow_inf_nan=False,
    )

    # --- engine (LMCache names) ---
    chunk_size: int = Field(256, gt=0, le=1 << 20, description="Tokens per chunk (cache key unit).")
    local_cpu: bool = Field(
        True,
        description=(
            "The CPU memory tier (L1); must be true: every store and load passes through L1 "
            "pages (they also stage the disk and remote tiers). false is refused."
        ),
    )
    max_local_cpu_size: float = Field(
        5.0, ge=0, description="L1 pool size in GB (GiB); also accepts quantities like 4Gi."
    )
    local_disk: str | None = Field(
        None, description="Local disk tier (L2) directory as file:///path/, or null for none."
    )
    max_local_disk_size: float = Field(
        0.0, ge=0, description="L2 cap in GB (GiB); also accepts quantities like 100Gi."
    )
    remote_url: str | None = Field(
        None,
        description="Remote tier (L3): redis://, rediss://, unix://, valkey:// or redis-sentinel://",
    )
    remote_serde: Literal["naive", "zstd", "lz4"] = Field(
        "naive", description="Remote value encoding: naive (raw), zstd or lz4 compression."
    )
    save_unfull_chunk: bool = Field(
        False,
        description=(
            "Must be false: only whole chunks are cached (a prompt's trailing partial chunk is "
            "recomputed). true is refused."
        ),
    )
    extra_config: dict[str, Any] = Field(
        default_factory=dict, description="Extra engine options, e.g. {use_odirect: true}."
    )
    cache_policy: Literal["LRU"] = Field("LRU", description="L1 eviction policy.")
    blocking_timeout_secs: float = Field(
        10.0, gt=0, description="Upper bound for blocking operations (seconds)."
    )
    internal_api_server_enabled: bool = Field(
        False, description="Serve the HTTP API (the server always does; kept for LMCache configs)."
    )
    internal_api_server_port_start: int = Field(
        6999, ge=1, le=65535, description="HTTP API port of the standalone starter."
    )
    # --- our additions ---
    l1_page_size: int = Field(
        1024**2,
        gt=0,
        description="L1 page size in bytes (quantities like 1Mi accepted); entries span pages.",
    )
    l1_persistent: bool = Field(
        True,
        description=(
            "Keep the L1 pool in a named shared memory segment of shm_dir (lmcache-node-pool) "
            "that outlives the server: a restarted or upgraded server with the same chunk "
            "size, l1_page_size and max_local_cpu_size adopts its chunks. Its memory stays "
            "allocated in /dev/shm after the server exits (lmcache-node pool remove frees "
            "it). false: process memory, lost at exit."
        ),
    )
    lock_ttl_secs: float = Field(
        30.0, gt=0, description="Default lifetime of a lookup lock when the client names none."
    )
    write_policy: Literal["write_through", "write_on_evict"] = Field(
        "write_through", description="When chunks flow from L1 to the lower tiers."
    )
    remote_timeout_secs: float = Field(
        1.0,
        gt=0,
        description=(
            "Longest one remote operation may take, retries included (a slower one is a "
            "miss); raise it for big chunks over a slow network."
        ),
    )
    remote_ttl_secs: float | None = Field(
        None, gt=0, description="Expiry of remote entries (seconds); null keeps them."
    )
    heartbeat_timeout_secs: float = Field(
        30.0, gt=0, description="A client silent for this long is dropped with its resources."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level."
    )
    # --- server ---
    host: str = Field("localhost", description="Address the ZMQ server binds (0.0.0.0 in pods).")
    port: int = Field(5555, ge=1, le=65535, description="ZMQ port.")
    http_port: int = Field(8080, ge=0, le=65535, description="HTTP API port (0 disables it).")
    max_workers: int = Field(1, ge=1, le=256, description="Request worker threads.")
    device: Device = Field(
        "cpu",
        description=(
            "Device of the KV caches: cpu, cuda, xpu, or auto (cuda when it works here, else "
            "cpu). cuda without a usable GPU stops the server at start, saying why."
        ),
    )
    # --- trust: credentials (docs/security.md) ---
    curve_server_key: str | None = Field(
        None,
        description=(
            "File holding the server's CURVE secret key (Z85, 40 characters). With "
            "curve_client_keys it makes the ZMQ port encrypted and authenticated."
        ),
    )
    curve_client_keys: str | None = Field(
        None,
        description=(
            "File of the client CURVE public keys allowed to connect, one Z85 key per line; "
            "re-read when it changes, so keys rotate without a restart."
        ),
    )
    insecure_allow_unauthenticated: bool = Field(
        False,
        description=(
            "Serve a non-loopback address without CURVE credentials (anyone who reaches the "
            "port can read and write the cache), and run a remote tier without "
            "remote_secret_file (unkeyed names and checks); logged as a warning at every start."
        ),
    )
    http_host: str | None = Field(
        None,
        max_length=1024,
        description=(
            "Addresses the HTTP API binds, comma-separated; unset: 127.0.0.1, plus host when "
            "it names one address. 0.0.0.0 only when given here."
        ),
    )
    http_token_file: str | None = Field(
        None,
        description=(
            "File holding the bearer token the HTTP API's admin endpoints require "
            "(/cache/clear, /loglevel); unset: they answer loopback clients only."
        ),
    )
    http_max_body_bytes: int = Field(
        64 * 1024, ge=1024, le=16 * 1024**2, description="Largest HTTP request body accepted."
    )
    remote_secret_file: str | None = Field(
        None,
        description=(
            "File holding the remote tier's secret (at least 16 bytes; a trailing newline is "
            "ignored): remote keys are HMACs under it and every value carries a MAC checked "
            "on read. A remote tier needs it unless insecure_allow_unauthenticated is set."
        ),
    )
    remote_key_prefix: str = Field(
        "lmcache",
        min_length=1,
        max_length=256,
        pattern=r"^[A-Za-z0-9._/:-]+$",
        description="Prefix of every remote key (the operator sets <namespace>/<cluster>).",
    )
    shm_dir: str = Field(
        "/dev/shm/lmcache-default",  # noqa: S108 - POSIX shm, a directory of our own
        min_length=2,
        max_length=1024,
        description=(
            "Directory of the shared memory segments; clients learn it from the handshake. "
            "The server creates it (mode 2770, group shm_group) or adopts the one an earlier "
            "run left if it is a real directory owned by the server's user or root, in "
            "shm_group and closed to others; otherwise it refuses to start. The operator "
            "names one per cluster."
        ),
    )
    shm_group: int | None = Field(
        None,
        ge=0,
        le=2**31 - 1,
        description="Group of shm_dir and its segments (default: the server's own group).",
    )
    # --- bounds on what clients control (each exceeded limit is a typed error) ---
    max_lock_ttl_secs: float = Field(
        60.0, gt=0, le=3600, description="Longest lookup lock a client may ask for (seconds)."
    )
    max_locks_per_session: int = Field(
        4096, ge=1, le=1 << 20, description="Lookup locks one client session may hold at once."
    )
    max_keys_per_request: int = Field(
        8192, ge=1, le=1 << 20, description="Chunk keys in one lookup, store or retrieve."
    )
    max_registrations_per_session: int = Field(
        64, ge=1, le=4096, description="KV cache registrations one client session may hold."
    )
    max_layers_per_registration: int = Field(
        1024, ge=1, le=65536, description="Layers in one registration."
    )
    max_segments_per_registration: int = Field(
        1024, ge=1, le=65536, description="Shared memory segments in one registration."
    )
    max_staging_chunks_per_session: int = Field(
        2048,
        ge=1,
        le=1 << 20,
        description="Engine-mode staging chunks (server memory) one client session may hold.",
    )
    max_staging_bytes_per_session: float = Field(
        4.0,
        gt=0,
        description="Engine-mode staging memory one client session may hold, in GB (GiB).",
    )
    max_sessions: int = Field(1024, ge=1, le=1 << 20, description="Client sessions at once.")
    max_queued_requests: int = Field(
        4096,
        ge=1,
        le=1 << 20,
        description="Requests waiting for a worker; beyond it the server answers busy.",
    )
    max_message_bytes: int = Field(
        16 * 1024**2,
        ge=64 * 1024,
        le=1024**3,
        description="Largest ZMQ message accepted (ZMQ_MAXMSGSIZE); a bigger one drops the peer.",
    )
    # --- routing: what the node holds, published to routers (docs/routing.md) ---
    events_port: int = Field(
        0,
        ge=0,
        le=65535,
        description=(
            "Port of the events socket (ZMQ PUB on host, CURVE like the request port): "
            "batches of stored/evicted/cleared chunk keys per tier for cache-aware routers. "
            "0 disables events and snapshots."
        ),
    )
    events_flush_secs: float = Field(
        0.02, gt=0, le=10, description="Longest an event waits before its batch is published."
    )
    events_max_pending_keys: int = Field(
        65536,
        ge=64,
        le=1 << 24,
        description=(
            "Key events buffered between batches; beyond it they are dropped and subscribers "
            "resynchronise from a snapshot (the server never waits for them)."
        ),
    )
    events_snapshot_max_keys: int = Field(
        1 << 20,
        ge=1,
        le=1 << 24,
        description=(
            "Most keys per tier in one snapshot (8 bytes each); a larger tier is cut to its "
            "most recently used keys."
        ),
    )
    # --- standalone starter / worker identity ---
    model_name: str = Field("default", min_length=1, description="Model name (key namespace).")
    worker_id: int = Field(0, ge=0, description="Worker rank (key namespace).")
    world_size: int = Field(1, ge=1, description="Number of workers (key namespace).")
    kv_dtype: KVDtype = Field("float16", description="KV dtype of the standalone buffers.")
    kv_shape: str = Field(
        "2,2,256,4,16", description="num_layers,2,chunk_size,num_kv_heads,head_size"
    )
    kvcache_shape_spec: str | None = Field(
        None, description="Layer groups: (shape):dtype:layer_count;... (overrides kv_shape)."
    )
    use_mla: bool = Field(False, description="MLA layout (one latent vector per token).")
    fmt: Literal["vllm"] = Field("vllm", description="KV layout family.")

    _compat_warnings: list[str] = PrivateAttr(default_factory=list)

    @property
    def compat_warnings(self) -> list[str]:
        """One line per LMCache key or value this config accepted but ignores or converts
        (the commands log them at start)."""
        return list(self._compat_warnings)

    @field_validator(
        "max_local_cpu_size", "max_local_disk_size", "max_staging_bytes_per_session", mode="before"
    )
    @classmethod
    def _gb(cls, value: object) -> float:
        try:
            return size_to_gb(value)
        except SizeError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("l1_page_size", mode="before")
    @classmethod
    def _page_bytes(cls, value: object) -> int:
        try:
            return size_to_bytes(value, bare_unit=1)
        except SizeError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("cache_policy", "log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("local_cpu")
    @classmethod
    def _l1_required(cls, value: bool) -> bool:
        if not value:
            raise ValueError(
                "the L1 memory tier cannot be turned off: every store and load passes through "
                "its pages, also on the way to and from the disk and remote tiers. Remove "
                "local_cpu (or set it to true) and size L1 with max_local_cpu_size"
            )
        return value

    @field_validator("save_unfull_chunk")
    @classmethod
    def _whole_chunks_only(cls, value: bool) -> bool:
        if value:
            raise ValueError(
                "only whole chunks are cached: the vLLM connector never stores a prompt's "
                "trailing partial chunk (vLLM recomputes it). Remove save_unfull_chunk (or set "
                "it to false)"
            )
        return value

    @field_validator("local_disk")
    @classmethod
    def _disk_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        parsed = urlparse(value)
        if parsed.scheme != "file" or not parsed.path:
            raise ValueError("use a file:// URL such as file:///var/cache/lmcache/")
        return value

    @field_validator("remote_url")
    @classmethod
    def _remote_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        scheme = urlparse(value).scheme
        allowed = ("redis", "rediss", "unix", "valkey", "valkeys", "redis-sentinel")
        if scheme not in allowed:
            raise ValueError(f"the scheme must be one of {', '.join(allowed)}")
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> NodeConfig:
        if self.lock_ttl_secs > self.max_lock_ttl_secs:
            raise _cross_field(
                ("lock_ttl_secs", "max_lock_ttl_secs"),
                "the default lock lifetime exceeds the longest one allowed: lower "
                "lock_ttl_secs or raise max_lock_ttl_secs",
            )
        if self.local_disk is not None and self.max_local_disk_size <= 0:
            raise _cross_field(
                ("local_disk", "max_local_disk_size"),
                "local_disk is set but max_local_disk_size is 0: give the disk tier a cap "
                "(e.g. max_local_disk_size: 20)",
            )
        try:
            self.layer_groups()  # raises with the format and an example
        except ValueError as exc:
            keys = ["kvcache_shape_spec" if self.kvcache_shape_spec else "kv_shape"]
            if self.use_mla:
                keys.append("use_mla")
            raise _cross_field(keys, str(exc)) from None
        return self

    # --- derived values ---
    @property
    def l1_capacity_bytes(self) -> int:
        return int(self.max_local_cpu_size * 1024**3)

    @property
    def disk_path(self) -> Path | None:
        return Path(urlparse(self.local_disk).path) if self.local_disk else None

    @property
    def disk_capacity_bytes(self) -> int:
        return int(self.max_local_disk_size * 1024**3)

    def layer_groups(self) -> list[LayerGroup]:
        """The KV layer groups of the standalone starter, validated."""
        try:
            if self.kvcache_shape_spec:
                groups = parse_shape_spec(self.kvcache_shape_spec)
            else:
                groups = groups_from_kv_shape(self.kv_shape, self.kv_dtype)
            if self.use_mla:
                check_mla(groups)
        except KVSpecError as exc:
            raise ValueError(str(exc)) from None
        return groups

    def redacted(self) -> dict[str, Any]:
        """The effective config with secrets hidden (for /config and logs)."""
        data = self.model_dump()
        for key in SECRET_KEYS:
            if data.get(key):
                data[key] = _redact_url(str(data[key]))
        return data


def _cross_field(keys: tuple[str, ...] | list[str], message: str) -> PydanticCustomError:
    """A rule over several keys; ``_explain`` names each key, value and origin."""
    return PydanticCustomError("cross_field", message, {"keys": ",".join(keys)})


def _redact_url(url: str) -> str:
    """``url`` with its password hidden: in the user part and in a ``password=`` query."""
    base, mark, query = url.partition("?")
    password = urlparse(base).password
    if password is not None:
        base = base.replace(f":{password}@", ":***@", 1)
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, "***" if k.lower() == "password" else v) for k, v in pairs], safe="*"
        )
    return base + mark + query


def config_keys() -> list[str]:
    """All configuration keys, in declaration order."""
    return list(NodeConfig.model_fields)


def _known_keys_hint() -> str:
    return (
        f"known keys: {', '.join(config_keys())}, plus the LMCache {LMCACHE_VERSION} keys "
        f"({KEYS_PAGE})"
    )


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML config file into a mapping (our keys and LMCache's, as written), with
    errors that name the file."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(
            f"Config file {str(file)!r} does not exist or is not a file: pass an existing YAML "
            f"file with --config or {CONFIG_FILE_ENV}"
        )
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config file {str(file)!r} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"Config file {str(file)!r} must hold a mapping of keys to values, "
            f"not a {type(data).__name__}"
        )
    return {str(k): v for k, v in data.items()}


def _file_values(file_name: str | os.PathLike[str]) -> Translation:
    found = translate(
        read_config_file(file_name),
        our_keys=NodeConfig.model_fields,
        origin=f"config file {file_name}",
    )
    if found.unknown:
        raise ConfigError(
            f"Config file {str(file_name)!r} has {'; '.join(found.unknown)}; {_known_keys_hint()}"
        )
    return found


def load_config(
    cli: Mapping[str, Any] | None = None,
    *,
    config_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    require_file: bool = False,
) -> NodeConfig:
    """Build the effective config: CLI > config file > LMCACHE_* environment > defaults.

    ``cli`` holds only the options the user gave (None values are ignored). LMCache keys in
    the file and the environment are translated (``NodeConfig.compat_warnings`` says what was
    ignored or converted).
    """
    env = os.environ if environ is None else environ
    cli_values = {k: v for k, v in (cli or {}).items() if v is not None}
    unknown = [k for k in cli_values if k not in NodeConfig.model_fields]
    if unknown:
        messages = "; ".join(unknown_key_message(k, NodeConfig.model_fields) for k in unknown)
        raise ConfigError(f"Unknown setting(s): {messages}; {_known_keys_hint()}")
    file_name = config_file or env.get(CONFIG_FILE_ENV) or None
    if file_name is None and require_file:
        raise ConfigError(
            f"No config file specified: pass --config FILE or set {CONFIG_FILE_ENV}=FILE"
        )
    from_file = _file_values(file_name) if file_name else Translation()
    from_env = translate_env(env, our_keys=NodeConfig.model_fields)
    origins = dict(from_env.origins)
    origins.update({k: f"config file {file_name}" for k in from_file.values})
    origins.update({k: "the command line" for k in cli_values})
    merged = {**from_env.values, **from_file.values, **cli_values}
    visible = {k: v for k, v in env.items() if k not in from_env.hidden}
    saved_env: dict[str, str] | None = None
    if environ is not None or from_env.hidden:  # pydantic-settings reads os.environ: swap
        saved_env = dict(os.environ)
        os.environ.clear()
        os.environ.update(visible)
    try:
        config = NodeConfig(**merged)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, origins, visible)) from None
    except SettingsError as exc:
        raise ConfigError(
            f"An {ENV_PREFIX}* environment variable could not be parsed: {exc}"
        ) from None
    finally:
        if saved_env is not None:
            os.environ.clear()
            os.environ.update(saved_env)
    config._compat_warnings = from_env.warnings + from_file.warnings
    return config


class _WithoutEnvironment(NodeConfig):
    """NodeConfig from its arguments alone (no environment variables read)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def check_mapping(mapping: Mapping[Any, Any], *, origin: str) -> MappingCheck:
    """Validate ``mapping`` (LMCache and our keys) as the config file it would become; the
    environment is neither read nor changed (safe in a multi-threaded process)."""
    found = translate(mapping, our_keys=NodeConfig.model_fields, origin=origin)
    problems = [f"{origin}: {message}" for message in found.unknown]
    values: dict[str, Any] = {}
    try:
        config = _WithoutEnvironment(**found.values)
    except ValidationError as exc:
        origins = {key: origin for key in found.values}
        problems += _problems(exc, origins, {}, found.sources)
    else:
        values = {key: getattr(config, key) for key in found.values}
    defaults = {
        key: NodeConfig.model_fields[key].get_default(call_default_factory=True)
        for key in found.values
    }
    return MappingCheck(
        problems=problems,
        warnings=found.warnings,
        values=values,
        sources=found.sources,
        defaults=defaults,
    )


def _origin(key: str, origins: Mapping[str, str], env: Mapping[str, str]) -> str:
    if key in origins:
        return origins[key]
    env_name = ENV_PREFIX + key.upper()
    if any(name.upper() == env_name for name in env):
        return f"environment variable {env_name}"
    return "the default"


def _value_of(key: str, given: Mapping[str, Any]) -> Any:
    if key in given:
        return given[key]
    return NodeConfig.model_fields[key].get_default(call_default_factory=True)


def _explain(exc: ValidationError, origins: Mapping[str, str], env: Mapping[str, str]) -> str:
    lines = [f"  - {problem}" for problem in _problems(exc, origins, env)]
    return "\n".join(["Invalid configuration:", *lines])


def _problems(
    exc: ValidationError,
    origins: Mapping[str, str],
    env: Mapping[str, str],
    written_as: Mapping[str, str] | None = None,
) -> list[str]:
    """One line per error: key (as written, when an LMCache name set it), value, origin."""
    names = written_as or {}

    def shown(key: str) -> str:
        written = names.get(key, key)
        return key if written == key else f"{written} ({key})"

    lines = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        key = loc[0] if loc else "(whole config)"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            lines.append(
                f"{unknown_key_message(key, NodeConfig.model_fields)} "
                f"(from {_origin(key, origins, env)}); {_known_keys_hint()}"
            )
            continue
        ctx = error.get("ctx") or {}
        if not loc:
            involved = [k for k in str(ctx.get("keys", "")).split(",") if k]
            values = error.get("input")
            given = values if isinstance(values, dict) else {}
            details = "; ".join(
                f"{shown(k)} = {_value_of(k, given)!r} (from {_origin(k, origins, env)})"
                for k in involved
            )
            lines.append(f"{details}: {message}" if details else message)
            continue
        allowed = ""
        if "expected" in ctx:
            allowed = f"; allowed: {ctx['expected']}"
        where = _origin(key, origins, env)
        value = error.get("input")
        path = ".".join([shown(key), *loc[1:]])
        lines.append(f"{path} = {value!r} (from {where}): {message}{allowed}")
    return lines
