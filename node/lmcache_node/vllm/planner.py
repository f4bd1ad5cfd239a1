"""Scheduler-side planning: which chunks a request loads from and stores to the node server.

Plain Python (no vLLM import) so every rule is unit-tested. Units: a *chunk* is
``chunk_size`` tokens (the cache key unit), a *block* is vLLM's ``block_size`` tokens;
``chunk_size`` is a multiple of ``block_size``, so chunk ``i`` covers blocks
``[i * bpc, (i + 1) * bpc)`` with ``bpc = chunk_size // block_size``.

Rules:
- a lookup counts whole chunks only, and never the request's last token (vLLM must compute at
  least one token to produce logits);
- a load covers the hit chunks beyond what vLLM already has (its own prefix cache); a chunk
  vLLM has only in part is loaded whole (the bytes are the same KV);
- a store covers prompt chunks that are fully computed and not yet on the server, as soon as
  a step completes them (chunked prefill stores as it goes); generated tokens are not stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TransferOp:
    """One request's contiguous run of chunks to move, with the vLLM blocks they live in."""

    req_id: str
    tokens: list[int]  # the request's tokens from 0 to the end of the run (keys are chained)
    start_chunk: int
    end_chunk: int
    block_ids: list[int]  # (end_chunk - start_chunk) * blocks_per_chunk ids, in order
    salt: str = ""

    @property
    def num_chunks(self) -> int:
        return self.end_chunk - self.start_chunk


@dataclass
class StepPlan:
    """What the worker does this step: loads before the forward, stores after it."""

    loads: list[TransferOp] = field(default_factory=list)
    stores: list[TransferOp] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.loads or self.stores)


@dataclass
class RequestTracker:
    req_id: str
    prompt: list[int]
    salt: str = ""
    block_ids: list[int] = field(default_factory=list)
    stored_chunks: int = 0  # leading prompt chunks known to be on the server
    hit_chunks: int = 0  # leading chunks the last lookup found
    vllm_computed: int = 0  # tokens vLLM had locally at that lookup
    lock_id: int | None = None
    load_planned: bool = False


class Planner:
    """Per-request state of the scheduler-side connector."""

    def __init__(
        self, chunk_size: int, block_size: int, *, can_load: bool = True, can_store: bool = True
    ) -> None:
        if block_size <= 0 or chunk_size <= 0 or chunk_size % block_size:
            raise ValueError(
                f"the connector's chunk size ({chunk_size}) must be a positive multiple of "
                f"vLLM's block size ({block_size}); set lmcache.node.chunk_size (and the "
                "server's chunk_size) accordingly, e.g. 256 with --block-size 128"
            )
        self.chunk_size = chunk_size
        self.block_size = block_size
        self.blocks_per_chunk = chunk_size // block_size
        self.can_load = can_load
        self.can_store = can_store
        self.trackers: dict[str, RequestTracker] = {}
        self._loads: list[TransferOp] = []

    # --- lookup ---
    def track(self, req_id: str, prompt: list[int], salt: str = "") -> RequestTracker:
        tracker = self.trackers.get(req_id)
        if tracker is None:
            tracker = RequestTracker(req_id=req_id, prompt=list(prompt), salt=salt)
            self.trackers[req_id] = tracker
        return tracker

    def lookup_chunks(self, tracker: RequestTracker, num_tokens: int) -> int:
        """How many leading chunks a lookup may ask about (never the last token)."""
        usable = min(len(tracker.prompt), max(num_tokens - 1, 0))
        return usable // self.chunk_size

    def record_lookup(
        self, tracker: RequestTracker, hit_chunks: int, num_computed_tokens: int
    ) -> int:
        """Store the lookup's result; returns the tokens vLLM may take from the server."""
        tracker.hit_chunks = hit_chunks
        tracker.load_planned = False
        tracker.vllm_computed = num_computed_tokens
        tracker.stored_chunks = max(tracker.stored_chunks, hit_chunks)
        if not self.can_load:
            return 0
        return max(0, hit_chunks * self.chunk_size - num_computed_tokens)

    # --- allocation and scheduling ---
    def record_alloc(
        self, tracker: RequestTracker, block_ids: list[int], num_external_tokens: int
    ) -> TransferOp | None:
        """vLLM allocated the request's blocks; plan the load it agreed to (if any)."""
        tracker.block_ids = list(block_ids)
        if num_external_tokens <= 0 or not self.can_load or tracker.load_planned:
            return None
        start = tracker.vllm_computed // self.chunk_size
        end = tracker.hit_chunks
        if end * self.blocks_per_chunk > len(block_ids) or end <= start:
            return None
        op = TransferOp(
            req_id=tracker.req_id,
            tokens=tracker.prompt[: end * self.chunk_size],
            start_chunk=start,
            end_chunk=end,
            block_ids=list(block_ids[start * self.blocks_per_chunk : end * self.blocks_per_chunk]),
            salt=tracker.salt,
        )
        tracker.load_planned = True
        self._loads.append(op)
        return op

    def record_scheduled(
        self,
        req_id: str,
        new_block_ids: list[int] | None,
        *,
        replace_blocks: bool,
        computed_after_step: int,
    ) -> TransferOp | None:
        """A step scheduled the request; returns the store of chunks this step completes."""
        tracker = self.trackers.get(req_id)
        if tracker is None:
            return None
        if new_block_ids is not None:
            if replace_blocks:
                tracker.block_ids = list(new_block_ids)
            else:
                tracker.block_ids.extend(new_block_ids)
        if not self.can_store:
            return None
        done = min(computed_after_step, len(tracker.prompt)) // self.chunk_size
        done = min(done, len(tracker.block_ids) // self.blocks_per_chunk)
        start = tracker.stored_chunks
        if done <= start:
            return None
        tracker.stored_chunks = done
        return TransferOp(
            req_id=req_id,
            tokens=tracker.prompt[: done * self.chunk_size],
            start_chunk=start,
            end_chunk=done,
            block_ids=tracker.block_ids[
                start * self.blocks_per_chunk : done * self.blocks_per_chunk
            ],
            salt=tracker.salt,
        )

    def take_loads(self) -> list[TransferOp]:
        loads, self._loads = self._loads, []
        return loads

    def finish(self, req_id: str) -> RequestTracker | None:
        """Forget a finished request; the caller frees its lookup lock."""
        self._loads = [op for op in self._loads if op.req_id != req_id]
        return self.trackers.pop(req_id, None)


def invalid_blocks(op: TransferOp, loaded_chunks: int, blocks_per_chunk: int) -> set[int]:
    """The blocks of ``op`` a retrieve that wrote ``loaded_chunks`` leading chunks left unset."""
    loaded = max(0, min(loaded_chunks, op.num_chunks))
    return set(op.block_ids[loaded * blocks_per_chunk :])
