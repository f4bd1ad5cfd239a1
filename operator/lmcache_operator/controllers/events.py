"""Kubernetes Events the controllers post themselves (kopf's only cover its handlers)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lmcache_operator.builders.common import MANAGED_BY
from lmcache_operator.kube import KubeClient

MAX_EVENT_MESSAGE = 1024  # events.k8s.io caps the note at 1 KiB; keep core Events the same


def clip(message: str, limit: int = MAX_EVENT_MESSAGE) -> str:
    return message if len(message) <= limit else message[: limit - 3] + "..."


async def post_event(
    client: KubeClient,
    involved: Mapping[str, Any],
    *,
    reason: str,
    message: str,
    warning: bool = True,
    now: str,
) -> None:
    """Create one core/v1 Event about ``involved`` (an object with apiVersion, kind and
    metadata name/namespace/uid)."""
    meta = involved["metadata"]
    await client.create(
        {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": involved["apiVersion"],
                "kind": involved["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid", ""),
            },
            "type": "Warning" if warning else "Normal",
            "reason": reason,
            "message": clip(message),
            "source": {"component": MANAGED_BY},
            "reportingComponent": MANAGED_BY,
            "reportingInstance": MANAGED_BY,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
    )
