"""Security contexts and host path confinement shared by the cache and vLLM pod builders.

- Default security contexts (restricted-style): no privilege escalation, every capability
  dropped, seccomp RuntimeDefault; a user's context merges over them (nested objects
  merged, ``capabilities.drop`` and ``supplementalGroups`` keep ours).
- Host path confinement: a hostPath volume below an allowed prefix becomes a hostPath of
  the prefix itself plus a ``subPath`` on every mount of it. kubelet resolves a subPath
  inside its volume and refuses one that leaves it (a symlink planted under the prefix
  cannot point a mount, or the disk tier's ``chown``, at ``/etc``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from lmcache_operator.api.policy import PodPolicy

RUNTIME_DEFAULT_SECCOMP = {"type": "RuntimeDefault"}


def restricted_container_context() -> dict[str, Any]:
    """A container that cannot gain privileges: no escalation, no capabilities."""
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


_UNION_LISTS = {"drop", "supplementalGroups"}


def merged_context(defaults: Mapping[str, Any], user: Mapping[str, Any] | None) -> dict[str, Any]:
    """``user`` over ``defaults``: objects merged key by key, capabilities.drop and
    supplementalGroups the union (ours first), anything else the user's value."""
    out = copy.deepcopy(dict(defaults))
    for key, value in (user or {}).items():
        mine = out.get(key)
        if isinstance(mine, dict) and isinstance(value, Mapping):
            out[key] = merged_context(mine, value)
        elif key in _UNION_LISTS and isinstance(mine, list) and isinstance(value, list):
            out[key] = list(dict.fromkeys([*mine, *value]))
        else:
            out[key] = copy.deepcopy(value)
    return out


def _mounts(pod_spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [
        mount
        for kind in ("initContainers", "containers")
        for container in pod_spec.get(kind) or []
        for mount in container.get("volumeMounts") or []
    ]


def confine_host_paths(pod_spec: dict[str, Any], policy: PodPolicy) -> dict[str, Any]:
    """Rewrite every hostPath volume of ``pod_spec`` (in place) to its allowed prefix plus
    subPaths. A path outside every prefix is an error unless the policy allows privileged
    pass-through (then it is left as written); validation refuses those before building.
    """
    for volume in pod_spec.get("volumes") or []:
        host_path = volume.get("hostPath")
        if not host_path:
            continue
        path = str(host_path["path"])
        prefix = policy.prefix_of(path)
        if prefix is None:
            if policy.allow_privileged_pass_through:
                continue
            raise ValueError(
                f"volume {volume['name']!r}: hostPath {path!r} is outside the allowed prefixes "
                f"{policy.allowed_host_path_prefixes}: validate the spec before building"
            )
        if prefix == path:
            continue
        below = path[len(prefix) :].lstrip("/")
        volume["hostPath"] = {"path": prefix, "type": "DirectoryOrCreate"}
        for mount in _mounts(pod_spec):
            if mount.get("name") != volume["name"]:
                continue
            if mount.get("subPathExpr"):
                mount["subPathExpr"] = f"{below}/{mount['subPathExpr']}"
            else:
                mount["subPath"] = f"{below}/{mount['subPath']}" if mount.get("subPath") else below
    return pod_spec
