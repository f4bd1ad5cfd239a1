"""NodeLink's failure handling (a scripted stand-in for NodeClient: pure control flow)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import pytest
from lmcache_node.client import IncompatibleServerError, NodeUnavailableError, RemoteError
from lmcache_node.vllm.link import NodeLink
from lmcache_node.vllm.settings import ConnectorSettings

from tests.support import wait_until


@dataclass
class Info:
    server_version: str = "test"
    chunk_size: int = 256


@dataclass
class ScriptedClient:
    """Fails ``connect`` while ``script.down`` is set; counts closes."""

    script: Script

    def connect(self) -> Info:
        self.script.connects += 1
        if self.script.incompatible:
            raise IncompatibleServerError("incompatible", "keys chunks with 'xxh3_128-chain-v1'")
        if self.script.down:
            raise NodeUnavailableError("nobody listens")
        return Info()

    def lookup(self, keys: list[bytes], **_: Any) -> tuple[int, int | None]:
        if self.script.remote_error:
            raise RemoteError("internal", "boom")
        return len(keys), None

    def close(self) -> None:
        self.script.closed += 1


@dataclass
class Script:
    down: bool = True
    incompatible: bool = False
    connects: int = 0
    remote_error: bool = False
    register_error: BaseException | None = None
    closed: int = 0
    registered: list[object] = field(default_factory=list)


def make_link(script: Script) -> NodeLink:
    def on_connected(client: object) -> None:
        if script.register_error is not None:
            raise script.register_error
        script.registered.append(client)

    return NodeLink(
        ConnectorSettings(reconnect_s=0.05),
        name="test link",
        on_connected=on_connected,
        client_factory=lambda _s, _c: ScriptedClient(script),  # type: ignore[arg-type,return-value]
    )


def lookup(client: Any) -> tuple[int, int | None]:
    result: tuple[int, int | None] = client.lookup([b"k" * 16])
    return result


def test_down_at_start_then_connects_in_background(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lmcache_node.vllm")
    script = Script(down=True)
    link = make_link(script)
    link.start()
    try:
        assert not link.connected
        miss: tuple[int, int | None] = (0, None)
        assert link.call("lookup", lookup, miss) == miss
        assert link.call("lookup", lookup, miss) == miss
        script.down = False
        assert link.wait_connected(10)
        assert link.call("lookup", lookup, miss) == (1, None)
        assert len(script.registered) == 1
    finally:
        link.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # one incident, logged once
    assert any("reachable again" in r.getMessage() for r in caplog.records)


def test_registration_error_never_reaches_vllm(caplog: pytest.LogCaptureFixture) -> None:
    script = Script(down=False, register_error=OSError(28, "No space left on device"))
    link = make_link(script)
    link.start()  # must not raise
    try:
        assert not link.connected
        assert script.closed >= 1  # the half-made client was closed
        assert any("/dev/shm" in r.getMessage() for r in caplog.records)
        script.register_error = None
        assert link.wait_connected(10)
    finally:
        link.close()


def test_remote_error_gives_the_fallback() -> None:
    script = Script(down=False, remote_error=True)
    link = make_link(script)
    link.start()
    try:
        assert link.connected
        assert link.call("lookup", lookup, (0, None)) == (0, None)
        script.remote_error = False
        assert link.call("lookup", lookup, (0, None)) == (1, None)
    finally:
        link.close()


def test_incompatible_server_is_an_error_once_while_it_lasts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="lmcache_node.vllm")
    script = Script(down=False, incompatible=True)
    link = make_link(script)
    link.start()
    try:
        # it keeps retrying: the server may be upgraded
        wait_until(lambda: script.connects >= 4, 30, "four connect attempts")
        assert not link.connected
        script.incompatible = False
        assert link.wait_connected(10)
    finally:
        link.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, errors
    assert "keys chunks with 'xxh3_128-chain-v1'" in errors[0]
