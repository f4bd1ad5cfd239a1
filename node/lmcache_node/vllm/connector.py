"""``LMCacheNodeConnector``: vLLM's KV connector for the per-node cache server.

Load it with::

    --kv-transfer-config '{"kv_connector":"LMCacheNodeConnector",
      "kv_connector_module_path":"lmcache_node.vllm.connector","kv_role":"kv_both",
      "kv_connector_extra_config":{"lmcache.node.host":"tcp://10.0.0.7","lmcache.node.port":5555}}'

Scheduler side: a lookup (with a lock) per new request reports the whole chunks the server has
beyond vLLM's own prefix cache; those are loaded synchronously, so vLLM starts the load before
the forward pass (asynchronous loads would start after it). Stores are planned as prefill
completes chunks. Worker side: the KV tensors are registered once (CPU: moved into POSIX shared
memory the server maps; CUDA: IPC handles), loads run in ``start_load_kv`` and stores in
``wait_for_save``. ``kv_role``: ``kv_both`` loads and stores, ``kv_producer`` only stores,
``kv_consumer`` only loads. A load that fails is handled as vLLM's ``kv_load_failure_policy``
says: ``recompute`` (the blocks are recomputed) or ``fail`` (vLLM fails the request); any other
failure of the server degrades to a miss. Models with several KV cache groups are refused.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from lmcache_node.client import NodeClient, Registration
from lmcache_node.keys import KeyNamespace, chunk_keys
from lmcache_node.vllm.link import NodeLink
from lmcache_node.vllm.planner import Planner, StepPlan, TransferOp
from lmcache_node.vllm.settings import ConnectorSettings, load_settings
from lmcache_node.vllm.stats import NodeConnectorPromMetrics, NodeConnectorStats
from lmcache_node.vllm.transfers import WorkerTransfers, register
from lmcache_node.vllm.verify import KVVerifier
from lmcache_node.vllm.vllm_facts import (
    check_kv_cache_groups,
    kv_dtype,
    kv_layout,
    request_salt,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)
_UNLOCK_AFTER_STEPS = 2


def _show_our_logs() -> None:
    """vLLM configures only its own loggers; give ours a handler in vLLM's format."""
    package = logging.getLogger("lmcache_node")
    if package.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("%(levelname)s %(asctime)s [lmcache_node] %(message)s", "%m-%d %H:%M:%S")
    )
    package.addHandler(handler)
    level = os.environ.get("LMCACHE_LOG_LEVEL", "INFO").upper()
    package.setLevel(level if level in ("DEBUG", "INFO", "WARNING", "ERROR") else "INFO")
    package.propagate = False


_show_our_logs()


@dataclass
class NodeConnectorMetadata(KVConnectorMetadata):  # type: ignore[misc]
    """Scheduler -> worker: this step's loads and stores."""

    plan: StepPlan = field(default_factory=StepPlan)


