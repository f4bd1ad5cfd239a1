# Long on purpose: the VLLMDeployment CRD's pydantic models, every field with its description,
# bounds and CEL rules in one place (crds/ and the CRD reference are generated from them).
"""The VLLMDeployment kind: vLLM replicas (a Deployment) wired to their node's cache server."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, Field, model_validator

from lmcache_operator.api.common import (
    ApiModel,
    Condition,
    KindDefinition,
    PodOverrides,
    PrinterColumn,
    PullPolicy,
    Quantity,
    SecretKeyRef,
    nested_default,
    positive_quantity_field,
)
from lmcache_operator.api.k8s_types import K8S_TYPE_KEY, k8s_list, k8s_object
from lmcache_operator.api.policy import (
    HOST_PATH_MAX_LENGTH,
    SHAPE_RULE,
    SYSTEM_RULE,
    PodPolicy,
    checked_host_path,
    pass_through_problems,
    volume_problems,
)
from lmcache_operator.api.router import RouterSpec

KIND = "VLLMDeployment"
PLURAL = "vllmdeployments"

Device = Literal["auto", "cuda", "cpu"]
KVRole = Literal["kv_both", "kv_producer", "kv_consumer"]
Colocation = Literal["Required", "Preferred", "None"]

GPU_IMAGE = ("docker.io/vllm/vllm-openai", "v0.32.0")
CPU_IMAGE = ("ghcr.io/lmcache-k8s/lmcache-vllm-cpu", "0.1.0")
KV_TRANSFER_FLAGS = ("--kv-transfer-config", "--kv_transfer_config")

Arg = Annotated[str, Field(max_length=4096)]
CpuQuantity = Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)?m?$", max_length=32)]


class ModelVolume(ApiModel):
    """A volume holding the weights, mounted read-only into the vLLM container."""

    source: dict[str, Any] = Field(
        description=(
            "A core/v1 volume source, e.g. {persistentVolumeClaim: {claimName: llama}} or "
            "{hostPath: {path: /models}} (under an allowed prefix, chart value "
            "allowedHostPathPrefixes); passed through."
        ),
        json_schema_extra={K8S_TYPE_KEY: "VolumeSource"},
    )
    mount_path: str = Field(
        "/models",
        pattern=r"^/[^\s]*$",
        max_length=1024,
        description="Where the volume is mounted; model.name may be a path below it.",
    )


MODEL_CACHE_FORMS_MESSAGE = (
    "model.cache takes exactly one of claimName (an existing PVC), size (a PVC the operator "
    "creates) and hostPath (a directory on each node)"
)
AccessMode = Literal["ReadWriteOnce", "ReadWriteOncePod", "ReadWriteMany"]


class ModelCacheSpec(ApiModel):
    """Where downloaded weights are kept (HF_HOME points into it), so replicas and restarts
    load them from there instead of downloading again."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "[has(self.claimName), has(self.size), has(self.hostPath)]"
                    ".filter(x, x).size() == 1",
                    "message": MODEL_CACHE_FORMS_MESSAGE,
                },
                {
                    "rule": "has(self.size) || (!has(self.storageClassName) && "
                    "!has(self.accessModes))",
                    "message": "model.cache.storageClassName and accessModes apply to the PVC "
                    "the operator creates: set model.cache.size too",
                },
            ]
        }
    )

    claim_name: str | None = Field(
        None,
        min_length=1,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="An existing PersistentVolumeClaim in the namespace (ReadWriteMany for "
        "replicas on several nodes).",
    )
    size: Quantity | None = positive_quantity_field(
        "Size of a PVC the operator creates, <name>-model-cache (owned by the VLLMDeployment: "
        "deleted with it), e.g. 100Gi.",
        default=None,
    )
    storage_class_name: str | None = Field(
        None,
        max_length=253,
        description="StorageClass of the created PVC (default: the cluster's).",
    )
    access_modes: list[AccessMode] = Field(
        default_factory=lambda: list[AccessMode](["ReadWriteOnce"]),
        min_length=1,
        max_length=3,
        description="Access modes of the created PVC: ReadWriteOnce (one node: replicas on "
        "other nodes cannot mount it) or ReadWriteMany (every node shares one copy).",
    )
    host_path: Annotated[str, AfterValidator(checked_host_path)] | None = Field(
        None,
        pattern=r"^/[^\s]*$",
        max_length=HOST_PATH_MAX_LENGTH,
        description="A directory on each node, under an allowed prefix (chart value "
        "allowedHostPathPrefixes): each node downloads a model once, every replica and "
        "restart there reuses it. Created if missing (owned by root: a non-root image needs "
        "it created writable for its user).",
        json_schema_extra={"x-kubernetes-validations": [dict(SHAPE_RULE), dict(SYSTEM_RULE)]},
    )
    mount_path: str = Field(
        "/var/cache/huggingface",
        pattern=r"^/[^\s]*$",
        max_length=1024,
        description="Where the cache is mounted in the vLLM container; HF_HOME is set to it "
        "(unless engine.env or pod.env sets HF_HOME).",
    )

    @model_validator(mode="after")
    def _one_form(self) -> ModelCacheSpec:
        forms = [self.claim_name, self.size, self.host_path]
        if sum(form is not None for form in forms) != 1:
            raise ValueError(MODEL_CACHE_FORMS_MESSAGE)
        if self.size is None and (
            self.storage_class_name is not None or "access_modes" in self.model_fields_set
        ):
            raise ValueError(
                "model.cache.storageClassName and accessModes apply to the PVC the operator "
                "creates: set model.cache.size too"
            )
        return self


