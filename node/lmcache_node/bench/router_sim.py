"""The routing bench's replay: real node servers and router, simulated engines.

Each replica is a real node server (loopback, small L1, the real eviction) and a simulated
prefill engine: one FIFO prefill queue whose service time is the measured per-token prefill
cost times the tokens its node cache does not hold (its own LOOKUP, as the connector does).
When the prefill ends the engine STOREs the prompt's chunks (real copies, real events).
Time is virtual: arrivals and prefill completions are replayed in order, as fast as the real
RPCs allow; before each cache-aware decision the router's index has caught up with the
node's events (the measured event lag is reported, not simulated).
"""

from __future__ import annotations

import asyncio
import heapq
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from lmcache_node.bench.router_workload import Turn
from lmcache_node.client import NodeClient, Registration
from lmcache_node.keys import ChunkKey, KeyNamespace, chunk_keys
from lmcache_node.protocol.events import digest_int
from lmcache_node.router.core import Route, Router, RouteRequest
from lmcache_node.router.discovery import Replica
from lmcache_node.router.scoring import Policy, Weights

NAMESPACE = KeyNamespace(model_name="bench-model", kv_dtype="float16", layout="bench-sim")
NUM_BLOCKS = 64
BARRIER_TIMEOUT_S = 2.0
POLICIES = (
    "cache_aware", "round_robin", "prefix_hash", "session", "oracle", "cache_aware_default_weights",
)  # fmt: skip
ROUTER_POLICY = {
    "cache_aware": Policy.CACHE_AWARE,
    "cache_aware_default_weights": Policy.CACHE_AWARE,
    "round_robin": Policy.ROUND_ROBIN,
    "prefix_hash": Policy.PREFIX_HASH,
    "session": Policy.SESSION,
}


@dataclass
class SimReplica:
    name: str
    endpoint: str  # the node server's request port
    client: NodeClient
    registration: Registration
    free_at: float = 0.0  # when its prefill queue empties (virtual seconds)
    starts: list[float] = field(default_factory=list)  # queued prefill starts (virtual)

    @classmethod
    def connect(cls, name: str, endpoint: str, chunk: int) -> SimReplica:
        client = NodeClient(endpoint, timeout_s=30, expected_chunk_size=chunk)
        client.connect()
        layers = [torch.zeros(NUM_BLOCKS, 2, chunk, 4, dtype=torch.float16)]  # 4 KiB/chunk
        registration = client.register_kv_caches(
            layers, block_dim=0, block_size=chunk, namespace=NAMESPACE
        )
        return cls(name, endpoint, client, registration)

    def waiting(self, now: float) -> int:
        self.starts = [s for s in self.starts if s > now]
        return len(self.starts)


@dataclass
class PolicyResult:
    policy: str
    prompt_tokens: int = 0
    hit_tokens: int = 0
    ttft_s: list[float] = field(default_factory=list)
    busy_s: float = 0.0
    makespan_s: float = 0.0
    reasons: Counter[str] = field(default_factory=Counter)
    event_lag_s: list[float] = field(default_factory=list)
    barrier_timeouts: int = 0
    wall_s: float = 0.0

    def summary(self, replicas: int) -> dict[str, float | int]:
        ttft = sorted(self.ttft_s)
        p99 = ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))]
        return {
            "hit_ratio": self.hit_tokens / max(1, self.prompt_tokens),
            "ttft_p50_s": statistics.median(ttft),
            "ttft_p99_s": p99,
            "utilization": self.busy_s / max(1e-12, replicas * self.makespan_s),
            "wall_s": self.wall_s,
        }


@dataclass
class _Job:
    turn: Turn
    replica: SimReplica
    keys: list[ChunkKey]
    route: Route | None


