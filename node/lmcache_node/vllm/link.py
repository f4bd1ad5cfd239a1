"""The connector's connection to the node server: never blocks serving, reconnects by itself.

``NodeLink`` owns one ``NodeClient``. The first connect is tried once at start-up (briefly);
if the server is not there, a background thread retries every ``reconnect_s`` until it is,
running ``on_connected`` (the worker registers its KV caches there). Calls made through
``call`` turn every client error into the caller's fallback value and log once per incident:
the first failure at WARNING, silence while the outage lasts, one INFO line on recovery.
After a server restart the client itself reconnects and re-registers (see ``NodeClient``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

from lmcache_node.client import (
    IncompatibleServerError,
    NodeClient,
    NodeClientError,
)
from lmcache_node.protocol.credentials import ClientCredentials
from lmcache_node.retry import RetryPolicy
from lmcache_node.vllm.settings import ConnectorSettings

log = logging.getLogger(__name__)

T = TypeVar("T")
ClientFactory = Callable[[ConnectorSettings, ClientCredentials | None], NodeClient]


def default_client(
    settings: ConnectorSettings, credentials: ClientCredentials | None
) -> NodeClient:
    return NodeClient(
        settings.url,
        timeout_s=settings.timeout_s,
        expected_chunk_size=settings.chunk_size,
        credentials=credentials,
    )


class Incidents:
    """Logs a failure once per incident and the recovery when it ends."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._mutex = threading.Lock()
        self._failures = 0

    @property
    def failing(self) -> bool:
        return self._failures > 0

    def failed(self, what: str, error: BaseException) -> None:
        with self._mutex:
            self._failures += 1
            first = self._failures == 1
        if first:
            log.warning(
                "%s: %s failed (%s: %s); serving continues without the cache (vLLM recomputes) "
                "and the connector keeps retrying",
                self._name,
                what,
                type(error).__name__,
                error,
            )
        else:
            log.debug("%s: %s failed again: %s", self._name, what, error)

    def succeeded(self) -> None:
        with self._mutex:
            failures, self._failures = self._failures, 0
        if failures:
            log.info(
                "%s: node server reachable again after %d failed call(s)", self._name, failures
            )


class NodeLink:
    def __init__(
        self,
        settings: ConnectorSettings,
        *,
        name: str,
        on_connected: Callable[[NodeClient], None] | None = None,
        credentials: ClientCredentials | None = None,
        client_factory: ClientFactory = default_client,
    ) -> None:
        self.settings = settings
        self._credentials = credentials
        self._incompatible = ""  # the last incompatibility logged
        self.name = name
        self.incidents = Incidents(name)
        self._on_connected = on_connected
        self._factory = client_factory
        self._client: NodeClient | None = None
        self._mutex = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Try to connect now; if that fails, keep trying in the background."""
        if not self._try_connect():
            self._thread = threading.Thread(
                target=self._reconnect_loop, name=f"{self.name}-reconnect", daemon=True
            )
            self._thread.start()

    @property
    def connected(self) -> bool:
        return self._client is not None

    def wait_connected(self, timeout_s: float) -> bool:
        """For tests and start-up scripts: wait until the first connect succeeded."""
        deadline = threading.Event()
        waited = 0.0
        while self._client is None and waited < timeout_s and not self._closed.is_set():
            deadline.wait(0.05)
            waited += 0.05
        return self._client is not None

    def call(self, what: str, action: Callable[[NodeClient], T], fallback: T) -> T:
        """Run ``action`` on the client; any client error gives ``fallback`` (logged once)."""
        client = self._client
        if client is None:
            self.incidents.failed(what, NodeClientError("not connected to " + self.settings.url))
            return fallback
        try:
            result = action(client)
        except NodeClientError as exc:
            self.incidents.failed(what, exc)
            return fallback
        self.incidents.succeeded()
        return result

    def close(self) -> None:
        self._closed.set()
        with self._mutex:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except NodeClientError as exc:
                log.debug("%s: close failed: %s", self.name, exc)
        if self._thread is not None:
            self._thread.join(timeout=5)

    # --- internals ---
    def _try_connect(self) -> bool:
        client: NodeClient | None = None
        try:
            client = self._factory(self.settings, self._credentials)
            info = client.connect()
            if self._on_connected is not None:
                self._on_connected(client)
        except IncompatibleServerError as exc:
            # Once per cause: the reconnect loop retries (the server may be upgraded) quietly.
            report = log.error if str(exc) != self._incompatible else log.debug
            self._incompatible = str(exc)
            report(
                "%s: the node server at %s is incompatible: %s. Serving continues without the "
                "cache (the connector's lmcache.node.chunk_size must equal the server's "
                "chunk_size, and both sides must run the same lmcache-k8s version)",
                self.name,
                self.settings.url,
                exc,
            )
            self._discard(client)
            return False
        except NodeClientError as exc:
            self.incidents.failed(f"connecting to {self.settings.url}", exc)
            self._discard(client)
            return False
        except (OSError, ValueError, RuntimeError) as exc:
            # e.g. /dev/shm full or too small, or a KV layout the server cannot map: never
            # fail vLLM for it; keep retrying (space may be freed) and say what to fix.
            self.incidents.failed(
                f"registering the KV cache with {self.settings.url} (check /dev/shm size and "
                "that the cache server shares this pod's /dev/shm)",
                exc,
            )
            self._discard(client)
            return False
        with self._mutex:
            if self._closed.is_set():
                self._discard(client)
                return True
            self._client = client
        self.incidents.succeeded()
        log.info(
            "%s: connected to node server %s (server %s, chunk size %d)",
            self.name,
            self.settings.url,
            info.server_version,
            info.chunk_size,
        )
        return True

    def _reconnect_loop(self) -> None:
        policy = RetryPolicy.fixed(self.settings.reconnect_s)
        for delay in policy.delays():
            if self._closed.wait(delay) or self._try_connect():
                return

    def _discard(self, client: NodeClient | None) -> None:
        if client is None:
            return
        try:
            client.close()
        except NodeClientError as exc:
            log.debug("%s: close after a failed connect: %s", self.name, exc)
