# Long on purpose: one rule per LMCache 0.5.6 key (108 of them), each saying what this node
# does with it (docs/reference/lmcache-keys.md is generated from the table).
"""LMCache 0.5.6 configuration keys, accepted by the node's config loader.

Every key LMCache 0.5.6 defines (its YAML keys and their ``LMCACHE_<KEY>`` variables) is known
here: a key with the same meaning as one of ours maps onto it (most keep their name; ``mp_port``
and ``mp_host`` become ``port`` and ``host``), a key that does not apply to this node is
accepted with one warning that names it and says why it is ignored. A value that only LMCache
understands (a ``lm://`` remote, CacheGen serde, the LFU policy) is handled the same way: a
warning, and this node's behaviour. A key neither LMCache nor this node knows stays an error,
with a did-you-mean.

Standard library only, so the operator and the vLLM launcher can import it;
:func:`validate_mapping` loads :mod:`lmcache_node.config` (pydantic, no torch) when called.
"""

from __future__ import annotations

import difflib
import enum
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

LMCACHE_VERSION = "0.5.6"
ENV_PREFIX = "LMCACHE_"
KEYS_PAGE = "docs/reference/lmcache-keys.md"
# LMCACHE_* variables that are not config keys: the config file, the vLLM connector's settings
# (LMCACHE_NODE_*) and the launcher's (LMCACHE_LAUNCHER_*).
OTHER_ENV_PREFIXES = ("LMCACHE_NODE_", "LMCACHE_LAUNCHER_")
OTHER_ENV_NAMES = frozenset({"LMCACHE_CONFIG_FILE"})


class _Unset(enum.Enum):
    UNSET = "unset"


UNSET = _Unset.UNSET
"""A converted value meaning "not given": the key takes this node's default."""

Converted = tuple[Any, str | None]
"""(value or UNSET, a warning or None)."""


@dataclass(frozen=True)
class Rule:
    """What this node does with one LMCache key: ``target`` is our key (None: ignored)."""

    target: str | None
    reason: str = ""
    convert: Callable[[Any], Converted] | None = None

    def describe(self, key: str) -> str:
        if self.target is None:
            return f"ignored: {self.reason}"
        if self.target == key:
            return f"same key{'; ' + self.reason if self.reason else ''}"
        return f"sets `{self.target}`{'; ' + self.reason if self.reason else ''}"


# ---- value conversions (LMCache values this node serves differently) ----------------------

OUR_REMOTE_SCHEMES = ("redis", "rediss", "unix", "valkey", "valkeys", "redis-sentinel")
LMCACHE_ONLY_REMOTE_SCHEMES = (
    "lm", "mooncakestore", "infinistore", "s3", "fs", "blackhole", "nixl", "sagemaker-hyperpod",
)  # fmt: skip
LMCACHE_ONLY_SERDES = ("cachegen", "kivi")
LMCACHE_ONLY_POLICIES = ("LFU", "FIFO", "MRU")


def _is_unset(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("", "none"))


def _as_is(value: Any) -> Converted:
    return (UNSET, None) if value is None else (value, None)


def _remote_url(value: Any) -> Converted:
    if _is_unset(value):
        return UNSET, None
    scheme = urlparse(str(value)).scheme.lower()
    if scheme in LMCACHE_ONLY_REMOTE_SCHEMES:
        return UNSET, (
            f"its {scheme}:// remote backend is LMCache's; this node's remote tier is Redis or "
            f"Valkey ({', '.join(s + '://' for s in OUR_REMOTE_SCHEMES)}), so it runs without one"
        )
    return value, None


def _remote_serde(value: Any) -> Converted:
    if _is_unset(value):
        return UNSET, None
    if str(value).lower() in LMCACHE_ONLY_SERDES:
        return "naive", (
            f"{value} is an LMCache codec; remote values are stored naive (raw) instead "
            "(this node also offers zstd and lz4)"
        )
    return value, None


def _cache_policy(value: Any) -> Converted:
    if _is_unset(value):
        return UNSET, None
    if str(value).upper() in LMCACHE_ONLY_POLICIES:
        return "LRU", f"{value} is not offered; L1 evicts least recently used chunks (LRU)"
    return value, None