class ModelSpec(ApiModel):
    """The model vLLM serves."""

    name: str = Field(
        min_length=1,
        max_length=1024,
        description="Hugging Face model id (meta-llama/Llama-3.1-8B-Instruct) or a local path.",
    )
    served_model_name: str | None = Field(
        None,
        max_length=256,
        description="Name clients use in the OpenAI API (--served-model-name).",
    )
    hf_token_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key with a Hugging Face token (becomes HF_TOKEN)."
    )
    volume: ModelVolume | None = Field(None, description="Optional volume holding the weights.")
    cache: ModelCacheSpec | None = Field(
        None,
        description="Keep downloaded weights (HF_HOME) on a PVC or a node directory, so "
        "replicas and restarts do not download them again.",
    )


class VLLMImageSpec(ApiModel):
    """The vLLM container image."""

    repository: str | None = Field(
        None,
        max_length=512,
        description=(
            "Image repository without the tag; default docker.io/vllm/vllm-openai, or "
            "ghcr.io/lmcache-k8s/lmcache-vllm-cpu (which contains the connector) with device cpu."
        ),
    )
    tag: str | None = Field(None, max_length=128, description="Image tag (default per repository).")
    pull_policy: PullPolicy = Field("IfNotPresent", description="Kubernetes imagePullPolicy.")
    pull_secrets: list[str] = Field(
        default_factory=list, max_length=16, description="Image pull Secrets in the namespace."
    )
    includes_connector: bool | None = Field(
        None,
        description=(
            "Whether the image already contains the lmcache_node package. When false, an init "
            "container copies it from the cache cluster's image into a shared volume on "
            "PYTHONPATH. Default: true for the CPU image, false otherwise."
        ),
    )


class ParallelismSpec(ApiModel):
    """Model parallelism inside one replica."""

    tensor: int = Field(1, ge=1, le=64, description="--tensor-parallel-size.")
    pipeline: int = Field(1, ge=1, le=64, description="--pipeline-parallel-size.")


class EngineSpec(ApiModel):
    """vLLM engine arguments."""

    extra_args: list[Arg] = Field(
        default_factory=list,
        max_length=128,
        description=(
            "Extra `vllm serve` arguments, appended last. No --kv-transfer-config while "
            "cache.enabled (the operator writes it)."
        ),
    )
    env: list[dict[str, Any]] = k8s_list(
        "EnvVar", "Extra environment variables (core/v1 EnvVar) of the vLLM container.", 128
    )
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="--gpu-memory-utilization (fraction of GPU memory)."
    )
    max_model_len: int | None = Field(None, ge=1, description="--max-model-len.")
    enable_prefix_caching: bool | None = Field(
        None, description="--enable-prefix-caching / --no-enable-prefix-caching (vLLM default)."
    )
    device: Device = Field(
        "auto",
        description=(
            "cuda (GPU limits), cpu (no GPU limits; the CPU image) or auto (cuda, unless "
            "resources.gpus is 0)."
        ),
    )


class VLLMResources(ApiModel):
    """Resources of one replica."""

    gpus: int | None = Field(
        None,
        ge=0,
        le=64,
        description="GPUs per replica (default tensor x pipeline; none with device cpu).",
    )
    gpu_resource_name: str = Field(
        "nvidia.com/gpu", max_length=253, description="Extended resource name of a GPU."
    )
    cpu: CpuQuantity | None = Field(None, description="CPU request, e.g. '8' or 500m.")
    memory: Quantity | None = positive_quantity_field(
        "Memory request and limit, e.g. 32Gi.", default=None
    )


class ClusterRef(ApiModel):
    """An LMCacheCluster in the same namespace."""

    name: str = Field(min_length=1, max_length=253, description="LMCacheCluster name.")


class VLLMCacheSpec(ApiModel):
    """KV cache offload to the node cache servers."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.enabled) || !self.enabled || has(self.clusterRef)",
                    "message": "cache.clusterRef is required while cache.enabled is true: name "
                    "an LMCacheCluster in the same namespace",
                }
            ]
        }
    )

    enabled: bool = Field(True, description="Wire vLLM to the cache cluster's servers.")
    cluster_ref: ClusterRef | None = Field(
        None, description="The LMCacheCluster (same namespace) whose servers this uses."
    )
    kv_role: KVRole = Field(
        "kv_both",
        description="kv_both (load and store), kv_producer (store only: prefill), kv_consumer "
        "(load only: decode).",
    )
    load_failure_policy: Literal["recompute", "fail"] = Field(
        "recompute",
        description="What vLLM does when a KV load fails: recompute the tokens, or fail the "
        "request.",
    )

    @model_validator(mode="after")
    def _ref_required(self) -> VLLMCacheSpec:
        if self.enabled and self.cluster_ref is None:
            raise ValueError(
                "cache.clusterRef is required while cache.enabled is true: name an "
                "LMCacheCluster in the same namespace"
            )
        return self


class VLLMPlacement(ApiModel):
    """Where the replicas run."""

    colocate_with_cache: Colocation = Field(
        "Required",
        description=(
            "Required: only on the cluster's nodes and only where its cache pod is Ready "
            "(pods wait, scheduling-gated, until then). Preferred: a preference; the connector "
            "recomputes where no cache runs. None: no constraint."
        ),
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Extra node labels the pods require."
    )
    tolerations: list[dict[str, Any]] = k8s_list(
        "Toleration", "Pod tolerations (core/v1 Toleration), passed through.", 64
    )
    affinity: dict[str, Any] | None = k8s_object(
        "Affinity", "Pod affinity (core/v1 Affinity), merged with the colocation terms."
    )
    topology_spread_constraints: list[dict[str, Any]] = k8s_list(
        "TopologySpreadConstraint",
        "How the replicas spread over zones or nodes (core/v1 TopologySpreadConstraint), "
        "passed through.",
        16,
    )
    priority_class_name: str | None = Field(None, max_length=253, description="PriorityClass.")
    runtime_class_name: str | None = Field(None, max_length=253, description="RuntimeClass.")


class ServiceSpec(ApiModel):
    """The Service in front of the OpenAI API."""

    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field(
        "ClusterIP", description="Service type."
    )
    port: int = Field(8000, ge=1, le=65535, description="Port of the OpenAI API.")


class ProbeSpec(ApiModel):
    """Health checks on vLLM's /health."""

    enabled: bool = Field(True, description="Add startup, readiness and liveness probes.")
    startup_timeout_seconds: int = Field(
        1800, ge=10, le=86400, description="How long model loading may take before a restart."
    )
    period_seconds: int = Field(10, ge=1, le=300, description="Probe period.")
    failure_threshold: int = Field(
        3, ge=1, le=100, description="Failures before not-ready/restart."
    )


class StrategySpec(ApiModel):
    """Deployment update strategy."""

    type: Literal["RollingUpdate", "Recreate"] = Field(
        "RollingUpdate", description="RollingUpdate or Recreate."
    )
    max_surge: int | str | None = Field(
        None, description="Extra replicas during a rolling update (needs spare GPUs)."
    )
    max_unavailable: int | str | None = Field(
        None, description="Replicas that may be unavailable during a rolling update."
    )


