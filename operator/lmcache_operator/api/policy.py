"""What a CR author may put into the pods the operator creates (docs/security.md, "CR authors").

Two layers, with the same rules and messages:

- always (CEL in the CRDs, pydantic here): a host path the operator itself mounts (the disk
  tier, the shm path) is a normalised absolute path that is neither ``/`` nor a system
  directory nor a parent of one;
- configurable (the chart's ``allowedHostPathPrefixes`` and ``allowPrivilegedPassThrough``,
  given to the operator and to ``lmcache-operator render`` as a :class:`PodPolicy`): every host
  path lies under an allowed prefix, and the pod pass-through fields carry no privilege
  (privileged, added capabilities, privilege escalation, unconfined seccomp/AppArmor, SELinux
  labels, sysctls, host-process containers, ids in the range reserved for cluster groups, host
  paths outside the prefixes) unless the chart allows privileged pass-through.

Every function here is pure: a spec fragment and a policy in, problems (strings naming the
field and the fix) out.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_ALLOWED_HOST_PATH_PREFIXES: tuple[str, ...] = (
    "/var/cache/lmcache",
    "/var/lib/lmcache",
    "/mnt",
    "/models",
    "/dev/shm",  # noqa: S108 - the host tmpfs the cache shares with vLLM
)
"""Chart default of ``allowedHostPathPrefixes``: the paths the examples use, /mnt and /dev/shm."""

SHM = "/dev/shm"  # noqa: S108 - the one directory under /dev a cache may use
SYSTEM_DIRECTORIES: tuple[str, ...] = (
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/proc",
    "/root",
    "/run",
    "/sbin",
    "/sys",
    "/usr",
    "/var/lib/containerd",
    "/var/lib/docker",
    "/var/lib/kubelet",
    "/var/log",
    "/var/run",
)
"""Host directories no CR may mount or hand to a user, nor any parent of them (``/var``)."""

# Groups (and user ids) derived from a cluster's namespace/name live in this range; a CR
# author may not name one in a pod's security context (so no pod joins another cluster's
# shm group) nor as an explicit shmGroup.
RESERVED_ID_MIN = 0x7000_0000  # 1879048192
RESERVED_ID_SPAN = 0x0FFF_FFFF  # the range ends at 2147483646, below 2^31 - 1
RESERVED_ID_MAX = RESERVED_ID_MIN + RESERVED_ID_SPAN - 1
MIN_EXPLICIT_GROUP = 1000  # system groups (disk, shadow, ...) are below

SHAPE_MESSAGE = (
    "must be a normalised absolute path: it starts with '/' and has no '//', no '.' or '..' "
    "segment and no trailing '/'"
)
SYSTEM_MESSAGE = (
    "must not be / or a system directory (/bin, /boot, /dev except /dev/shm, /etc, /lib*, "
    "/proc, /root, /run, /sbin, /sys, /usr, /var/lib/containerd, /var/lib/docker, "
    "/var/lib/kubelet, /var/log, /var/run) or a parent of one (/var): use a directory under "
    "/var/cache/lmcache, /var/lib/lmcache or /mnt"
)

_DOT_SEGMENT = re.compile(r"(^|/)\.\.?(/|$)")


def _cel_list(items: Iterable[str]) -> str:
    return "[" + ", ".join(f"'{item}'" for item in items) + "]"


# CEL twins of path_shape_problem and system_path_problem (the API server runs these).
SHAPE_RULE: dict[str, Any] = {
    "rule": "self.startsWith('/') && !self.contains('//')"
    " && (self == '/' || !self.endsWith('/')) && !self.matches('(^|/)[.][.]?(/|$)')",
    "message": SHAPE_MESSAGE,
}
SYSTEM_RULE: dict[str, Any] = {
    "rule": f"self == '{SHM}' || self.startsWith('{SHM}/') || !(self == '/'"
    f" || {_cel_list(SYSTEM_DIRECTORIES)}.exists(d, self == d || self.startsWith(d + '/')"
    " || d.startsWith(self + '/')))",
    "message": SYSTEM_MESSAGE,
}
HOST_PATH_MAX_LENGTH = 1024


def path_shape_problem(path: str) -> str | None:
    """Why ``path`` is not a normalised absolute path, or None."""
    ok = (
        path.startswith("/")
        and "//" not in path
        and (path == "/" or not path.endswith("/"))
        and _DOT_SEGMENT.search(path) is None
    )
    return None if ok else SHAPE_MESSAGE


def is_under(path: str, prefix: str) -> bool:
    """``path`` is ``prefix`` or below it, on a component boundary (/mnt2 is not under /mnt)."""
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def system_path_problem(path: str) -> str | None:
    """Why ``path`` is a directory no CR may use (/, a system directory, a parent of one)."""
    if is_under(path, SHM):
        return None
    if path == "/" or any(
        is_under(path, directory) or is_under(directory, path) for directory in SYSTEM_DIRECTORIES
    ):
        return SYSTEM_MESSAGE
    return None


def checked_host_path(path: str) -> str:
    """A pydantic after-validator: the always-refused paths, with the CEL rules' messages."""
    problem = path_shape_problem(path) or system_path_problem(path)
    if problem is not None:
        raise ValueError(problem)
    return path


