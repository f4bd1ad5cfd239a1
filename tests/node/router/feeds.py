"""Helpers: the router's ``NodeFeed`` on a loop thread, and a worker that stores chunks."""

from __future__ import annotations

import asyncio
import threading

import torch
import zmq.asyncio
from lmcache_node.client import NodeClient, Registration
from lmcache_node.keys import ChunkKey, KeyNamespace, chunk_keys
from lmcache_node.protocol.credentials import ClientCredentials
from lmcache_node.router.feed import NodeFeed
from lmcache_node.router.index import NodeIndex

BLOCK = 16
NUM_BLOCKS = 64


class FeedThread:
    """A ``NodeFeed`` following ``endpoint`` on an event loop of its own."""

    def __init__(
        self,
        endpoint: str,
        *,
        credentials: ClientCredentials | None = None,
        max_keys: int = 1 << 20,
        **options: float,
    ) -> None:
        self.index = NodeIndex("node", max_keys=max_keys)
        self.loop = asyncio.new_event_loop()
        self.context = zmq.asyncio.Context()
        self.feed = NodeFeed(
            self.index, endpoint, context=self.context, credentials=credentials, **options
        )
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.loop.run_until_complete(self.feed.run())

    def __enter__(self) -> FeedThread:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.feed.stop)
        self._thread.join(30)
        self.context.destroy(0)

    def keys(self, tier: str) -> set[int]:
        bit = 1 if tier == "l1" else 2
        return {k for k, mask in list(self.index.entries.items()) if mask & bit}


class Worker:
    """A vLLM-like worker: a registered CPU KV cache and prompts to store."""

    def __init__(self, client: NodeClient, namespace: KeyNamespace, chunk: int) -> None:
        self.client = client
        self.namespace = namespace
        self.chunk = chunk
        self.layers = [torch.zeros(NUM_BLOCKS, 2, BLOCK, 16, dtype=torch.float16)]
        self.registration: Registration = client.register_kv_caches(
            self.layers, block_dim=0, block_size=BLOCK, namespace=namespace
        )

    def keys(self, prompt_id: int, chunks: int) -> list[ChunkKey]:
        tokens = [prompt_id * 100_000 + i for i in range(chunks * self.chunk)]
        return self.worker_keys(tokens)

    def worker_keys(self, tokens: list[int]) -> list[ChunkKey]:
        """The keys this worker's connector would use for ``tokens``."""
        return chunk_keys(tokens, self.chunk, self.namespace)

    def store(self, keys: list[ChunkKey]) -> int:
        per_chunk = self.chunk // BLOCK
        stored = 0
        for start in range(0, len(keys), 8):  # at most NUM_BLOCKS blocks per call
            part = keys[start : start + 8]
            blocks = [b % NUM_BLOCKS for b in range(len(part) * per_chunk)]
            stored += self.client.store(self.registration, list(part), blocks)
        return stored
