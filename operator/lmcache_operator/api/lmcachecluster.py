# Long on purpose: the LMCacheCluster CRD's pydantic models, every field with its description,
# bounds and CEL rules in one place (crds/ and the CRD reference are generated from them).
"""The LMCacheCluster kind: one cache server per selected node (a DaemonSet)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, ConfigDict, Field, JsonValue, model_validator

from lmcache_operator.api.common import (
    ApiModel,
    Condition,
    KindDefinition,
    NodeImageSpec,
    PlacementSpec,
    PodOverrides,
    PrinterColumn,
    Quantity,
    ResourceRequirements,
    SecretKeyRef,
    nested_default,
    positive_quantity_field,
)
from lmcache_operator.api.policy import (
    HOST_PATH_MAX_LENGTH,
    MIN_EXPLICIT_GROUP,
    RESERVED_ID_MAX,
    RESERVED_ID_MIN,
    SHAPE_RULE,
    SHM,
    SYSTEM_RULE,
    PodPolicy,
    checked_host_path,
    derived_group,
    is_under,
    pass_through_problems,
)
from lmcache_operator.api.rollout import PoolStatus, RolloutStatus
from lmcache_operator.quantity import parse_bytes

KIND = "LMCacheCluster"
PLURAL = "lmcacheclusters"

TransferMode = Literal["shared", "engine"]
Device = Literal["auto", "cuda", "cpu"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]

HostPath = Annotated[str, AfterValidator(checked_host_path)]
"""A host directory the operator mounts: never /, a system directory or a parent of one."""
HOST_PATH_RULES: list[JsonValue] = [dict(SHAPE_RULE), dict(SYSTEM_RULE)]
DISK_NOT_SHM_MESSAGE = (
    "cache.disk.path must not be /dev/shm or below it: that is memory, not disk (size the "
    "memory tier with cache.cpuSize)"
)
SHM_GROUP_MESSAGE = (
    f"shmGroup must be at least {MIN_EXPLICIT_GROUP} (no system group) and below "
    f"{RESERVED_ID_MIN} ({RESERVED_ID_MIN}-{RESERVED_ID_MAX} is reserved for derived groups); "
    "leave it unset for a group of the cluster's own"
)


def _not_shm(path: str) -> str:
    if is_under(path, SHM):
        raise ValueError(DISK_NOT_SHM_MESSAGE)
    return path


def _explicit_group(group: int | None) -> int | None:
    if group is not None and not MIN_EXPLICIT_GROUP <= group < RESERVED_ID_MIN:
        raise ValueError(SHM_GROUP_MESSAGE)
    return group


EVENTS_PORT_MESSAGE = (
    "server.eventsPort must differ from server.port and server.httpPort (or be 0: no events)"
)


class ServerSpec(ApiModel):
    """The cache server process (lmcache-node serve)."""

    port: int = Field(5555, ge=1, le=65535, description="ZMQ port vLLM workers connect to.")
    http_port: int = Field(
        8080, ge=1, le=65535, description="HTTP port: /healthz, /readyz, /metrics."
    )
    events_port: int = Field(
        5556,
        ge=0,
        le=65535,
        description=(
            "Port of the events socket routers subscribe to (what each node caches; CURVE like "
            "the ZMQ port); 0 turns events off (VLLMDeployment routers then route by load)."
        ),
    )
    chunk_size: int = Field(
        256, gt=0, le=1 << 20, description="Tokens per chunk; must match the vLLM side."
    )
    max_workers: int = Field(1, ge=1, le=256, description="Request worker threads.")
    transfer_mode: TransferMode = Field(
        "shared",
        description=(
            "How KV bytes move: shared (vLLM shares its KV tensors with the server: CUDA IPC on "
            "GPUs, so the pod sees the GPUs through NVIDIA_VISIBLE_DEVICES=all; POSIX shm on "
            "CPUs) or engine (vLLM copies into a server-owned shm pool; the server runs on cpu "
            "and needs no GPU visibility)."
        ),
    )
    log_level: LogLevel = Field("INFO", description="Server log level.")
    extra_args: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="Extra command-line arguments appended to `lmcache-node serve`.",
    )


class DiskTier(ApiModel):
    """Local disk tier (L2) on a hostPath directory."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.size)",
                    "message": "cache.disk.size is required with a disk tier: cap it, e.g. 100Gi",
                }
            ]
        }
    )

    path: Annotated[HostPath, AfterValidator(_not_shm)] = Field(
        "/var/cache/lmcache",
        pattern=r"^/[^\s]*$",
        max_length=HOST_PATH_MAX_LENGTH,
        description=(
            "Host directory of the disk tier, under an allowed prefix (chart value "
            "allowedHostPathPrefixes); the cluster keeps its files in the subdirectory "
            "lmcache-<namespace>.<name>, created and handed to the server's user."
        ),
        json_schema_extra={
            "x-kubernetes-validations": [
                *HOST_PATH_RULES,
                {
                    "rule": f"!(self == '{SHM}' || self.startsWith('{SHM}/'))",
                    "message": DISK_NOT_SHM_MESSAGE,
                },
            ]
        },
    )
    size: Quantity | None = positive_quantity_field(
        "Cap of the disk tier, e.g. 100Gi (required).", default=None
    )

    @model_validator(mode="after")
    def _size_required(self) -> DiskTier:
        if self.size is None:
            raise ValueError("cache.disk.size is required with a disk tier: cap it, e.g. 100Gi")
        return self