def derived_group(namespace: str, name: str) -> int:
    """The shm group of a cluster without spec.shmGroup: a stable hash of namespace/name into
    the reserved range (268 million values: two clusters share one with probability about
    n^2 / 5.4e8 for n clusters, e.g. 2e-5 for 100)."""
    digest = hashlib.sha256(f"{namespace}/{name}".encode()).digest()
    return RESERVED_ID_MIN + int.from_bytes(digest[:8], "big") % RESERVED_ID_SPAN


def reserved_id(value: object) -> bool:
    return isinstance(value, int) and RESERVED_ID_MIN <= value <= RESERVED_ID_MAX


@dataclass(frozen=True)
class PodPolicy:
    """The chart's guard rails: where host paths may point and whether pass-through may be
    privileged. ``PodPolicy()`` is the chart's default."""

    allowed_host_path_prefixes: tuple[str, ...] = DEFAULT_ALLOWED_HOST_PATH_PREFIXES
    allow_privileged_pass_through: bool = False

    def __post_init__(self) -> None:
        problems = prefix_problems(self.allowed_host_path_prefixes)
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_settings(
        cls, prefixes: Sequence[str] | None, *, allow_privileged_pass_through: bool = False
    ) -> PodPolicy:
        """From flags: no prefixes given = the defaults. ValueError names a bad prefix."""
        chosen = tuple(prefixes) if prefixes else DEFAULT_ALLOWED_HOST_PATH_PREFIXES
        return cls(chosen, allow_privileged_pass_through)

    def prefix_of(self, path: str) -> str | None:
        """The longest allowed prefix ``path`` lies under, or None."""
        matches = [p for p in self.allowed_host_path_prefixes if is_under(path, p)]
        return max(matches, key=len) if matches else None

    def host_path_problem(self, field: str, path: str) -> str | None:
        """Why a host path the operator mounts for itself (disk tier, shm) is refused."""
        problem = path_shape_problem(path) or system_path_problem(path)
        if problem is not None:
            return f"{field}: {path!r} {problem}"
        if self.prefix_of(path) is None:
            return (
                f"{field}: {path!r} is not under an allowed host path prefix "
                f"({', '.join(self.allowed_host_path_prefixes)}): use a directory below one of "
                "them, or have the cluster admin add a prefix (chart value "
                "allowedHostPathPrefixes)"
            )
        return None


def prefix_problems(prefixes: Sequence[str]) -> list[str]:
    """Why a list of allowed prefixes is unusable (the operator refuses to start with it)."""
    problems = []
    if not prefixes:
        problems.append("allowedHostPathPrefixes is empty: list at least one directory")
    for prefix in prefixes:
        problem = path_shape_problem(prefix) or system_path_problem(prefix)
        if problem is not None:
            problems.append(f"allowed host path prefix {prefix!r} {problem}")
    return problems


# ---- pass-through -------------------------------------------------------------------------

_UNCONFINED = "Unconfined"
_FIX = (
    "remove it, or have the cluster admin set allowPrivilegedPassThrough: true in the chart "
    "(which lets every CR author reach node root)"
)


