"""Memory of a cache pod: the L1 pool's size on the node and the requests/limits that cover it
(docs/operator.md, "Memory accounting")."""

from __future__ import annotations

from typing import Any

from lmcache_operator.api.lmcachecluster import LMCacheClusterSpec
from lmcache_operator.quantity import GIB, format_mebibytes, parse_bytes

MEMORY_OVERHEAD_BYTES = 2 * GIB  # the server process beside its pool
POOL_PAGE_BYTES = 1 << 20  # the node's l1_page_size default
POOL_HEADER_BYTES = 4096
POOL_INDEX_BYTES_PER_PAGE = 68  # a 64-byte slot and a 4-byte chain entry per page
POOL_DATA_ALIGN = 2 << 20  # the data pages start on a 2 MiB boundary


def pool_bytes(spec: LMCacheClusterSpec) -> int:
    """Size of a node's L1 pool file (docs/tiers.md, "Layout"): a header and a 68-byte index
    entry per page, rounded up to 2 MiB, then the pages of cache.cpuSize (1 MiB each)."""
    pages = parse_bytes(spec.cache.cpu_size) // POOL_PAGE_BYTES
    index = POOL_HEADER_BYTES + pages * POOL_INDEX_BYTES_PER_PAGE
    return -(-index // POOL_DATA_ALIGN) * POOL_DATA_ALIGN + pages * POOL_PAGE_BYTES


def container_resources(spec: LMCacheClusterSpec) -> dict[str, Any]:
    """Requests/limits: memory = the L1 pool (cache.cpuSize and its index) + the server's
    overhead, limit above it, unless given. The pool is tmpfs memory charged to the pod that
    created it (also across container restarts), so the request reserves it on the node."""
    request = pool_bytes(spec) + MEMORY_OVERHEAD_BYTES
    limit = request + max(MEMORY_OVERHEAD_BYTES, request // 4)
    requests: dict[str, str] = {"memory": format_mebibytes(request)}
    limits: dict[str, str] = {"memory": format_mebibytes(limit)}
    if spec.resources is not None:
        requests.update(spec.resources.requests)
        limits.update(spec.resources.limits)
        if "memory" in spec.resources.requests and "memory" not in spec.resources.limits:
            given = parse_bytes(spec.resources.requests["memory"])
            limits["memory"] = format_mebibytes(given + max(MEMORY_OVERHEAD_BYTES, given // 4))
    return {"requests": requests, "limits": limits}
