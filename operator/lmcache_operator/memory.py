"""Does each node's memory hold the cluster's L1 pool and its vLLM pods? Pure.

A persistent pool is tmpfs memory that outlives its cache pod: while the pod is being
replaced, or on a node where it no longer runs, no pod's request covers it, and the
scheduler may place pods into that memory. So per node the operator compares the pool plus
the memory requests of the cluster's vLLM pods there with the node's allocatable memory, and
reports the nodes where they do not fit (the cluster's Degraded condition names them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from lmcache_operator.quantity import GIB


def _gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.1f} GiB"


def memory_problems(
    pool_bytes: int,
    nodes: Iterable[str],
    allocatable: Mapping[str, int],
    vllm_requests: Mapping[str, tuple[int, int]],
) -> list[str]:
    """One line per node whose pool and vLLM requests (bytes, pods) exceed its allocatable
    memory; nodes of unknown memory (Nodes not watched: namespaced mode) are skipped."""
    problems = []
    for node in sorted(set(nodes)):
        capacity = allocatable.get(node)
        if capacity is None:
            continue
        requested, pods = vllm_requests.get(node, (0, 0))
        if pool_bytes + requested > capacity:
            problems.append(
                f"{node}: the L1 pool ({_gib(pool_bytes)}) and the memory requests of its "
                f"{pods} vLLM pod(s) ({_gib(requested)}) exceed its allocatable memory "
                f"({_gib(capacity)})"
            )
    return problems
