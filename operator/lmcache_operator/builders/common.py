"""Labels, ownership and hashing shared by every builder."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from lmcache_operator.api.common import GROUP

MANAGED_BY = "lmcache-operator"
CLUSTER_LABEL = f"{GROUP}/cluster"
CONFIG_HASH_ANNOTATION = f"{GROUP}/config-hash"


def standard_labels(instance: str, name: str, component: str) -> dict[str, str]:
    """The app.kubernetes.io labels of every child object."""
    return {
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/instance": instance,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/part-of": "lmcache-k8s",
    }


def owner_reference(owner: Mapping[str, Any]) -> dict[str, Any]:
    """A controller ownerReference, so garbage collection removes the children."""
    meta = owner["metadata"]
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def content_hash(data: Any) -> str:
    """A short stable hash of JSON-serialisable data."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
