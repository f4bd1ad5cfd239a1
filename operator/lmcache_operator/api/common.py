"""Pieces shared by every kind of the lmcache.dev API: base model, quantities, kinds.

Pydantic models are the single source of the API: the CRDs in ``crds/`` are generated from
them (``lmcache-operator crds``) and the operator validates specs with the same models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict

from lmcache_operator.api.k8s_types import k8s_list, k8s_object
from lmcache_operator.quantity import QUANTITY_PATTERN, parse_bytes

GROUP = "lmcache.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
FIELD_MANAGER = "lmcache-operator"

EMPTY_DEFAULT: JsonDict = {"default": {}}  # so the API server applies nested defaults


class ApiModel(BaseModel):
    """camelCase on the wire, snake_case in Python, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )


def nested_default(model: type[ApiModel], description: str | None = None) -> Any:
    """A sub-object field that defaults to the model's own defaults, in Python and in the CRD."""
    return Field(
        default_factory=lambda: model.model_validate({}),
        description=description if description is not None else (model.__doc__ or "").strip(),
        json_schema_extra=EMPTY_DEFAULT,
    )


def _positive_quantity(value: str) -> str:
    if parse_bytes(value) <= 0:
        raise ValueError(f"{value!r} must be greater than zero")
    return value


Quantity = Annotated[
    str,
    Field(pattern=QUANTITY_PATTERN, max_length=64),
    AfterValidator(_positive_quantity),
]
"""A positive Kubernetes quantity such as 4Gi; checked by the API server too (CEL)."""

POSITIVE_QUANTITY_RULE: JsonDict = {
    "rule": "!isQuantity(self) || quantity(self).isGreaterThan(quantity('0'))",
    "message": "must be a quantity greater than zero, e.g. 4Gi",
}


def positive_quantity_field(description: str, **kwargs: Any) -> Any:
    """A Field for a Quantity whose positivity the API server checks with CEL."""
    return Field(
        description=description,
        json_schema_extra={"x-kubernetes-validations": [POSITIVE_QUANTITY_RULE]},
        **kwargs,
    )


PullPolicy = Literal["Always", "IfNotPresent", "Never"]


class ImageSpec(ApiModel):
    """Container image of a component."""

    repository: str = Field(
        "ghcr.io/lmcache-k8s/lmcache-node",
        min_length=1,
        max_length=512,
        description="Image repository, without the tag.",
    )
    tag: str = Field("0.1.0", min_length=1, max_length=128, description="Image tag.")
    pull_policy: PullPolicy = Field("IfNotPresent", description="Kubernetes imagePullPolicy.")
    pull_secrets: list[str] = Field(
        default_factory=list,
        max_length=16,
        description="Names of image pull Secrets in the resource's namespace.",
    )

    @property
    def reference(self) -> str:
        return f"{self.repository}:{self.tag}"


class NodeImageSpec(ApiModel):
    """The cache server's image; unset parts come from the operator (chart value nodeImage)."""

    repository: str | None = Field(
        None,
        min_length=1,
        max_length=512,
        description=(
            "Image repository, without the tag; default: the chart's nodeImage.repository "
            "(ghcr.io/lmcache-k8s/lmcache-node)."
        ),
    )
    tag: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description=(
            "Image tag; default: <version>-cuda when the cluster serves CUDA (device cuda, or "
            "auto on GPU nodes), <version>-cpu otherwise (version: the chart's "
            "nodeImage.version). The CUDA variant has a CUDA PyTorch for CUDA IPC."
        ),
    )
    pull_policy: PullPolicy = Field("IfNotPresent", description="Kubernetes imagePullPolicy.")
    pull_secrets: list[str] = Field(
        default_factory=list,
        max_length=16,
        description="Names of image pull Secrets in the resource's namespace.",
    )

    @property
    def reference(self) -> str:
        """repository:tag; only for a spec resolved with the operator's defaults."""
        if self.repository is None or self.tag is None:
            raise ValueError("the node image is not resolved: use builders.node_image.resolve()")
        return f"{self.repository}:{self.tag}"


class SecretKeyRef(ApiModel):
    """A key of a Secret in the resource's namespace."""

    name: str = Field(min_length=1, max_length=253, description="Secret name.")
    key: str = Field(min_length=1, max_length=253, description="Key inside the Secret.")


GPU_NODE_LABEL = "nvidia.com/gpu.present"


