"""Namespaced mode on the chart's own Role (no ClusterRole): the operator needs nothing else."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.operator.conftest import REPO, OperatorProcess
from tests.operator.kubectl import Cluster
from tests.operator.test_credentials import check_pair, credentials
from tests.operator.test_vllm_cluster import (
    cache_manifest,
    vllm_manifest,
    wait_cache_ready,
    wait_vllm,
)

pytestmark = pytest.mark.k8s

SERVICE_ACCOUNT = "lmc-lmcache-operator"


def _charts_identity(k8s: Cluster, namespace: str, path: Path) -> None:
    """The chart's ServiceAccount, Role and RoleBinding for watchNamespaces={namespace}, and a
    kubeconfig holding a token of that ServiceAccount."""
    rendered = subprocess.run(
        [
            str(k8s.bin_dir / "helm"), "template", "lmc", str(REPO / "charts" / "lmcache-operator"),
            "--namespace", namespace, "--set", f"watchNamespaces={{{namespace}}}",
            "--show-only", "templates/rbac.yaml", "--show-only", "templates/serviceaccount.yaml",
        ],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(rendered) if d)
    assert kinds == ["Role", "RoleBinding", "ServiceAccount"]  # nothing cluster-scoped
    k8s.kubectl("apply", "-n", namespace, "-f", "-", stdin=rendered)
    token = k8s.kubectl("create", "token", SERVICE_ACCOUNT, "-n", namespace).stdout.strip()
    admin = yaml.safe_load(k8s.kubeconfig.read_text())
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": admin["clusters"][0]["cluster"]}],
                "users": [{"name": "operator", "user": {"token": token}}],
                "contexts": [
                    {
                        "name": "x",
                        "context": {"cluster": "c", "user": "operator", "namespace": namespace},
                    }
                ],
                "current-context": "x",
            }
        )
    )


def test_namespaced_mode_works_on_the_charts_role_alone_and_never_reads_secrets(
    k8s_cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    kubeconfig = tmp_path / "operator.kubeconfig"
    _charts_identity(k8s_cluster, namespace, kubeconfig)
    operator = OperatorProcess(k8s_cluster, namespace, tmp_path, kubeconfig=kubeconfig)
    operator.start()
    try:
        k8s_cluster.apply(cache_manifest(port=7320), namespace)
        wait_cache_ready(k8s_cluster, namespace)
        k8s_cluster.apply(vllm_manifest(replicas=1), namespace)
        wait_vllm(k8s_cluster, namespace, "Ready", lambda s: s.get("readyReplicas") == 1)
        server_public, _ = check_pair(k8s_cluster, namespace)
        assert credentials(k8s_cluster, namespace)["serverKey"]["publicKey"] == server_public
    finally:
        operator.stop()
    log = operator.logs()
    assert " 403" not in log and "forbidden" not in log.lower(), log[-3000:]
    requests = operator.api_requests()
    touched = {what.split(" ", 1)[1].split("/")[0] for what in requests}
    assert "nodes" not in touched and "customresourcedefinitions" not in touched, requests
    secret_calls = {what.split(" ", 1)[0] for what in requests if " secrets" in what}
    assert secret_calls == {"POST"}, requests  # created; never a GET, LIST or WATCH
