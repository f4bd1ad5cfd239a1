"""The server object in this process: readiness order, injected registry, stop()."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from lmcache_node.client import NodeClient
from lmcache_node.config import load_config
from lmcache_node.httpapi import HttpApi
from lmcache_node.server.node_server import NodeServer
from lmcache_node.server.process import free_port
from prometheus_client import CollectorRegistry

pytestmark = pytest.mark.integration  # real server processes / subprocesses


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_readyz_is_503_until_started_and_while_stopping() -> None:
    config = load_config(
        {"host": "127.0.0.1", "port": free_port(), "max_local_cpu_size": 0.01}, environ={}
    )
    registry = CollectorRegistry()
    server = NodeServer(config, registry=registry)
    http = HttpApi(server, "127.0.0.1", 0)
    http.start()
    base = f"http://127.0.0.1:{http.port}"
    try:
        assert get(base + "/healthz")[0] == 200
        status, body = get(base + "/readyz")
        assert status == 503 and json.loads(body)["status"] == "starting"
        assert get(base + "/stats")[0] == 503
        server.start()
        assert get(base + "/readyz")[0] == 200
        with NodeClient(server.endpoint, timeout_s=10) as client:
            client.connect()
            client.lookup([b"k" * 16])
        value = registry.get_sample_value(
            "lmcache_node_requests_total", {"op": "lookup", "outcome": "ok"}
        )
        assert value == 1.0  # the injected registry holds the server's metrics
        assert registry.get_sample_value("lmcache_node_l1_capacity_bytes") == 10 * 1024**2
        server.request_stop()
        assert get(base + "/readyz")[0] == 503
        assert server.wait(30)
    finally:
        server.stop()
        http.stop()


def test_stop_without_start_returns() -> None:
    config = load_config({"port": free_port(), "max_local_cpu_size": 0.01}, environ={})
    server = NodeServer(config)
    server.stop()
    assert server.wait(0)