def _id_problems(field: str, context: Mapping[str, Any]) -> list[str]:
    problems = []
    for key in ("runAsUser", "runAsGroup", "fsGroup"):
        if reserved_id(context.get(key)):
            problems.append(
                f"{field}.{key}: {context[key]} lies in the range reserved for cache clusters' "
                f"shm groups ({RESERVED_ID_MIN}-{RESERVED_ID_MAX}): choose an id outside it"
            )
    for group in context.get("supplementalGroups") or []:
        if reserved_id(group):
            problems.append(
                f"{field}.supplementalGroups: {group} lies in the range reserved for cache "
                f"clusters' shm groups ({RESERVED_ID_MIN}-{RESERVED_ID_MAX}); the operator adds "
                "the cluster's own group itself: remove it"
            )
    return problems


def _common_context_problems(field: str, context: Mapping[str, Any]) -> list[str]:
    problems = _id_problems(field, context)
    for key in ("seccompProfile", "appArmorProfile"):
        if (context.get(key) or {}).get("type") == _UNCONFINED:
            problems.append(f"{field}.{key}.type: Unconfined is refused: {_FIX}")
    if context.get("seLinuxOptions"):
        problems.append(f"{field}.seLinuxOptions: custom SELinux labels are refused: {_FIX}")
    if (context.get("windowsOptions") or {}).get("hostProcess"):
        problems.append(f"{field}.windowsOptions.hostProcess: host processes are refused: {_FIX}")
    return problems


def pod_security_context_problems(field: str, context: Mapping[str, Any] | None) -> list[str]:
    """A pass-through core/v1 PodSecurityContext."""
    if not context:
        return []
    problems = _common_context_problems(field, context)
    if context.get("sysctls"):
        problems.append(f"{field}.sysctls: sysctls are refused: {_FIX}")
    return problems


def container_security_context_problems(field: str, context: Mapping[str, Any] | None) -> list[str]:
    """A pass-through core/v1 SecurityContext."""
    if not context:
        return []
    problems = _common_context_problems(field, context)
    if context.get("privileged"):
        problems.append(f"{field}.privileged: privileged containers are refused: {_FIX}")
    added = (context.get("capabilities") or {}).get("add")
    if added:
        problems.append(f"{field}.capabilities.add: adding {added} is refused: {_FIX}")
    if context.get("allowPrivilegeEscalation"):
        problems.append(f"{field}.allowPrivilegeEscalation: true is refused: {_FIX}")
    if context.get("procMount") not in (None, "Default"):
        problems.append(f"{field}.procMount: {context['procMount']} is refused: {_FIX}")
    return problems


def volume_problems(field: str, volume: Mapping[str, Any], policy: PodPolicy) -> list[str]:
    """A pass-through core/v1 Volume (or volume source): its hostPath, if any."""
    host_path = volume.get("hostPath")
    if not host_path:
        return []
    path = str(host_path.get("path", ""))
    where = f"{field}.hostPath.path"
    shape = path_shape_problem(path)
    if shape is not None:
        return [f"{where}: {path!r} {shape}"]
    if policy.allow_privileged_pass_through:
        return []
    problem = system_path_problem(path)
    if problem is not None:
        return [f"{where}: {path!r} {problem}; or {_FIX}"]
    if policy.prefix_of(path) is None:
        return [
            f"{where}: {path!r} is not under an allowed host path prefix "
            f"({', '.join(policy.allowed_host_path_prefixes)}): use a directory below one of "
            f"them, or {_FIX}"
        ]
    return []


def pass_through_problems(
    field: str,
    *,
    policy: PodPolicy,
    pod_context: Mapping[str, Any] | None = None,
    container_context: Mapping[str, Any] | None = None,
    volumes: Sequence[Mapping[str, Any]] = (),
) -> list[str]:
    """Everything a pod override block may not carry under ``policy``."""
    problems: list[str] = []
    for index, volume in enumerate(volumes):
        problems += volume_problems(f"{field}.volumes[{index}]", volume, policy)
    if policy.allow_privileged_pass_through:
        return problems
    problems += pod_security_context_problems(f"{field}.securityContext", pod_context)
    problems += container_security_context_problems(
        f"{field}.containerSecurityContext", container_context
    )
    return problems
