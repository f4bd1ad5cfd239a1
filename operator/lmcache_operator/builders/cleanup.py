"""The Job that removes a deleted cluster's L1 pool from one node.

A persistent pool (``cache.persistent``) is a file in the cluster's shm directory on the
host's ``/dev/shm``: it outlives its pod on purpose (a new server adopts it), so when the
cluster is deleted the operator runs one Job per node the cluster ran on:
``lmcache-node pool remove --shm-dir <the cluster's shm_dir> --wait-s 60``. Its pod runs where
the cache pods ran (``nodeName``, tolerating every taint), from the cluster's node image
(its CPU variant), as the cache server's user in the cluster's shm group (the pool is 0600:
only that user may check it is a pool), with the host's ``/dev/shm`` confined like the
cache pods' (a hostPath under the allowed prefixes) and nothing else: no service account
token, no capabilities, a read-only root filesystem.
"""

from __future__ import annotations

import hashlib
from typing import Any

from lmcache_operator.api.lmcachecluster import LMCacheClusterSpec
from lmcache_operator.api.policy import SHM, PodPolicy
from lmcache_operator.builders import node_image
from lmcache_operator.builders.cache_security import (
    container_security_context,
    pod_security_context,
    shm_dir,
)
from lmcache_operator.builders.common import standard_labels
from lmcache_operator.builders.node_image import NodeImageDefaults
from lmcache_operator.builders.podsecurity import confine_host_paths

APP_NAME = "lmcache-pool-cleanup"
CLEANUP_LABEL = "lmcache.dev/pool-cleanup"  # the cluster's name (not lmcache.dev/cluster:
NODE_ANNOTATION = "lmcache.dev/node"  # the cache pods' selector and the webhook use that)
WAIT_S = 60  # for a cache server still stopping (the DaemonSet is deleted first)
MAX_JOB_NAME = 63


def job_name(name: str, namespace: str, node: str) -> str:
    """``<cluster>-pool-<hash>``, unique per (namespace, cluster, node), at most 63."""
    digest = hashlib.sha256(f"{namespace}/{name}/{node}".encode()).hexdigest()[:10]
    return f"{name[: MAX_JOB_NAME - 16]}-pool-{digest}"


def remove_command(name: str, namespace: str) -> list[str]:
    return ["lmcache-node", "pool", "remove", "--shm-dir", shm_dir(namespace, name),
            "--wait-s", str(WAIT_S)]  # fmt: skip


def build_cleanup_job(
    name: str,
    namespace: str,
    spec: LMCacheClusterSpec,
    node: str,
    *,
    deadline_s: int,
    policy: PodPolicy | None = None,
    images: NodeImageDefaults = node_image.DEFAULTS,
) -> dict[str, Any]:
    """The Job removing cluster ``name``'s pool on ``node`` (``deadline_s``: its whole run)."""
    image = node_image.resolve(spec, "cpu", images).image
    labels = {**standard_labels(name, APP_NAME, "pool-cleanup"), CLEANUP_LABEL: name}
    container: dict[str, Any] = {
        "name": "pool-remove",
        "image": image.reference,
        "imagePullPolicy": image.pull_policy,
        "command": remove_command(name, namespace),
        "securityContext": container_security_context(spec),
        "volumeMounts": [
            {"name": "shm", "mountPath": SHM},
            {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - an emptyDir (HOME)
        ],
        "resources": {
            "requests": {"cpu": "50m", "memory": "256Mi"},
            "limits": {"memory": "1Gi"},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: dict[str, Any] = {
        "nodeName": node,
        "restartPolicy": "Never",
        "tolerations": [{"operator": "Exists"}],  # wherever the cache pod ran
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(name, namespace, spec),
        "containers": [container],
        "volumes": [
            {"name": "shm", "hostPath": {"path": spec.host_shm_path, "type": "Directory"}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
        ],
    }
    if spec.placement.priority_class_name:
        pod_spec["priorityClassName"] = spec.placement.priority_class_name
    if image.pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in image.pull_secrets]
    confine_host_paths(pod_spec, PodPolicy() if policy is None else policy)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(name, namespace, node),
            "namespace": namespace,
            "labels": labels,
            "annotations": {NODE_ANNOTATION: node},
        },
        "spec": {
            "backoffLimit": 2,
            "activeDeadlineSeconds": deadline_s,
            "ttlSecondsAfterFinished": 3600,
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }
