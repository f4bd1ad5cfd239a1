"""One active replica: a coordination.k8s.io Lease (kubernetes_asyncio's leader election).

The standby polls the Lease every ``retry_s``; when the holder stops renewing (killed, node
lost) the standby takes it after ``lease_s`` and starts operating. A leader that cannot renew
within ``renew_s`` stops (the process exits and restarts as a standby), so two replicas
never reconcile at once. A leader that stops cleanly (SIGTERM) releases the Lease at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from kubernetes_asyncio.leaderelection.electionconfig import Config
from kubernetes_asyncio.leaderelection.leaderelection import LeaderElection
from kubernetes_asyncio.leaderelection.resourcelock.leaselock import LeaseLock

from lmcache_operator.kube import KubeClient, KubeError
from lmcache_operator.metrics import OperatorMetrics

logger = logging.getLogger(__name__)


def default_identity() -> str:
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class LeaseSettings:
    namespace: str
    name: str = "lmcache-operator"
    identity: str = field(default_factory=default_identity)
    lease_s: int = 8  # a dead leader is replaced after at most lease_s + retry_s (whole s)
    renew_s: float = 6.0  # a leader that cannot renew for this long steps down
    retry_s: float = 2.0  # how often the leader renews and the standby checks


async def release(client: KubeClient, lease: LeaseSettings) -> None:
    """Hand the Lease over now (the standby takes it on its next check)."""
    try:
        current = await client.get("coordination.k8s.io/v1", "Lease", lease.namespace, lease.name)
        if current is None or current["spec"].get("holderIdentity") != lease.identity:
            return
        await client.merge_patch(
            "coordination.k8s.io/v1", "Lease", lease.namespace, lease.name,
            {"metadata": {"resourceVersion": current["metadata"]["resourceVersion"]},
             "spec": {"holderIdentity": None}},
        )  # fmt: skip
        logger.info("released the leader Lease %s/%s", lease.namespace, lease.name)
    except KubeError as exc:
        logger.warning("could not release the leader Lease: %s", exc)


async def run_as_leader(
    client: KubeClient,
    lease: LeaseSettings,
    operate: Callable[[], Awaitable[None]],
    metrics: OperatorMetrics,
) -> int:
    """Wait for the Lease, then ``operate`` until it returns (0) or the Lease is lost (1)."""
    finished = asyncio.Event()
    outcome = {"code": 1}

    async def lead() -> None:
        logger.info("%s leads (Lease %s/%s)", lease.identity, lease.namespace, lease.name)
        metrics.set_leader(True)
        try:
            await operate()
            outcome["code"] = 0
        finally:
            metrics.set_leader(False)
            finished.set()

    async def stopped() -> None:
        logger.error("%s lost the leader Lease: stopping", lease.identity)
        finished.set()

    config = Config(
        LeaseLock(lease.name, lease.namespace, lease.identity, client.api),
        lease_duration=lease.lease_s,
        renew_deadline=lease.renew_s,
        retry_period=lease.retry_s,
        onstarted_leading=lead,
        onstopped_leading=stopped,
    )
    logger.info("%s waits for the leader Lease %s/%s", lease.identity, lease.namespace, lease.name)
    election = asyncio.get_running_loop().create_task(LeaderElection(config).run())
    waiter = asyncio.get_running_loop().create_task(finished.wait())
    try:
        await asyncio.wait({election, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (election, waiter):
            task.cancel()
        await asyncio.gather(election, waiter, return_exceptions=True)
    if election.done() and not election.cancelled() and election.exception() is not None:
        error = election.exception()
        logger.error("leader election failed: %s", error, exc_info=error)
    if outcome["code"] == 0:
        await release(client, lease)
    return outcome["code"]
