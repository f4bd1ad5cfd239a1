"""The server's shm directory: refused at start when unsafe, named in the handshake, where
clients' KV segments and the server's staging areas live."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lmcache_node.client import NodeClient
from lmcache_node.server.process import ServerProcess, free_port
from lmcache_node.transfer.shm_pool import POOL_NAME

pytestmark = pytest.mark.integration  # real server processes / subprocesses

CLUSTER_GID = 54323


def serve(shm_dir: Path) -> subprocess.CompletedProcess[str]:
    """``lmcache-node serve`` (``python -m lmcache_node``) with ``shm_dir``."""
    return subprocess.run(
        [sys.executable, "-m", "lmcache_node", "serve", "--host", "127.0.0.1",
         "--port", str(free_port()), "--http-port", str(free_port()),
         "--cpu-buffer-size", "0.01", "--shm-dir", str(shm_dir)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_serve_refuses_a_symlinked_shm_dir(tmp_path: Path) -> None:
    real = tmp_path / "elsewhere"
    real.mkdir(mode=0o700)
    link = tmp_path / "shm"
    link.symlink_to(real)
    done = serve(link)
    assert done.returncode == 1, done.stderr
    assert f"the shm directory {link} is a symbolic link" in done.stderr
    assert "remove it" in done.stderr
    assert os.listdir(real) == []


def test_serve_refuses_a_world_accessible_shm_dir(tmp_path: Path) -> None:
    path = tmp_path / "shm"
    path.mkdir()
    os.chmod(path, 0o1777)
    done = serve(path)
    assert done.returncode == 1, done.stderr
    assert f"the shm directory {path} is accessible to other users" in done.stderr
    assert f"rm -r {path}" in done.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o1777  # left as it was


@pytest.mark.skipif(os.geteuid() != 0, reason="gives the directory another group")
def test_clients_put_their_segments_in_the_directory_the_server_names(tmp_path: Path) -> None:
    shm_dir = tmp_path / "cluster-shm"
    args = ("--chunk-size", "64", "--cpu-buffer-size", "0.01",
            "--shm-dir", str(shm_dir), "--shm-group", str(CLUSTER_GID))  # fmt: skip
    with ServerProcess(*args, log_file=tmp_path / "s.log") as server:
        assert stat.S_IMODE(shm_dir.stat().st_mode) == 0o2770
        assert shm_dir.stat().st_gid == CLUSTER_GID
        with NodeClient(server.endpoint, timeout_s=10) as node:
            assert node.connect().shm_dir == str(shm_dir)
            shared = node.register_kv_caches([torch.ones(8, 2, 16, 16)], block_dim=0, block_size=16)
            engine = node.register_kv_caches(
                [torch.ones(8, 2, 16, 16)], block_dim=0, block_size=16, transfer_mode="engine"
            )
            names = sorted(set(os.listdir(shm_dir)) - {POOL_NAME})  # the L1 pool: 0600, ours
            assert stat.S_IMODE((shm_dir / POOL_NAME).stat().st_mode) == 0o600
            assert len(names) == 2
            assert names[0].startswith("lmcache-node-kv-") and names[0] in shared.exported.shm_names
            assert names[1].startswith("lmcache-node-staging-")
            for name in names:
                info = (shm_dir / name).stat()
                assert stat.S_IMODE(info.st_mode) == 0o660 and info.st_gid == CLUSTER_GID
            key = os.urandom(16)
            assert node.store(shared, [key], [0, 1, 2, 3]) == 1
            assert node.retrieve(engine, [key], [4, 5, 6, 7]) == 1
            node.unregister(engine)
            node.unregister(shared)
            assert os.listdir(shm_dir) == [POOL_NAME]  # kept for the next server
