"""The router's discovery against a real API server, with the RBAC the operator gives it.

EndpointSlices are written by hand (a Service without selector, as the EndpointSlice API
allows), so node names and readiness are exactly what each step needs; the router's
``KubeDiscovery`` runs with a token of the ServiceAccount that ``builders/router.py`` makes,
bound to its Role, and must see every change through its watch.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from lmcache_node.router.discovery import KubeDiscovery, Replica
from lmcache_operator.builders import router

from tests.operator.kubectl import Cluster
from tests.support import wait_until

pytestmark = [pytest.mark.k8s, pytest.mark.slow]


def endpoint_slice(name: str, service: str, port: tuple[str, int],
                   endpoints: list[tuple[str, str, bool]]) -> dict[str, Any]:  # fmt: skip
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": port[0], "port": port[1], "protocol": "TCP"}],
        "endpoints": [
            {"addresses": [address], "nodeName": node, "conditions": {"ready": ready},
             "targetRef": {"kind": "Pod", "name": f"pod-{address.replace('.', '-')}"}}
            for address, node, ready in endpoints
        ],
    }  # fmt: skip


def service(name: str, port: tuple[str, int]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"ports": [{"name": port[0], "port": port[1], "protocol": "TCP"}]},
    }


def apply(cluster: Cluster, namespace: str, *objects: dict[str, Any]) -> None:
    manifest = yaml.safe_dump_all(objects)
    cluster.apply(manifest, namespace)


def service_account_kubeconfig(cluster: Cluster, namespace: str, account: str) -> dict[str, Any]:
    """The admin kubeconfig's server and CA, with a token of ``account`` instead."""
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    server = admin["clusters"][0]["cluster"]
    token = cluster.kubectl("create", "token", account, "-n", namespace).stdout.strip()
    ca = server.get("certificate-authority-data")
    if ca is None:
        ca = base64.b64encode(Path(server["certificate-authority"]).read_bytes()).decode()
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "k", "cluster": {"server": server["server"],
                                               "certificate-authority-data": ca}}],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "k", "context": {"cluster": "k", "user": "sa"}}],
        "current-context": "k",
    }  # fmt: skip


class DiscoveryThread:
    """``KubeDiscovery`` on a loop of its own; ``latest`` is its last report."""

    def __init__(self, **options: Any) -> None:
        self.latest: list[Replica] | None = None
        self.reports = 0
        self.loop = asyncio.new_event_loop()
        self.discovery = KubeDiscovery(on_change=self._changed, **options)
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def _changed(self, replicas: list[Replica]) -> None:
        self.latest = replicas
        self.reports += 1

    def _run(self) -> None:
        task = self.loop.create_task(self.discovery.run())
        with contextlib.suppress(asyncio.CancelledError):
            self.loop.run_until_complete(task)

    def __enter__(self) -> DiscoveryThread:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        def cancel() -> None:
            self.discovery.stop()
            for task in asyncio.all_tasks(self.loop):
                task.cancel()

        self.loop.call_soon_threadsafe(cancel)
        self._thread.join(30)


@pytest.fixture
def rbac(k8s_cluster: Cluster, namespace: str) -> Iterator[dict[str, Any]]:
    accounts = (
        router.build_service_account("llm", namespace),
        router.build_role("llm", namespace),
        router.build_role_binding("llm", namespace),
    )
    apply(k8s_cluster, namespace, *accounts)
    yield service_account_kubeconfig(k8s_cluster, namespace, "llm-router")