class RemoteTier(ApiModel):
    """Remote tier (L3): Redis or Valkey shared by every node."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.url) != has(self.urlSecretRef)",
                    "message": "set exactly one of cache.remote.url and cache.remote.urlSecretRef",
                }
            ]
        }
    )

    url: str | None = Field(
        None,
        max_length=2048,
        pattern=r"^(redis|rediss|unix|valkey|valkeys|redis-sentinel)://.+$",
        description="Remote URL without credentials, e.g. redis://redis.cache:6379/0.",
    )
    url_secret_ref: SecretKeyRef | None = Field(
        None,
        description="A Secret key holding the whole URL (use it when the URL has a password).",
    )
    serde: Literal["naive", "zstd", "lz4"] = Field(
        "naive", description="Value encoding: naive (raw), zstd or lz4."
    )

    @model_validator(mode="after")
    def _one_form(self) -> RemoteTier:
        if (self.url is None) == (self.url_secret_ref is None):
            raise ValueError("set exactly one of cache.remote.url and cache.remote.urlSecretRef")
        return self


class CacheSpec(ApiModel):
    """Cache tiers and their sizes."""

    cpu_size: Quantity = positive_quantity_field(
        "Size of the CPU memory tier (L1) per node, as a quantity, e.g. 4Gi.", default="4Gi"
    )
    eviction_policy: Literal["LRU"] = Field("LRU", description="L1 eviction policy.")
    disk: DiskTier | None = Field(None, description="Optional local disk tier (L2).")
    remote: RemoteTier | None = Field(None, description="Optional remote tier (L3).")
    persistent: bool = Field(
        True,
        description=(
            "Keep each node's L1 pool in the cluster's shm directory on the host (node key "
            "l1_persistent), so a restarted or upgraded cache server adopts its chunks "
            "instead of starting cold. The pool outlives its pod: deleting the cluster "
            "removes it with a cleanup Job per node (finalizer lmcache.dev/pool-cleanup). "
            "false: process memory, lost at every restart."
        ),
    )


MAX_CONFIG_KEYS = 256
DEFAULT_CONFIG_FROM_KEY = "lmcache.yaml"


class ConfigFromSpec(ApiModel):
    """A ConfigMap key holding an LMCache (or lmcache-node) YAML config."""

    name: str = Field(
        min_length=1,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="ConfigMap in the LMCacheCluster's namespace.",
    )
    key: str = Field(
        DEFAULT_CONFIG_FROM_KEY,
        min_length=1,
        max_length=253,
        pattern=r"^[-._a-zA-Z0-9]+$",
        description="Key of the ConfigMap holding the YAML mapping.",
    )


class UpdateStrategy(ApiModel):
    """How a spec change reaches the cache pods (the DaemonSet itself is OnDelete)."""

    type: Literal["RollingUpdate", "OnDelete"] = Field(
        "RollingUpdate",
        description=(
            "RollingUpdate: the operator replaces the cache pods node by node (maxUnavailable "
            "at a time), each time waiting until the new server is ready with the node's pool "
            "adopted (status.rollout); OnDelete: a pod runs the new spec once you delete it."
        ),
    )
    max_unavailable: int | str = Field(
        1,
        description=(
            "Nodes whose cache pod may be replaced (or unavailable) at once during a rolling "
            "update (number, or percent of the nodes)."
        ),
    )
    max_surge: int | str | None = Field(
        None,
        description=(
            "Extra pods during a rolling update, rolled by the DaemonSet controller without "
            "the operator's coordination (the new server cannot adopt a pool its predecessor "
            "still holds); not allowed with hostNetwork (port clash)."
        ),
    )


class MonitoringSpec(ApiModel):
    """Prometheus scraping."""

    service_monitor: bool = Field(
        False, description="Create a ServiceMonitor (needs the Prometheus Operator CRDs)."
    )
    interval: str = Field(
        "30s", pattern=r"^[0-9]+(ms|s|m|h)$", max_length=16, description="Scrape interval."
    )
    labels: dict[str, str] = Field(
        default_factory=dict, description="Extra labels of the ServiceMonitor (for selection)."
    )


class SecuritySpec(ApiModel):
    """Credentials the operator keeps for the cluster (docs/security.md)."""

    rotation_grace_period_seconds: int = Field(
        3600,
        ge=0,
        le=30 * 86400,
        description=(
            "After a client key rotation (annotation lmcache.dev/rotate-keys), the previous "
            "client key stays allowed until every VLLMDeployment using the cluster has rolled "
            "out the new one and no other pod mounting the client Secret predates the "
            "rotation, and at most this long (seconds)."
        ),
    )


class LMCacheClusterSpec(ApiModel):
    """Desired state of an LMCacheCluster: one cache server on every selected node."""

    image: NodeImageSpec = nested_default(NodeImageSpec, "Cache server image.")
    server: ServerSpec = nested_default(ServerSpec, "Cache server process settings.")
    cache: CacheSpec = nested_default(CacheSpec, "Cache tiers.")
    device: Device = Field(
        "auto",
        description=(
            "Device of the KV caches: cuda, cpu (clusters without GPUs, tests) or auto "
            "(cuda when the pods are placed on GPU nodes, cpu otherwise)."
        ),
    )
    placement: PlacementSpec = nested_default(PlacementSpec, "Node selection and scheduling.")
    host_network: bool = Field(
        True, description="Run on the host network, so vLLM reaches the server at its node's IP."
    )
    host_shm_path: HostPath = Field(
        "/dev/shm",  # noqa: S108 - the host tmpfs CUDA IPC and shm need
        pattern=r"^/[^\s]*$",
        max_length=HOST_PATH_MAX_LENGTH,
        description=(
            "Host tmpfs mounted at /dev/shm (hostPath, never an emptyDir), under an allowed "
            "prefix (chart value allowedHostPathPrefixes)."
        ),
        json_schema_extra={"x-kubernetes-validations": HOST_PATH_RULES},
    )
    shm_group: Annotated[int | None, AfterValidator(_explicit_group)] = Field(
        None,
        description=(
            "Group shared by the cache pods and the cluster's vLLM pods (supplementalGroups): "
            "it owns the shm directory /dev/shm/lmcache-<namespace>.<name> (mode 2770). Unset: "
            f"a group derived from namespace/name in {RESERVED_ID_MIN}-{RESERVED_ID_MAX}, so two "
            "clusters do not share one by accident."
        ),
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": f"self >= {MIN_EXPLICIT_GROUP} && self < {RESERVED_ID_MIN}",
                    "message": SHM_GROUP_MESSAGE,
                }
            ]
        },
    )
    resources: ResourceRequirements | None = Field(
        None,
        description=(
            "Container resources; when unset, memory request = cache.cpuSize + 2Gi and the limit "
            "is 25% above it (at least 2Gi more)."
        ),
    )
    update_strategy: UpdateStrategy = nested_default(UpdateStrategy, "DaemonSet update strategy.")
    monitoring: MonitoringSpec = nested_default(MonitoringSpec, "Metrics scraping.")
    pod: PodOverrides = nested_default(PodOverrides, "Escape hatches for the pod template.")
    config: dict[str, JsonValue] = Field(
        default_factory=dict,
        max_length=MAX_CONFIG_KEYS,
        description=(
            "Cache server settings: LMCache 0.5.6 keys (an LMCache config works unchanged; keys "
            "that do not apply are ignored with a warning) and lmcache-node keys "
            "(docs/reference/configuration.md). Keys the spec sets (port, chunk_size, "
            "max_local_cpu_size, ...) may only repeat the spec's value; keys the operator sets "
            "(host, shm_dir, credentials, ...) are refused; a bad or unknown key sets "
            "ConfigValid=False naming it. Applied over configFrom."
        ),
        json_schema_extra={"additionalProperties": True},
    )
    config_from: ConfigFromSpec | None = Field(
        None,
        description=(
            "A ConfigMap key holding an LMCache YAML config (e.g. the lmcache.yaml of an "
            "LMCache deployment), validated like config; a change rolls the cache pods."
        ),
    )
    security: SecuritySpec = nested_default(SecuritySpec, "Credentials and their rotation.")

    @model_validator(mode="after")
    def _cross_field(self) -> LMCacheClusterSpec:
        if self.server.port == self.server.http_port:
            raise ValueError("server.port and server.httpPort must differ")
        if self.server.events_port in (self.server.port, self.server.http_port):
            raise ValueError(EVENTS_PORT_MESSAGE)
        if self.host_network and self.update_strategy.max_surge is not None:
            raise ValueError(
                "updateStrategy.maxSurge is not allowed with hostNetwork: two pods of a node "
                "would bind the same ports; use maxUnavailable"
            )
        return self

    def group(self, namespace: str, name: str) -> int:
        """The cluster's shm group: spec.shmGroup, else derived from namespace/name."""
        return self.shm_group if self.shm_group is not None else derived_group(namespace, name)

    def semantic_problems(self, policy: PodPolicy | None = None) -> list[str]:
        """Problems the API server's schema cannot see, under the chart's guard rails
        (``policy``, default: the chart's defaults); each names the field and the fix."""
        policy = PodPolicy() if policy is None else policy
        problems: list[str] = []
        paths = [("spec.hostShmPath", self.host_shm_path)]
        if self.cache.disk is not None:
            paths.append(("spec.cache.disk.path", self.cache.disk.path))
        for field, path in paths:
            problem = policy.host_path_problem(field, path)
            if problem is not None:
                problems.append(problem)
        problems += pass_through_problems(
            "spec.pod",
            policy=policy,
            pod_context=self.pod.security_context,
            container_context=self.pod.container_security_context,
            volumes=self.pod.volumes,
        )
        cpu_bytes = parse_bytes(self.cache.cpu_size)
        if self.resources is not None:
            for kind in ("requests", "limits"):
                memory = getattr(self.resources, kind).get("memory")
                if memory is None:
                    continue
                try:
                    memory_bytes = parse_bytes(memory)
                except ValueError as exc:
                    problems.append(f"resources.{kind}.memory: {exc}")
                    continue
                if memory_bytes < cpu_bytes:
                    problems.append(
                        f"resources.{kind}.memory {memory} is below cache.cpuSize "
                        f"{self.cache.cpu_size}: the memory tier would not fit; raise it or "
                        "shrink cache.cpuSize"
                    )
        return problems


