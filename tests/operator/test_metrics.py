"""The operator's metrics: names the dashboard uses exist; the HTTP endpoint serves them."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from pathlib import Path

from lmcache_node.server.process import free_port
from lmcache_operator.metrics import OperatorMetrics
from lmcache_operator.serving import serve
from prometheus_client import generate_latest

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "charts" / "lmcache-operator" / "files" / "dashboards" / "lmcache-node.json"


def _exported() -> set[str]:
    metrics = OperatorMetrics()
    metrics.reconciles.labels(kind="K", result="success").inc()
    metrics.reconcile_seconds.labels(kind="K").observe(0.1)
    metrics.queue_depth.labels(queue="q").set(1)
    metrics.watch_restarts.labels(kind="Pod").inc()
    metrics.api_error(500, "GET pods")
    metrics.children_repaired.labels(kind="ConfigMap").inc()
    text = generate_latest(metrics.registry).decode()
    return set(re.findall(r"^(lmcache_operator_\w+)", text, re.MULTILINE))


def test_dashboard_operator_row_uses_exported_metrics() -> None:
    text = DASHBOARD.read_text()
    dashboard = json.loads(text)
    assert "Operator" in [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    used = set(re.findall(r"lmcache_operator_\w+", text))
    assert {"lmcache_operator_reconciles_total", "lmcache_operator_is_leader"} <= used
    assert used - _exported() == set()


def test_health_and_metrics_are_served() -> None:
    metrics = OperatorMetrics()
    port = free_port()

    async def scrape() -> tuple[dict[str, object], str]:
        runner = await serve(f"http://127.0.0.1:{port}/healthz", metrics)
        try:
            metrics.set_leader(True)
            metrics.api_error(403, "PATCH daemonsets")

            def get(path: str) -> str:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                    return str(r.read().decode())

            health = await asyncio.to_thread(get, "/healthz")
            page = await asyncio.to_thread(get, "/metrics")
            return json.loads(health), page
        finally:
            await runner.cleanup()

    health, page = asyncio.run(scrape())
    assert health == {"ok": True, "leader": True}
    assert "lmcache_operator_is_leader 1.0" in page
    assert 'lmcache_operator_api_errors_total{code="403"} 1.0' in page
