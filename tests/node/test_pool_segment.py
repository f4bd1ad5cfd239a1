"""The L1 pool as a real segment of an shm directory (tmpfs): adoption, refusals, one
holder at a time, what lies under its name, the sweep, and `lmcache-node pool`."""

from __future__ import annotations

import gc
import json
import os
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from lmcache_node.assembly import build_engine
from lmcache_node.cli import main
from lmcache_node.config import NodeConfig, load_config
from lmcache_node.engine import CacheEngine, StoreOutcome
from lmcache_node.engine.journal import HEADER_BYTES, LAYOUT_VERSION
from lmcache_node.keys import ChunkKey
from lmcache_node.transfer.shm import ShmDirectory
from lmcache_node.transfer.shm_pool import POOL_NAME

PAGE = 64 * 1024
BASE = {"max_local_cpu_size": "1Mi", "l1_page_size": "64Ki", "chunk_size": 16}


def key(i: int) -> ChunkKey:
    return ChunkKey(i.to_bytes(16, "little"))


def payload(i: int) -> torch.Tensor:
    return torch.full((PAGE + 100,), i % 251, dtype=torch.uint8)  # two pages each


def config(**changes: object) -> NodeConfig:
    return load_config({**BASE, **changes}, environ={})


@pytest.fixture
def shm_dir() -> Iterator[ShmDirectory]:
    path = Path("/dev/shm") / f"lmcache-test-pool-{uuid.uuid4().hex[:12]}"
    directory = ShmDirectory.prepare(path)
    yield directory
    directory.close()
    shutil.rmtree(path, ignore_errors=True)


def fill(engine: CacheEngine, count: int = 5) -> None:
    for i in range(count):
        assert engine.put(key(i), payload(i)) is StoreOutcome.RESERVED


def reopen(shm_dir: ShmDirectory, **changes: object) -> CacheEngine:
    """The next engine on ``shm_dir``, once the caller dropped the last one (the pool's lock
    goes with its garbage collection, as with its process)."""
    gc.collect()
    return build_engine(config(**changes), shm_dir)


def test_a_pool_is_created_then_adopted_with_its_chunks(shm_dir: ShmDirectory) -> None:
    first = build_engine(config(), shm_dir)
    assert first.pool_state.origin == "created" and "no pool was left" in first.pool_state.reason
    fill(first)
    info = os.stat(shm_dir.path / POOL_NAME)
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.geteuid()
    del first
    second = reopen(shm_dir)
    assert second.pool_state.origin == "adopted"
    assert second.stats().adopted_entries == 5
    for i in range(5):
        out = torch.empty(PAGE + 100, dtype=torch.uint8)
        assert second.get(key(i), out) and torch.equal(out, payload(i))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"chunk_size": 32}, "chunk size is 16, this server's is 32"),
        ({"l1_page_size": "128Ki"}, "page size (l1_page_size) is 65536"),
        ({"max_local_cpu_size": "2Mi"}, "page count (max_local_cpu_size) is 16"),
    ],
)
def test_another_geometry_starts_empty_and_says_why(
    shm_dir: ShmDirectory, change: dict[str, object], reason: str
) -> None:
    first = build_engine(config(), shm_dir)
    fill(first)
    del first
    second = reopen(shm_dir, **change)
    assert second.pool_state.origin == "created" and reason in second.pool_state.reason
    assert second.stats().entries == 0 and second.lookup([key(0)]).hits == 0
    assert second.put(key(9), payload(9)) is StoreOutcome.RESERVED


def test_an_incompatible_header_starts_empty(shm_dir: ShmDirectory) -> None:
    first = build_engine(config(), shm_dir)
    fill(first)
    del first
    gc.collect()
    path = shm_dir.path / POOL_NAME
    with path.open("r+b") as pool:  # a future layout version
        pool.seek(8)
        pool.write((LAYOUT_VERSION + 1).to_bytes(4, "little"))
    second = build_engine(config(), shm_dir)
    assert second.pool_state.origin == "created"
    assert f"layout version is {LAYOUT_VERSION + 1}" in second.pool_state.reason
    assert second.stats().entries == 0
    assert path.read_bytes()[8:12] == LAYOUT_VERSION.to_bytes(4, "little")