class Endpoint(ApiModel):
    """A cache server on one node."""

    node: str = Field(description="Node name.")
    host_ip: str = Field("", alias="hostIP", description="The node's IP (status.hostIP).")
    port: int = Field(description="ZMQ port on that IP.")
    pod: str = Field(description="Cache pod name.")
    ready: bool = Field(description="Whether the pod is Ready.")
    restarts: int = Field(0, description="Container restarts of the pod.")
    device: str = Field(
        "",
        description=(
            "Device the server serves (cuda or cpu: spec.device resolved); a server that "
            "cannot serve it exits at start and the Degraded condition quotes why."
        ),
    )
    pool: PoolStatus | None = Field(
        None, description="Its L1 pool as the server reported it once ready (/readyz)."
    )


class ServerKeyStatus(ApiModel):
    """The cache servers' CURVE public key (its secret half is in the cache Secret)."""

    public_key: str = Field(description="Z85 public key (40 characters).")
    fingerprint: str = Field(description="Its first 8 characters, as the servers log it.")


class ClientKeyStatus(ApiModel):
    """A client public key the cache servers accept."""

    public_key: str = Field(description="Z85 public key (40 characters).")
    fingerprint: str = Field(description="Its first 8 characters, as the servers log it.")
    state: Literal["active", "retiring"] = Field(
        description="active: in the client Secret; retiring: a rotation's previous key, "
        "accepted until the consumers have rolled."
    )
    created_at: str = Field("", description="When the operator generated it (RFC 3339).")


