"""Starting the operator: the runtime, the HTTP endpoint, the leader Lease, then kopf."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import kopf

from lmcache_operator.api.policy import PodPolicy
from lmcache_operator.builders.node_image import DEFAULTS, NodeImageDefaults
from lmcache_operator.controllers.common import Settings
from lmcache_operator.controllers.injection import AdmissionController, Lookups
from lmcache_operator.controllers.runtime import Runtime
from lmcache_operator.kube import KubeClient
from lmcache_operator.leader import LeaseSettings, default_identity, run_as_leader
from lmcache_operator.metrics import OperatorMetrics
from lmcache_operator.serving import serve
from lmcache_operator.wiring.admission import WebhookOptions
from lmcache_operator.wiring.admission import serve as serve_admission

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    namespaces: Sequence[str] = ()
    liveness_endpoint: str | None = "http://0.0.0.0:8081/healthz"
    log_level: str = "INFO"
    leader_election: bool = False
    lease_namespace: str | None = None  # default: $POD_NAMESPACE, the kubeconfig's, "default"
    lease_name: str = "lmcache-operator"
    identity: str | None = None
    gate_timeout_s: float = 300.0
    policy: PodPolicy = field(default_factory=PodPolicy)
    images: NodeImageDefaults = DEFAULTS
    secret_check_s: float = 30.0
    key_propagation_s: float = 90.0
    pool_probe_timeout_s: float = 10.0
    pool_cleanup_timeout_s: float = 300.0
    config_check_s: float = 30.0
    webhook: WebhookOptions | None = None  # serve the injection webhook (every replica)


def _webhook_ended(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error(
            "the injection webhook stopped: %s (pods are created unwired and reported)",
            task.exception(),
        )


async def _main(options: RunOptions) -> int:
    import lmcache_operator.wiring  # noqa: F401, PLC0415 - registers the kopf handlers

    client = await KubeClient.connect()
    metrics = OperatorMetrics()
    settings = Settings(
        namespaces=tuple(options.namespaces),
        gate_timeout_s=options.gate_timeout_s,
        policy=options.policy,
        images=options.images,
        secret_check_s=options.secret_check_s,
        key_propagation_s=options.key_propagation_s,
        pool_probe_timeout_s=options.pool_probe_timeout_s,
        pool_cleanup_timeout_s=options.pool_cleanup_timeout_s,
        config_check_s=options.config_check_s,
    )
    runtime = Runtime(client, settings, metrics)
    server = await serve(options.liveness_endpoint, metrics) if options.liveness_endpoint else None
    webhook = None
    if options.webhook is not None:  # before the election: every replica answers reviews
        admission = AdmissionController(Lookups(client), metrics)
        webhook = asyncio.get_running_loop().create_task(
            serve_admission(options.webhook, admission), name="injection webhook"
        )
        webhook.add_done_callback(_webhook_ended)

    async def operate() -> None:
        await kopf.operator(
            clusterwide=not options.namespaces,
            namespaces=list(options.namespaces),
            standalone=True,
            memo=kopf.Memo(runtime=runtime),
        )

    try:
        if not options.leader_election:
            metrics.set_leader(True)
            await operate()
            return 0
        lease = LeaseSettings(
            namespace=options.lease_namespace
            or os.environ.get("POD_NAMESPACE")
            or client.credentials.namespace
            or "default",
            name=options.lease_name,
            identity=options.identity or default_identity(),
        )
        return await run_as_leader(client, lease, operate, metrics)
    finally:
        if webhook is not None:
            webhook.cancel()
            await asyncio.gather(webhook, return_exceptions=True)
        await runtime.close()
        if server is not None:
            await server.cleanup()


def run(options: RunOptions) -> int:
    """Run until interrupted (or, with leader election, until the Lease is lost: exit 1)."""
    level = getattr(logging, options.log_level.upper())
    kopf.configure(verbose=level <= logging.DEBUG, log_prefix=True)
    logging.getLogger().setLevel(level)
    # kopf logs every watch-event handler run at INFO: keep those for DEBUG.
    logging.getLogger("kopf.objects").setLevel(max(level, logging.WARNING))
    logger.info(
        "starting lmcache-operator for %s",
        ", ".join(options.namespaces) if options.namespaces else "all namespaces",
    )
    return asyncio.run(_main(options))
