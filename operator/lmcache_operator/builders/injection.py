"""Wiring a pod someone else built to a cache cluster (what the admission webhook applies).

:func:`inject` takes a pod and its cluster's :class:`~connection.Connection` and returns the
pod with the contract merged in, and an outcome the pod keeps in annotations:

- ``injected``: env, volumes, scheduling and the ``--kv-transfer-config`` argument of a
  container that runs vLLM's CLI (``vllm serve``, ``python -m vllm.entrypoints.openai.api_server``,
  ``lmcache-node vllm``);
- ``partial``: env and volumes only; the message says what the user must add (the container's
  command is the image's entrypoint or a shell, it already has a kv-transfer-config, or a
  setting of the pod conflicts with the cluster's);
- ``failed``: nothing but the annotations (no such cluster, or a cluster vLLM cannot reach).

Values the pod already sets win over ours (env names, nodeSelector keys, fsGroup), so a user's
explicit choice is never overwritten; each conflict is named in the message.
"""

from __future__ import annotations

import copy
import os
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lmcache_operator.api.common import GROUP
from lmcache_operator.api.policy import SHM
from lmcache_operator.builders.common import CLUSTER_LABEL, MANAGED_BY
from lmcache_operator.builders.connection import (
    CONNECTION_ANNOTATION,
    Connection,
    env,
    init_containers,
    kv_transfer_args,
    pod_security_context,
    volume_mounts,
    volumes,
)
from lmcache_operator.builders.vllm_connector import CONNECTOR_DIR, HOST_IP_ENV

INJECTION_ANNOTATION = f"{GROUP}/injection"  # injected | partial | failed
MESSAGE_ANNOTATION = f"{GROUP}/injection-message"
REPORTED_ANNOTATION = f"{GROUP}/injection-reported"  # set once the operator posted its Event
CONTAINER_ANNOTATION = f"{GROUP}/container"  # which container runs vLLM
INSTALL_ANNOTATION = f"{GROUP}/install-connector"  # "false": the image has lmcache_node
ARGS_ANNOTATION = f"{GROUP}/vllm-args"  # "append": the image's entrypoint is `vllm serve`
INJECTED, PARTIAL, FAILED = "injected", "partial", "failed"
MAX_MESSAGE = 1000
KV_FLAGS = ("--kv-transfer-config", "--kv_transfer_config")


@dataclass
class Injection:
    """The wired pod, its outcome, and what the annotation says (``conflicts``: settings of
    the pod that keep it from using the cache fully; they make the outcome ``partial``)."""

    pod: dict[str, Any]
    outcome: str
    notes: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)

    @property
    def message(self) -> str:
        text = "; ".join([*self.conflicts, *self.notes])
        return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def _annotate(pod: dict[str, Any], cluster: str, injection: Injection) -> Injection:
    meta = pod.setdefault("metadata", {})
    meta.setdefault("labels", {})[CLUSTER_LABEL] = cluster
    annotations = meta.setdefault("annotations", {})
    annotations[INJECTION_ANNOTATION] = injection.outcome
    annotations[MESSAGE_ANNOTATION] = injection.message or "wired to its node's cache server"
    return injection


def failed(pod: Mapping[str, Any], cluster: str, message: str) -> Injection:
    """Nothing wired: only the annotations that say why (the operator then posts an Event)."""
    result = Injection(copy.deepcopy(dict(pod)), FAILED, [message])
    return _annotate(result.pod, cluster, result)


def already_handled(pod: Mapping[str, Any]) -> bool:
    """Pods the webhook leaves alone: the operator's own, and pods it saw before."""
    meta = pod.get("metadata") or {}
    if (meta.get("labels") or {}).get("app.kubernetes.io/managed-by") == MANAGED_BY:
        return True
    return INJECTION_ANNOTATION in (meta.get("annotations") or {})


def vllm_command(container: Mapping[str, Any]) -> str | None:
    """How a container runs vLLM: ``cli`` (its args can take ours), ``shell`` (a script we do
    not edit), or None (not vLLM, or the image's entrypoint: not visible here)."""
    argv = [str(a) for a in (*(container.get("command") or ()), *(container.get("args") or ()))]
    if not container.get("command"):
        return None
    program = posixpath.basename(argv[0])
    if program == "vllm" and argv[1:2] == ["serve"]:
        return "cli"
    if program == "lmcache-node" and argv[1:2] == ["vllm"]:
        return "cli"
    if program.startswith("python") and "vllm.entrypoints.openai.api_server" in argv:
        index = argv.index("vllm.entrypoints.openai.api_server")
        return "cli" if argv[index - 1] == "-m" else None
    if program in ("sh", "bash", "dash", "ash") and "-c" in argv:
        return "shell" if any("vllm" in a for a in argv) else None
    return None


def has_kv_config(container: Mapping[str, Any]) -> bool:
    argv = [str(a) for a in (*(container.get("command") or ()), *(container.get("args") or ()))]
    return any(a.split("=", 1)[0].split(".", 1)[0] in KV_FLAGS for a in argv)


def target_container(pod: Mapping[str, Any]) -> tuple[int | None, str]:
    """(index of the container to wire, why not): the one ``lmcache.dev/container`` names,
    else the first running vLLM's CLI, else the first whose name or image says vllm, else the
    first; None with a reason when there is none."""
    spec = pod.get("spec") or {}
    containers = list(spec.get("containers") or [])
    wanted = ((pod.get("metadata") or {}).get("annotations") or {}).get(CONTAINER_ANNOTATION)
    if wanted:
        for index, container in enumerate(containers):
            if container.get("name") == wanted:
                return index, ""
        return None, f"annotation {CONTAINER_ANNOTATION}={wanted} names no container"
    for index, container in enumerate(containers):
        if vllm_command(container) is not None:
            return index, ""
    for index, container in enumerate(containers):  # an image entrypoint: name or image
        if "vllm" in str(container.get("name", "")) or "vllm" in str(container.get("image", "")):
            return index, ""
    return (0, "") if containers else (None, "the pod has no containers")


def _merge_env(container: dict[str, Any], ours: list[dict[str, Any]], notes: list[str]) -> None:
    user = [dict(item) for item in container.get("env") or []]
    user_names = {str(item.get("name")) for item in user}
    added = [item for item in ours if item["name"] not in user_names]
    installs = any(item["name"] == "PYTHONPATH" for item in ours)
    for item in user:  # the copied connector first on the container's own PYTHONPATH
        if installs and item.get("name") == "PYTHONPATH" and "value" in item:
            item["value"] = f"{CONNECTOR_DIR}{os.pathsep}{item['value']}"
    kept = sorted(n for n in user_names if n in {o["name"] for o in ours} and n != "PYTHONPATH")
    if kept:
        notes.append(f"kept the container's own {', '.join(kept)}")
    # ours first: LMCACHE_NODE_HOST references HOST_IP, defined earlier in the list; when the
    # container defines HOST_IP itself, ours follow its variables instead
    container["env"] = [*user, *added] if HOST_IP_ENV in user_names else [*added, *user]


def _merge_mounts(container: dict[str, Any], ours: list[dict[str, Any]], notes: list[str]) -> None:
    paths = {posixpath.normpath(m["mountPath"]) for m in ours}
    mounts = []
    for mount in container.get("volumeMounts") or []:
        if posixpath.normpath(str(mount.get("mountPath", ""))) in paths:
            notes.append(
                f"replaced the container's mount of volume {mount.get('name')!r} at "
                f"{mount.get('mountPath')} (the cache needs the host's {SHM} there)"
                if posixpath.normpath(str(mount.get("mountPath"))) == SHM
                else f"replaced the container's mount at {mount.get('mountPath')}"
            )
            continue
        mounts.append(mount)
    container["volumeMounts"] = [*mounts, *ours]


def _merge_named(
    existing: list[dict[str, Any]], ours: list[dict[str, Any]], what: str, conflicts: list[str]
) -> list[dict[str, Any]]:
    by_name = {item.get("name"): item for item in existing}
    out = list(existing)
    for item in ours:
        current = by_name.get(item["name"])
        if current is None:
            out.append(item)
        elif current != item:
            conflicts.append(f"the pod already has a {what} named {item['name']!r}: left as it is")
    return out


def _schedule(spec: dict[str, Any], conn: Connection, conflicts: list[str]) -> None:
    selector = dict(spec.get("nodeSelector") or {})
    for key, value in sorted(conn.node_selector.items()):
        if key in selector and selector[key] != value:
            conflicts.append(
                f"the pod's nodeSelector {key}={selector[key]} differs from the cluster's "
                f"{key}={value}: it may run where no cache server does"
            )
            continue
        selector[key] = value
    if selector:
        spec["nodeSelector"] = selector


def _security(spec: dict[str, Any], conn: Connection) -> None:
    context = dict(spec.get("securityContext") or {})
    ours = pod_security_context(conn)
    groups = list(context.get("supplementalGroups") or [])
    for group in ours["supplementalGroups"]:
        if group not in groups:
            groups.append(group)
    context["supplementalGroups"] = groups
    context.setdefault("fsGroup", ours["fsGroup"])
    spec["securityContext"] = context


def _wire_args(pod: Mapping[str, Any], container: dict[str, Any], notes: list[str]) -> bool:
    """Add ``--kv-transfer-config`` where the container runs vLLM's CLI; False otherwise."""
    name = container.get("name")
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    how = vllm_command(container)
    if how is None and annotations.get(ARGS_ANNOTATION) == "append":
        how = "cli"
    if has_kv_config(container):
        notes.append(
            f"container {name!r} already has a --kv-transfer-config: left as it is (ours is "
            "in the connection ConfigMap, key kvTransferConfig; MultiConnector combines both)"
        )
        return False
    if how == "cli":
        container["args"] = [*(container.get("args") or []), *kv_transfer_args()]
        return True
    reason = (
        "runs vLLM through a shell script"
        if how == "shell"
        else "has no command (the image's entrypoint cannot be seen here)"
        if not container.get("command")
        else "does not run vllm serve"
    )
    notes.append(
        f"container {name!r} {reason}: added env and volumes only; add --kv-transfer-config "
        "with the connection ConfigMap's kvTransferConfig to its command (or annotate the pod "
        f"{ARGS_ANNOTATION}=append when the entrypoint is vllm serve)"
    )
    return False


def inject(pod: Mapping[str, Any], conn: Connection) -> Injection:
    """``pod`` wired to ``conn``'s cluster (a new object; ``pod`` is not changed)."""
    if not conn.host_network:
        return failed(
            pod,
            conn.cluster,
            f"LMCacheCluster {conn.cluster!r} runs without hostNetwork, so vLLM cannot reach it "
            "at its node's IP: set hostNetwork: true on the cluster",
        )
    index, why = target_container(pod)
    if index is None:
        return failed(pod, conn.cluster, why)
    result = Injection(copy.deepcopy(dict(pod)), INJECTED)
    spec = result.pod.setdefault("spec", {})
    annotations = (result.pod.get("metadata") or {}).get("annotations") or {}
    install = str(annotations.get(INSTALL_ANNOTATION, "true")).lower() != "false"
    container = spec["containers"][index]
    args_wired = _wire_args(result.pod, container, result.notes)
    _merge_env(container, env(conn, install=install), result.notes)
    _merge_mounts(container, volume_mounts(install=install), result.notes)
    spec["volumes"] = _merge_named(
        list(spec.get("volumes") or []), volumes(conn, install=install), "volume", result.conflicts
    )
    if install:
        spec["initContainers"] = _merge_named(
            list(spec.get("initContainers") or []),
            init_containers(conn),
            "init container",
            result.conflicts,
        )
        secrets = [dict(s) for s in spec.get("imagePullSecrets") or []]
        known = {s.get("name") for s in secrets}
        secrets += [{"name": s} for s in conn.image_pull_secrets if s not in known]
        if secrets:
            spec["imagePullSecrets"] = secrets
    _schedule(spec, conn, result.conflicts)
    _security(spec, conn)
    if not args_wired or result.conflicts:
        result.outcome = PARTIAL
    meta = result.pod.setdefault("metadata", {})
    meta.setdefault("annotations", {})[CONNECTION_ANNOTATION] = conn.digest()
    return _annotate(result.pod, conn.cluster, result)
