"""What controllers share: their settings, and the outcomes the wiring turns into kopf's."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lmcache_operator.api.policy import PodPolicy
from lmcache_operator.builders.node_image import DEFAULTS, NodeImageDefaults

Clock = Callable[[], float]  # monotonic seconds
MONOTONIC: Clock = time.monotonic


@dataclass(frozen=True)
class Settings:
    """Runtime settings of the operator (``lmcache-operator run`` flags)."""

    namespaces: tuple[str, ...] = ()  # watched namespaces; empty: all
    gate_timeout_s: float = 300.0  # a vLLM pod still gated after this gets an Event + condition
    repair_interval_s: float = 2.0  # at most one repair of a child per this interval
    config_check_s: float = 30.0  # how often spec.configFrom ConfigMaps are read for changes
    policy: PodPolicy = field(default_factory=PodPolicy)  # the chart's guard rails
    images: NodeImageDefaults = DEFAULTS  # the chart's nodeImage
    secret_check_s: float = 30.0  # how often the credential Secrets are checked (POST: 409)
    key_propagation_s: float = 90.0  # a rotated key reaches the cache pods' files (kubelet)
    pool_probe_timeout_s: float = 10.0  # reading a new cache pod's pool (/readyz); 0: off
    pool_cleanup_timeout_s: float = 300.0  # a deleted cluster's pool cleanup Jobs, at most

    @property
    def namespaced(self) -> bool:
        """Watching listed namespaces only: no Node watch, no CRD reads (Roles only)."""
        return bool(self.namespaces)


class InvalidSpec(Exception):  # noqa: N818 - an outcome, named as the Event reason
    """The spec cannot be applied: reported (ConfigValid=False, an Event), not retried."""


class RetryLater(Exception):  # noqa: N818 - an outcome
    """Not done yet; try again after ``delay`` (``reason`` names the Event, if any)."""

    def __init__(self, message: str, *, delay: float, reason: str = "") -> None:
        super().__init__(message)
        self.delay = delay
        self.reason = reason
