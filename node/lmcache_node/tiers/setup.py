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

log = logging.getLogger(__name__)

# extra_config keys read here (LMCache's name where it has one)
USE_ODIRECT = "use_odirect"
REMOTE_KEY_PREFIX = "remote_key_prefix"


def build_lower_tiers(config: NodeConfig) -> TieredStore | None:
    """The disk and remote tiers ``config`` enables, or None when it enables neither."""
    extra = config.extra_config
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
            serde=config.remote_serde,
            timeout_secs=config.remote_timeout_secs,
            ttl_secs=config.remote_ttl_secs,
            key_prefix=str(extra.get(REMOTE_KEY_PREFIX, "lmcache")),
        )
        log.info(
            "L3 remote tier: %s (serde %s, timeout %.2f s, ttl %s)",
            config.redacted()["remote_url"],
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
