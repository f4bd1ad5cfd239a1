"""Data-path calls of ``NodeClient`` (``node_client.py``): lookup, store, retrieve (shared
memory or through the server's staging area), and their asynchronous forms.

Moved out of ``node_client.py`` unchanged (a mixin: the client's state is declared below).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from lmcache_node.client.calls import ClientCalls
from lmcache_node.client.errors import (
    NodeUnavailableError,
    RemoteError,
)
from lmcache_node.client.registrations import Registration
from lmcache_node.protocol import messages as m
from lmcache_node.transfer.streams import copy_stream

if TYPE_CHECKING:
    from lmcache_node.client.node_client import HandshakeInfo

log = logging.getLogger("lmcache_node.client.node_client")  # the client's log, as before the split


class DataPathCalls(ClientCalls):
    """``lookup`` / ``store`` / ``retrieve``: whole chunks between the registration's
    blocks and the server, the reply after the server committed."""

    if TYPE_CHECKING:
        info: HandshakeInfo | None
        _executor: ThreadPoolExecutor

    # ----- data path -----
    def lookup(
        self, keys: list[bytes], *, lock: bool = False, lock_ttl_s: float | None = None
    ) -> tuple[int, int | None]:
        """Leading chunks found; with ``lock``, also a lock id holding them (free it).

        Within the server's limits: at most ``max_keys_per_request`` leading keys are looked
        up (a prefix lookup, so the answer stays right), and the lock lifetime is capped at
        ``max_lock_ttl_secs``.
        """
        info = self.info
        keys = list(keys)
        if info is not None:
            max_keys = info.limit("max_keys_per_request")
            if max_keys is not None and len(keys) > max_keys:
                keys = keys[: int(max_keys)]
            max_ttl = info.limit("max_lock_ttl_secs")
            if lock_ttl_s is not None and max_ttl is not None and lock_ttl_s > max_ttl:
                lock_ttl_s = max_ttl
        reply = self._call(
            m.Op.LOOKUP, m.LookupRequest(keys=keys, lock=lock, lock_ttl_s=lock_ttl_s), m.LookupReply
        )
        return reply.hits, reply.lock_id

    def store(
        self,
        registration: Registration,
        keys: list[bytes],
        block_ids: list[int],
        *,
        num_tokens: int = 0,
        timeout_s: float | None = None,
    ) -> int:
        """Store chunks from the blocks; returns the leading chunks now cached. The reply
        comes after the data is committed, so a lookup right after it hits."""
        return self._current(
            registration,
            lambda: self._store_once(registration, keys, block_ids, num_tokens, timeout_s),
        )

    def _store_once(
        self,
        registration: Registration,
        keys: list[bytes],
        block_ids: list[int],
        num_tokens: int,
        timeout_s: float | None,
    ) -> int:
        if registration.transfer_mode == "engine":
            return self._engine_transfer(
                registration, keys, block_ids, store=True, timeout=timeout_s
            )
        if registration.event is not None:
            registration.event.record()
        request = m.StoreRequest(
            registration_id=registration.registration_id,
            keys=list(keys),
            block_ids=list(block_ids),
            num_tokens=num_tokens,
        )
        return self._call(m.Op.STORE, request, m.StoreReply, timeout=timeout_s).stored

    def retrieve(
        self,
        registration: Registration,
        keys: list[bytes],
        block_ids: list[int],
        *,
        timeout_s: float | None = None,
    ) -> int:
        """Write the leading cached chunks into the blocks; returns how many."""
        return self._current(
            registration, lambda: self._retrieve_once(registration, keys, block_ids, timeout_s)
        )

    def _current(self, registration: Registration, action: Callable[[], int]) -> int:
        """Run ``action``; if the session was re-established meanwhile (server restart or a
        dropped session), the registration got a new id: run it once more with that id."""
        used = registration.registration_id
        try:
            return action()
        except RemoteError as exc:
            if exc.code != m.ErrorCode.NOT_REGISTERED.value or registration.registration_id == used:
                raise
            return action()

    def _retrieve_once(
        self,
        registration: Registration,
        keys: list[bytes],
        block_ids: list[int],
        timeout_s: float | None,
    ) -> int:
        if registration.transfer_mode == "engine":
            return self._engine_transfer(
                registration, keys, block_ids, store=False, timeout=timeout_s
            )
        request = m.RetrieveRequest(
            registration_id=registration.registration_id, keys=list(keys), block_ids=list(block_ids)
        )
        return self._call(m.Op.RETRIEVE, request, m.RetrieveReply, timeout=timeout_s).retrieved

    def _engine_transfer(
        self,
        registration: Registration,
        keys: list[bytes],
        block_ids: list[int],
        *,
        store: bool,
        timeout: float | None,
    ) -> int:
        """Engine-driven mode: the worker copies through the staging area, batch by batch."""
        geometry = registration.geometry
        assert geometry is not None
        per_chunk = geometry.split(len(keys), block_ids) if keys else []
        geometry.check_blocks(block_ids)
        done = 0
        batch = max(1, registration.staging_chunks)
        with registration.lock:
            for first in range(0, len(keys), batch):
                staging = registration.staging
                if staging is None:
                    raise NodeUnavailableError(
                        "the registration has no staging area (server restarting?)"
                    )
                chunk_keys = list(keys[first : first + batch])
                chunk_blocks = per_chunk[first : first + batch]
                flat = [b for blocks in chunk_blocks for b in blocks]
                slots = [
                    staging[
                        i * registration.chunk_bytes : i * registration.chunk_bytes
                        + geometry.block_bytes * len(blocks)
                    ]
                    for i, blocks in enumerate(chunk_blocks)
                ]
                if store:
                    for slot, blocks in zip(slots, chunk_blocks, strict=True):
                        copy_stream([slot], geometry.chunk_views(blocks))
                    _sync(registration)
                    reply_s = self._call(
                        m.Op.STORE,
                        m.StoreRequest(registration.registration_id, chunk_keys, flat),
                        m.StoreReply,
                        timeout=timeout,
                    )
                    count = reply_s.stored
                else:
                    reply_r = self._call(
                        m.Op.RETRIEVE,
                        m.RetrieveRequest(registration.registration_id, chunk_keys, flat),
                        m.RetrieveReply,
                        timeout=timeout,
                    )
                    count = reply_r.retrieved
                    for slot, blocks in zip(slots[:count], chunk_blocks[:count], strict=True):
                        copy_stream(geometry.chunk_views(blocks), [slot])
                    _sync(registration)
                done += count
                if count < len(chunk_keys):
                    break
        return done

    def store_async(
        self, registration: Registration, keys: list[bytes], block_ids: list[int], **kwargs: Any
    ) -> Future[int]:
        return self._executor.submit(self.store, registration, keys, block_ids, **kwargs)

    def retrieve_async(
        self, registration: Registration, keys: list[bytes], block_ids: list[int], **kwargs: Any
    ) -> Future[int]:
        return self._executor.submit(self.retrieve, registration, keys, block_ids, **kwargs)


def _sync(registration: Registration) -> None:
    """Engine mode on CUDA: the staging copies must be complete before the next step."""
    device = registration.tensors[0].device
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
