"""Errors of the API server, and which of them are retried."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from lmcache_operator.kube.paths import resource_of

FORBIDDEN_RETRY_S = 30.0  # RBAC is fixed by a person: retry slowly, never give up
_RBAC_VERBS = {
    "GET": "get",
    "POST": "create",
    "PUT": "update",
    "PATCH": "patch",
    "DELETE": "delete",
    "WATCH": "watch",
}


class KubeError(RuntimeError):
    """The API server answered with an error status."""

    def __init__(self, status: int, method: str, path: str, body: Any) -> None:
        message = body.get("message") if isinstance(body, dict) else str(body)
        super().__init__(f"{method} {path}: HTTP {status}: {message}")
        self.status = status
        self.body = body
        self.method = method
        self.path = path


def transient(exc: BaseException) -> bool:
    """Worth retrying by itself: a conflict, throttling, a server error or the network."""
    if isinstance(exc, KubeError):
        return exc.status in (409, 429) or exc.status >= 500
    return isinstance(exc, aiohttp.ClientError | asyncio.TimeoutError)


def forbidden_message(exc: KubeError) -> str | None:
    """What RBAC refused (verb, resource, namespace) and how to fix it; None unless HTTP 403.

    A 403 is the operator's permissions, not the user's spec: it is retried, never reported
    as an invalid spec.
    """
    if exc.status != 403:
        return None
    parts = [p for p in exc.path.split("?")[0].split("/") if p]
    group = parts[1] if parts[:1] == ["apis"] and len(parts) > 1 else ""
    namespace = parts[parts.index("namespaces") + 1] if "namespaces" in parts[:-1] else None
    verb = _RBAC_VERBS.get(exc.method.upper(), exc.method.lower())
    resource = resource_of(exc.path)
    where = f" in namespace {namespace}" if namespace else ""
    api_group = group or "core"
    detail = exc.body.get("message") if isinstance(exc.body, dict) else exc.body
    return (
        f"the operator may not {verb} {resource} (apiGroup {api_group}){where}: grant "
        f"'{verb}' on '{resource}' in the operator's ClusterRole/Role; retrying every "
        f"{FORBIDDEN_RETRY_S:.0f} s" + (f" (API server: {detail})" if detail else "")
    )
