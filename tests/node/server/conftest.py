"""Real server processes on loopback for the server tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import zmq
from lmcache_node.server.process import ServerProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    proc = ServerProcess(
        "--chunk-size", "64", "--cpu-buffer-size", "0.05", "--l1-page-size", "4096",
        "--heartbeat-timeout-secs", "1.5", "--max-workers", "2", log_file=log,
    )  # fmt: skip
    with proc:
        yield proc


@pytest.fixture
def dealer(server: ServerProcess) -> Iterator[zmq.Socket]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(server.endpoint)
    yield sock
    sock.close(0)
