"""Worker-side execution of a step's plan: retrieve before the forward, store after it.

Exceptions never propagate into vLLM: a retrieve that fails (server down, timeout, a chunk
evicted or found corrupt by the server) reports the blocks it did not fill, and vLLM's
``kv_load_failure_policy`` decides: recompute them, or fail the request. A store that fails
is dropped (a future miss, nothing more).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch

from lmcache_node.client import NodeClient, Registration
from lmcache_node.keys import ChunkKey, KeyNamespace, chunk_keys
from lmcache_node.vllm.link import NodeLink
from lmcache_node.vllm.planner import TransferOp, invalid_blocks
from lmcache_node.vllm.verify import KVVerifier

log = logging.getLogger(__name__)


@dataclass
class TransferStats:
    loaded_tokens: int = 0
    requested_load_tokens: int = 0
    stored_tokens: int = 0
    failed_load_tokens: int = 0
    failed_store_tokens: int = 0


class WorkerTransfers:
    def __init__(
        self,
        link: NodeLink,
        *,
        namespace: Callable[[str], KeyNamespace],
        chunk_size: int,
        blocks_per_chunk: int,
        registration: Callable[[], Registration | None],
        fail_on_load_error: bool = False,
        verifier: KVVerifier | None = None,
    ) -> None:
        self._link = link
        self.verifier = verifier
        self._fail_on_load_error = fail_on_load_error
        self._namespace = namespace
        self._chunk_size = chunk_size
        self._bpc = blocks_per_chunk
        self._registration = registration
        self._invalid: set[int] = set()
        self._mutex = threading.Lock()
        self.stats = TransferStats()

    def keys(self, op: TransferOp) -> list[ChunkKey]:
        keys = chunk_keys(op.tokens, self._chunk_size, self._namespace(op.salt))
        return keys[op.start_chunk : op.end_chunk]

    def load(self, ops: list[TransferOp]) -> None:
        """Retrieve every op into its blocks (synchronously: the forward reads them next)."""
        for op in ops:
            started = time.perf_counter()
            reg = self._registration()
            loaded = 0
            if reg is not None:
                keys = self.keys(op)
                loaded = self._link.call("retrieve", _retrieve(reg, keys, op.block_ids), 0)
                if self.verifier is not None and loaded > 0:
                    self.verifier.loaded(op.req_id, keys[:loaded], op.block_ids)
            else:
                self._link.incidents.failed(
                    "retrieve", RuntimeError("KV caches not registered with the node server")
                )
            tokens = op.num_chunks * self._chunk_size
            got = max(0, min(loaded, op.num_chunks)) * self._chunk_size
            self.stats.requested_load_tokens += tokens
            self.stats.loaded_tokens += got
            if got < tokens:
                self.stats.failed_load_tokens += tokens - got
                bad = invalid_blocks(op, loaded, self._bpc)
                with self._mutex:
                    self._invalid |= bad
                if self._fail_on_load_error:
                    log.error(
                        "request %s: loaded only %d of %d tokens from the node server (%d "
                        "blocks not loaded); kv_load_failure_policy is 'fail', so vLLM fails "
                        'the request. Set "kv_load_failure_policy":"recompute" in '
                        "--kv-transfer-config to recompute such blocks instead",
                        op.req_id,
                        got,
                        tokens,
                        len(bad),
                    )
                else:
                    log.info(
                        "request %s: loaded %d of %d tokens from the node server; vLLM "
                        "recomputes the other %d (%d blocks)",
                        op.req_id,
                        got,
                        tokens,
                        tokens - got,
                        len(bad),
                    )
            else:
                log.info(
                    "request %s: loaded %d tokens from the node server in %.3f s",
                    op.req_id,
                    got,
                    time.perf_counter() - started,
                )

    def store(self, ops: list[TransferOp]) -> None:
        """Store every op (the reply comes after the server committed the data)."""
        for op in ops:
            reg = self._registration()
            tokens = op.num_chunks * self._chunk_size
            if reg is None:
                self.stats.failed_store_tokens += tokens
                continue
            keys = self.keys(op)
            stored = self._link.call("store", _store(reg, keys, op.block_ids), -1)
            if stored < 0:
                self.stats.failed_store_tokens += tokens
                continue
            if self.verifier is not None and stored > 0:
                self.verifier.saved(keys[:stored], op.block_ids)
            self.stats.stored_tokens += stored * self._chunk_size
            log.debug("request %s: stored %d chunks", op.req_id, stored)

    def take_invalid_blocks(self) -> set[int]:
        with self._mutex:
            invalid, self._invalid = self._invalid, set()
        return invalid


def _retrieve(
    reg: Registration, keys: list[ChunkKey], block_ids: list[int]
) -> Callable[[NodeClient], int]:
    def action(client: NodeClient) -> int:
        return client.retrieve(reg, cast(list[bytes], keys), block_ids)

    return action


def _store(
    reg: Registration, keys: list[ChunkKey], block_ids: list[int]
) -> Callable[[NodeClient], int]:
    def action(client: NodeClient) -> int:
        return client.store(reg, cast(list[bytes], keys), block_ids)

    return action


def register(
    client: NodeClient,
    kv_caches: list[torch.Tensor],
    *,
    block_dim: int,
    block_size: int,
    namespace: KeyNamespace,
    transfer_mode: str = "auto",
) -> Registration:
    """Register the worker's KV tensors: ``transfer_mode`` as ``lmcache.node.transfer_mode``."""
    return client.register_kv_caches(
        kv_caches,
        block_dim=block_dim,
        block_size=block_size,
        namespace=namespace,
        transfer_mode=transfer_mode,
    )
