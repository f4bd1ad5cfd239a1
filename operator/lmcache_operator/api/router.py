"""``VLLMDeployment.spec.router``: the cache-aware router in front of the replicas."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from lmcache_operator.api.common import ApiModel, Quantity, nested_default, positive_quantity_field

RouterPolicy = Literal["cache-aware", "round-robin", "prefix-hash", "session"]
RouterArg = Annotated[str, Field(max_length=4096)]
CpuQuantity = Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)?m?$", max_length=32)]


class RouterResources(ApiModel):
    """Resources of one router pod."""

    cpu: CpuQuantity = Field("500m", description="CPU request.")
    memory: Quantity = positive_quantity_field(
        "Memory request and limit (the index takes about 100 bytes per cached chunk).",
        default="1Gi",
    )

    def requirements(self) -> dict[str, Any]:
        return {
            "requests": {"cpu": self.cpu, "memory": self.memory},
            "limits": {"memory": self.memory},
        }


class RouterSpec(ApiModel):
    """An OpenAI-compatible router (lmcache-node router) that sends each request to the
    replica whose node cache holds most of its prompt's prefix, balanced with load."""

    enabled: bool = Field(
        False,
        description=(
            "Run the router: a Deployment and a Service <name>-router (status.routerUrl) "
            "in front of the replicas."
        ),
    )
    replicas: int = Field(2, ge=0, le=64, description="Router pods (each routes on its own).")
    policy: RouterPolicy = Field(
        "cache-aware",
        description=(
            "cache-aware (what each node cache holds, and load), round-robin, prefix-hash "
            "(consistent hashing of the first chunk) or session (sticky per x-session-id)."
        ),
    )
    image: str | None = Field(
        None,
        max_length=1024,
        description="Router image; default: the cache cluster's node image (lmcache-node).",
    )
    resources: RouterResources = nested_default(RouterResources)
    session_header: str = Field(
        "x-session-id",
        pattern=r"^[A-Za-z0-9-]+$",
        max_length=128,
        description="Request header naming the conversation (policy session).",
    )
    extra_args: list[RouterArg] = Field(
        default_factory=list,
        max_length=64,
        description="Extra `lmcache-node router` arguments, appended last.",
    )