def _local_disk(value: Any) -> Converted:
    if _is_unset(value):
        return UNSET, None
    text = str(value)
    if text.startswith("/"):  # LMCache also takes a bare path
        return f"file://{text.rstrip('/')}/", None
    return value, None


def _mp_host(value: Any) -> Converted:
    if _is_unset(value):
        return UNSET, None
    return str(value).removeprefix("tcp://"), None


# extra_config keys this node reads (tiers/setup.py); the rest are LMCache's own
KNOWN_EXTRA_CONFIG_KEYS = ("use_odirect",)


def _extra_config(value: Any) -> Converted:
    if _is_unset(value):
        return UNSET, None
    if isinstance(value, Mapping):
        others = sorted(str(k) for k in value if str(k) not in KNOWN_EXTRA_CONFIG_KEYS)
        if others:
            return value, (
                f"its entries {', '.join(others)} are ignored (this node reads "
                f"{', '.join(KNOWN_EXTRA_CONFIG_KEYS)})"
            )
    return value, None


# ---- the 108 keys of LMCache 0.5.6, in its order --------------------------------------------


def _same(key: str, convert: Callable[[Any], Converted] = _as_is, note: str = "") -> Rule:
    return Rule(target=key, reason=note, convert=convert)


def _ignored(reason: str) -> Rule:
    return Rule(target=None, reason=reason)


_BLEND = "CacheBlend (reuse of non-prefix text) is not implemented; chunks are reused as prefixes"
_P2P = (
    "peer-to-peer transfer between instances is not used: vLLM pods share their node's server, "
    "and nodes share through the remote tier"
)
_CONTROLLER = (
    "LMCache's controller and its workers are not used: the operator manages the servers and "
    "nodes publish what they hold to the router"
)
_PD = (
    "LMCache's own prefill/decode transfer is not used: disaggregated prefill goes through the "
    "cache (kv_producer and kv_consumer roles) or vLLM's NixlConnector (lmcache-node vllm with "
    "LMCACHE_LAUNCHER_DISAGG=nixl)"
)
_NIXL = "the node does not use NIXL; vLLM's NixlConnector does (lmcache-node vllm)"
_GDS = "GPU Direct Storage is not used; the disk tier is local_disk"
_LAZY = "L1 is one shared memory pool allocated at start (and adopted after a restart)"
_STATS = "chunk statistics are not collected; /metrics and /stats report per-tier counts"
_HIDDEN = "hidden-state caching is not implemented; only KV caches are stored"
_PLUGINS = "no plugins or scripts are loaded: the server never runs code named by its config"
_API = "the node serves one HTTP API on http_host and http_port"
_LOOKUP = (
    "lookups are served by the node server; the vLLM side's timeouts are the connector's "
    "lmcache.node.lookup_timeout_s / LMCACHE_NODE_LOOKUP_TIMEOUT_S"
)

_PD_KEYS = (
    "enable_pd", "pd_role", "pd_buffer_size", "pd_buffer_device", "pd_peer_host",
    "pd_peer_init_port", "pd_peer_alloc_port", "pd_peer_query_port", "pd_proxy_host",
    "pd_proxy_port", "pd_allocation_timeout_sec", "pd_shutdown_timeout_sec",
    "pd_condition_poll_interval_sec", "pd_max_prefill_len", "pd_backend_mode",
    "pd_skip_proxy_notification", "pd_bidirectional",
)  # fmt: skip

