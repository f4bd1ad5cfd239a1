"""kill -9 a process that is writing chunks, many times at random points, then restart.

No corrupt chunk may ever be returned, the cap must hold and the index must rebuild.
"""

import functools
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from lmcache_node.keys import ChunkKey
from lmcache_node.tiers.disk import DiskTier

from tests.node.tiers.conftest import make_keys, payload_for
from tests.support import wait_until

CAP = 24 * 1024**2
KEYS = 64
ROUNDS = 8


def size_of(key: bytes) -> int:
    """Sizes from 1 byte to 6 MiB, fixed per key so any process can check the bytes."""
    return 1 + int.from_bytes(key[8:12], "little") % (6 * 1024**2)


# A zygote imports everything once, then forks one writer per round (fast restarts). It
# runs no torch op before forking, so the children do not inherit thread pools.
ZYGOTE = textwrap.dedent(
    """
    import os, random, sys
    from lmcache_node.tiers.disk import DiskTier
    from lmcache_node.tiers.workers import Priority
    from tests.node.tiers.conftest import make_keys, payload_for
    from tests.node.tiers.test_crash import CAP, KEYS, size_of

    def write_forever(root, odirect, seed):
        tier = DiskTier(root, CAP, workers=2, use_odirect=odirect)
        keys = make_keys(KEYS, "crash")
        rng = random.Random(seed)
        first = True
        while True:
            key = rng.choice(keys)
            data = payload_for(key, size_of(key))
            tier.pool.submit(Priority.PUT, lambda k=key, d=data: tier.store_from(k, [d], d.numel()))
            tier.store_from(key, [data], data.numel())
            if rng.random() < 0.1:
                tier.remove(rng.choice(keys))
            if first:
                print("ready", os.getpid(), flush=True)
                first = False

    for line in sys.stdin:
        root, odirect, seed = line.split()
        while True:
            try:
                if os.waitpid(-1, os.WNOHANG) == (0, 0):
                    break
            except ChildProcessError:
                break
        if os.fork() == 0:
            try:
                write_forever(root, odirect == "1", int(seed))
            finally:
                os._exit(1)
    """
)

pytestmark = pytest.mark.integration  # real server processes / subprocesses


def chunk_bytes_on_disk(root: Path) -> int:
    return sum(p.stat().st_size for p in root.glob("*/*.lmc"))


def _dead(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


@pytest.mark.slow
@pytest.mark.parametrize("odirect", [False, True])
def test_kill_nine_while_writing_never_yields_corrupt_chunks(tmp_path: Path, odirect: bool) -> None:
    root = tmp_path / "disk"
    repo = Path(__file__).resolve().parents[3]
    rng = random.Random(1234 + odirect)
    keys = make_keys(KEYS, "crash")
    temp_files_left = 0
    verified = 0
    zygote = subprocess.Popen(
        [sys.executable, "-c", ZYGOTE],
        cwd=repo,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert zygote.stdin is not None and zygote.stdout is not None
    try:
        for round_ in range(ROUNDS):
            zygote.stdin.write(f"{root} {int(odirect)} {round_}\n")
            zygote.stdin.flush()
            ready, pid_text = zygote.stdout.readline().split()
            assert ready == "ready"
            pid = int(pid_text)
            if round_ % 2:  # a random point in the write stream
                time.sleep(rng.random() * 0.5)
            else:  # right while a chunk file is being written
                wait_until(
                    lambda: list(root.glob("*/*.tmp")), 10, "a chunk file being written",
                    interval=0.001,
                )  # fmt: skip
            os.kill(pid, signal.SIGKILL)
            wait_until(functools.partial(_dead, pid), 30, "the killed writer to die", interval=0.01)
            temp_files_left += len(list(root.glob("*/*.tmp")))
            verified += check_restart(root, keys)
    finally:
        zygote.stdin.close()
        zygote.kill()
        zygote.wait(timeout=30)
    final = DiskTier(root, CAP)
    assert final.stats().entries > 0  # the writers did get chunks down between kills
    assert final.stats().corrupt == 0
    final.close()
    assert temp_files_left > 0, "no kill landed mid-write"
    assert verified > 0, "no chunk written before a kill was read back"


def check_restart(root: Path, keys: list[ChunkKey]) -> int:
    """Restart on ``root``; every chunk read back must be exact. Returns how many were."""
    tier = DiskTier(root, CAP)  # restart: rebuild the index
    exact = 0
    try:
        assert not list(root.glob("*/*.tmp"))
        assert tier.stats().used_bytes <= CAP
        assert chunk_bytes_on_disk(root) <= CAP
        assert set(tier.indexed_keys()) <= set(keys)
        for key in tier.indexed_keys():
            nbytes = size_of(key)
            out = torch.zeros(nbytes, dtype=torch.uint8)
            if tier.load_into(key, [out], nbytes):
                assert torch.equal(out, payload_for(key, nbytes)), "corrupt chunk returned"
                exact += 1
    finally:
        tier.close()
    return exact
