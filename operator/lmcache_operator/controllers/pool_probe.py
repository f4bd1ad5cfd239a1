"""Each cache server's L1 pool as it reports it on ``/readyz``, read once per pod.

A cache pod's readiness already waits for its pool: the server answers ``/readyz`` with 200
only after it opened the pool (adopted the chunks its predecessor left, or made a new one).
The operator reads that answer once per pod (by uid), after the pod turned Ready, to show
what was adopted in the status and to let a rollout move on. ``/readyz`` is open and
read-only (no credentials are sent); the server binds it on the node's IP (host network) or
the pod's IP. A server the operator cannot reach (a NetworkPolicy, an operator outside the
cluster) is ``unknown`` after ``budget_s``; ``budget_s`` 0 turns the reading off.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from lmcache_operator.controllers.common import MONOTONIC, Clock
from lmcache_operator.state import Key

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
STATES = ("adopted", "created", "anonymous", "disabled")
RETRY_S = 1.0
MAX_REASON = 512


@dataclass(frozen=True)
class PoolReport:
    """A node's pool: state adopted, created, anonymous, disabled or unknown."""

    state: str
    reason: str = ""
    capacity_bytes: int = 0
    used_bytes: int = 0
    entries: int = 0
    adopted_entries: int = 0
    adopted_bytes: int = 0

    def to_status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "reason": self.reason,
            "capacityBytes": self.capacity_bytes,
            "usedBytes": self.used_bytes,
            "entries": self.entries,
            "adoptedEntries": self.adopted_entries,
            "adoptedBytes": self.adopted_bytes,
        }


def _count(l1: Mapping[str, Any], name: str) -> int:
    value = l1.get(name, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def parse_readyz(payload: Any) -> PoolReport:
    """The ``l1`` object of a ``/readyz`` answer (a server without one: unknown)."""
    l1 = payload.get("l1") if isinstance(payload, Mapping) else None
    if not isinstance(l1, Mapping) or l1.get("pool") not in STATES:
        return PoolReport("unknown", "the server's /readyz reports no L1 pool (an older server?)")
    reason = l1.get("reason")
    return PoolReport(
        state=str(l1["pool"]),
        reason=str(reason)[:MAX_REASON] if isinstance(reason, str) else "",
        capacity_bytes=_count(l1, "capacity_bytes"),
        used_bytes=_count(l1, "used_bytes"),
        entries=_count(l1, "entries"),
        adopted_entries=_count(l1, "adopted_entries"),
        adopted_bytes=_count(l1, "adopted_bytes"),
    )


class ProbeError(Exception):
    """The server could not be read (yet)."""


PoolProbe = Callable[[str, int], Awaitable[PoolReport | None]]  # (address, port) -> report


class HttpPoolProbe:
    """GET http://ADDRESS:PORT/readyz; None while the server says it is not ready (503)."""

    def __init__(self, timeout_s: float = 2.0) -> None:
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, address: str, port: int) -> PoolReport | None:
        if self._session is None:  # no proxies from the environment: the node's own IP
            self._session = aiohttp.ClientSession(timeout=self.timeout, trust_env=False)
        host = f"[{address}]" if ":" in address else address
        try:
            async with self._session.get(f"http://{host}:{port}/readyz") as response:
                body = await response.content.read(MAX_BODY_BYTES)
                if response.status == 503:
                    return None
                if response.status != 200:
                    raise ProbeError(f"/readyz answered HTTP {response.status}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ProbeError(f"/readyz of {host}:{port}: {exc or type(exc).__name__}") from exc
        try:
            return parse_readyz(json.loads(body))
        except ValueError as exc:
            raise ProbeError(f"/readyz of {host}:{port} is not JSON") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class PoolProbes:
    """One reading per cache pod (by uid), retried until ``budget_s``; ``on_done(key)``."""

    def __init__(
        self,
        probe: PoolProbe,
        budget_s: float,
        on_done: Callable[[Key], None],
        *,
        clock: Clock = MONOTONIC,
    ) -> None:
        self.probe = probe
        self.budget_s = budget_s
        self.on_done = on_done
        self.clock = clock
        self.reports: dict[str, tuple[Key, PoolReport]] = {}  # pod uid -> (cluster, report)
        self._tasks: dict[str, tuple[Key, asyncio.Task[None]]] = {}

    def report(self, uid: str) -> PoolReport | None:
        known = self.reports.get(uid)
        return known[1] if known is not None else None

    def ensure(self, key: Key, uid: str, address: str, port: int) -> PoolReport | None:
        """The pod's report, or None after starting (or while running) its reading."""
        known = self.report(uid)
        if known is not None or uid in self._tasks:
            return known
        if self.budget_s <= 0 or not address:
            why = "not read (--pool-probe-timeout 0)" if self.budget_s <= 0 else "no pod IP"
            self.reports[uid] = (key, PoolReport("unknown", why))
            return self.reports[uid][1]
        task = asyncio.get_running_loop().create_task(self._read(key, uid, address, port))
        self._tasks[uid] = (key, task)
        return None

    async def _read(self, key: Key, uid: str, address: str, port: int) -> None:
        deadline = self.clock() + self.budget_s
        last = "no answer"
        report: PoolReport | None = None
        try:
            while report is None:
                try:
                    report = await self.probe(address, port)
                    last = "/readyz says the server is not ready"
                except ProbeError as exc:
                    last = str(exc)
                if report is None and self.clock() + RETRY_S > deadline:
                    logger.info("cache pod of %s/%s at %s: pool unknown (%s)",
                                key[0], key[1], address, last)  # fmt: skip
                    report = PoolReport("unknown", f"could not read /readyz: {last}")
                elif report is None:
                    await asyncio.sleep(RETRY_S)
        finally:
            self._tasks.pop(uid, None)
        self.reports[uid] = (key, report)
        self.on_done(key)

    def keep(self, key: Key, uids: set[str]) -> None:
        """Forget the pods of cluster ``key`` that are gone (readings and running probes)."""
        for uid in [u for u, (k, _) in self.reports.items() if k == key and u not in uids]:
            del self.reports[uid]
        for uid in [u for u, (k, _) in self._tasks.items() if k == key and u not in uids]:
            self._tasks.pop(uid)[1].cancel()

    async def close(self) -> None:
        tasks = [task for _, task in self._tasks.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