def test_replicas_and_their_node_servers_follow_the_endpoint_slices(
    k8s_cluster: Cluster, namespace: str, rbac: dict[str, Any]
) -> None:
    apply(
        k8s_cluster, namespace,
        service("llm", ("http", 8000)), service("c-cache", ("zmq", 6000)),
        endpoint_slice("llm-a", "llm", ("http", 8000),
                       [("10.1.0.1", "gpu-0", True), ("10.1.0.2", "gpu-1", True),
                        ("10.1.0.3", "gpu-1", False)]),
        endpoint_slice("c-cache-a", "c-cache", ("zmq", 6000), [("10.0.0.1", "gpu-0", True)]),
    )  # fmt: skip
    with DiscoveryThread(namespace=namespace, service="llm", cache_service="c-cache",
                         kubeconfig=rbac) as found:  # fmt: skip
        expected = [
            Replica("pod-10-1-0-1", "http://10.1.0.1:8000", "gpu-0", "tcp://10.0.0.1:6000"),
            Replica("pod-10-1-0-2", "http://10.1.0.2:8000", "gpu-1", ""),  # no cache there yet
        ]
        wait_until(lambda: found.latest == expected, 60, "the first list")

        # a cache pod comes up on gpu-1; the unready replica turns ready
        apply(k8s_cluster, namespace,
              endpoint_slice("c-cache-b", "c-cache", ("zmq", 6000), [("10.0.0.2", "gpu-1", True)]),
              endpoint_slice("llm-a", "llm", ("http", 8000),
                             [("10.1.0.1", "gpu-0", True), ("10.1.0.2", "gpu-1", True),
                              ("10.1.0.3", "gpu-1", True)]))  # fmt: skip
        wait_until(
            lambda: (
                found.latest is not None
                and [(r.url, r.cache) for r in found.latest]
                == [
                    ("http://10.1.0.1:8000", "tcp://10.0.0.1:6000"),
                    ("http://10.1.0.2:8000", "tcp://10.0.0.2:6000"),
                    ("http://10.1.0.3:8000", "tcp://10.0.0.2:6000"),
                ]
            ),
            60,
            "the watch to see both changes",
        )

        k8s_cluster.kubectl("delete", "endpointslice", "llm-a", "-n", namespace)
        wait_until(lambda: found.latest == [], 60, "the deleted slice")


def test_the_routers_account_reads_endpoint_slices_and_nothing_else(
    k8s_cluster: Cluster, namespace: str, rbac: dict[str, Any]
) -> None:
    who = f"system:serviceaccount:{namespace}:llm-router"

    def can(verb: str, resource: str) -> bool:
        result = k8s_cluster.kubectl("auth", "can-i", verb, resource, "-n", namespace,
                                     "--as", who, check=False)  # fmt: skip
        return result.stdout.strip() == "yes"

    assert all(can(v, "endpointslices.discovery.k8s.io") for v in ("get", "list", "watch"))
    for verb, resource in (("list", "pods"), ("get", "secrets"), ("create", "endpointslices"),
                           ("list", "services"), ("list", "endpointslices -A")):  # fmt: skip
        assert not can(verb, resource), (verb, resource)


def test_pods_chosen_by_a_label_selector(k8s_cluster: Cluster, namespace: str) -> None:
    """vLLM deployed by someone else: ready pods matching the selector, on kwok nodes."""
    pods = [
        {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"foreign-{i}", "labels": {"app": "their-vllm"}},
            "spec": {"nodeName": f"gpu-{i}", "containers": [{"name": "v", "image": "vllm"}],
                     "tolerations": [{"operator": "Exists"}]},
        }
        for i in range(2)
    ]  # fmt: skip
    apply(k8s_cluster, namespace, *pods)
    admin = yaml.safe_load(k8s_cluster.kubeconfig.read_text())
    with DiscoveryThread(namespace=namespace, pod_selector="app=their-vllm", replica_port=9000,
                         kubeconfig=admin) as found:  # fmt: skip
        wait_until(
            lambda: (
                found.latest is not None
                and [(r.name, r.node) for r in found.latest]
                == [("foreign-0", "gpu-0"), ("foreign-1", "gpu-1")]
            ),
            90,
            "both pods ready",
        )
        assert found.latest is not None
        assert all(r.url.endswith(":9000") and r.cache == "" for r in found.latest)
        k8s_cluster.kubectl("delete", "pod", "foreign-0", "-n", namespace, "--wait=false")
        wait_until(
            lambda: found.latest is not None and [r.name for r in found.latest] == ["foreign-1"],
            60,
            "the deleted pod",
        )
