"""Real server processes on loopback for the server tests."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from lmcache_node.server.process import ServerProcess


@pytest.fixture(scope="module")
def shm_path() -> Iterator[Path]:
    """The module server's shm directory (it creates it): on tmpfs, as on a node."""
    path = Path("/dev/shm") / f"lmcache-test-{uuid.uuid4().hex[:12]}"
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, shm_path: Path) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    proc = ServerProcess(
        "--chunk-size", "64", "--cpu-buffer-size", "0.05", "--l1-page-size", "4096",
        "--heartbeat-timeout-secs", "1.5", "--max-workers", "2", "--shm-dir", str(shm_path),
        log_file=log,
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
