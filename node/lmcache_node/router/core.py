"""The router's state and its decision, independent of HTTP (the bench drives it directly).

``Router`` holds the replicas (from discovery), one ``NodeIndex`` + ``NodeFeed`` per node
server, and per replica what this router sent there. ``route`` turns a request's tokens
into the chained chunk keys of each node's published namespace (``keys.chunk_keys``, the
connector's code), asks each replica's node index how much of the prefix it holds, and
lets the policy choose. ``started`` / ``first_token`` / ``finished`` keep the load
accounting (requests in flight, prefill still owed) that the cost model uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq.asyncio

from lmcache_node.keys import ChunkKey, KeyNamespace, chunk_keys
from lmcache_node.protocol.credentials import ClientCredentials
from lmcache_node.protocol.events import digest_int
from lmcache_node.router.discovery import Replica
from lmcache_node.router.feed import NodeFeed
from lmcache_node.router.index import NodeIndex, PrefixHold
from lmcache_node.router.scoring import (
    CacheAware,
    Candidate,
    Decision,
    Policy,
    PrefixHash,
    RoundRobin,
    Session,
    Weights,
)

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 256  # the prefix-hash unit before any node server told its chunk size


@dataclass(frozen=True)
class PublishedNamespace(KeyNamespace):
    """A key namespace known only by the seed a node server published for it."""

    published_seed: bytes = b""

    def seed(self) -> bytes:
        return self.published_seed


@dataclass
class ReplicaState:
    replica: Replica
    healthy: bool = True
    in_flight: int = 0  # requests this router has open there
    pending_prefill: int = 0  # estimated prefill tokens not yet done for them
    waiting: int = 0  # vLLM's num_requests_waiting (scraped)
    running: int = 0  # vLLM's num_requests_running (scraped)
    routed: int = 0


@dataclass
class NodeSource:
    index: NodeIndex
    feed: NodeFeed
    task: asyncio.Task[None] | None = None
    users: set[str] = field(default_factory=set)  # replica names on this node


@dataclass(frozen=True)
class RouteRequest:
    tokens: Sequence[int]
    session: str | None = None


@dataclass
class Route:
    state: ReplicaState
    decision: Decision
    prompt_tokens: int
    owed: int  # prefill tokens this request adds to the replica until its first token
    holds: dict[str, PrefixHold] = field(default_factory=dict)  # per replica (explain)
    open: bool = True


class Router:
    def __init__(
        self,
        *,
        policy: Policy = Policy.CACHE_AWARE,
        weights: Weights | None = None,
        model_name: str | None = None,
        credentials: ClientCredentials | None = None,
        max_route_tokens: int = 1 << 17,
        index_max_keys: int = 1 << 21,
        feed_options: dict[str, Any] | None = None,
    ) -> None:
        self.policy = policy
        self.model_name = model_name
        self.credentials = credentials
        self.max_route_tokens = max_route_tokens
        self.index_max_keys = index_max_keys
        self.feed_options = dict(feed_options or {})
        self.cache_aware = CacheAware(weights)
        self.round_robin = RoundRobin()
        self.prefix_hash = PrefixHash()
        self.session = Session()
        self.replicas: dict[str, ReplicaState] = {}
        self.nodes: dict[str, NodeSource] = {}  # by node server endpoint
        self.context = zmq.asyncio.Context()

    # ----- membership -----
    async def set_replicas(self, replicas: Iterable[Replica]) -> None:
        wanted = {r.name: r for r in replicas}
        for name in list(self.replicas):
            if name not in wanted:
                del self.replicas[name]
        for name, replica in wanted.items():
            state = self.replicas.get(name)
            if state is None or state.replica != replica:
                self.replicas[name] = ReplicaState(replica)
                if state is not None:  # same pod, moved: keep the load we know
                    self.replicas[name].in_flight = state.in_flight
                    self.replicas[name].pending_prefill = state.pending_prefill
        caches: dict[str, set[str]] = {}
        for replica in wanted.values():
            if replica.cache:
                caches.setdefault(replica.cache, set()).add(replica.name)
        for endpoint in list(self.nodes):
            if endpoint not in caches:
                await self._stop_node(endpoint)
        for endpoint, users in caches.items():
            source = self.nodes.get(endpoint) or self._start_node(endpoint)
            source.users = users

    def _start_node(self, endpoint: str) -> NodeSource:
        index = NodeIndex(endpoint, max_keys=self.index_max_keys)
        feed = NodeFeed(
            index, endpoint, context=self.context, credentials=self.credentials,
            **self.feed_options,
        )  # fmt: skip
        source = NodeSource(index, feed)
        source.task = asyncio.get_running_loop().create_task(feed.run(), name=f"feed {endpoint}")
        self.nodes[endpoint] = source
        log.info("following node server %s", endpoint)
        return source

    async def _stop_node(self, endpoint: str) -> None:
        source = self.nodes.pop(endpoint)
        source.feed.stop()
        if source.task is not None:
            source.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await source.task
        log.info("stopped following node server %s", endpoint)

    async def close(self) -> None:
        for endpoint in list(self.nodes):
            await self._stop_node(endpoint)
        self.context.destroy(0)

    # ----- decisions -----
    def candidates(self, exclude: Iterable[str] = ()) -> list[ReplicaState]:
        skip = set(exclude)
        states = [s for s in self.replicas.values() if s.replica.name not in skip]
        healthy = [s for s in states if s.healthy]
        return sorted(healthy or states, key=lambda s: s.replica.name)

    def chunk_size(self) -> int:
        for source in self.nodes.values():
            if source.feed.chunk_size:
                return source.feed.chunk_size
        return DEFAULT_CHUNK

    def holds(self, tokens: Sequence[int], states: Sequence[ReplicaState]) -> list[PrefixHold]:
        """What each replica's node cache holds of ``tokens`` (nothing when out of step)."""
        tokens = tokens[: self.max_route_tokens]
        digests: dict[tuple[bytes, int], list[int]] = {}
        found: list[PrefixHold] = []
        for state in states:
            source = self.nodes.get(state.replica.cache)
            best = PrefixHold()
            if source is not None and source.index.synced and source.feed.chunk_size:
                chunk = source.feed.chunk_size
                for seed in source.index.seeds_for(self.model_name):
                    values = digests.get((seed, chunk))
                    if values is None:
                        keys = keys_for(tokens, chunk, seed)
                        values = digests[(seed, chunk)] = [digest_int(k) for k in keys]
                    hold = source.index.hold(values)
                    tokens_held = PrefixHold(hold.l1 * chunk, hold.l2 * chunk)
                    if (tokens_held.chunks, tokens_held.l1) > (best.chunks, best.l1):
                        best = tokens_held
            found.append(best)
        return found

    def route(self, request: RouteRequest, *, exclude: Iterable[str] = ()) -> Route:
        states = self.candidates(exclude)
        if not states:
            raise LookupError("no replica to route to")
        prompt = len(request.tokens)
        holds = self.holds(request.tokens, states) if self.policy is Policy.CACHE_AWARE else []
        candidates = [
            Candidate(
                name=s.replica.name,
                prompt_tokens=prompt,
                l1_tokens=holds[i].l1 if holds else 0,
                l2_tokens=holds[i].l2 if holds else 0,
                pending_prefill_tokens=s.pending_prefill,
                in_flight=s.in_flight,
                waiting=max(0, s.waiting - s.in_flight),  # ours are counted as in flight
            )
            for i, s in enumerate(states)
        ]
        decision = self._decide(request, candidates)
        state = states[decision.index]
        owed = max(0, round(prompt - decision.cached_tokens))
        return Route(
            state=state,
            decision=decision,
            prompt_tokens=prompt,
            owed=owed,
            holds={s.replica.name: h for s, h in zip(states, holds, strict=False)},
        )

    def _decide(self, request: RouteRequest, candidates: list[Candidate]) -> Decision:
        if self.policy is Policy.CACHE_AWARE:
            return self.cache_aware.choose(candidates)
        if self.policy is Policy.ROUND_ROBIN:
            return self.round_robin.choose(candidates)
        if self.policy is Policy.PREFIX_HASH:
            first = request.tokens[: self.chunk_size()]
            return self.prefix_hash.choose(candidates, _token_bytes(first))
        return self.session.choose(candidates, request.session)

    # ----- load accounting -----
    def started(self, route: Route) -> None:
        route.state.in_flight += 1
        route.state.pending_prefill += route.owed
        route.state.routed += 1

    def first_token(self, route: Route) -> None:
        if route.owed:
            route.state.pending_prefill = max(0, route.state.pending_prefill - route.owed)
            route.owed = 0

    def finished(self, route: Route, *, ok: bool) -> None:
        if not route.open:
            return
        route.open = False
        self.first_token(route)
        route.state.in_flight = max(0, route.state.in_flight - 1)
        if not ok:
            route.state.healthy = False


def _token_bytes(tokens: Sequence[int]) -> bytes:
    return b"".join(int(t).to_bytes(8, "little", signed=True) for t in tokens)


def keys_for(tokens: Sequence[int], chunk: int, seed: bytes) -> list[ChunkKey]:
    """The connector's chunk keys of ``tokens`` in the namespace with ``seed``."""
    return chunk_keys(tokens, chunk, PublishedNamespace("", published_seed=seed))