class VLLMDeploymentSpec(ApiModel):
    """Desired state of a VLLMDeployment."""

    model: ModelSpec = Field(description="The model to serve.")
    image: VLLMImageSpec = nested_default(VLLMImageSpec)
    replicas: int = Field(1, ge=0, le=10000, description="Number of vLLM replicas (pods).")
    parallelism: ParallelismSpec = nested_default(ParallelismSpec)
    engine: EngineSpec = nested_default(EngineSpec)
    resources: VLLMResources = nested_default(VLLMResources)
    cache: VLLMCacheSpec = nested_default(VLLMCacheSpec)
    placement: VLLMPlacement = nested_default(VLLMPlacement)
    service: ServiceSpec = nested_default(ServiceSpec)
    probes: ProbeSpec = nested_default(ProbeSpec)
    strategy: StrategySpec = nested_default(StrategySpec)
    pod: PodOverrides = nested_default(PodOverrides)
    router: RouterSpec = nested_default(RouterSpec)

    @model_validator(mode="after")
    def _cross_field(self) -> VLLMDeploymentSpec:
        needed = self.parallelism.tensor * self.parallelism.pipeline
        gpus = self.resources.gpus
        if self.engine.device != "cpu" and gpus is not None and gpus < needed:
            raise ValueError(
                f"resources.gpus ({gpus}) must be at least parallelism.tensor "
                f"x parallelism.pipeline ({needed}) unless engine.device is cpu"
            )
        if self.router.enabled and not self.cache.enabled and self.router.image is None:
            raise ValueError(
                "router.image is required while cache.enabled is false: the router runs from "
                "the cache cluster's node image by default"
            )
        if self.cache.enabled and any(
            arg.split("=", 1)[0].split(".", 1)[0] in KV_TRANSFER_FLAGS
            for arg in self.engine.extra_args
        ):
            raise ValueError(
                "engine.extraArgs must not contain --kv-transfer-config while cache.enabled is "
                "true: the operator writes it; set cache.enabled: false to wire vLLM yourself"
            )
        return self

    def semantic_problems(self, policy: PodPolicy | None = None) -> list[str]:
        """What the chart's guard rails (``policy``, default: the chart's defaults) refuse:
        host paths outside the allowed prefixes and privileged pass-through; each names the
        field and the fix."""
        policy = PodPolicy() if policy is None else policy
        problems: list[str] = []
        if self.model.volume is not None:
            source = self.model.volume.source
            problems += volume_problems("spec.model.volume.source", source, policy)
        cache = self.model.cache
        if cache is not None and cache.host_path is not None:
            problem = policy.host_path_problem("spec.model.cache.hostPath", cache.host_path)
            problems += [problem] if problem is not None else []
        problems += pass_through_problems(
            "spec.pod",
            policy=policy,
            pod_context=self.pod.security_context,
            container_context=self.pod.container_security_context,
            volumes=self.pod.volumes,
        )
        return problems

    @property
    def image_runs_as_non_root(self) -> bool:
        """The default CPU image (ours) runs as uid 65532; stock vLLM images run as root."""
        return self.image.repository is None and self.device == "cpu"

    @property
    def device(self) -> Literal["cuda", "cpu"]:
        if self.engine.device == "cpu":
            return "cpu"
        if self.engine.device == "auto" and self.resources.gpus == 0:
            return "cpu"
        return "cuda"

    @property
    def gpus(self) -> int:
        if self.device == "cpu":
            return 0
        if self.resources.gpus is not None:
            return self.resources.gpus
        return self.parallelism.tensor * self.parallelism.pipeline

    @property
    def image_reference(self) -> str:
        repo, tag = CPU_IMAGE if self.device == "cpu" else GPU_IMAGE
        if self.image.repository is not None:
            repo, tag = self.image.repository, self.image.tag or "latest"
        elif self.image.tag is not None:
            tag = self.image.tag
        return f"{repo}:{tag}"

    @property
    def image_includes_connector(self) -> bool:
        if self.image.includes_connector is not None:
            return self.image.includes_connector
        return self.image.repository is None and self.device == "cpu"