LMCACHE_KEYS: dict[str, Rule] = {
    "chunk_size": _same("chunk_size"),
    "local_cpu": _same("local_cpu", note="false is refused: every chunk passes through L1"),
    "max_local_cpu_size": _same("max_local_cpu_size"),
    "local_cpu_use_hugepages": _ignored("L1 is a POSIX shared memory pool (pinned on CUDA)"),
    "reserve_local_cpu_size": _ignored("L1 is sized by max_local_cpu_size alone"),
    "local_disk": _same("local_disk", _local_disk, "a bare /path means file:///path/"),
    "local_disk_path_sharding": _ignored(
        "one server per node serves all of its GPUs from one disk directory"
    ),
    "max_local_disk_size": _same("max_local_disk_size"),
    "remote_url": _same(
        "remote_url", _remote_url, "LMCache's other backends (lm://, s3://, ...) are ignored"
    ),
    "remote_serde": _same(
        "remote_serde", _remote_serde, "cachegen and kivi become naive, with a warning"
    ),
    "use_layerwise": _ignored("chunks move whole, all layers at once"),
    "save_decode_cache": _ignored("only prompt (prefill) chunks are stored"),
    "pre_caching_hash_algorithm": _ignored(
        "chunk keys use this node's own hash, the same in every process and node"
    ),
    "enable_blending": _ignored(_BLEND),
    "blend_recompute_ratios": _ignored(_BLEND),
    "blend_thresholds": _ignored(_BLEND),
    "blend_check_layers": _ignored(_BLEND),
    "blend_min_tokens": _ignored(_BLEND),
    "blend_special_str": _ignored(_BLEND),
    "retrieve_locations": _ignored("lookups always walk L1, then disk, then remote"),
    "store_location": _ignored("stores land in L1 and flow down to the lower tiers"),
    "enable_p2p": _ignored(_P2P),
    "p2p_host": _ignored(_P2P),
    "p2p_init_ports": _ignored(_P2P),
    "p2p_lookup_ports": _ignored(_P2P),
    "mp_host": Rule("host", "the address the server binds", _mp_host),
    "mp_port": Rule("port", "the server's ZMQ port", _as_is),
    "enable_controller": _ignored(_CONTROLLER),
    "lmcache_instance_id": _ignored(_CONTROLLER),
    "controller_pull_url": _ignored(_CONTROLLER),
    "controller_reply_url": _ignored(_CONTROLLER),
    "lmcache_worker_ports": _ignored(_CONTROLLER),
    "lmcache_worker_ids": _ignored(_CONTROLLER),
    "lmcache_worker_heartbeat_delay_time": _ignored(_CONTROLLER),
    "lmcache_worker_heartbeat_time": _ignored(_CONTROLLER),
    **{key: _ignored(_PD) for key in _PD_KEYS},
    "transfer_channel": _ignored(_NIXL),
    "nixl_backends": _ignored(_NIXL),
    "nixl_buffer_size": _ignored(_NIXL),
    "nixl_buffer_device": _ignored(_NIXL),
    "gds_path": _ignored(_GDS),
    "gds_path_sharding": _ignored(_GDS),
    "gds_buffer_size": _ignored(_GDS),
    "maru_path": _ignored("the Maru CXL memory backend is not available"),
    "maru_pool_size": _ignored("the Maru CXL memory backend is not available"),
    "use_gds": _ignored(_GDS),
    "gds_backend": _ignored(_GDS),
    "audit_actual_remote_url": _ignored("the auditing backend is not available"),
    "internal_api_server_host": _ignored(
        "the node's HTTP API binds http_host (default 127.0.0.1 plus host); the standalone "
        "starter's internal API is loopback only"
    ),
    "extra_config": _same("extra_config", _extra_config, "this node reads use_odirect"),
    "save_unfull_chunk": _same(
        "save_unfull_chunk", note="true is refused: only whole chunks are cached"
    ),
    "blocking_timeout_secs": _same("blocking_timeout_secs"),
    "external_lookup_client": _ignored(_LOOKUP),
    "py_enable_gc": _ignored("the server keeps Python's garbage collector on"),
    "cache_policy": _same("cache_policy", _cache_policy, "LFU, FIFO and MRU become LRU"),
    "numa_mode": _ignored("NUMA placement is left to the pod's CPU and memory policy"),
    "enable_async_loading": _ignored("the connector decides how loads overlap vLLM's steps"),
    "internal_api_server_enabled": _same("internal_api_server_enabled"),
    "internal_api_server_port_start": _same("internal_api_server_port_start"),
    "priority_limit": _ignored("requests have no caching priorities"),
    "internal_api_server_include_index_list": _ignored(_API),
    "internal_api_server_socket_path_prefix": _ignored(_API),
    "runtime_plugin_locations": _ignored(_PLUGINS),
    "storage_plugins": _ignored(_PLUGINS),
    "remote_storage_plugins": _ignored(_PLUGINS),
    "lookup_timeout_ms": _ignored(_LOOKUP),
    "min_retrieve_tokens": _ignored("every hit is loaded (vLLM recomputes only what misses)"),
    "hit_miss_ratio": _ignored("a testing knob of LMCache's; hits are never faked"),
    "lookup_server_worker_ids": _ignored(_LOOKUP),
    "enable_scheduler_bypass_lookup": _ignored(_LOOKUP),
    "script_allowed_imports": _ignored(_PLUGINS),
    "run_script_api_enabled": _ignored(_PLUGINS),
    "enable_lazy_memory_allocator": _ignored(_LAZY),
    "lazy_memory_initial_ratio": _ignored(_LAZY),
    "lazy_memory_expand_trigger_ratio": _ignored(_LAZY),
    "lazy_memory_step_ratio": _ignored(_LAZY),
    "lazy_memory_safe_size": _ignored(_LAZY),
    "enable_chunk_statistics": _ignored(_STATS),
    "chunk_statistics_auto_start_statistics": _ignored(_STATS),
    "chunk_statistics_auto_exit_timeout_hours": _ignored(_STATS),
    "chunk_statistics_auto_exit_target_unique_chunks": _ignored(_STATS),
    "chunk_statistics_strategy": _ignored(_STATS),
    "enable_kv_events": _ignored("vLLM KV events in LMCache's format are not emitted"),
    "use_gpu_connector_v3": _ignored("the node copies KV blocks with its own code"),
    "pin_timeout_sec": _ignored(
        "lookup locks expire after lock_ttl_secs (at most max_lock_ttl_secs)"
    ),
    "pin_check_interval_sec": _ignored(
        "lookup locks expire after lock_ttl_secs (at most max_lock_ttl_secs)"
    ),
    "remote_config_url": _ignored(
        "configuration comes from the file, the environment or the operator only"
    ),
    "app_id": _ignored("tenants are separated by the connector's lmcache.node.tenant_salt"),
    "enable_hidden_state_cache": _ignored(_HIDDEN),
    "max_hidden_state_cpu_size": _ignored(_HIDDEN),
    "hidden_state_layers": _ignored(_HIDDEN),
    "hidden_states_retrieve_mode": _ignored(_HIDDEN),
}


