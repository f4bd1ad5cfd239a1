"""The routing bench's workload: multi-tenant chat with shared system prompts (fixed seed).

Tenants are system prompts (1-4k tokens) chosen with a Zipf-like popularity; each
conversation has 4-10 turns, and turn *k*'s prompt is the system prompt, every earlier user
message and assistant reply, and the new user message. Conversations start as a Poisson
process; a turn follows the previous one after an exponential think time. Times are in
units of the scale the bench picks (so the load fits the replicas), tokens are random ids.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class WorkloadSpec:
    seed: int = 20261219
    system_prompts: int = 40
    conversations: int = 400
    turns: tuple[int, int] = (4, 10)
    system_tokens: tuple[int, int] = (1024, 4096)
    user_tokens: tuple[int, int] = (40, 400)
    reply_tokens: tuple[int, int] = (40, 400)
    popularity_exponent: float = 1.0  # Zipf s of the tenants
    think_share: float = 0.06  # mean gap between turns, as a share of the start window
    vocab: int = 4000


@dataclass
class Turn:
    conversation: int
    index: int
    tenant: int
    arrival: float  # in start-window units until ``scale`` is applied
    tokens: list[int] = field(repr=False)
    system_tokens: int = 0

    @property
    def session(self) -> str:
        return f"conversation-{self.conversation}"


def _tokens(rng: random.Random, bounds: tuple[int, int], vocab: int) -> list[int]:
    return [rng.randrange(10, vocab) for _ in range(rng.randint(*bounds))]


def make_workload(spec: WorkloadSpec) -> list[Turn]:
    """Every turn of every conversation, by arrival (start window = 1.0)."""
    rng = random.Random(spec.seed)  # noqa: S311 - a reproducible workload
    systems = [_tokens(rng, spec.system_tokens, spec.vocab) for _ in range(spec.system_prompts)]
    weights = [1.0 / (rank + 1) ** spec.popularity_exponent for rank in range(len(systems))]
    turns: list[Turn] = []
    start = 0.0
    mean_gap_between_starts = 1.0 / spec.conversations
    for conversation in range(spec.conversations):
        start += rng.expovariate(1.0 / mean_gap_between_starts)
        tenant = rng.choices(range(len(systems)), weights)[0]
        history = list(systems[tenant])
        arrival = start
        for index in range(rng.randint(*spec.turns)):
            history += _tokens(rng, spec.user_tokens, spec.vocab)
            turns.append(
                Turn(conversation, index, tenant, arrival, list(history),
                     system_tokens=len(systems[tenant]))
            )  # fmt: skip
            history += _tokens(rng, spec.reply_tokens, spec.vocab)  # the assistant's answer
            arrival += max(0.2, rng.expovariate(1.0)) * spec.think_share
    turns.sort(key=lambda t: t.arrival)
    return turns


def estimated_round_robin_tokens(turns: list[Turn], chunk: int, replicas: int) -> float:
    """Prefill tokens round-robin would compute if every node kept every system prompt and a
    conversation's history were on the right node one time in ``replicas`` (sizing only)."""
    total = 0.0
    previous: dict[int, int] = {}
    for turn in turns:
        cached_system = turn.system_tokens // chunk * chunk
        history = previous.get(turn.conversation, 0) // chunk * chunk
        cached = cached_system + max(0, history - cached_system) / replicas
        total += len(turn.tokens) - cached
        previous[turn.conversation] = len(turn.tokens)
    return total
