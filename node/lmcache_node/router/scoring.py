"""Routing policies: pure functions of what the router knows about each replica.

``cache_aware`` estimates, per replica, the prefill work a request would cost there, in
tokens: the prompt minus what its caches hold (vLLM's own prefix cache at full value, the
node's L1 and L2 at a discount for the reload), plus the prefill the replica still owes to
requests already sent to it, plus a per-request load term (requests in flight here and
waiting in vLLM's queue). The cheapest wins; ties (a cold prefix on idle replicas) go to
the least loaded, then in turn. ``round_robin``, ``prefix_hash`` (consistent hashing of the
first chunk, as production-stack does) and ``session`` (sticky per conversation) are the
baselines.
"""

from __future__ import annotations

import bisect
import enum
import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass


class Policy(str, enum.Enum):
    CACHE_AWARE = "cache-aware"
    ROUND_ROBIN = "round-robin"
    PREFIX_HASH = "prefix-hash"
    SESSION = "session"


@dataclass(frozen=True)
class Weights:
    """Cost-model knobs (tokens are prefill tokens)."""

    gpu: float = 1.0  # share of a token's prefill a GPU prefix-cache hit saves
    l1: float = 0.95  # ... a node L1 hit (reloaded from CPU memory)
    l2: float = 0.8  # ... a node L2 hit (read from disk first)
    request_tokens: float = 64.0  # load of one request in flight or waiting, in tokens


@dataclass(frozen=True)
class Candidate:
    """One healthy replica as the router sees it for one request."""

    name: str
    prompt_tokens: int
    gpu_tokens: int = 0  # leading tokens in vLLM's own prefix cache
    l1_tokens: int = 0  # leading tokens in the node's L1
    l2_tokens: int = 0  # further leading tokens in the node's L2 (after the L1 ones)
    pending_prefill_tokens: int = 0  # prefill owed to requests this router sent there
    in_flight: int = 0  # requests this router has open there
    waiting: int = 0  # vLLM's queue (num_requests_waiting), from its /metrics


@dataclass(frozen=True)
class Decision:
    index: int  # into the candidates
    reason: str  # cache, load, hash, session, round_robin
    cost: float = 0.0
    cached_tokens: float = 0.0  # credited tokens of the chosen replica


def credit(candidate: Candidate, weights: Weights) -> float:
    """Prefill tokens the replica's caches save, weighted by where they come from."""
    prompt = candidate.prompt_tokens
    gpu = min(candidate.gpu_tokens, prompt)
    l1_end = min(candidate.l1_tokens, prompt)
    l2_end = min(candidate.l1_tokens + candidate.l2_tokens, prompt)
    return (
        gpu * weights.gpu
        + max(0, l1_end - gpu) * weights.l1
        + max(0, l2_end - max(gpu, l1_end)) * weights.l2
    )


def cost(candidate: Candidate, weights: Weights) -> float:
    """Estimated prefill work (tokens) before this request's first token on the replica."""
    load = weights.request_tokens * (candidate.in_flight + candidate.waiting)
    return (
        candidate.prompt_tokens
        - credit(candidate, weights)
        + candidate.pending_prefill_tokens
        + load
    )


class CacheAware:
    def __init__(self, weights: Weights | None = None) -> None:
        self.weights = weights or Weights()
        self._turn = itertools.count()

    def choose(self, candidates: Sequence[Candidate]) -> Decision:
        if not candidates:
            raise ValueError("no candidate replica")
        costs = [cost(c, self.weights) for c in candidates]
        best = min(costs)
        tied = [i for i, value in enumerate(costs) if value - best < 0.5]
        if len(tied) > 1:  # least in flight, then in turn
            fewest = min(candidates[i].in_flight for i in tied)
            tied = [i for i in tied if candidates[i].in_flight == fewest]
        index = tied[next(self._turn) % len(tied)]
        cached = credit(candidates[index], self.weights)
        return Decision(index, "cache" if cached > 0 else "load", costs[index], cached)


class RoundRobin:
    def __init__(self) -> None:
        self._turn = itertools.count()

    def choose(self, candidates: Sequence[Candidate]) -> Decision:
        if not candidates:
            raise ValueError("no candidate replica")
        return Decision(next(self._turn) % len(candidates), "round_robin")


class HashRing:
    """Consistent hashing: each replica owns ``vnodes`` points on a 64-bit ring."""

    def __init__(self, names: Sequence[str], vnodes: int = 64) -> None:
        points = sorted(
            (_hash64(f"{name}#{v}".encode()), name) for name in names for v in range(vnodes)
        )
        self._hashes = [h for h, _ in points]
        self._names = [n for _, n in points]

    def owner(self, key: bytes) -> str:
        if not self._names:
            raise ValueError("the ring is empty")
        position = bisect.bisect(self._hashes, _hash64(key)) % len(self._hashes)
        return self._names[position]


class _Ringed:
    def __init__(self) -> None:
        self._ring: HashRing | None = None
        self._ring_names: tuple[str, ...] = ()
        self._fallback = CacheAware(Weights(gpu=0.0, l1=0.0, l2=0.0))  # least loaded

    def _owner(self, candidates: Sequence[Candidate], key: bytes) -> int:
        names = tuple(sorted(c.name for c in candidates))
        if self._ring is None or names != self._ring_names:
            self._ring, self._ring_names = HashRing(names), names
        owner = self._ring.owner(key)
        return next(i for i, c in enumerate(candidates) if c.name == owner)


class PrefixHash(_Ringed):
    """The replica owning the hash of the first chunk's tokens (the whole prompt when it
    is shorter than a chunk)."""

    def choose(self, candidates: Sequence[Candidate], first_chunk: bytes) -> Decision:
        if not candidates:
            raise ValueError("no candidate replica")
        return Decision(self._owner(candidates, first_chunk), "hash")


class Session(_Ringed):
    """The replica owning the conversation's session id; without one, the least loaded."""

    def choose(self, candidates: Sequence[Candidate], session: str | None) -> Decision:
        if not candidates:
            raise ValueError("no candidate replica")
        if not session:
            decision = self._fallback.choose(candidates)
            return Decision(decision.index, "load", decision.cost)
        return Decision(self._owner(candidates, session.encode()), "session")


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