class RotationStatus(ApiModel):
    """The last client key rotation (annotation lmcache.dev/rotate-keys)."""

    phase: Literal["Propagating", "RollingConsumers", "Completed"] = Field(
        description="Propagating: the new key is allowed, waiting for the cache pods' key "
        "file to update; RollingConsumers: VLLMDeployments roll to the new key; Completed: "
        "the previous key is no longer accepted."
    )
    requested: str = Field(description="The annotation value this rotation answered.")
    started_at: str = Field("", description="When the new key was written (RFC 3339).")
    completed_at: str = Field("", description="When the previous key was dropped (RFC 3339).")
    message: str = Field("", description="What the rotation waits for, or how it ended.")


class CredentialsStatus(ApiModel):
    """The cluster's credentials: where they are and their public halves."""

    cache_secret: str = Field(description="Secret the cache pods mount (server.key, ...).")
    client_secret: str = Field(description="Secret the vLLM pods mount (client.key, ...).")
    keys_config_map: str = Field(description="ConfigMap of the public keys (clients.pub).")
    server_key: ServerKeyStatus = Field(description="The servers' public key.")
    client_keys: list[ClientKeyStatus] = Field(
        default_factory=list, description="Client public keys the servers accept."
    )
    consumer_key: str = Field(
        "",
        description="Fingerprint of the client key the VLLMDeployments' pods run with "
        "(pod annotation lmcache.dev/client-key).",
    )
    generated_at: str = Field("", description="When the key pair was generated (RFC 3339).")
    rotation: RotationStatus | None = Field(None, description="The last rotation, if any.")


