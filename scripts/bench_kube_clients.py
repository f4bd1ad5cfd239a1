"""Which Kubernetes client for the operator's async calls: a measurement, not a guess.

Runs the operator's dominant request pattern (server-side apply of a ConfigMap, a GET, a
JSON merge patch of its labels; N objects, 16 in flight) against a real API server with:
- ``kubernetes_asyncio`` (aiohttp; the official client generated for asyncio), as it comes
  and with its session's ``trust_env`` off (as the operator runs it: no netrc and proxy
  lookups in a worker thread per request),
- the official sync ``kubernetes`` client in a thread pool (``asyncio.to_thread``, 16 threads),
and prints wall time and this process's CPU time for each. Usage:

    python scripts/bench_kube_clients.py --kubeconfig /tmp/k1/admin.kubeconfig [--objects 400]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import kubernetes
import kubernetes_asyncio

NAMESPACE = f"client-bench-{os.getpid()}"  # a fresh one per run (deletion is slow)
CONCURRENCY = 16


def config_map(name: str, round_: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"round": str(round_)}},
        "data": {"config.yaml": "x: 1\n" * 40, "round": str(round_)},
    }


def path(name: str) -> str:
    return f"/api/v1/namespaces/{NAMESPACE}/configmaps/{name}"


async def run_async(
    kubeconfig: str, names: list[str], round_: int, *, trust_env: bool = True
) -> None:
    configuration = kubernetes_asyncio.client.Configuration()
    await kubernetes_asyncio.config.load_kube_config(
        config_file=kubeconfig, client_configuration=configuration
    )
    async with kubernetes_asyncio.client.ApiClient(configuration) as api:
        api.rest_client.pool_manager._trust_env = trust_env  # the operator: False (no proxy)
        limit = asyncio.Semaphore(CONCURRENCY)

        async def call(method: str, name: str, body: Any, content_type: str, query: Any) -> Any:
            response = await api.call_api(
                path(name),
                method,
                query_params=query,
                header_params={"Content-Type": content_type, "Accept": "application/json"},
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
            )
            return json.loads(await response.read())

        async def one(name: str) -> None:
            async with limit:
                await call(
                    "PATCH",
                    name,
                    config_map(name, round_),
                    "application/apply-patch+yaml",
                    [("fieldManager", "bench"), ("force", "true")],
                )
                await call("GET", name, None, "application/json", [])
                await call(
                    "PATCH",
                    name,
                    {"metadata": {"labels": {"merged": str(round_)}}},
                    "application/merge-patch+json",
                    [],
                )

        await asyncio.gather(*(one(n) for n in names))


async def run_threads(kubeconfig: str, names: list[str], round_: int) -> None:
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    configuration.connection_pool_maxsize = CONCURRENCY
    api = kubernetes.client.ApiClient(configuration)
    limit = asyncio.Semaphore(CONCURRENCY)

    def call(method: str, name: str, body: Any, content_type: str, query: Any) -> Any:
        method, url, headers, data, _ = api.param_serialize(
            method,
            path(name),
            query_params=query,
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        response = api.call_api(method, url, header_params=headers, body=data)
        response.read()
        return json.loads(response.data)

    def sequence(name: str) -> None:
        call(
            "PATCH",
            name,
            config_map(name, round_),
            "application/apply-patch+yaml",
            [("fieldManager", "bench"), ("force", "true")],
        )
        call("GET", name, None, "application/json", [])
        call(
            "PATCH",
            name,
            {"metadata": {"labels": {"merged": str(round_)}}},
            "application/merge-patch+json",
            [],
        )

    async def one(name: str) -> None:
        async with limit:
            await asyncio.to_thread(sequence, name)

    try:
        await asyncio.gather(*(one(n) for n in names))
    finally:
        api.close()


def measure(run: Callable[[], Awaitable[None]]) -> tuple[float, float]:
    cpu0, wall0 = time.process_time(), time.perf_counter()
    asyncio.run(run())  # type: ignore[arg-type]
    return time.perf_counter() - wall0, time.process_time() - cpu0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    parser.add_argument("--objects", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    kubernetes.config.load_kube_config(config_file=args.kubeconfig)
    core = kubernetes.client.CoreV1Api()
    try:
        core.create_namespace({"metadata": {"name": NAMESPACE}})
    except kubernetes.client.ApiException as exc:
        if exc.status != 409:
            raise

    async def run_async_no_env(kubeconfig: str, names: list[str], round_: int) -> None:
        await run_async(kubeconfig, names, round_, trust_env=False)

    runners = {
        "kubernetes_asyncio": run_async,
        "kubernetes_asyncio, trust_env off": run_async_no_env,
        "threads": run_threads,
    }
    results: dict[str, list[tuple[float, float]]] = {label: [] for label in runners}
    for round_ in range(args.rounds):
        for label, runner in runners.items():
            slug = "".join(c if c.isalnum() else "-" for c in label).strip("-")
            names = [f"{slug}-{i}" for i in range(args.objects)]

            async def go(r: Any = runner, n: list[str] = names, k: int = round_) -> None:
                await r(args.kubeconfig, n, k)

            results[label].append(measure(go))
    load = os.getloadavg()[0]
    for label, runs in results.items():
        walls = sorted(w for w, _ in runs)
        cpus = sorted(c for _, c in runs)
        wall = walls[len(walls) // 2]
        print(
            f"{label:34s} {args.objects} objects x 3 requests: wall median {wall:.2f} s"
            f" (runs {', '.join(f'{w:.2f}' for w, _ in runs)}), client CPU median "
            f"{cpus[len(cpus) // 2]:.2f} s (runs {', '.join(f'{c:.2f}' for _, c in runs)})"
        )
    print(f"load average (1 min) at the end: {load:.2f}")
    core.delete_namespace(NAMESPACE)


if __name__ == "__main__":
    main()
