"""Health and queue lengths of the replicas, from vLLM's own ``/metrics``.

Every ``interval_s`` each replica's ``/metrics`` is read (bounded in size and time):
``vllm:num_requests_waiting`` and ``vllm:num_requests_running`` (summed over engines).
Two failures in a row mark the replica unhealthy (the router then avoids it); one answer
makes it healthy again. A request that cannot reach a replica marks it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re

import aiohttp

from lmcache_node.router.core import ReplicaState, Router

log = logging.getLogger(__name__)

_SAMPLE = re.compile(
    rb"^vllm:num_requests_(waiting|running)(?:\{[^}]*\})?\s+([0-9.eE+-]+)\s*$", re.M
)
MAX_METRICS_BYTES = 4 * 1024**2


def parse_queue(text: bytes) -> tuple[int, int]:
    """(waiting, running) from a Prometheus text page of vLLM."""
    waiting = running = 0.0
    for kind, value in _SAMPLE.findall(text):
        if kind == b"waiting":
            waiting += float(value)
        else:
            running += float(value)
    return int(waiting), int(running)


class LoadMonitor:
    def __init__(
        self,
        router: Router,
        session: aiohttp.ClientSession,
        *,
        interval_s: float = 1.0,
        timeout_s: float = 2.0,
        failures_to_unhealthy: int = 2,
    ) -> None:
        self.router = router
        self.session = session
        self.interval_s = interval_s
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.failures_to_unhealthy = failures_to_unhealthy
        self._failures: dict[str, int] = {}
        self._stopped = asyncio.Event()

    async def run(self) -> None:
        while not self._stopped.is_set():
            states = list(self.router.replicas.values())
            await asyncio.gather(*(self.poll(s) for s in states))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), self.interval_s)

    def stop(self) -> None:
        self._stopped.set()

    async def poll(self, state: ReplicaState) -> None:
        name = state.replica.name
        try:
            async with self.session.get(
                state.replica.url + "/metrics", timeout=self.timeout
            ) as response:
                body = await response.content.read(MAX_METRICS_BYTES)
                ok = response.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            ok, body = False, b""
            log.debug("replica %s: /metrics failed: %s", name, exc)
        if ok:
            state.waiting, state.running = parse_queue(body)
            if not state.healthy:
                log.info("replica %s is healthy again", name)
            state.healthy = True
            self._failures[name] = 0
            return
        failures = self._failures.get(name, 0) + 1
        self._failures[name] = failures
        if failures >= self.failures_to_unhealthy and state.healthy:
            log.warning("replica %s: %d failed health checks; avoiding it", name, failures)
            state.healthy = False