_TENSOR = "(has(self.parallelism) && has(self.parallelism.tensor) ? self.parallelism.tensor : 1)"
_PIPELINE = (
    "(has(self.parallelism) && has(self.parallelism.pipeline) ? self.parallelism.pipeline : 1)"
)
SPEC_RULES: tuple[dict[str, str], ...] = (
    {
        "rule": "!has(self.resources) || !has(self.resources.gpus)"
        " || (has(self.engine) && has(self.engine.device) && self.engine.device == 'cpu')"
        f" || self.resources.gpus >= {_TENSOR} * {_PIPELINE}",
        "message": "resources.gpus must be at least parallelism.tensor x parallelism.pipeline "
        "unless engine.device is cpu",
    },
    {
        "rule": "!has(self.cache) || !has(self.cache.enabled) || !self.cache.enabled"
        " || !has(self.engine) || !has(self.engine.extraArgs)"
        " || !self.engine.extraArgs.exists(a, a.startsWith('--kv-transfer-config')"
        " || a.startsWith('--kv_transfer_config'))",
        "message": "engine.extraArgs must not contain --kv-transfer-config while cache.enabled "
        "is true: the operator writes it; set cache.enabled: false to wire vLLM yourself",
    },
    {
        "rule": "!has(self.router) || !has(self.router.enabled) || !self.router.enabled"
        " || has(self.router.image) || !has(self.cache) || !has(self.cache.enabled)"
        " || self.cache.enabled",
        "message": "router.image is required while cache.enabled is false: the router runs "
        "from the cache cluster's node image by default",
    },
    {
        "rule": "!has(self.replicas) || self.replicas >= 0",
        "message": "replicas must be 0 or more",
    },
)


class CacheStatus(ApiModel):
    """How the replicas reach the cache."""

    cluster_ref: str = Field("", description="The LMCacheCluster in use.")
    state: str = Field(
        "", description="Ready, Degraded, NotFound, Incompatible, Waiting or Disabled."
    )
    nodes_without_ready_cache: list[str] = Field(
        default_factory=list, description="Nodes running replicas without a Ready cache pod."
    )
    compatible: bool | None = Field(
        None, description="Chunk size, transfer mode and layout match the cluster."
    )


class VLLMDeploymentStatus(ApiModel):
    """Observed state, written by the operator through the status subresource."""

    model_config = ConfigDict(extra="ignore")

    observed_generation: int | None = Field(None, description="Spec generation last acted on.")
    replicas: int = Field(0, description="Pods of the Deployment.")
    ready_replicas: int = Field(0, description="Ready pods.")
    available_replicas: int = Field(0, description="Available pods.")
    updated_replicas: int = Field(0, description="Pods running the current spec.")
    selector: str = Field("", description="Label selector of the pods (scale subresource).")
    url: str = Field("", description="In-cluster URL of the OpenAI API.")
    router_url: str = Field(
        "", description="In-cluster URL of the router's OpenAI API (spec.router.enabled)."
    )
    cache: CacheStatus = Field(
        default_factory=lambda: CacheStatus.model_validate({}), description="Cache wiring."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Ready, Available, Progressing, CacheReady, CacheCompatible, ConfigValid, "
        "ReplicaFailure.",
    )


DEFINITION = KindDefinition(
    kind=KIND,
    plural=PLURAL,
    singular="vllmdeployment",
    short_names=("vllmd",),
    spec_model=VLLMDeploymentSpec,
    status_model=VLLMDeploymentStatus,
    description=(
        "VLLMDeployment runs vLLM replicas (a Deployment and a Service) whose KV connector "
        "talks to the LMCacheCluster server on each pod's own node (status.hostIP)."
    ),
    printer_columns=(
        PrinterColumn("Ready", "integer", ".status.readyReplicas", "Ready replicas."),
        PrinterColumn("Replicas", "integer", ".spec.replicas", "Desired replicas."),
        PrinterColumn("Model", "string", ".spec.model.name", "Served model."),
        PrinterColumn("Cache", "string", ".status.cache.state", "Cache wiring state."),
        PrinterColumn("Age", "date", ".metadata.creationTimestamp"),
    ),
    spec_rules=SPEC_RULES,
    scale=(".spec.replicas", ".status.replicas", ".status.selector"),
)