class LMCacheNodeConnector(KVConnectorBase_V1):  # type: ignore[misc]
    """KV connector to a ``lmcache-node`` server (no dependency on the ``lmcache`` package)."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        if kv_cache_config is not None:
            check_kv_cache_groups(kv_cache_config)
        transfer = vllm_config.kv_transfer_config
        self.settings: ConnectorSettings = load_settings(transfer.kv_connector_extra_config)
        credentials = self.settings.client_credentials()
        # vLLM acts on the policy (scheduler); the worker names it when a load fails.
        self.fail_on_load_error = getattr(transfer, "kv_load_failure_policy", "fail") == "fail"
        self.block_size = int(vllm_config.cache_config.block_size)
        self.can_load = transfer.kv_role in ("kv_both", "kv_consumer")
        self.can_store = transfer.kv_role in ("kv_both", "kv_producer")
        self.planner = Planner(
            self.settings.chunk_size,
            self.block_size,
            can_load=self.can_load,
            can_store=self.can_store,
        )
        from vllm.platforms import current_platform  # noqa: PLC0415 - vLLM import at use

        model_config = vllm_config.model_config
        use_mla = bool(getattr(model_config, "use_mla", False))
        self._namespace_base = KeyNamespace(
            model_name=self.settings.model_name or str(model_config.model),
            world_size=int(vllm_config.parallel_config.world_size),
            worker_id=0,
            kv_dtype=kv_dtype(vllm_config),
            layout=kv_layout(str(current_platform.device_type), self.block_size, use_mla),
            tenant_salt=self.settings.tenant_salt,
        )
        self._registration: Registration | None = None
        self._kv_caches: list[torch.Tensor] = []
        self._block_dim = 0
        self._worker_id = 0
        self._unlock_later: collections.deque[list[str]] = collections.deque()
        if role == KVConnectorRole.SCHEDULER:
            # Lookups run in vLLM's scheduler loop: they give up sooner than transfers.
            self.link = NodeLink(
                self.settings.model_copy(update={"timeout_s": self.settings.lookup_timeout_s}),
                name="lmcache-node scheduler",
                credentials=credentials,
            )
        else:
            self.link = NodeLink(
                self.settings,
                name="lmcache-node worker",
                on_connected=self._register_with,
                credentials=credentials,
            )
            self.transfers = WorkerTransfers(
                self.link,
                namespace=self._worker_namespace,
                chunk_size=self.settings.chunk_size,
                blocks_per_chunk=self.planner.blocks_per_chunk,
                registration=lambda: self._registration,
                fail_on_load_error=self.fail_on_load_error,
                verifier=(
                    KVVerifier(
                        lambda: (self._kv_caches, self._block_dim), self.planner.blocks_per_chunk
                    )
                    if self.settings.verify
                    else None
                ),
            )
        log.info(
            "LMCacheNodeConnector (%s, %s): server %s (%s), chunk %d tokens, transfer mode %s, "
            "kv_load_failure_policy %s (%s), namespace %s%s",
            role.name.lower(),
            transfer.kv_role,
            self.settings.url,
            "CURVE" if credentials is not None else "no CURVE",
            self.settings.chunk_size,
            self.settings.transfer_mode,
            "fail" if self.fail_on_load_error else "recompute",
            "a failed load fails its request"
            if self.fail_on_load_error
            else "a failed load is recomputed",
            self._namespace_base.label(),
            ", verify mode on" if self.settings.verify else "",
        )
        if role == KVConnectorRole.SCHEDULER:
            self.link.start()

    # The cache is best effort: a preempted request's pending store is just a future miss.
    @property
    def requires_kv_delivery(self) -> bool:
        return False

    # ============================== worker side ==============================
    def _worker_rank(self) -> int:
        try:
            from vllm.distributed.parallel_state import get_world_group  # noqa: PLC0415

            return int(get_world_group().rank_in_group)
        except (ImportError, AssertionError, AttributeError):
            return 0

    def _namespace(self, salt: str, worker_id: int) -> KeyNamespace:
        base = self._namespace_base
        tenant = "|".join(p for p in (base.tenant_salt, salt) if p)
        return dataclasses.replace(base, worker_id=worker_id, tenant_salt=tenant)

    def _worker_namespace(self, salt: str) -> KeyNamespace:
        return self._namespace(salt, self._worker_id)

    def _register_with(self, client: NodeClient) -> None:
        self._registration = register(
            client,
            self._kv_caches,
            block_dim=self._block_dim,
            block_size=self.block_size,
            namespace=self._worker_namespace(""),
            transfer_mode=self.settings.transfer_mode,
        )

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._worker_id = self._worker_rank()
        self._kv_caches = list(kv_caches.values())
        num_blocks = int(getattr(self._kv_cache_config, "num_blocks", 0) or 0)
        first = self._kv_caches[0]
        dims = [d for d, size in enumerate(first.shape) if size == num_blocks]
        self._block_dim = dims[0] if dims else 0
        log.info(
            "LMCacheNodeConnector: %d KV layers, shape %s (%s, %s), block dim %d",
            len(self._kv_caches),
            tuple(first.shape),
            first.dtype,
            first.device,
            self._block_dim,
        )
        self.link.start()

    def _plan(self) -> StepPlan:
        meta = self._get_connector_metadata()
        assert isinstance(meta, NodeConnectorMetadata)
        return meta.plan

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        plan = self._plan()
        if plan.loads:
            self.transfers.load(plan.loads)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete inside start_load_kv

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return  # whole blocks of every layer are stored together in wait_for_save

    def wait_for_save(self) -> None:
        if not self.has_connector_metadata():
            return
        plan = self._plan()
        if plan.stores:
            self.transfers.store(plan.stores)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return None, None  # loads and stores complete within their step

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.transfers.take_invalid_blocks()

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        verifier = getattr(getattr(self, "transfers", None), "verifier", None)
        if verifier is None:
            return None
        stats = NodeConnectorStats.from_verify_counts(verifier.take_counts())
        return None if stats.is_empty() else stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats:
        return NodeConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> NodeConnectorPromMetrics:
        return NodeConnectorPromMetrics(
            vllm_config, metric_types, labelnames, per_engine_labelvalues
        )

    def shutdown(self) -> None:
        verifier = getattr(getattr(self, "transfers", None), "verifier", None)
        if verifier is not None:
            log.info("verify: chunks by outcome over this worker's life: %s", verifier.totals)
        self.link.close()

    # ============================== scheduler side ==============================
    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        prompt = request.prompt_token_ids
        if prompt is None or getattr(request, "mm_features", None):
            return 0, False  # embeddings / multimodal inputs: tokens do not identify the KV
        tracker = self.planner.track(request.request_id, list(prompt), request_salt(request))
        self._free_lock(tracker.req_id)
        n_chunks = self.planner.lookup_chunks(tracker, int(request.num_tokens))
        if n_chunks == 0:
            return 0, False
        namespace = self._scheduler_namespace(tracker.salt)
        keys = chunk_keys(tracker.prompt[: n_chunks * self.planner.chunk_size],
                          self.planner.chunk_size, namespace)  # fmt: skip
        lock, ttl = self.can_load, self.settings.lock_ttl_s

        def lookup(client: NodeClient) -> tuple[int, int | None]:
            return client.lookup(cast(list[bytes], keys), lock=lock, lock_ttl_s=ttl)

        miss: tuple[int, int | None] = (0, None)
        hits, lock_id = self.link.call("lookup", lookup, miss)
        tracker.lock_id = lock_id
        need = self.planner.record_lookup(tracker, int(hits), num_computed_tokens)
        if need <= 0:
            self._free_lock(tracker.req_id)
        return need, False

    def _scheduler_namespace(self, salt: str) -> KeyNamespace:
        return self._namespace(salt, 0)  # lookups ask about rank 0's chunks

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        tracker = self.planner.trackers.get(request.request_id)
        if tracker is None:
            return
        block_ids = blocks.get_block_ids()[0] if num_external_tokens > 0 else []
        op = self.planner.record_alloc(tracker, list(block_ids), num_external_tokens)
        if op is None:
            self._free_lock(tracker.req_id)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        # Loads are synchronous, so two steps later they have run even with asynchronous
        # scheduling (one step in flight): unlock their chunks then (or at request end).
        while len(self._unlock_later) >= _UNLOCK_AFTER_STEPS:
            for req_id in self._unlock_later.popleft():
                self._free_lock(req_id)
        plan = StepPlan(loads=self.planner.take_loads())
        self._unlock_later.append([op.req_id for op in plan.loads])
        num_scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            op = self.planner.record_scheduled(
                new.req_id,
                list(new.block_ids[0]),
                replace_blocks=True,
                computed_after_step=new.num_computed_tokens + num_scheduled.get(new.req_id, 0),
            )
            if op is not None:
                plan.stores.append(op)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            new_blocks = cached.new_block_ids[i]
            op = self.planner.record_scheduled(
                req_id,
                list(new_blocks[0]) if new_blocks is not None else None,
                replace_blocks=req_id in cached.resumed_req_ids,
                computed_after_step=cached.num_computed_tokens[i] + num_scheduled.get(req_id, 0),
            )
            if op is not None:
                plan.stores.append(op)
        return NodeConnectorMetadata(plan=plan)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        self._free_lock(request.request_id)
        self.planner.finish(request.request_id)
        return False, None

    def _free_lock(self, req_id: str) -> None:
        tracker = self.planner.trackers.get(req_id)
        if tracker is None or tracker.lock_id is None:
            return
        lock_id, tracker.lock_id = tracker.lock_id, None
        self.link.call("free_lock", lambda c: c.free_lock(lock_id), None)


__all__ = [
    "LMCacheNodeConnector",
    "NodeConnectorMetadata",
    "TransferOp",
    "check_kv_cache_groups",
    "kv_layout",
]