Phase = Literal["Pending", "Progressing", "Ready", "Degraded", "Failed"]


class ConnectionStatus(ApiModel):
    """How any vLLM pod uses this cache (docs/integrations.md, "Any vLLM")."""

    config_map: str = Field(
        "",
        description="ConfigMap (same namespace) holding the connection contract: settings, "
        "--kv-transfer-config, env, a pod template patch, production-stack values.",
    )
    pod_label: str = Field(
        "",
        description="Label (on a pod template or a namespace) that asks the operator's "
        "webhook to wire pods to this cache.",
    )


class LMCacheClusterStatus(ApiModel):
    """Observed state, written by the operator through the status subresource."""

    model_config = ConfigDict(extra="ignore")

    observed_generation: int | None = Field(None, description="Spec generation last acted on.")
    phase: Phase | None = Field(None, description="Pending, Progressing, Ready, Degraded, Failed.")
    desired_nodes: int = Field(0, description="Nodes that should run a cache server.")
    current_nodes: int = Field(0, description="Nodes running a cache pod.")
    ready_nodes: int = Field(0, description="Nodes whose cache pod is Ready.")
    updated_nodes: int = Field(0, description="Nodes running the current spec.")
    unavailable_nodes: int = Field(0, description="Nodes without an available cache pod.")
    endpoints: list[Endpoint] = Field(
        default_factory=list, description="The cache server of each node."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Ready, Available, Progressing, Degraded, ConfigValid.",
    )
    consumers: list[str] = Field(
        default_factory=list, description="VLLMDeployments (same namespace) that use this cache."
    )
    credentials: CredentialsStatus | None = Field(
        None, description="The cluster's CURVE keys, token and their Secrets."
    )
    rollout: RolloutStatus | None = Field(
        None, description="The rollout of the current spec to the cache pods, node by node."
    )
    pool_nodes: list[str] = Field(
        default_factory=list,
        description=(
            "Nodes where a cache pod of this cluster ran with a persistent pool: the pool may "
            "be there after the pod is gone; deleting the cluster removes it from each."
        ),
    )
    connection: ConnectionStatus | None = Field(
        None, description="The connection contract for vLLM pods not made by a VLLMDeployment."
    )


DEFINITION = KindDefinition(
    kind=KIND,
    plural=PLURAL,
    singular="lmcachecluster",
    short_names=("lmcc",),
    spec_model=LMCacheClusterSpec,
    status_model=LMCacheClusterStatus,
    description=(
        "LMCacheCluster runs one LMCache-compatible KV cache server on every selected node "
        "(a DaemonSet) that vLLM pods on that node reach at the node's IP."
    ),
    printer_columns=(
        PrinterColumn("Ready", "integer", ".status.readyNodes", "Nodes with a ready server."),
        PrinterColumn("Desired", "integer", ".status.desiredNodes", "Nodes that need one."),
        PrinterColumn("Phase", "string", ".status.phase", "Summary state."),
        PrinterColumn("Port", "integer", ".spec.server.port", "ZMQ port."),
        PrinterColumn("Cache", "string", ".spec.cache.cpuSize", "CPU tier size per node."),
        PrinterColumn("Age", "date", ".metadata.creationTimestamp"),
    ),
    spec_rules=(
        {
            "rule": "!has(self.server) || !has(self.server.port) || !has(self.server.httpPort)"
            " || self.server.port != self.server.httpPort",
            "message": "server.port and server.httpPort must differ",
        },
        {
            "rule": "!has(self.server) || !has(self.server.eventsPort)"
            " || self.server.eventsPort == 0 || ("
            "(!has(self.server.port) || self.server.eventsPort != self.server.port)"
            " && (!has(self.server.httpPort) || self.server.eventsPort != self.server.httpPort))",
            "message": EVENTS_PORT_MESSAGE,
        },
        {
            "rule": "!(self.hostNetwork && has(self.updateStrategy)"
            " && has(self.updateStrategy.maxSurge))",
            "message": "updateStrategy.maxSurge is not allowed with hostNetwork: two pods of a "
            "node would bind the same ports; use maxUnavailable",
        },
    ),
)
