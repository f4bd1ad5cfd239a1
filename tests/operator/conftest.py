"""Fixtures for operator tests on a real Kubernetes API server (../shared/k8s/up.sh)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from lmcache_node.server.process import free_port

from tests.operator.kubectl import Cluster
from tests.support import wait_until

REPO = Path(__file__).resolve().parents[2]
K8S_DIR = Path(os.environ.get("LMCACHE_K8S_DIR", REPO.parent / "shared" / "k8s"))
OPERATOR = Path(sys.executable).parent / "lmcache-operator"


def _missing_cluster(reason: str) -> None:
    message = f"LOCAL KUBERNETES CLUSTER UNAVAILABLE ({reason}): k8s-marked operator tests skipped"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message}; under CI=true this is a failure", pytrace=False)
    pytest.skip(message)


NVIDIA_RUNTIME_CLASS = """
apiVersion: node.k8s.io/v1
kind: RuntimeClass
metadata: {name: nvidia}
handler: nvidia
"""


@pytest.fixture(scope="session")
def k8s_cluster() -> Iterator[Cluster]:
    """One local cluster (2 GPU + 1 CPU kwok nodes) for the session, stopped at the end."""
    up, down, install = (K8S_DIR / n for n in ("up.sh", "down.sh", "install.sh"))
    if not up.is_file():
        _missing_cluster(f"{up} not found")
    directory = Path(tempfile.mkdtemp(prefix="lmcache-op-k8s-"))
    shutil.rmtree(directory)  # up.sh creates it
    bin_dir = Path(
        subprocess.run([str(install)], capture_output=True, text=True, check=True, timeout=300)
        .stdout.strip()
        .splitlines()[-1]
    )
    result = subprocess.run(
        [str(up), "--dir", str(directory), "--gpu-nodes", "2", "--cpu-nodes", "1"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    if result.returncode != 0:
        subprocess.run(
            [str(down), "--dir", str(directory)], capture_output=True, timeout=120, check=False
        )
        _missing_cluster(f"up.sh failed: {result.stderr.strip()[-800:]}")
    cluster = Cluster(
        kubeconfig=Path(result.stdout.strip().splitlines()[-1]),
        bin_dir=bin_dir,
        directory=directory,
    )
    try:
        cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
        # GPU clusters have it (NVIDIA's GPU operator creates it): cache pods serving CUDA
        # run under it, and pods naming a missing RuntimeClass are refused at admission
        cluster.kubectl("apply", "-f", "-", stdin=NVIDIA_RUNTIME_CLASS)
        cluster.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        yield cluster
    finally:
        subprocess.run(
            [str(down), "--dir", str(directory)], capture_output=True, timeout=120, check=False
        )


@pytest.fixture
def namespace(k8s_cluster: Cluster) -> Iterator[str]:
    """A fresh namespace per test (privileged: hostNetwork and hostPath pods)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    k8s_cluster.kubectl("create", "namespace", name)
    k8s_cluster.kubectl("label", "namespace", name, "pod-security.kubernetes.io/enforce=privileged")
    try:
        yield name
    finally:
        k8s_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


class OperatorProcess:
    """`lmcache-operator run` as a subprocess watching one namespace (namespaced mode: no
    Node watch), or every namespace (``namespaced=False``)."""

    def __init__(
        self,
        cluster: Cluster,
        namespace: str,
        log_dir: Path,
        extra_args: tuple[str, ...] = (),
        name: str = "operator",
        *,
        namespaced: bool = True,
        kubeconfig: Path | None = None,
    ) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.log_dir = log_dir
        self.extra_args = extra_args
        self.name = name
        self.namespaced = namespaced
        self.env = {**cluster.env, **({"KUBECONFIG": str(kubeconfig)} if kubeconfig else {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.port = 0

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}-{self.starts}.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metrics(self) -> str:
        """The operator's own /metrics page."""
        with urllib.request.urlopen(f"{self.base_url}/metrics", timeout=5) as response:
            return str(response.read().decode())

    def start(self) -> None:
        assert self.proc is None, "already running"
        self.starts += 1
        self.port = free_port()
        url = f"{self.base_url}/healthz"
        log = self.log_path.open("wb")
        # kwok pods run nothing: their /readyz cannot be read (test_pools.py reads real ones)
        probe = () if "--pool-probe-timeout" in self.extra_args else ("--pool-probe-timeout", "2")
        self.proc = subprocess.Popen(
            [str(OPERATOR), "run", *(["-n", self.namespace] if self.namespaced else []),
             "--liveness", url, "--log-level", "INFO", *probe, *self.extra_args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )  # fmt: skip

        def alive() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"operator exited: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    return bool(response.status == 200)
            except OSError:
                return False

        wait_until(alive, 30, "the operator's liveness endpoint", interval=0.2)

    def stop(self, *, kill: bool = False) -> None:
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.proc = None

    def api_requests(self) -> dict[str, int]:
        """The API requests the controllers and watches made ('GET secrets' -> count), from
        the line the operator logs when it stops (call after stop())."""
        marker = "API requests made by the controllers and watches: "
        lines = [
            line.split(marker, 1)[1]
            for path in sorted(self.log_dir.glob(f"{self.name}-*.log"))
            for line in path.read_text(errors="replace").splitlines()
            if marker in line
        ]
        assert lines, "the operator logged no request counts (did it stop cleanly?)"
        counts: dict[str, int] = {}
        for line in lines:
            for item in [] if line == "none" else line.split(", "):
                what, _, count = item.rpartition(": ")
                counts[what] = counts.get(what, 0) + int(count)
        return counts

    def logs(self) -> str:
        return "\n".join(
            p.read_text(errors="replace")[-3000:]
            for p in sorted(self.log_dir.glob(f"{self.name}-*.log"))
        )


@pytest.fixture
def operator(
    k8s_cluster: Cluster, namespace: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[OperatorProcess]:
    process = OperatorProcess(k8s_cluster, namespace, tmp_path)
    process.start()
    try:
        yield process
    finally:
        process.stop()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(f"--- operator log ---\n{process.logs()}")


@pytest.fixture
def clusterwide_operator(
    k8s_cluster: Cluster, namespace: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[OperatorProcess]:
    """The operator watching every namespace, as with the chart's ClusterRole: it also
    watches Nodes (namespaced mode, Roles only, does not)."""
    process = OperatorProcess(k8s_cluster, namespace, tmp_path, namespaced=False)
    process.start()
    try:
        yield process
    finally:
        process.stop()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(f"--- operator log ---\n{process.logs()}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
