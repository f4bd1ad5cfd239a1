"""A server started from an LMCache config file and LMCACHE_* variables serves, and says what
it ignores."""

from __future__ import annotations

import json
import shutil
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from lmcache_node.server.process import ServerProcess

pytestmark = pytest.mark.integration  # real server processes / subprocesses


def test_server_starts_from_an_lmcache_config_and_logs_what_it_ignores(tmp_path: Path) -> None:
    shm = Path("/dev/shm") / f"lmcache-test-{uuid.uuid4().hex[:12]}"
    config = tmp_path / "lmcache.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "chunk_size": 128,
                "local_cpu": True,
                "max_local_cpu_size": 0.05,
                "use_layerwise": True,  # ignored, warned
                "remote_url": "lm://cache:65432",  # LMCache's backend: no remote tier, warned
                "save_unfull_chunk": False,
                "shm_dir": str(shm),
            }
        ),
        encoding="utf-8",
    )
    proc = ServerProcess(
        "--config", str(config), log_file=tmp_path / "server.log",
        env={"LMCACHE_PD_ROLE": "sender", "LMCACHE_MP_PORT": "1"},  # --port wins over mp_port
    )  # fmt: skip
    try:
        with proc:
            with urllib.request.urlopen(proc.http_url + "/config", timeout=10) as response:
                effective = json.loads(response.read())
            log = proc.log_tail(20000)
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    assert effective["chunk_size"] == 128 and effective["remote_url"] is None
    assert effective["port"] == proc.port
    warnings = [line for line in log.splitlines() if "WARNING" in line and "config: " in line]
    assert len(warnings) == 3, log  # the environment's first, then the file's in its order
    assert "LMCache key 'pd_role' (environment variable LMCACHE_PD_ROLE) is ignored" in warnings[0]
    assert "LMCache key 'remote_url' = 'lm://cache:65432' (from config file" in warnings[1]
    assert "LMCache key 'use_layerwise' (from config file" in warnings[2]
