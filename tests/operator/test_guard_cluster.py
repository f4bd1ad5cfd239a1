"""Guard rails and typed pass-through on a real API server (kwok nodes).

The API server refuses the always-bad host paths (CEL) and misspelt core/v1 fields (typed
schemas, kubectl's strict field validation); the operator refuses what the chart's policy
forbids with ConfigValid=False naming the field and the fix.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from lmcache_operator.api.k8s_types import kubernetes_version
from lmcache_operator.k8s_openapi import extract

from tests.operator.conftest import REPO, OperatorProcess
from tests.operator.kubectl import Cluster
from tests.support import wait_until

pytestmark = pytest.mark.k8s

CLUSTER_DOC = (
    "apiVersion: lmcache.dev/v1alpha1\nkind: LMCacheCluster\nmetadata: {{name: {name}}}\n"
    "spec: {spec}\n"
)
VLLM_DOC = (
    "apiVersion: lmcache.dev/v1alpha1\nkind: VLLMDeployment\nmetadata: {{name: {name}}}\n"
    "spec: {{model: {{name: m}}, cache: {{enabled: false}}, {spec}}}\n"
)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            CLUSTER_DOC.format(name="bad", spec="{placement: {tolerations: [{keys: gpu}]}}"),
            'unknown field "spec.placement.tolerations[0].keys"',
        ),
        (
            CLUSTER_DOC.format(name="bad", spec="{pod: {env: [{name: A, valu: b}]}}"),
            'unknown field "spec.pod.env[0].valu"',
        ),
        (
            CLUSTER_DOC.format(name="bad", spec="{pod: {hostPID: true}}"),
            'unknown field "spec.pod.hostPID"',
        ),
        (
            CLUSTER_DOC.format(name="bad", spec="{cache: {disk: {path: /etc, size: 1Gi}}}"),
            'spec.cache.disk.path: Invalid value: "/etc": must not be / or a system directory',
        ),
        (
            CLUSTER_DOC.format(name="bad", spec="{hostShmPath: /}"),
            'spec.hostShmPath: Invalid value: "/": must not be / or a system directory',
        ),
        (
            CLUSTER_DOC.format(name="bad", spec="{cache: {disk: {path: /mnt/../etc, size: 1Gi}}}"),
            'spec.cache.disk.path: Invalid value: "/mnt/../etc": must be a normalised absolute',
        ),
        (
            CLUSTER_DOC.format(
                name="bad", spec="{pod: {volumes: [{name: h, hostPath: {path: /mnt/../etc}}]}}"
            ),
            'spec.pod.volumes[0].hostPath.path: Invalid value: "/mnt/../etc": must be a '
            "normalised absolute path",
        ),
        (
            CLUSTER_DOC.format(name="bad", spec="{shmGroup: 1879048192}"),
            "reserved for derived groups",
        ),
        (
            VLLM_DOC.format(name="bad", spec="placement: {tolerations: [{keys: a}]}"),
            'unknown field "spec.placement.tolerations[0].keys"',
        ),
        (
            VLLM_DOC.format(name="bad", spec="pod: {containerSecurityContext: {privilegd: true}}"),
            'unknown field "spec.pod.containerSecurityContext.privilegd"',
        ),
    ],
)
def test_api_server_refuses_misspelt_pass_through_and_system_paths(
    k8s_cluster: Cluster, namespace: str, doc: str, message: str
) -> None:
    result = k8s_cluster.apply(doc, namespace, check=False)
    assert result.returncode != 0, result.stdout
    assert message in result.stderr
    kind = "lmcc" if "LMCacheCluster" in doc else "vllmd"
    assert k8s_cluster.get(kind, "bad", namespace) is None


def test_api_server_accepts_typed_pass_through(k8s_cluster: Cluster, namespace: str) -> None:
    cluster_spec = (
        "{placement: {tolerations: [{key: gpu, operator: Exists, effect: NoSchedule}], "
        "affinity: {nodeAffinity: {requiredDuringSchedulingIgnoredDuringExecution: "
        "{nodeSelectorTerms: [{matchExpressions: [{key: zone, operator: In, values: [a]}]}]}}}}, "
        "pod: {env: [{name: A, valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}], "
        "envFrom: [{configMapRef: {name: extra}}], "
        "volumes: [{name: s, emptyDir: {sizeLimit: 1Gi}}, {name: d, hostPath: {path: /mnt/d}}], "
        "volumeMounts: [{name: s, mountPath: /scratch}], "
        "securityContext: {fsGroup: 3000}, "
        "containerSecurityContext: {capabilities: {drop: [NET_RAW]}}}}"
    )
    k8s_cluster.apply(CLUSTER_DOC.format(name="ok", spec=cluster_spec), namespace)
    stored = k8s_cluster.get("lmcc", "ok", namespace)
    assert stored is not None
    assert stored["spec"]["pod"]["volumes"][0]["emptyDir"]["sizeLimit"] == "1Gi"
    vllm_spec = (
        "placement: {topologySpreadConstraints: [{maxSkew: 1, topologyKey: zone, "
        "whenUnsatisfiable: ScheduleAnyway}]}, "
        "pod: {securityContext: {runAsNonRoot: true, runAsUser: 1000}}"
    )
    k8s_cluster.apply(VLLM_DOC.format(name="ok", spec=vllm_spec), namespace)
    assert k8s_cluster.get("vllmd", "ok", namespace) is not None


def _status(k8s: Cluster, namespace: str, name: str) -> dict[str, Any]:
    return ((k8s.get("lmcc", name, namespace) or {}).get("status")) or {}


def _config_valid(st: dict[str, Any]) -> dict[str, Any] | None:
    return next((c for c in st.get("conditions") or [] if c["type"] == "ConfigValid"), None)


PREFIXES_FIX = "chart value allowedHostPathPrefixes"
ADMIN_FIX = "allowPrivilegedPassThrough: true in the chart"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            "{cache: {disk: {path: /opt/cache, size: 1Gi}}}",
            (
                "spec.cache.disk.path: '/opt/cache' is not under an allowed host path prefix",
                PREFIXES_FIX,
            ),
        ),
        (
            "{pod: {containerSecurityContext: {privileged: true}}}",
            (
                "spec.pod.containerSecurityContext.privileged: privileged containers are refused",
                ADMIN_FIX,
            ),
        ),
        (
            "{pod: {containerSecurityContext: {capabilities: {add: [SYS_ADMIN]}}}}",
            (
                "spec.pod.containerSecurityContext.capabilities.add: adding ['SYS_ADMIN']",
                ADMIN_FIX,
            ),
        ),
        (
            "{pod: {volumes: [{name: root, hostPath: {path: /}}]}}",
            (
                "spec.pod.volumes[0].hostPath.path: '/' must not be / or a system directory",
                ADMIN_FIX,
            ),
        ),
    ],
    ids=["disk-outside-prefixes", "privileged", "capabilities", "hostpath-root"],
)
def test_operator_refuses_what_the_policy_forbids_with_config_valid_false(
    k8s_cluster: Cluster,
    namespace: str,
    operator: OperatorProcess,
    spec: str,
    expected: tuple[str, str],
) -> None:
    message, fix = expected
    k8s_cluster.apply(CLUSTER_DOC.format(name="guarded", spec=spec), namespace)

    def refused() -> dict[str, Any] | None:
        valid = _config_valid(_status(k8s_cluster, namespace, "guarded"))
        return valid if valid is not None and valid["status"] == "False" else None

    valid = wait_until(refused, 30, "ConfigValid=False")
    assert valid["reason"] == "InvalidSpec"
    assert message in valid["message"]
    assert fix in valid["message"]
    assert k8s_cluster.get("daemonset", "guarded-cache", namespace) is None


def test_a_disk_tier_and_host_paths_under_the_prefixes_are_applied_confined(
    k8s_cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    spec = (
        "{image: {repository: lmcache.local/node, tag: dev, pullPolicy: Never}, "
        "server: {port: 24100, httpPort: 24101}, cache: {cpuSize: 1Gi, "
        "disk: {path: /mnt/nvme/l2, size: 5Gi}}, "
        "pod: {volumes: [{name: data, hostPath: {path: /mnt/data}}], "
        "volumeMounts: [{name: data, mountPath: /data, readOnly: true}]}}"
    )
    k8s_cluster.apply(CLUSTER_DOC.format(name="disk", spec=spec), namespace)

    def ready() -> dict[str, Any] | None:
        st = _status(k8s_cluster, namespace, "disk")
        return st if st.get("phase") == "Ready" and st.get("readyNodes") == 2 else None

    wait_until(ready, 60, "the cluster Ready on the 2 GPU nodes")
    pods = k8s_cluster.items("pods", namespace, "lmcache.dev/cluster=disk")
    pod = pods[0]["spec"]  # created by the DaemonSet controller: the API server took it
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["disk"]["hostPath"]["path"] == "/mnt"
    assert volumes["data"]["hostPath"]["path"] == "/mnt"
    init = pod["initContainers"][0]
    assert init["volumeMounts"][0]["subPath"] == f"nvme/l2/lmcache-{namespace}.disk"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


def test_committed_core_v1_schemas_are_those_of_the_pinned_api_server(
    k8s_cluster: Cluster,
) -> None:
    openapi = json.loads(k8s_cluster.kubectl("get", "--raw", "/openapi/v3/api/v1").stdout)
    version = json.loads(k8s_cluster.kubectl("get", "--raw", "/version").stdout)["gitVersion"]
    assert version == kubernetes_version()
    committed = json.loads(
        (REPO / "operator" / "lmcache_operator" / "api" / "k8s_core_v1.json").read_text("utf-8")
    )
    assert committed == extract(openapi, version), (
        "api/k8s_core_v1.json is stale: run scripts/k8s_openapi.py, then make crds"
    )
