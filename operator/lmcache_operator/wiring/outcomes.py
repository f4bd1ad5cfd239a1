"""Controller outcomes as kopf understands them (errors, retries, Events)."""

from __future__ import annotations

from collections.abc import Awaitable

import kopf

from lmcache_operator.controllers.common import InvalidSpec, RetryLater
from lmcache_operator.controllers.runtime import Runtime


def runtime_of(memo: kopf.Memo) -> Runtime:
    runtime: Runtime = memo["runtime"]
    return runtime


async def as_kopf(body: kopf.Body, call: Awaitable[None]) -> None:
    """Invalid specs: a Warning Event and no retry; RetryLater: kopf retries after its delay."""
    try:
        await call
    except InvalidSpec as exc:
        kopf.warn(body, reason="InvalidSpec", message=str(exc))
        raise kopf.PermanentError(f"invalid spec: {exc}") from exc
    except RetryLater as exc:
        if exc.reason:
            kopf.warn(body, reason=exc.reason, message=str(exc))
        raise kopf.TemporaryError(str(exc), delay=exc.delay) from exc
