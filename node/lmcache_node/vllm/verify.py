"""Verify mode (``lmcache.node.verify`` / ``LMCACHE_NODE_VERIFY=1``, off by default).

When the worker saves a chunk it records a digest (BLAKE2b) of the chunk's KV bytes as they
lie in vLLM's blocks; after every load it digests the blocks the chunk was loaded into (the
bytes vLLM's forward reads next) and compares. A chunk loaded with bytes this worker never
saved under its key is a mismatch: counted, and the first one logged as an ERROR with its
key and request. A chunk saved by another instance (or before this worker started) has no
digest here and counts as ``unknown``. The counts reach vLLM's own stats: the log line
"KV Transfer metrics" and ``vllm:lmcache_node_verify_chunks_total{outcome=...}`` on its
``/metrics`` (``stats.py``).

A key keeps every digest this worker saved for it (a chunk recomputed under another batch
may differ in its last bits; the server keeps the first bytes it got), for the
``MAX_KEYS`` most recently saved keys. Cost: one copy and one hash of each saved and loaded
chunk, off by default. vLLM-free, so it is unit-tested without vLLM.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from lmcache_node.keys import ChunkKey

log = logging.getLogger(__name__)

MAX_KEYS = 1 << 18  # digests kept: 256 Ki keys x ~100 bytes
DIGEST_BYTES = 16
OUTCOMES = ("saved", "matched", "mismatched", "unknown")

# The worker's KV tensors and the dimension of their block index (known after registration).
CacheView = Callable[[], tuple[Sequence[torch.Tensor], int]]


def chunk_digest(caches: Sequence[torch.Tensor], block_dim: int, block_ids: Sequence[int]) -> bytes:
    """BLAKE2b of the bytes of ``block_ids`` (in order) in every layer, layer by layer."""
    hasher = hashlib.blake2b(digest_size=DIGEST_BYTES)
    if not caches:
        return hasher.digest()
    index = torch.tensor(list(block_ids), dtype=torch.long, device=caches[0].device)
    for layer in caches:
        blocks = layer.index_select(block_dim, index).contiguous().cpu()
        hasher.update(memoryview(blocks.reshape(-1).view(torch.uint8).numpy()))  # type: ignore[arg-type]
    return hasher.digest()


class KVVerifier:
    """Digests at save, checks after load; counts by outcome (``OUTCOMES``)."""

    def __init__(
        self, caches: CacheView, blocks_per_chunk: int, *, max_keys: int = MAX_KEYS
    ) -> None:
        self._caches = caches
        self._bpc = blocks_per_chunk
        self._max_keys = max_keys
        self._saved: OrderedDict[ChunkKey, set[bytes]] = OrderedDict()
        self._mutex = threading.Lock()
        self._counts = dict.fromkeys(OUTCOMES, 0)  # since the last take_counts()
        self.totals = dict.fromkeys(OUTCOMES, 0)
        self.first_mismatch: tuple[str, ChunkKey] | None = None

    def _digests(self, block_ids: Sequence[int], chunks: int) -> list[bytes]:
        caches, block_dim = self._caches()
        bpc = self._bpc
        return [
            chunk_digest(caches, block_dim, block_ids[i * bpc : (i + 1) * bpc])
            for i in range(chunks)
        ]

    def saved(self, keys: Sequence[ChunkKey], block_ids: Sequence[int]) -> None:
        """Record the digests of the chunks ``keys`` as they lie in ``block_ids`` now."""
        digests = self._digests(block_ids, len(keys))
        with self._mutex:
            for key, digest in zip(keys, digests, strict=True):
                self._saved.setdefault(key, set()).add(digest)
                self._saved.move_to_end(key)
            while len(self._saved) > self._max_keys:
                self._saved.popitem(last=False)
            self._count("saved", len(keys))

    def loaded(self, req_id: str, keys: Sequence[ChunkKey], block_ids: Sequence[int]) -> int:
        """Check the chunks ``keys`` just loaded into ``block_ids``; the mismatches found."""
        digests = self._digests(block_ids, len(keys))
        mismatches = 0
        first: tuple[str, ChunkKey, int] | None = None
        with self._mutex:
            for index, (key, digest) in enumerate(zip(keys, digests, strict=True)):
                known = self._saved.get(key)
                if known is None:
                    self._count("unknown", 1)
                elif digest in known:
                    self._count("matched", 1)
                else:
                    self._count("mismatched", 1)
                    mismatches += 1
                    if self.first_mismatch is None:
                        self.first_mismatch = (req_id, key)
                        first = (req_id, key, index)
        if first is not None:
            log.error(
                "verify: request %s loaded chunk %d (key %s) with KV bytes this worker never "
                "saved under that key: the cache returned other bytes than vLLM stored. "
                "First mismatch; later ones are counted in "
                'vllm:lmcache_node_verify_chunks_total{outcome="mismatched"}',
                first[0],
                first[2],
                first[1].hex(),
            )
        return mismatches

    def _count(self, outcome: str, n: int) -> None:
        self._counts[outcome] += n
        self.totals[outcome] += n

    def take_counts(self) -> dict[str, int]:
        """The counts since the last call (for vLLM's per-step connector stats)."""
        with self._mutex:
            counts, self._counts = self._counts, dict.fromkeys(OUTCOMES, 0)
        return counts
