"""What the client's mixins (registrations, data path) need of ``NodeClient``: its ``_call``."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

import msgspec

from lmcache_node.protocol import messages as m

T = TypeVar("T", bound=msgspec.Struct)


class ClientCalls:
    """Base of the client's mixins: ``NodeClient`` implements ``_call`` (one request, its
    typed reply, the session retried once unless ``retry_session`` is false)."""

    if TYPE_CHECKING:

        def _call(
            self,
            op: m.Op,
            payload: msgspec.Struct,
            reply_type: type[T],
            *,
            timeout: float | None = None,
            internal: bool = False,
            retry_session: bool = True,
        ) -> T: ...