class PlacementSpec(ApiModel):
    """Where the pods run."""

    node_selector: dict[str, str] = Field(
        default_factory=lambda: {GPU_NODE_LABEL: "true"},
        description=(
            "Node labels the pods require; defaults to GPU nodes "
            '({"nvidia.com/gpu.present": "true"}).'
        ),
        json_schema_extra={"default": {GPU_NODE_LABEL: "true"}},
    )
    tolerations: list[dict[str, Any]] = k8s_list(
        "Toleration", "Pod tolerations (core/v1 Toleration objects), passed through.", 64
    )
    affinity: dict[str, Any] | None = k8s_object(
        "Affinity", "Pod affinity (core/v1 Affinity), passed through."
    )
    priority_class_name: str | None = Field(
        None, max_length=253, description="PriorityClass of the pods."
    )
    runtime_class_name: str | None = Field(
        None,
        max_length=253,
        description=(
            "RuntimeClass of the pods. Unset: nvidia for a cache serving CUDA (the cache pod "
            "sees the GPUs without requesting any; the chart's nodeImage.cudaRuntimeClassName), "
            "none otherwise. An empty string omits it."
        ),
    )


class PodOverrides(ApiModel):
    """Escape hatches merged into the generated pod template.

    The operator refuses privilege here (privileged, added capabilities, privilege
    escalation, unconfined seccomp/AppArmor, SELinux labels, sysctls, ids in the range
    reserved for shm groups, host paths outside the chart's allowedHostPathPrefixes) unless
    the chart sets allowPrivilegedPassThrough: the resource's ConfigValid condition says which
    field.
    """

    labels: dict[str, str] = Field(default_factory=dict, description="Extra pod labels.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Extra pod annotations.")
    env: list[dict[str, Any]] = k8s_list(
        "EnvVar", "Extra environment variables (core/v1 EnvVar) of the main container.", 128
    )
    env_from: list[dict[str, Any]] = k8s_list(
        "EnvFromSource",
        "Extra environment sources (core/v1 EnvFromSource: ConfigMaps, Secrets) of the main "
        "container.",
        16,
    )
    volumes: list[dict[str, Any]] = k8s_list(
        "Volume",
        "Extra pod volumes (core/v1 Volume); a hostPath must lie under an allowed prefix "
        "(chart value allowedHostPathPrefixes).",
        64,
    )
    volume_mounts: list[dict[str, Any]] = k8s_list(
        "VolumeMount", "Extra volume mounts (core/v1 VolumeMount) of the main container.", 64
    )
    security_context: dict[str, Any] | None = k8s_object(
        "PodSecurityContext",
        "Pod securityContext (core/v1 PodSecurityContext), merged over the operator's defaults "
        "(seccomp RuntimeDefault, the cluster's shm group in supplementalGroups, and for cache "
        "pods runAsNonRoot with the image's uid 65532).",
    )
    container_security_context: dict[str, Any] | None = k8s_object(
        "SecurityContext",
        "securityContext (core/v1 SecurityContext) of the main container, merged over the "
        "defaults (allowPrivilegeEscalation false, capabilities drop ALL, and for cache pods a "
        "read-only root filesystem); capabilities.drop keeps ALL.",
    )


class ResourceRequirements(ApiModel):
    """Container resources; omitted values are derived (see the field of the owner)."""

    requests: dict[str, str] = Field(
        default_factory=dict, description="Resource requests, e.g. {memory: 6Gi, cpu: '2'}."
    )
    limits: dict[str, str] = Field(default_factory=dict, description="Resource limits.")


class Condition(ApiModel):
    """A status condition (the metav1.Condition shape)."""

    type: str = Field(description="Condition type, e.g. Ready.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="One CamelCase word saying why.")
    message: str = Field("", description="What happened and, when it is a problem, what to do.")
    last_transition_time: str = Field(description="When the status last changed (RFC 3339).")
    observed_generation: int | None = Field(
        None, description="The resource generation the condition was computed for."
    )


@dataclass(frozen=True)
class PrinterColumn:
    name: str
    type: str
    json_path: str
    description: str = ""


@dataclass(frozen=True)
class KindDefinition:
    """Everything the CRD generator needs to know about one kind."""

    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    spec_model: type[BaseModel]
    status_model: type[BaseModel]
    description: str
    printer_columns: tuple[PrinterColumn, ...] = ()
    categories: tuple[str, ...] = ("lmcache",)
    spec_rules: tuple[dict[str, str], ...] = field(default_factory=tuple)
    scale: tuple[str, str, str] | None = None  # spec/status replicas paths, label selector path
    group: str = GROUP
    version: str = VERSION

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{self.group}"
