"""LMCacheCluster status of the L1 pools and of the operator's node-by-node rollouts."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from lmcache_operator.api.common import ApiModel

PoolState = Literal["adopted", "created", "anonymous", "disabled", "unknown"]
NodeRolloutState = Literal["Waiting", "Replacing", "Starting", "Updated"]
RolloutState = Literal["Complete", "RollingOut", "Blocked", "Manual", "DaemonSet"]


class PoolStatus(ApiModel):
    """A node's L1 pool, as its server reported it on /readyz once ready."""

    model_config = ConfigDict(extra="ignore")

    state: PoolState = Field(
        description=(
            "adopted (the chunks a previous server left were kept), created (a new pool; "
            "reason says why nothing was adopted), anonymous (process memory, lost at exit), "
            "disabled (no L1), unknown (the operator could not read /readyz)."
        )
    )
    reason: str = Field("", description="Why nothing was adopted, or why the state is unknown.")
    capacity_bytes: int = Field(0, description="Size of the pool.")
    used_bytes: int = Field(0, description="Bytes in use when the server became ready.")
    entries: int = Field(0, description="Chunks held when the server became ready.")
    adopted_entries: int = Field(0, description="Chunks adopted from the previous server.")
    adopted_bytes: int = Field(0, description="Bytes adopted from the previous server.")


class NodeRollout(ApiModel):
    """One node of a rollout."""

    model_config = ConfigDict(extra="ignore")

    node: str = Field(description="Node name.")
    state: NodeRolloutState = Field(
        description=(
            "Waiting (runs an older spec), Replacing (its cache pod was deleted), Starting "
            "(the new pod starts, or its pool is being read), Updated."
        )
    )
    pod: str = Field("", description="The cache pod of the current spec, once it exists.")
    started_at: str = Field("", description="When its old pod was deleted (RFC 3339).")
    seconds: float | None = Field(
        None, description="From deleting the old pod to the new one ready with its pool."
    )
    pool: PoolState | None = Field(None, description="The new server's pool.")
    adopted_entries: int = Field(0, description="Chunks the new server adopted.")
    adopted_bytes: int = Field(0, description="Bytes the new server adopted.")
    message: str = Field("", description="What it waits for, or why the pool was not adopted.")


class RolloutStatus(ApiModel):
    """The operator's rollout of the current spec to the cache pods, node by node."""

    model_config = ConfigDict(extra="ignore")

    revision: str = Field(
        description="The pod template being rolled out (annotation lmcache.dev/template-hash)."
    )
    state: RolloutState = Field(
        description=(
            "Complete; RollingOut; Blocked (a new pod does not become ready: the rollout "
            "stops there); Manual (updateStrategy OnDelete: delete pods to update them); "
            "DaemonSet (maxSurge: the DaemonSet controller rolls, uncoordinated)."
        )
    )
    updated_nodes: int = Field(0, description="Nodes running the current spec.")
    desired_nodes: int = Field(0, description="Nodes that run a cache pod.")
    nodes_in_progress: list[str] = Field(
        default_factory=list, description="Nodes whose cache pod is being replaced now."
    )
    started_at: str = Field("", description="When this revision's rollout began (RFC 3339).")
    completed_at: str = Field("", description="When every node ran it (RFC 3339).")
    message: str = Field("", description="What the rollout does or waits for.")
    nodes: list[NodeRollout] = Field(
        default_factory=list, description="Per node: state, time taken, what was adopted."
    )
