"""Assemble a node's engine from its config: the L1 pool, the engine over it, the lower tiers.

The engine package knows nothing of its consumers; this module is where the pieces meet.
With an shm directory and ``l1_persistent`` (the default) the L1 pool is the named segment
``shm_pool.POOL_NAME``: a pool a previous server left is adopted with its committed chunks
when its header matches this server's geometry, otherwise it is started afresh (the log and
``/readyz`` say why). When no pool can be had the L1 tier runs on process memory.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch

from lmcache_node.config import NodeConfig
from lmcache_node.engine.core import CacheEngine
from lmcache_node.engine.journal import (
    HEADER_BYTES,
    IncompatiblePoolError,
    JournalEntry,
    PoolGeometry,
    PoolJournal,
    foreign_header,
    read_header,
)
from lmcache_node.engine.policy import make_policy
from lmcache_node.engine.types import PoolState
from lmcache_node.keys import HASH_ALGORITHM
from lmcache_node.sizes import format_bytes
from lmcache_node.tiers.setup import attach_lower_tiers, remote_secret
from lmcache_node.transfer.shm import ShmDirectory
from lmcache_node.transfer.shm_checks import SharedMemoryError
from lmcache_node.transfer.shm_pool import PoolBusyError, PoolFile, populate, remove_pool

log = logging.getLogger(__name__)


def build_engine(config: NodeConfig, shm_dir: ShmDirectory | None = None) -> CacheEngine:
    """The engine ``config`` describes, lower tiers attached. Its L1 pool lives in ``shm_dir``
    (adopted or created) when given and ``l1_persistent``; otherwise in process memory."""
    if config.remote_url is not None and not config.insecure_allow_unauthenticated:
        remote_secret(config)  # a refusal comes before the pool exists: nothing to undo
    engine = _l1_engine(config, shm_dir)
    log.info(
        "L1 memory tier: %s in %d pages (pinned=%s, policy %s, pool %s)",
        format_bytes(engine.pool.capacity_bytes),
        engine.pool.num_pages,
        engine.pool.pinned,
        config.cache_policy,
        engine.pool_state.origin,
    )
    attach_lower_tiers(engine, config)
    return engine


def pool_geometry(config: NodeConfig) -> PoolGeometry | None:
    """The geometry of the pool ``config`` asks for; None without an L1 tier."""
    pages = config.l1_capacity_bytes // config.l1_page_size
    if pages == 0:
        return None
    return PoolGeometry(config.l1_page_size, pages, config.chunk_size, HASH_ALGORITHM)


def _l1_engine(config: NodeConfig, shm_dir: ShmDirectory | None) -> CacheEngine:
    options: dict[str, Any] = {
        "policy": make_policy(config.cache_policy),
        "default_lock_ttl": config.lock_ttl_secs,
    }
    capacity, page_size = config.l1_capacity_bytes, config.l1_page_size
    geometry = pool_geometry(config)
    if shm_dir is None:
        return CacheEngine(capacity, page_size, **options)
    if geometry is None or not config.l1_persistent:
        _drop_leftover_pool(shm_dir)
        state = PoolState("disabled") if geometry is None else _anonymous("l1_persistent is false")
        return CacheEngine(capacity, page_size, pool_state=state, **options)
    try:
        mapping, journal, entries, state = _open_pool(shm_dir, geometry)
    except SharedMemoryError as exc:
        log.warning("%s; the L1 tier runs on process memory (its chunks are lost at exit)", exc)
        return CacheEngine(capacity, page_size, pool_state=_anonymous(str(exc)), **options)
    data = mapping[geometry.data_offset :]
    _pin_or_populate(data)
    engine = CacheEngine(
        capacity,
        page_size,
        backing=data,
        journal=journal,
        pool_state=state,
        **options,
    )
    if entries:
        engine.adopt((e.key, e.pages, e.nbytes) for e in entries)
    return engine


def _open_pool(
    shm_dir: ShmDirectory, geometry: PoolGeometry
) -> tuple[torch.Tensor, PoolJournal, list[JournalEntry], PoolState]:
    """The pool's mapping, its journal (holding the locked file), the entries to adopt and
    what happened."""
    start = time.monotonic()
    handle = PoolFile.acquire(shm_dir)
    try:
        refusal = _refusal(handle, geometry)
        if refusal is not None:
            if refusal != _NOTHING_LEFT:
                log.warning("L1 pool %s: not adopted: %s; starting empty", handle.path, refusal)
            handle.reset(geometry.total_bytes)
            mapping = handle.map()
            journal = PoolJournal(mapping[: geometry.data_offset], geometry, owner=handle)
            journal.format()
            log.info("L1 pool: created %s (%s)", handle.path, format_bytes(geometry.total_bytes))
            return mapping, journal, [], PoolState("created", refusal)
        mapping = handle.map()
        journal = PoolJournal(mapping[: geometry.data_offset], geometry, owner=handle)
        scan = journal.scan()
    except BaseException:
        handle.discard()
        raise
    log.info(
        "L1 pool: adopted %s: %d chunk(s), %s, in %.2f s (%d damaged record(s) dropped)",
        handle.path,
        len(scan.entries),
        format_bytes(sum(e.nbytes for e in scan.entries)),
        time.monotonic() - start,
        scan.dropped,
    )
    return mapping, journal, scan.entries, PoolState("adopted")


_NOTHING_LEFT = "no pool was left in shm_dir"


def _refusal(handle: PoolFile, geometry: PoolGeometry) -> str | None:
    """Why the pool file cannot be adopted as it is; None when it can."""
    size = handle.size
    if size == 0:
        return _NOTHING_LEFT
    try:
        found = read_header(handle.read_header(HEADER_BYTES))
    except IncompatiblePoolError as exc:
        return f"the pool left in shm_dir: {exc}"
    mismatch = geometry.mismatch(found)
    if mismatch is not None:
        return f"the pool left in shm_dir: {mismatch}"
    if size != geometry.total_bytes:
        return f"the pool left in shm_dir has {size} bytes, its header says {found.total_bytes}"
    return None


def _anonymous(reason: str) -> PoolState:
    return PoolState("anonymous", reason)


def _drop_leftover_pool(shm_dir: ShmDirectory) -> None:
    """Without a pool of our own, one a previous run left only holds memory: remove it."""
    try:
        if remove_pool(shm_dir, wait_s=0.0, not_a_pool=foreign_header):
            log.info("removed the L1 pool a previous run left in %s (not used now)", shm_dir.path)
    except PoolBusyError:
        log.info("the L1 pool in %s belongs to another live server: left alone", shm_dir.path)
    except SharedMemoryError as exc:
        log.warning("cannot remove the L1 pool a previous run left: %s", exc)


def _pin_or_populate(data: torch.Tensor) -> None:
    """With CUDA: page-lock the pool (``cudaHostRegister``: nothing device-side survives a
    restart, so an adopted pool is registered again). Without: map its pages in the
    background so the first copies take no page faults."""
    if data.numel() == 0:
        return
    if torch.cuda.is_available():
        cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
        result = int(cudart.cudaHostRegister(data.data_ptr(), data.numel(), 1))  # portable
        if result != 0:
            log.warning(
                "cudaHostRegister of the L1 pool failed (error %d): copies use pageable memory",
                result,
            )
        return
    threading.Thread(
        target=populate, args=(data,), name="lmcache-node-populate", daemon=True
    ).start()
