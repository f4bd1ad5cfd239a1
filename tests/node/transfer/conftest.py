"""Shm directories for the transfer tests: private ones, never the node's real directory."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from lmcache_node.transfer.shm import ShmDirectory


@pytest.fixture
def shm_dir(tmp_path: Path) -> Iterator[ShmDirectory]:
    directory = ShmDirectory.prepare(tmp_path / "shm")
    yield directory
    directory.close()


@pytest.fixture
def dev_shm_path() -> Iterator[Path]:
    """A fresh path under /dev/shm (world-traversable, like a node's): for tests whose
    processes of other users must reach the directory itself, not stop at a private parent."""
    path = Path("/dev/shm") / f"lmcache-test-{uuid.uuid4().hex[:12]}"
    yield path
    shutil.rmtree(path, ignore_errors=True)