class Simulation:
    def __init__(
        self, replicas: list[SimReplica], chunk: int, per_token_s: float, scale_s: float
    ) -> None:
        self.replicas = replicas
        self.chunk = chunk
        self.per_token_s = per_token_s
        self.scale_s = scale_s  # virtual seconds per workload time unit
        self._keys: dict[tuple[int, int], list[ChunkKey]] = {}

    def keys(self, turn: Turn) -> list[ChunkKey]:
        found = self._keys.get((turn.conversation, turn.index))
        if found is None:
            found = chunk_keys(turn.tokens, self.chunk, NAMESPACE)[:NUM_BLOCKS]
            self._keys[(turn.conversation, turn.index)] = found
        return found

    def loadable(self, turn: Turn, keys: list[ChunkKey]) -> list[ChunkKey]:
        """The chunks a connector may load: vLLM computes at least the last token."""
        return keys[: (len(turn.tokens) - 1) // self.chunk]

    async def run(self, policy: str, turns: list[Turn]) -> PolicyResult:
        for replica in self.replicas:
            replica.free_at, replica.starts = 0.0, []
        router = await self._router(policy)
        result = PolicyResult(policy)
        started = time.perf_counter()
        events: list[tuple[float, int, int, _Job | Turn]] = []
        for number, turn in enumerate(turns):
            heapq.heappush(events, (turn.arrival * self.scale_s, 1, number, turn))
        sequence = len(turns)
        try:
            while events:
                now, _, _, item = heapq.heappop(events)
                if isinstance(item, _Job):  # a prefill ended: store, as the connector does
                    await self._complete(item, router, result, policy)
                    continue
                job, finish = await self._arrive(item, now, router, result, policy)
                sequence += 1
                heapq.heappush(events, (finish, 0, sequence, job))
                result.makespan_s = max(result.makespan_s, finish)
        finally:
            if router is not None:
                await router.close()
        result.wall_s = time.perf_counter() - started
        return result

    async def _router(self, policy: str) -> Router | None:
        if policy == "oracle":
            return None
        # The simulated engines reload hits for free (TTFT = prefill of the uncached tokens
        # + queueing), so "cache_aware" is told so; the production defaults (a reload costs
        # 5% of a prefill from L1, 20% from disk) run as "cache_aware_default_weights".
        weights = Weights(l1=1.0, l2=1.0) if policy == "cache_aware" else None
        router = Router(policy=ROUTER_POLICY[policy], model_name=NAMESPACE.model_name,
                        weights=weights, feed_options={"min_resync_s": 0.05})  # fmt: skip
        with_cache = ROUTER_POLICY[policy] is Policy.CACHE_AWARE
        await router.set_replicas(
            Replica(r.name, f"http://{r.name}", cache=r.endpoint if with_cache else "")
            for r in self.replicas
        )
        if with_cache:
            deadline = time.monotonic() + 60
            while not all(s.index.synced and s.index.namespaces for s in router.nodes.values()):
                if time.monotonic() > deadline:
                    raise RuntimeError("the router did not get in step with the node servers")
                await asyncio.sleep(0.05)
        return router

    async def _arrive(
        self, turn: Turn, now: float, router: Router | None, result: PolicyResult, policy: str
    ) -> tuple[_Job, float]:
        keys = self.keys(turn)
        loadable = self.loadable(turn, keys)
        route = None
        if router is None:
            replica, hits = self._oracle(loadable, now)
            result.reasons["oracle"] += 1
        else:
            for state in router.replicas.values():
                state.waiting = next(r for r in self.replicas if r.name == state.replica.name
                                     ).waiting(now)  # fmt: skip
            route = router.route(RouteRequest(turn.tokens, turn.session))
            router.started(route)
            result.reasons[route.decision.reason] += 1
            replica = next(r for r in self.replicas if r.name == route.state.replica.name)
            hits = replica.client.lookup(list(loadable))[0] if loadable else 0
        uncached = len(turn.tokens) - hits * self.chunk
        service = uncached * self.per_token_s
        start = max(now, replica.free_at)
        finish = start + service
        replica.free_at = finish
        replica.starts.append(start)
        result.prompt_tokens += len(turn.tokens)
        result.hit_tokens += hits * self.chunk
        result.busy_s += service
        result.ttft_s.append(finish - now)
        return _Job(turn, replica, keys, route), finish

    def _oracle(self, loadable: list[ChunkKey], now: float) -> tuple[SimReplica, int]:
        """Knows every node's contents (their own lookups) and every queue exactly."""
        best: tuple[float, int, SimReplica] | None = None
        for replica in self.replicas:
            hits = replica.client.lookup(list(loadable))[0] if loadable else 0
            uncached_s = (len(loadable) - hits) * self.chunk * self.per_token_s  # + a constant
            cost = max(0.0, replica.free_at - now) + uncached_s
            if best is None or cost < best[0]:
                best = (cost, hits, replica)
        assert best is not None
        return best[2], best[1]

    async def _complete(
        self, job: _Job, router: Router | None, result: PolicyResult, policy: str
    ) -> None:
        if router is not None and job.route is not None:
            router.finished(job.route, ok=True)
        stored = job.replica.client.store(
            job.replica.registration, list(job.keys), list(range(len(job.keys)))
        ) if job.keys else 0  # fmt: skip
        if router is None or not router.nodes or not stored:
            return
        await self._barrier(job, router, result)

    async def _barrier(self, job: _Job, router: Router, result: PolicyResult) -> None:
        """Wait until the router's index agrees with the node about this prompt."""
        truth = job.replica.client.lookup(list(job.keys))[0]
        digests = [digest_int(k) for k in job.keys]
        index = router.nodes[job.replica.endpoint].index
        started = time.perf_counter()
        while index.hold(digests).chunks != truth:
            if time.perf_counter() - started > BARRIER_TIMEOUT_S:
                result.barrier_timeouts += 1
                return
            await asyncio.sleep(0.0005)
        result.event_lag_s.append(time.perf_counter() - started)
