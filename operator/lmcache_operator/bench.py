# Long on purpose: one benchmark run end to end (cluster, operator, workloads, the JSON
# report) that `make bench-operator` runs as a whole; nothing else imports it.
"""Operator benchmark on a local cluster (``make bench-operator``); JSON on the last line.

Method (the one used for LMCache's Go operator in notes/operators.md): the operator runs out
of cluster as a subprocess; each time is measured from the start of ``kubectl apply`` to the
event seen on a watch stream; one CR is timed 5 times (median); then 200 CRs (20 namespaces
x 10) are applied with one ``kubectl apply`` and watched until every status is Ready.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import yaml

from lmcache_operator.api.common import API_VERSION
from lmcache_operator.kube import KubeClient

BENCH_LABEL = "lmcache.dev/bench"
LAST_APPLY_SECONDS: list[float] = []  # how long each `kubectl apply` ran (the floor)
# LMCache's Go operator on this machine (notes/operators.md, "Measured here"): best of its runs.
GO_OPERATOR = {
    "apply_to_daemonset_s": 0.13,
    "apply_to_daemonset_ready_s": 0.21,
    "apply_to_ready_s": 0.25,
    "spec_change_to_daemonset_rolled_s": 0.16,
    "clusters_200_daemonsets_s": 15.9,
    "clusters_200_ready_s": 19.6,
    "status_lag_median_s": 6.5,
    "status_lag_worst_s": 9.9,
    "operator_cpu_s_200": 3.9,
    "operator_cpu_s_200_settled": 5.2,
    "operator_rss_mb_200": 78.0,
}


def cluster_doc(name: str, namespace: str, port: int, cpu: str = "4Gi") -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "LMCacheCluster",
        "metadata": {"name": name, "namespace": namespace, "labels": {BENCH_LABEL: "true"}},
        "spec": {
            "image": {"repository": "lmcache.local/node", "tag": "dev", "pullPolicy": "Never"},
            "cache": {"cpuSize": cpu},
            "server": {"port": port, "httpPort": port + 1},
        },
    }


class Watcher:
    """Records the first time each object satisfies a predicate, from a watch stream."""

    def __init__(
        self,
        client: KubeClient,
        api_version: str,
        kind: str,
        predicate: Callable[[dict[str, Any]], bool],
        label_selector: str,
    ) -> None:
        self.client, self.api_version, self.kind = client, api_version, kind
        self.predicate, self.label_selector = predicate, label_selector
        self.first: dict[tuple[str, str], float] = {}
        self._event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        listing = await self.client.list(
            self.api_version, self.kind, label_selector=self.label_selector
        )
        version = listing["metadata"]["resourceVersion"]
        self._task = asyncio.create_task(self._run(version))

    async def _run(self, version: str) -> None:
        while True:
            async for event in self.client.watch(
                self.api_version,
                self.kind,
                resource_version=version,
                label_selector=self.label_selector,
                timeout_s=300,
            ):
                obj = event["object"]
                if event["type"] == "BOOKMARK" or event["type"] == "ERROR":
                    continue
                version = obj["metadata"]["resourceVersion"]
                key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
                if key not in self.first and self.predicate(obj):
                    self.first[key] = time.monotonic()
                    self._event.set()

    async def wait_count(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.first) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.kind}: {len(self.first)} of {count} within {timeout}s")
            self._event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), timeout=min(remaining, 1.0))

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


def ds_ready(obj: dict[str, Any]) -> bool:
    st = obj.get("status", {})
    desired = st.get("desiredNumberScheduled", 0)
    return bool(
        desired > 0
        and st.get("observedGeneration") == obj["metadata"].get("generation")
        and st.get("numberReady") == desired
        and st.get("updatedNumberScheduled") == desired
    )


def ds_ready_at(generation: int) -> Callable[[dict[str, Any]], bool]:
    def check(obj: dict[str, Any]) -> bool:
        return obj["metadata"].get("generation", 0) >= generation and ds_ready(obj)

    return check


def cr_ready(generation: int) -> Callable[[dict[str, Any]], bool]:
    def check(obj: dict[str, Any]) -> bool:
        st = obj.get("status") or {}
        return bool(
            st.get("phase") == "Ready"
            and st.get("observedGeneration", 0) >= generation
            and st.get("readyNodes", 0) >= 1
            and st.get("readyNodes") == st.get("desiredNodes")
        )

    return check


async def kubectl_apply(env: dict[str, str], docs: list[dict[str, Any]]) -> float:
    """Start `kubectl apply`; returns the start time (monotonic)."""
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        "kubectl",
        "apply",
        "-f",
        "-",
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    _, err = await proc.communicate(yaml.safe_dump_all(docs).encode())
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl apply failed: {err.decode()[-500:]}")
    LAST_APPLY_SECONDS.append(time.monotonic() - started)
    return started


DS_SELECTOR = "app.kubernetes.io/managed-by=lmcache-operator"


async def _start_watchers(
    client: KubeClient, selector: str
) -> tuple[Watcher, Watcher, Watcher, Watcher]:
    """DaemonSets seen / ready, and LMCacheClusters ready / seen, all streaming."""
    watchers = (
        Watcher(client, "apps/v1", "DaemonSet", lambda _: True, DS_SELECTOR),
        Watcher(client, "apps/v1", "DaemonSet", ds_ready, DS_SELECTOR),
        Watcher(client, API_VERSION, "LMCacheCluster", cr_ready(1), selector),
        Watcher(client, API_VERSION, "LMCacheCluster", lambda _: True, selector),
    )
    for watcher in watchers:
        await watcher.start()
    return watchers


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


async def bench(env: dict[str, str], operator: psutil.Process, repetitions: int) -> dict[str, Any]:
    client = await KubeClient.connect(env["KUBECONFIG"])
    result: dict[str, Any] = {}
    selector = f"{BENCH_LABEL}=true"
    try:
        # --- one cluster, repeated ---
        to_ds, to_ds_ready, to_ready, change, change_ds = [], [], [], [], []
        created_to_ds: list[float] = []
        created_to_ready: list[float] = []
        ds_selector = DS_SELECTOR
        for rep in range(repetitions):
            ns = f"bench-one-{rep}"
            await client.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
            ds_seen, ds_ok, cr_ok, cr_new = await _start_watchers(client, selector)
            port = 21000 + 10 * rep
            started = await kubectl_apply(env, [cluster_doc("one", ns, port)])
            await cr_ok.wait_count(1, 60)
            await ds_seen.wait_count(1, 60)
            await ds_ok.wait_count(1, 60)
            key = (ns, "one-cache")
            to_ds.append(ds_seen.first[key] - started)
            to_ds_ready.append(ds_ok.first[key] - started)
            to_ready.append(cr_ok.first[(ns, "one")] - started)
            created_at = cr_new.first[(ns, "one")]  # the operator's share starts here
            created_to_ds.append(ds_seen.first[key] - created_at)
            created_to_ready.append(cr_ok.first[(ns, "one")] - created_at)
            rolled = Watcher(client, API_VERSION, "LMCacheCluster", cr_ready(2), selector)
            ds_rolled = Watcher(client, "apps/v1", "DaemonSet", ds_ready_at(2), ds_selector)
            await rolled.start()
            await ds_rolled.start()
            started = await kubectl_apply(env, [cluster_doc("one", ns, port, cpu="6Gi")])
            await rolled.wait_count(1, 60)
            await ds_rolled.wait_count(1, 60)
            change.append(rolled.first[(ns, "one")] - started)
            change_ds.append(ds_rolled.first[key] - started)
            for w in (ds_seen, ds_ok, cr_ok, cr_new, rolled, ds_rolled):
                w.stop()
            await client.delete("v1", "Namespace", None, ns)
        result["apply_to_daemonset_s"] = round(statistics.median(to_ds), 3)
        result["apply_to_daemonset_ready_s"] = round(statistics.median(to_ds_ready), 3)
        result["apply_to_ready_s"] = round(statistics.median(to_ready), 3)
        result["created_to_daemonset_s"] = round(statistics.median(created_to_ds), 3)
        result["created_to_ready_s"] = round(statistics.median(created_to_ready), 3)
        result["spec_change_to_ready_s"] = round(statistics.median(change), 3)
        result["spec_change_to_daemonset_rolled_s"] = round(statistics.median(change_ds), 3)

        # --- 200 clusters: 20 namespaces x 10, one kubectl apply ---
        await asyncio.sleep(3)  # let the single-CR namespaces go
        namespaces = [f"bench-many-{i}" for i in range(20)]
        for ns in namespaces:
            await client.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        docs = [
            cluster_doc(f"c{j}", ns, 30000 + 2 * (10 * i + j))
            for i, ns in enumerate(namespaces)
            for j in range(10)
        ]
        ds_seen, ds_ok, cr_ok, cr_seen = await _start_watchers(client, selector)
        rss_idle = operator.memory_info().rss / 1e6
        cpu_before = cpu_seconds(operator)
        started = await kubectl_apply(env, docs)
        await ds_seen.wait_count(len(docs), 300)
        all_ds = max(ds_seen.first.values()) - started
        await cr_ok.wait_count(len(docs), 300)
        all_ready = max(cr_ok.first.values()) - started
        cpu_ready = cpu_seconds(operator) - cpu_before
        await ds_ok.wait_count(len(docs), 60)
        lags = [
            cr_ok.first[(ns, name)] - ds_ok.first[(ns, f"{name}-cache")]
            for (ns, name) in cr_ok.first
        ]
        # settled: CPU until the operator is idle for 2 s
        settled = cpu_seconds(operator)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            await asyncio.sleep(2)
            now = cpu_seconds(operator)
            if now - settled < 0.02:
                break
            settled = now
        created = sorted(cr_seen.first.values())
        result.update(
            {
                "kubectl_apply_200_s": round(LAST_APPLY_SECONDS[-1], 2),
                "clusters_200_last_created_s": round(created[-1] - started, 2),
                "clusters_200_daemonsets_s": round(all_ds, 2),
                # the operator's own share: kubectl creates the CRs one by one (the floor)
                "clusters_200_ready_after_last_created_s": round(
                    all_ready - (created[-1] - started), 3
                ),
                "clusters_200_ready_s": round(all_ready, 2),
                "status_lag_median_s": round(statistics.median(lags), 3),
                "status_lag_worst_s": round(max(lags), 3),
                "operator_cpu_s_200": round(cpu_ready, 2),
                "operator_cpu_s_200_settled": round(settled - cpu_before, 2),
                "operator_rss_mb_idle": round(rss_idle, 1),
                "operator_rss_mb_200": round(operator.memory_info().rss / 1e6, 1),
            }
        )
        for w in (ds_seen, ds_ok, cr_ok, cr_seen):
            w.stop()
    finally:
        await client.close()
    return result


def _wait_alive(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the operator exited during start-up")
        try:
            with urllib.request.urlopen(url, timeout=1):  # noqa: S310 - our own http:// URL
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError("the operator's liveness endpoint never answered")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--k8s-dir", default=str(Path.cwd().parent / "shared" / "k8s"))
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--crds", default="crds")
    parser.add_argument("--profile", help="run the operator under cProfile, stats to this file")
    args = parser.parse_args(argv)
    k8s = Path(args.k8s_dir)
    if not (k8s / "up.sh").is_file():
        print(f"no local cluster scripts in {k8s}: pass --k8s-dir", file=sys.stderr)
        return 2
    bin_dir = subprocess.run(
        [str(k8s / "install.sh")], capture_output=True, text=True, check=True
    ).stdout.split()[-1]
    load_before = round(os.getloadavg()[0], 2)  # the machine is shared: say how busy it was
    workdir = Path(tempfile.mkdtemp(prefix="lmcache-bench-op-"))
    shutil.rmtree(workdir)
    up = subprocess.run(
        [str(k8s / "up.sh"), "--dir", str(workdir), "--gpu-nodes", "2", "--cpu-nodes", "1"],
        capture_output=True,
        text=True,
        check=False,
    )
    operator_proc: subprocess.Popen[bytes] | None = None
    try:
        if up.returncode != 0:
            print(up.stderr[-2000:], file=sys.stderr)
            return 1
        env = {
            **os.environ,
            "KUBECONFIG": up.stdout.split()[-1],
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        }
        subprocess.run(
            ["kubectl", "apply", "--server-side", "-f", args.crds],
            env=env,
            check=True,
            capture_output=True,
        )
        subprocess.run(
            ["kubectl", "wait", "--for=condition=Established", "crd", "--all"],
            env=env,
            check=True,
            capture_output=True,
        )
        subprocess.run(  # GPU clusters have it: the cache pods serving CUDA run under it
            ["kubectl", "apply", "-f", "-"],
            input=b"apiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata: {name: nvidia}\n"
            b"handler: nvidia\n",
            env=env,
            check=True,
            capture_output=True,
        )
        time.sleep(2)  # the API server's watch cache for the new kind
        url = "http://127.0.0.1:18980/healthz"
        log_path = Path(tempfile.gettempdir()) / "lmcache-bench-operator.log"
        print(f"operator log: {log_path}", file=sys.stderr)
        log = log_path.open("wb")
        profile = [sys.executable, "-m", "cProfile", "-o", args.profile] if args.profile else []
        operator_proc = subprocess.Popen(
            [
                *profile,
                str(Path(sys.executable).parent / "lmcache-operator"),
                "run",
                "--liveness",
                url,
                "--log-level",
                "INFO",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        _wait_alive(url, operator_proc)
        time.sleep(1)
        results = asyncio.run(bench(env, psutil.Process(operator_proc.pid), args.repetitions))
    finally:
        if operator_proc is not None:
            operator_proc.terminate()
            operator_proc.wait(timeout=30)
        subprocess.run(
            [str(k8s / "down.sh"), "--dir", str(workdir)], capture_output=True, check=False
        )
    ratios = {k: round(results[k] / v, 3) for k, v in GO_OPERATOR.items() if k in results}
    output = {
        "benchmark": "operator",
        "load_average_1m": {"before": load_before, "after": round(os.getloadavg()[0], 2)},
        **results,
        "go_operator": GO_OPERATOR,
        "ratio_to_go_operator": ratios,
        "meets_bar": all(r <= 1.0 for r in ratios.values())
        and results["operator_rss_mb_200"] <= 200,
    }
    for key, value in results.items():
        print(f"{key:30s} {value}", file=sys.stderr)
    print(json.dumps(output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
