"""Build the lower tiers a node config names and attach them to an engine."""

from __future__ import annotations

import logging

from lmcache_node.config import NodeConfig
from lmcache_node.engine.core import CacheEngine
from lmcache_node.sizes import format_bytes
from lmcache_node.tiers.base import LowerTier
from lmcache_node.tiers.disk import DiskTier
from lmcache_node.tiers.manager import TieredStore
from lmcache_node.tiers.remote import RemoteTier
from lmcache_node.tiers.remote_values import read_remote_secret

log = logging.getLogger(__name__)

# extra_config keys read here (LMCache's name where it has one)
USE_ODIRECT = "use_odirect"
OLD_REMOTE_KEY_PREFIX = "remote_key_prefix"  # now a setting of its own


def remote_secret(config: NodeConfig) -> bytes | None:
    """The remote tier's secret; None only when unauthenticated use is allowed (warned).

    Raises ValueError with what to set when there is none, or it cannot be used.
    """
    if config.remote_secret_file:
        return read_remote_secret(config.remote_secret_file)
    if not config.insecure_allow_unauthenticated:
        raise ValueError(
            "the remote tier needs a secret: set remote_secret_file to a file of at least 16 "
            "random bytes shared by the cluster's nodes (the operator mounts one), or set "
            "insecure_allow_unauthenticated to run without one (anyone who can write the "
            "database can then plant chunks this node hands to vLLM)"
        )
    log.warning(
        "remote tier WITHOUT a secret (insecure_allow_unauthenticated): remote keys are "
        "unkeyed and values unauthenticated; any writer of the database can plant chunks"
    )
    return None


def build_lower_tiers(config: NodeConfig) -> TieredStore | None:
    """The disk and remote tiers ``config`` enables, or None when it enables neither."""
    extra = config.extra_config
    secret: bytes | None = None
    if config.remote_url is not None:  # checked first: a refusal leaves nothing running
        if OLD_REMOTE_KEY_PREFIX in extra:
            raise ValueError(
                "extra_config.remote_key_prefix is now the remote_key_prefix setting: move it "
                "there (LMCACHE_REMOTE_KEY_PREFIX, --remote-key-prefix)"
            )
        secret = remote_secret(config)
    tiers: list[LowerTier] = []
    if config.disk_path is not None:
        disk = DiskTier(
            config.disk_path,
            config.disk_capacity_bytes,
            use_odirect=bool(extra.get(USE_ODIRECT, False)),
        )
        log.info(
            "L2 disk tier: %s, cap %s, O_DIRECT %s%s",
            config.disk_path,
            format_bytes(config.disk_capacity_bytes),
            disk.direct.enabled,
            "" if disk.available else " (DISABLED: see the error above)",
        )
        tiers.append(disk)
    if config.remote_url is not None:
        remote = RemoteTier(
            config.remote_url,
            secret=secret,
            serde=config.remote_serde,
            timeout_secs=config.remote_timeout_secs,
            ttl_secs=config.remote_ttl_secs,
            key_prefix=config.remote_key_prefix,
        )
        log.info(
            "L3 remote tier: %s (prefix %s, serde %s, timeout %.2f s, ttl %s)",
            config.redacted()["remote_url"],
            config.remote_key_prefix,
            config.remote_serde,
            config.remote_timeout_secs,
            config.remote_ttl_secs,
        )
        tiers.append(remote)
    if not tiers:
        return None
    return TieredStore(tiers, write_policy=config.write_policy)


def attach_lower_tiers(engine: CacheEngine, config: NodeConfig) -> TieredStore | None:
    store = build_lower_tiers(config)
    if store is not None:
        engine.promotion_wait_secs = config.blocking_timeout_secs
        store.attach(engine)
    return store