def test_two_engines_never_share_a_pool(shm_dir: ShmDirectory) -> None:
    first = build_engine(config(), shm_dir)
    fill(first)
    second = build_engine(config(), shm_dir)
    assert second.pool_state.origin == "anonymous"
    assert "in use by another live cache server" in second.pool_state.reason
    assert second.stats().entries == 0
    second.put(key(7), payload(7))  # its own memory: the first one's pool is untouched
    del first, second
    third = reopen(shm_dir)
    assert third.stats().adopted_entries == 5 and not third.contains(key(7))


@pytest.mark.parametrize("planted", ["symlink", "fifo", "group-writable", "hard-link"])
def test_whatever_else_lies_under_the_name_is_replaced_never_adopted(
    shm_dir: ShmDirectory, tmp_path: Path, planted: str
) -> None:
    target = tmp_path / "precious"
    target.write_bytes(b"keep me")
    path = shm_dir.path / POOL_NAME
    if planted == "symlink":
        path.symlink_to(target)
    elif planted == "fifo":
        os.mkfifo(path, 0o600)
    else:
        first = build_engine(config(), shm_dir)
        fill(first)
        del first
        gc.collect()
        if planted == "group-writable":
            path.chmod(0o660)
        else:
            os.link(path, shm_dir.path / "another-name")
    engine = build_engine(config(), shm_dir)
    assert engine.pool_state.origin == "created" and engine.stats().entries == 0
    assert path.is_file() and not path.is_symlink()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.stat().st_nlink == 1
    assert target.read_bytes() == b"keep me"


def test_the_sweep_never_removes_a_pool(shm_dir: ShmDirectory) -> None:
    first = build_engine(config(), shm_dir)
    fill(first)
    del first
    gc.collect()  # left by a dead server: unheld, and must stay for the next one
    assert shm_dir.sweep(min_age_s=0) == []
    assert build_engine(config(), shm_dir).stats().adopted_entries == 5


def test_without_persistence_the_pool_is_process_memory(shm_dir: ShmDirectory) -> None:
    first = build_engine(config(), shm_dir)
    fill(first)
    del first
    gc.collect()
    engine = build_engine(config(l1_persistent=False), shm_dir)
    assert engine.pool_state.origin == "anonymous" and not engine.pool_state.persistent
    assert not (shm_dir.path / POOL_NAME).exists()  # the leftover's memory is given back
    assert build_engine(config(max_local_cpu_size=0), shm_dir).pool_state.origin == "disabled"


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def pool_command(capsys: pytest.CaptureFixture[str]) -> Callable[..., Done]:
    """``lmcache-node pool ARGS`` (its real entry point, in this process: a flock held by
    another descriptor of this process conflicts as one of another process would)."""

    def run(*args: str) -> Done:
        code = main(["pool", *args])
        out, err = capsys.readouterr()
        return Done(code, out, err)

    return run


def test_pool_remove_waits_for_the_holder(
    shm_dir: ShmDirectory, pool_command: Callable[..., Done]
) -> None:
    where = str(shm_dir.path)
    engine = build_engine(config(), shm_dir)
    fill(engine)
    shown = json.loads(pool_command("show", "--shm-dir", where).stdout)
    assert shown["held"] is True and shown["entries"] == 5 and shown["chunk_size"] == 16
    busy = pool_command("remove", "--shm-dir", where, "--wait-s", "0.2")
    assert busy.returncode == 1 and "in use by another live cache server" in busy.stderr
    del engine
    gc.collect()
    done = pool_command("remove", "--shm-dir", where)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "shm_dir": where, "pool_removed": True, "segments_removed": 0,
        "directory_removed": True,
    }  # fmt: skip
    assert not shm_dir.path.exists()
    again = pool_command("remove", "--shm-dir", where)
    assert again.returncode == 0 and json.loads(again.stdout)["exists"] is False


def test_pool_remove_refuses_a_file_that_is_not_a_pool(
    shm_dir: ShmDirectory, pool_command: Callable[..., Done]
) -> None:
    path = shm_dir.path / POOL_NAME
    path.write_bytes(b"#!/bin/sh\necho not a pool\n" + bytes(HEADER_BYTES))
    path.chmod(0o600)
    refused = pool_command("remove", "--shm-dir", str(shm_dir.path))
    assert refused.returncode == 2 and "is not an lmcache-node L1 pool" in refused.stderr
    assert path.exists()
    assert pool_command("remove", "--shm-dir", "relative/dir").returncode == 2
