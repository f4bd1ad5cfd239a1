"""The injection webhook's HTTPS server: kopf's ``WebhookServer``, our review function.

It runs on every operator replica, outside the leader election (runner.py starts it before
competing for the Lease): a review only reads the API server, so both replicas answer and the
chart's Service spreads the API server's calls over them; a takeover leaves no gap. kopf's
own admission machinery (``@kopf.on.mutate``) is not used, because it serves only inside
``kopf.operator()``, which runs on the Lease holder alone. kopf's server re-reads the
certificate files when they change (cert-manager or a re-rendered Secret rotates them).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import kopf

from lmcache_operator.controllers.injection import AdmissionController

logger = logging.getLogger(__name__)

CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"
CERT_CHECK_INTERVAL_S = 30.0


@dataclass(frozen=True)
class WebhookOptions:
    port: int
    cert_dir: str
    address: str = "0.0.0.0"  # noqa: S104 - the Service reaches the pod on its IP


async def serve(options: WebhookOptions, controller: AdmissionController) -> None:
    """Serve admission reviews until cancelled (HTTPS; paths /pods and /namespaces)."""
    directory = Path(options.cert_dir)
    server = kopf.WebhookServer(
        addr=options.address,
        port=options.port,
        certfile=str(directory / CERT_FILE),
        pkeyfile=str(directory / KEY_FILE),
        file_check_interval=CERT_CHECK_INTERVAL_S,
    )

    async def review(
        request: Mapping[str, Any],
        *,
        webhook: str | None = None,
        headers: Mapping[str, str] | None = None,
        sslpeer: Mapping[str, Any] | None = None,
    ) -> Any:
        return await controller.review(request, webhook)

    async for _config in server(cast(kopf.WebhookFn, review)):
        logger.info(
            "injection webhook serving on %s:%d with the certificate in %s",
            options.address, options.port, directory,
        )  # fmt: skip