# ---- translation ----------------------------------------------------------------------------


@dataclass
class Translation:
    """A mapping of LMCache and our keys, in our keys.

    ``values``: our key -> value; ``sources``: our key -> the key as written; ``warnings``: one
    per ignored key or converted value; ``unknown``: one message per unknown key (callers say
    where it came from).
    """

    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)


def suggestions(key: str, known: Iterable[str], *, cutoff: float = 0.6) -> list[str]:
    """Known keys spelt like ``key`` (closest first)."""
    return difflib.get_close_matches(key.lower(), sorted(set(known)), n=3, cutoff=cutoff)


def unknown_key_message(key: str, our_keys: Collection[str]) -> str:
    close = suggestions(key, [*our_keys, *LMCACHE_KEYS])
    hint = f"did you mean {' or '.join(repr(k) for k in close)}?" if close else "check the name"
    return f"unknown key {key!r}: {hint}"


def _label(key: str, rule: Rule) -> str:
    if rule.target is None or rule.target == key:
        return f"LMCache key {key!r}"
    return f"LMCache key {key!r} (this node's {rule.target!r})"


def _apply(
    out: Translation, key: str, rule: Rule, value: Any, where: str
) -> tuple[str, Any] | None:
    """The (our key, value) a key sets, warnings added; None when it sets nothing."""
    if rule.target is None:
        out.warnings.append(f"{_label(key, rule)} {where} is ignored: {rule.reason}")
        return None
    converted, warning = rule.convert(value) if rule.convert is not None else (value, None)
    if warning is not None:
        out.warnings.append(f"{_label(key, rule)} = {value!r} {where}: {warning}")
    if converted is UNSET:
        return None
    return rule.target, converted


