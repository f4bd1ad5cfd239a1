"""kopf handlers of LMCacheCluster: each one call into the runtime's controllers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from lmcache_operator.api.common import GROUP, VERSION
from lmcache_operator.api.lmcachecluster import PLURAL
from lmcache_operator.wiring.outcomes import as_kopf, runtime_of


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
async def reconcile(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await as_kopf(body, runtime_of(memo).clusters.reconcile(body))


@kopf.on.event(GROUP, VERSION, PLURAL)
async def cluster_event(
    event: Mapping[str, Any], body: kopf.Body, memo: kopf.Memo, **_: Any
) -> None:
    runtime = runtime_of(memo)
    kind = str(event.get("type") or "MODIFIED")
    runtime.clusters.on_event(kind, body)
    runtime.vllm_observer.on_cache_cluster_event(kind, body)
