"""HTTP API, metrics, dead-client cleanup, graceful shutdown and the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from lmcache_node.client import NodeClient, NodeClientError, NodeUnavailableError, RemoteError
from lmcache_node.server.process import ServerProcess, free_port

from tests.support import continue_process, sample, stop_process, wait_until

pytestmark = pytest.mark.integration  # real server processes / subprocesses


def http(method: str, url: str, body: bytes | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_http_endpoints(server: ServerProcess) -> None:
    assert http("GET", server.http_url + "/healthz")[0] == 200
    status, body = http("GET", server.http_url + "/readyz")
    assert status == 200 and json.loads(body)["status"] == "ready"
    status, body = http("GET", server.http_url + "/config")
    config = json.loads(body)
    assert status == 200 and config["chunk_size"] == 64 and config["heartbeat_timeout_secs"] == 1.5
    status, body = http("GET", server.http_url + "/stats")
    assert status == 200 and "l1" in json.loads(body)["tiers"]
    assert http("PUT", server.http_url + "/loglevel", b"debug")[0] == 200
    assert http("PUT", server.http_url + "/loglevel", b'{"level": "INFO"}')[0] == 200
    status, body = http("PUT", server.http_url + "/loglevel", b"LOUD")
    assert status == 400 and b"DEBUG" in body
    assert http("GET", server.http_url + "/nope")[0] == 404


def test_metrics_and_clear(server: ServerProcess) -> None:
    with NodeClient(server.endpoint, timeout_s=10) as node:
        node.connect()
        tensors = [torch.randn(8, 2, 16, 16, dtype=torch.float16)]
        reg = node.register_kv_caches(tensors, block_dim=0, block_size=16)
        keys = [os.urandom(16) for _ in range(2)]
        assert node.store(reg, keys, list(range(8))) == 2
        assert node.retrieve(reg, keys, list(range(8))) == 2
        node.lookup([*keys, os.urandom(16)])
        text = http("GET", server.http_url + "/metrics")[1].decode()
        chunk_bytes = 4 * 2 * 16 * 16 * 2  # 4 blocks of [2, 16, 16] float16 per chunk
        assert sample(text, "lmcache_node_requests_total", op="store", outcome="ok") == 1
        assert sample(text, "lmcache_node_tokens_total", kind="stored") == 2 * 64
        assert sample(text, "lmcache_node_tokens_total", kind="retrieved") == 2 * 64
        assert sample(text, "lmcache_node_tokens_total", kind="lookup") == 3 * 64
        assert sample(text, "lmcache_node_tokens_total", kind="hit") == 2 * 64
        assert sample(text, "lmcache_node_bytes_total", op="retrieve", tier="l1") == 2 * chunk_bytes
        assert sample(text, "lmcache_node_l1_entries") == 2
        assert sample(text, "lmcache_node_l1_capacity_bytes") > 0
        assert sample(text, "lmcache_node_registered_workers") == 1
        assert sample(text, "lmcache_node_operation_duration_seconds_count", op="store") == 1
        status, body = http("POST", server.http_url + "/cache/clear")
        assert status == 200 and json.loads(body)["cleared"] >= 2
        assert node.lookup(keys) == (0, None)


CRASHING_CLIENT = textwrap.dedent(
    """
    import os, sys, time, torch
    from lmcache_node.client import NodeClient
    node = NodeClient(sys.argv[1], timeout_s=10, heartbeat_interval_s=60)
    node.connect()
    reg = node.register_kv_caches([torch.zeros(8, 2, 16, 16)], block_dim=0, block_size=16)
    key = os.urandom(16)
    node.store(reg, [key], [0, 1, 2, 3])
    node.lookup([key], lock=True, lock_ttl_s=600)
    print(" ".join(reg.exported.shm_names), flush=True)
    time.sleep(600)
    """
)


def test_dead_client_is_dropped_with_its_shm_and_locks(
    server: ServerProcess, shm_path: Path
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHING_CLIENT, server.endpoint], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        names = proc.stdout.readline().split()
        assert names and all((shm_path / n).exists() for n in names)
        with NodeClient(server.endpoint, timeout_s=10) as node:
            node.connect()
            assert node.stats()["active_locks"] == 1
            proc.kill()
            proc.wait()
            wait_until(
                lambda: (s := node.stats())["registered_workers"] == 0 and s["active_locks"] == 0,
                20,
                "the dead client's registration and lock to be dropped",
            )
        assert not any((shm_path / n).exists() for n in names)
    finally:
        proc.kill()
        proc.wait()


def test_idle_client_keeps_its_session_with_heartbeats(server: ServerProcess) -> None:
    with NodeClient(server.endpoint, timeout_s=10, heartbeat_interval_s=0.3) as node:
        node.connect()
        node.register_kv_caches([torch.zeros(8, 2, 16, 16)], block_dim=0, block_size=16)
        time.sleep(3.0)  # time must pass: twice the heartbeat timeout, and nothing happens
        stats = node.stats()
        assert stats["registered_workers"] >= 1


def test_sigterm_finishes_in_flight_requests_and_exits_zero(tmp_path: Path, shm_path: Path) -> None:
    proc = ServerProcess(
        "--chunk-size", "256", "--cpu-buffer-size", "1", "--shm-dir", str(shm_path),
        log_file=tmp_path / "s.log",
    ).start()  # fmt: skip
    node = NodeClient(proc.endpoint, timeout_s=30, expected_chunk_size=256)
    try:
        node.connect()
        tensors = [torch.randn(64, 8, 128, 256, dtype=torch.float16) for _ in range(4)]
        reg = node.register_kv_caches(tensors, block_dim=0, block_size=128, transfer_mode="engine")
        staging = [n for n in os.listdir(shm_path) if n.startswith("lmcache-node-staging")]
        assert staging
        keys = [os.urandom(16) for _ in range(8)]
        result: list[object] = []

        def store() -> None:
            try:
                result.append(node.store(reg, keys, list(range(16))))
            except NodeClientError as exc:
                result.append(exc)

        thread = threading.Thread(target=store)
        thread.start()
        time.sleep(0.05)  # a head start, racing the signal: both outcomes are checked below
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGTERM)
        thread.join(timeout=60)
        assert proc.proc.wait(timeout=60) == 0
        # In flight when the signal came: finished (8 chunks). Sent during the shutdown: the
        # typed refusal. Sent after the socket closed: the client's "unavailable". Never a
        # hang (a timeout), a partial store or another error.
        (outcome,) = result
        refused = isinstance(outcome, RemoteError) and outcome.code == "shutting_down"
        gone = type(outcome) is NodeUnavailableError
        assert outcome == 8 or refused or gone, f"not one of the clean outcomes: {outcome!r}"
        log = proc.log_tail(20000)
        assert "server stopped" in log
        assert "received SIGTERM" in log
        left = [n for n in os.listdir(shm_path) if n.startswith("lmcache-node-staging")]
        assert not set(left) & set(staging)
    finally:
        node.close()
        proc.kill()


def test_busy_port_and_bad_config_exit_with_clear_errors(
    server: ServerProcess, tmp_path: Path
) -> None:
    command = [sys.executable, "-m", "lmcache_node.server", "--host", "127.0.0.1"]
    busy = subprocess.run(
        [*command, "--port", str(server.port), "--http-port", str(free_port())],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert busy.returncode == 1
    assert "--port" in busy.stderr
    bad = subprocess.run(
        [*command, "--max-workers", "zero"], capture_output=True, text=True, timeout=60, check=False
    )
    assert bad.returncode == 2
    assert "max_workers" in bad.stderr
    config = tmp_path / "c.yaml"
    config.write_text("chunk_size: 128\nbogus_key: 1\n")
    bad_file = subprocess.run(
        [*command, "--config", str(config)], capture_output=True, text=True, timeout=60, check=False
    )
    assert bad_file.returncode == 2
    assert "bogus_key" in bad_file.stderr


def test_cli_flags_map_to_config_keys() -> None:
    import argparse

    from lmcache_node.serve import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--cpu-buffer-size", "2", "--max_workers", "3", "--chunk-size", "512", "--use-mla",
         "--kvcache-shape-spec", "(2,1,256,1,576):bfloat16:2",
         "--extra-config", "{use_odirect: true}", "--save-unfull-chunk", "false"]
    )  # fmt: skip
    config = config_from_args(args)
    assert config.max_local_cpu_size == 2.0
    assert config.max_workers == 3
    assert config.chunk_size == 512
    assert config.use_mla is True
    assert config.save_unfull_chunk is False
    assert config.extra_config == {"use_odirect": True}


@pytest.mark.parametrize("flag", ["--port", "--http-port", "--device", "--host", "--config"])
def test_lmcache_server_flags_exist(flag: str) -> None:
    import argparse

    from lmcache_node.serve import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert flag in parser.format_help()


STALLING_CLIENT = textwrap.dedent(
    """
    import os, sys, torch
    from lmcache_node.client import NodeClient
    node = NodeClient(sys.argv[1], timeout_s=10, heartbeat_interval_s=0.3)
    node.connect()
    reg = node.register_kv_caches([torch.zeros(8, 2, 16, 16)], block_dim=0, block_size=16)
    print(" ".join(reg.exported.shm_names), flush=True)
    sys.stdin.readline()
    key = os.urandom(16)
    print("ok", node.store(reg, [key], [0, 1, 2, 3]), node.retrieve(reg, [key], [4, 5, 6, 7]),
          flush=True)
    node.close()
    """
)


def test_stalled_client_keeps_its_memory_and_comes_back(
    server: ServerProcess, shm_path: Path
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", STALLING_CLIENT, server.endpoint],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    try:
        names = proc.stdout.readline().split()
        assert names
        stop_process(proc.pid)
        with NodeClient(server.endpoint, timeout_s=10) as node:
            node.connect()
            wait_until(
                lambda: node.stats()["registered_workers"] == 0,
                20,
                "the stalled client's registration to be dropped after the heartbeat timeout",
            )
        assert all((shm_path / n).exists() for n in names)  # but it is alive: memory kept
        continue_process(proc.pid)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().split() == ["ok", "1", "1"]
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            continue_process(proc.pid)
        proc.kill()
        proc.wait()


def test_free_port_never_hands_out_a_port_twice() -> None:
    """The kernel repeats ports across binds to port 0 (about 150 repeats in 2,000 here);
    two processes given one port would share it (vLLM binds with SO_REUSEPORT) and split
    each other's connections, as a CI run of the vLLM e2e once did."""
    ports = [free_port() for _ in range(2000)]
    assert len(set(ports)) == len(ports)


def test_free_port_says_when_every_port_it_draws_was_handed_out() -> None:
    """Bounded, not a spin: when the kernel only offers ports handed out before, it says so."""
    with pytest.raises(RuntimeError, match="ephemeral range is used up"):
        free_port(handed_out=_EveryPort())


class _EveryPort(set[int]):
    def __contains__(self, port: object) -> bool:
        return True