def translate(mapping: Mapping[Any, Any], *, our_keys: Collection[str], origin: str) -> Translation:
    """``mapping`` (a config file, ``spec.config``) in our keys; ``origin`` names it in messages.

    Our own names win over an LMCache name for the same setting (``port`` over ``mp_port``).
    """
    out = Translation()
    where = f"(from {origin})"
    lmcache_named: list[tuple[str, Any]] = []
    for raw_key, value in mapping.items():
        key = str(raw_key)
        rule = LMCACHE_KEYS.get(key)
        if key in our_keys and (rule is None or rule.target == key):
            applied = _apply(out, key, rule, value, where) if rule else (key, value)
            if applied is not None:
                out.values[applied[0]] = applied[1]
                out.sources[applied[0]] = key
        elif rule is not None:
            lmcache_named.append((key, value))
        else:
            out.unknown.append(unknown_key_message(key, our_keys))
    for key, value in lmcache_named:
        rule = LMCACHE_KEYS[key]
        applied = _apply(out, key, rule, value, where)
        if applied is None:
            continue
        target, converted = applied
        if target in out.values:
            if out.values[target] == converted:
                continue  # the same setting twice, in agreement
            out.warnings.append(
                f"{_label(key, rule)} = {value!r} {where} is ignored: {target!r} is also set "
                f"({out.values[target]!r}) and wins"
            )
            continue
        out.values[target] = converted
        out.sources[target] = key
    return out


@dataclass
class EnvTranslation:
    """``LMCACHE_*`` variables the settings loader must not read as they are.

    ``values``/``origins``: our key -> value / the variable it came from (LMCache names, and
    LMCache values converted); ``hidden``: the variables those replace; ``warnings``.
    """

    values: dict[str, Any] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)
    hidden: set[str] = field(default_factory=set)
    warnings: list[str] = field(default_factory=list)


def translate_env(env: Mapping[str, str], *, our_keys: Collection[str]) -> EnvTranslation:
    """The LMCache keys among ``LMCACHE_<KEY>`` variables (names match in any case)."""
    out = EnvTranslation()
    scratch = Translation()
    present = {name.upper() for name in env}
    for name in sorted(env):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in OTHER_ENV_NAMES:
            continue
        if upper.startswith(OTHER_ENV_PREFIXES):
            continue
        key = upper[len(ENV_PREFIX) :].lower()
        rule = LMCACHE_KEYS.get(key)
        where = f"(environment variable {name})"
        if rule is None:
            if key not in our_keys:
                close = suggestions(key, [*our_keys, *LMCACHE_KEYS], cutoff=0.85)
                if close:
                    names = " or ".join(ENV_PREFIX + k.upper() for k in close)
                    out.warnings.append(
                        f"{name} is not a setting and is ignored: did you mean {names}?"
                    )
            continue
        if rule.target is not None and rule.target != key:  # an LMCache name for our key
            ours = ENV_PREFIX + rule.target.upper()
            if ours in present:
                out.warnings.append(f"{name} is ignored: {ours} is also set and wins")
                continue
        raw = env[name]
        applied = _apply(scratch, key, rule, raw, where)
        out.warnings += scratch.warnings
        scratch.warnings.clear()
        if rule.target == key and applied is not None and applied[1] == raw:
            continue  # our own variable, read as usual
        out.hidden.add(name)
        if applied is not None:
            out.values[applied[0]] = applied[1]
            out.origins[applied[0]] = f"environment variable {name}"
    return out


# ---- validation for callers without the server (the operator) --------------------------------


@dataclass
class MappingCheck:
    """The result of :func:`validate_mapping`.

    ``problems``: what makes the mapping unusable (each names the key, the value and why);
    ``warnings``: keys and values accepted but ignored or converted; ``values``: our key -> the
    validated value of each key the mapping sets; ``sources``: our key -> the key as written;
    ``defaults``: our key -> its default, for each key the mapping sets.
    """

    problems: list[str]
    warnings: list[str]
    values: dict[str, Any]
    sources: dict[str, str]
    defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def valid(self) -> bool:
        return not self.problems


def validate_mapping(mapping: Mapping[Any, Any], *, origin: str = "spec.config") -> MappingCheck:
    """Validate LMCache and our keys as the node would load them from a config file.

    Loads :mod:`lmcache_node.config` (pydantic and pydantic-settings; no torch, no zmq). The
    environment is not read.
    """
    from lmcache_node.config import check_mapping  # noqa: PLC0415 - keeps this module light

    return check_mapping(mapping, origin=origin)
