"""A real node server process on loopback, shared by the client tests of a module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from lmcache_node.client import NodeClient
from lmcache_node.server.process import ServerProcess

CHUNK = 64  # tokens per chunk in these tests (4 blocks of 16)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    proc = ServerProcess(
        "--chunk-size", str(CHUNK), "--cpu-buffer-size", "0.25", "--l1-page-size", "4096",
        "--max-workers", "2", log_file=log,
    )  # fmt: skip
    with proc:
        yield proc


@pytest.fixture
def client(server: ServerProcess) -> Iterator[NodeClient]:
    node = NodeClient(server.endpoint, timeout_s=10.0, expected_chunk_size=CHUNK)
    node.connect()
    node.clear()
    yield node
    node.close()


@pytest.fixture
def server_log(server: ServerProcess) -> Path:
    assert server.log_file is not None
    return server.log_file
