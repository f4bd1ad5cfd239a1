"""Self-healing children: what the operator applied, and the repair of drift and deletions.

After each apply a controller records, per child, the shape it applied (our fields) and a
fingerprint: the applied object as the API server returned it, projected onto that shape
(so defaults and canonical forms are the server's). Watch events of the children are
projected the same way: a different fingerprint means someone else changed one of our
fields, a DELETED event that the child is gone; either way the owner is re-applied. Kinds
with a ``metadata.generation`` (DaemonSets, Deployments) bump it on every spec change, so
for them the record is the generation plus our metadata fields. Fields
we never set (other managers' labels, an HPA's replicas through the scale subresource)
are outside the shape and left alone.

Children created once and never re-applied, the per-cluster credential Secrets, cannot be
watched (the operator may create but not read Secrets): controllers/credentials.py finds a
deleted one on its periodic pass (a POST answered 201 instead of 409), regenerates the pair
and counts it in ``children_repaired{kind="Secret"}``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lmcache_operator.controllers.common import MONOTONIC, Clock
from lmcache_operator.metrics import OperatorMetrics
from lmcache_operator.state import Key

logger = logging.getLogger(__name__)

ChildKey = tuple[str, str, str]  # (kind, namespace, name)
IGNORED_PATHS = (("spec", "replicas"),)  # scaled by others (kubectl scale, an HPA)


def project(live: Any, shape: Any, path: tuple[str, ...] = ()) -> Any:
    """``live`` restricted to the keys present in ``shape`` (lists: element by element)."""
    if isinstance(shape, Mapping):
        if not isinstance(live, Mapping):
            return live
        return {
            k: project(live.get(k), v, (*path, k))
            for k, v in shape.items()
            if (*path, k) not in IGNORED_PATHS
        }
    if isinstance(shape, list):
        if not isinstance(live, list):
            return live
        extra = len(live) - len(shape)
        items = [project(item, s, path) for item, s in zip(live, shape, strict=False)]
        return [*items, {"…more": extra}] if extra else items
    return live


@dataclass(frozen=True)
class Record:
    owner_kind: str
    owner: Key
    shape: dict[str, Any]
    fingerprint: Any
    generation: int | None  # spec changes bump it (DaemonSets, Deployments; None: no such)


def _record(
    owner_kind: str, owner: Key, shape: Mapping[str, Any], result: Mapping[str, Any]
) -> Record:
    """A kind with a generation (every spec change bumps it) is recorded by its generation
    and our metadata only: cheap to keep and to compare on its many status events. Other
    kinds (ConfigMaps, Services) by all our fields."""
    generation = result["metadata"].get("generation")
    if generation is None:
        return Record(owner_kind, owner, dict(shape), project(result, shape), None)
    meta_shape = {"metadata": shape["metadata"]}
    return Record(owner_kind, owner, meta_shape, project(result, meta_shape), int(generation))


class ChildRepairer:
    """Watches children (callbacks from the watch loops) and asks owners to re-apply."""

    def __init__(
        self,
        repair: Mapping[str, Callable[[Key], None]],  # owner kind -> re-apply request
        metrics: OperatorMetrics,
        *,
        min_interval_s: float = 2.0,
        clock: Clock = MONOTONIC,
    ) -> None:
        self.repair = repair
        self.metrics = metrics
        self.min_interval_s = min_interval_s
        self.clock = clock
        self.records: dict[ChildKey, Record] = {}
        self._last_repair: dict[Key, float] = {}

    def record(
        self,
        owner_kind: str,
        owner: Key,
        desired: Iterable[Mapping[str, Any]],
        results: Iterable[Mapping[str, Any]],
    ) -> None:
        """What an apply produced: one record per child."""
        for shape, result in zip(desired, results, strict=True):
            meta = result["metadata"]
            key = (str(result["kind"]), str(meta["namespace"]), str(meta["name"]))
            self.records[key] = _record(owner_kind, owner, shape, result)

    def forget_child(self, kind: str, namespace: str, name: str) -> None:
        """A child its owner removes on purpose (e.g. a router turned off): not repaired."""
        self.records.pop((kind, namespace, name), None)

    def forget_owner(self, owner_kind: str, owner: Key) -> None:
        for key in [
            k for k, r in self.records.items() if (r.owner_kind, r.owner) == (owner_kind, owner)
        ]:
            del self.records[key]
        self._last_repair.pop(owner, None)

    def on_event(self, event: str, obj: Mapping[str, Any]) -> None:
        """A watch event of a child (any kind the operator applies)."""
        if event in ("SYNCED", "BOOKMARK"):
            return
        meta = obj["metadata"]
        kind = str(obj.get("kind", ""))
        record = self.records.get((kind, str(meta.get("namespace")), str(meta["name"])))
        if record is None:
            return  # not applied by this process (yet): the owner's own reconcile covers it
        if event == "DELETED":
            why = "deleted"
        elif meta.get("deletionTimestamp"):
            return  # going away: its DELETED event decides
        elif self._drifted(record, obj):
            why = "changed by someone else"
        else:
            return
        logger.info(
            "%s %s/%s was %s: re-applying %s %s/%s",
            kind, meta.get("namespace"), meta["name"], why,
            record.owner_kind, *record.owner,
        )  # fmt: skip
        self.metrics.children_repaired.labels(kind=kind).inc()
        self._request(record)

    @staticmethod
    def _drifted(record: Record, obj: Mapping[str, Any]) -> bool:
        """Someone else changed one of our fields (a spec change shows as a new generation;
        one from an older generation is a late event of ours: ignored)."""
        if record.generation is not None:
            generation = int(obj["metadata"].get("generation") or 0)
            if generation < record.generation:
                return False
            if generation > record.generation:
                return True
        return bool(project(obj, record.shape) != record.fingerprint)

    def _request(self, record: Record) -> None:
        """At most one repair per owner per interval: a fight with another controller
        (both rewriting the same field) costs one apply every ``min_interval_s``."""
        now = self.clock()
        last = self._last_repair.get(record.owner)
        self._last_repair[record.owner] = now
        request = self.repair[record.owner_kind]
        if last is not None and now - last < self.min_interval_s:
            asyncio.get_running_loop().call_later(self.min_interval_s, request, record.owner)
            return
        request(record.owner)
