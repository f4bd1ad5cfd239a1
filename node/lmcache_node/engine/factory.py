"""Build the engine a node config describes: L1 memory, then the disk and remote tiers."""

from __future__ import annotations

import logging

from lmcache_node.config import NodeConfig
from lmcache_node.engine.core import CacheEngine
from lmcache_node.engine.policy import make_policy
from lmcache_node.sizes import format_bytes

log = logging.getLogger(__name__)


def build_engine(config: NodeConfig) -> CacheEngine:
    """The engine for ``config``: an L1 pool of ``max_local_cpu_size`` GB plus lower tiers."""
    engine = CacheEngine(
        config.l1_capacity_bytes,
        config.l1_page_size,
        policy=make_policy(config.cache_policy),
        default_lock_ttl=config.lock_ttl_secs,
    )
    log.info(
        "L1 memory tier: %s in %d pages (pinned=%s, policy %s)",
        format_bytes(engine.pool.capacity_bytes),
        engine.pool.num_pages,
        engine.pool.pinned,
        config.cache_policy,
    )
    # Local import: the tiers package builds on the engine, not the other way round.
    from lmcache_node.tiers.setup import attach_lower_tiers  # noqa: PLC0415

    attach_lower_tiers(engine, config)
    return engine
