"""`lmcache-node vllm` starts the real vLLM (CPU) with our connector wired from the environment.

Proof that the connector is loaded and used: vLLM's workers register their KV caches with the
node server, a prompt's chunks are stored, and the same prompt again is a hit with the same
greedy output. Also the MultiConnector the launcher builds for NIXL disaggregation parses as
vLLM's own KVTransferConfig (NIXL itself needs a GPU stack this machine lacks).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.vllm.conftest import NodeServer
from e2e.vllm.harness import VLLMProcess, metric, node_shm_dir, prompt_text, wait_until

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
pytest.importorskip("vllm", reason="vLLM is not installed here: run `make e2e-vllm`")


@pytest.fixture
def node_server(work_dir: Path) -> Iterator[NodeServer]:
    """A node server of its own (the session's deployment has its own instances)."""
    own = work_dir / "launcher"
    (own / "disk").mkdir(parents=True, exist_ok=True)
    server = NodeServer(work_dir=own, disk_dir=own / "disk", shm_dir=node_shm_dir("launcher"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.shm_dir, ignore_errors=True)


def launcher_dry_run(env: dict[str, str]) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-m", "lmcache_node", "vllm", "model-dir", "--port", "1"],
        env={**os.environ, **env, "LMCACHE_LAUNCHER_DRY_RUN": "1"},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    printed: dict[str, object] = json.loads(result.stdout)
    return printed


def test_multiconnector_for_nixl_is_a_valid_vllm_kv_transfer_config() -> None:
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    printed = launcher_dry_run(
        {"ENABLE_LMCACHE": "1", "HOST_IP": "10.0.0.7", "LMCACHE_LAUNCHER_DISAGG": "nixl"}
    )
    argv = printed["argv"]
    assert isinstance(argv, list)
    config = KVTransferConfig(**json.loads(argv[argv.index("--kv-transfer-config") + 1]))
    assert config.kv_connector == "MultiConnector" and config.is_kv_transfer_instance
    children = [KVTransferConfig(**c) for c in config.kv_connector_extra_config["connectors"]]
    assert [c.kv_connector for c in children] == ["NixlConnector", "LMCacheNodeConnector"]
    ours = KVConnectorFactory.get_connector_class(children[1])
    assert ours.__name__ == "LMCacheNodeConnector"
    assert printed["env"] == {"VLLM_NIXL_SIDE_CHANNEL_HOST": "10.0.0.7"}


def test_launcher_starts_vllm_with_the_cache(
    work_dir: Path, tiny_model: Path, node_server: NodeServer
) -> None:
    vllm = VLLMProcess("launcher", tiny_model, work_dir=work_dir, kv_role=None, node_port=0)
    # the harness starts the API server module; start the same arguments through the launcher
    assert vllm.args[1:3] == ["-m", "vllm.entrypoints.openai.api_server"], vllm.args
    vllm.args = [sys.executable, "-m", "lmcache_node", "vllm", *vllm.args[3:]]
    vllm.env.update(
        {
            "ENABLE_LMCACHE": "1",
            "HOST_IP": "127.0.0.1",  # what the downward API gives in a pod
            "LMCACHE_NODE_PORT": str(node_server.port),
            "LMCACHE_CHUNK_SIZE": "256",
            "LMCACHE_MAX_LOCAL_CPU_SIZE": "20",  # a server setting: pointed out, no effect
        }
    )
    vllm.start()
    try:
        vllm.wait_ready()
        wait_until(
            lambda: metric(node_server.http_url, "lmcache_node_registered_workers") >= 1,
            60,
            "vLLM's worker registering its KV caches with the node server",
        )
        prompt = prompt_text(11, 2500)
        cold = vllm.complete(prompt, max_tokens=8)
        stored = "lmcache_node_tokens_total"
        wait_until(
            lambda: metric(node_server.http_url, stored, 'kind="stored"') >= 256,
            60,
            "the prompt's chunks stored through the launcher-wired connector",
        )
        warm = vllm.complete(prompt, max_tokens=8)
        assert metric(node_server.http_url, stored, 'kind="hit"') >= 256
        assert metric(node_server.http_url, stored, 'kind="retrieved"') >= 256
        assert warm.text == cold.text
        log = vllm.log_text()
        assert "lmcache-node vllm: exec " in log and "LMCacheNodeConnector" in log
        assert "tcp://127.0.0.1" in log  # the connector's host came from HOST_IP
        [note] = [line for line in log.splitlines() if "not read in this pod" in line]
        assert "LMCACHE_MAX_LOCAL_CPU_SIZE" in note and "LMCACHE_NODE_PORT" not in note
    finally:
        vllm.stop()
