"""Who the cache pods run as: security contexts, the shm group, the disk tier's directory.

The cache server runs as a user of the cluster's own (a uid derived from namespace/name,
the same number as the derived shm group; ``spec.pod.securityContext.runAsUser`` overrides
it) in the cluster's group, with no capabilities and a read-only root filesystem: no other
cluster's cache pod, and no CR-chosen image running as the image's default user, owns this
cluster's shm directory or segments. Only the disk tier's init container runs as root, with
CAP_CHOWN and CAP_FOWNER alone, to hand the cluster's own directory (never the configured
path itself, never a parent) to that user.
"""

from __future__ import annotations

from typing import Any

from lmcache_operator.api.lmcachecluster import LMCacheClusterSpec
from lmcache_operator.api.policy import SHM, derived_group
from lmcache_operator.builders.podsecurity import (
    RUNTIME_DEFAULT_SECCOMP,
    merged_context,
    restricted_container_context,
)

DISK_INIT_NAME = "disk-owner"
DISK_MOUNT = "/lmcache/disk"  # the cluster's directory of the disk tier, in the containers
IMAGE_UID = 65532  # USER of images/node/Dockerfile (the vLLM pods' helper init containers)
IMAGE_GID = 65532


def cluster_directory(namespace: str, name: str) -> str:
    """Name of the cluster's own directory on a node: in /dev/shm and in the disk tier.

    Namespaces cannot contain dots, so ``lmcache-<namespace>.<name>`` names one cluster
    (with a dash, namespace ``a-b`` + cluster ``c`` and ``a`` + ``b-c`` would collide).
    """
    return f"lmcache-{namespace}.{name}"


def shm_dir(namespace: str, name: str) -> str:
    """The cluster's shm directory (node key ``shm_dir``), in the pod's /dev/shm."""
    return f"{SHM}/{cluster_directory(namespace, name)}"


def disk_mount(name: str, namespace: str) -> dict[str, Any]:
    """The cluster's own subdirectory of the disk path (kubelet creates it inside the volume)."""
    return {"name": "disk", "mountPath": DISK_MOUNT, "subPath": cluster_directory(namespace, name)}


def server_uid(namespace: str, name: str) -> int:
    """The cluster's own user: derived from namespace/name like the shm group (the same
    number), in the range no CR may name in a security context."""
    return derived_group(namespace, name)


def run_as(name: str, namespace: str, spec: LMCacheClusterSpec) -> tuple[int, int]:
    """(uid, gid) the cache server runs as: the container's, then the pod's security context
    (an explicit override), else the cluster's own user and its group."""
    uid, gid = server_uid(namespace, name), spec.group(namespace, name)
    for context in (spec.pod.security_context, spec.pod.container_security_context):
        if context:
            uid = int(context.get("runAsUser", uid))
            gid = int(context.get("runAsGroup", gid))
    return uid, gid


def pod_security_context(name: str, namespace: str, spec: LMCacheClusterSpec) -> dict[str, Any]:
    """The cluster's own user and group, fsGroup (the 0440 credential files are group
    readable), seccomp; the spec's merged over."""
    group = spec.group(namespace, name)
    defaults = {
        "runAsNonRoot": True,
        "runAsUser": server_uid(namespace, name),
        "runAsGroup": group,
        "fsGroup": group,
        "supplementalGroups": [group],
        "seccompProfile": dict(RUNTIME_DEFAULT_SECCOMP),
    }
    return merged_context(defaults, spec.pod.security_context)


def container_security_context(spec: LMCacheClusterSpec) -> dict[str, Any]:
    """No privilege escalation, no capabilities, a read-only root filesystem."""
    defaults = {**restricted_container_context(), "readOnlyRootFilesystem": True}
    return merged_context(defaults, spec.pod.container_security_context)


# Hands the cluster's disk directory (the mount point: kubelet resolved the subPath inside
# the allowed prefix) to the server's user; never follows a symlink, never recurses.
DISK_OWNER_SCRIPT = """\
set -eu
d="$2"
if [ -L "$d" ] || [ ! -d "$d" ]; then
  echo "refusing to hand $d to the cache server: not a plain directory" >&2
  exit 1
fi
chown -h "$0:$1" "$d"
chmod 0750 "$d"
"""


def disk_owner_init(name: str, namespace: str, spec: LMCacheClusterSpec) -> dict[str, Any] | None:
    """An initContainer giving the cluster's disk directory to the server's user.

    kubelet creates a missing subPath root-owned; the server runs as non-root. Root with only
    CAP_CHOWN and CAP_FOWNER (chmod of a directory it does not own), nothing else.
    """
    if spec.cache.disk is None:
        return None
    uid, gid = run_as(name, namespace, spec)
    return {
        "name": DISK_INIT_NAME,
        "image": spec.image.reference,
        "imagePullPolicy": spec.image.pull_policy,
        "command": ["sh", "-c", DISK_OWNER_SCRIPT],
        "args": [str(uid), str(gid), DISK_MOUNT],
        "securityContext": {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"], "add": ["CHOWN", "FOWNER"]},
        },
        "volumeMounts": [disk_mount(name, namespace)],
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
    }
