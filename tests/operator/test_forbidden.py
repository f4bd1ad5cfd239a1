"""An RBAC 403 is the operator's permissions, retried; a 422/400 stays an invalid spec."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import kopf
import pytest
from lmcache_operator.builders.vllm_status import VLLMObserved
from lmcache_operator.builders.vllm_status import compute_status as vllm_status
from lmcache_operator.controllers.children import ChildRepairer
from lmcache_operator.controllers.common import InvalidSpec, RetryLater
from lmcache_operator.controllers.lmcachecluster import ClusterController
from lmcache_operator.controllers.vllmdeployment import VLLMController
from lmcache_operator.kube import FORBIDDEN_RETRY_S, KubeError, forbidden_message
from lmcache_operator.metrics import OperatorMetrics
from lmcache_operator.state import Views
from lmcache_operator.status import Observed, compute_status
from lmcache_operator.wiring.outcomes import as_kopf

DS_PATH = "/apis/apps/v1/namespaces/team-a/daemonsets/c1-cache?fieldManager=lmcache-operator"
DENIED = {
    "kind": "Status",
    "message": 'daemonsets.apps "c1-cache" is forbidden: User "system:serviceaccount:op:op" '
    'cannot patch resource "daemonsets" in API group "apps"',
}


def test_403_names_verb_resource_and_the_fix() -> None:
    message = forbidden_message(KubeError(403, "PATCH", DS_PATH, DENIED))
    assert message is not None
    assert "may not patch daemonsets (apiGroup apps) in namespace team-a" in message
    assert "ClusterRole/Role" in message
    assert DENIED["message"] in message


def test_403_on_a_core_resource() -> None:
    message = forbidden_message(
        KubeError(403, "POST", "/api/v1/namespaces/ns/configmaps", "forbidden")
    )
    assert message is not None and "may not create configmaps (apiGroup core)" in message


@pytest.mark.parametrize("status", [400, 404, 409, 422, 500])
def test_other_errors_are_not_forbidden(status: int) -> None:
    assert forbidden_message(KubeError(status, "PATCH", DS_PATH, {"message": "x"})) is None


class RefusingClient:
    """Refuses applies with ``status``; creates (the credential Secrets) with
    ``create_status`` (201 = created)."""

    def __init__(self, status: int, create_status: int = 201) -> None:
        self.status = status
        self.create_status = create_status

    async def get(self, *args: Any) -> dict[str, Any] | None:
        return None

    async def request(self, method: str, path: str, **_: Any) -> Any:
        raise KubeError(404, method, path, {"message": "not found"})  # no monitoring API

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        if self.create_status != 201:
            path = f"/api/v1/namespaces/{obj['metadata']['namespace']}/secrets"
            raise KubeError(self.create_status, "POST", path, {"message": "secrets is forbidden"})
        return obj

    async def patch_status(self, *args: Any) -> dict[str, Any]:
        return {}

    async def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        raise KubeError(self.status, "PATCH", DS_PATH, DENIED)


def _controllers(
    status: int, create_status: int = 201
) -> tuple[ClusterController, VLLMController, Views]:
    views, metrics = Views(), OperatorMetrics()
    children = ChildRepairer({}, metrics)
    client: Any = RefusingClient(status, create_status)
    return (
        ClusterController(client, views, metrics, children),
        VLLMController(client, views, metrics, children),
        views,
    )


def _reconcile(status: int, create_status: int = 201) -> tuple[Exception, Views, OperatorMetrics]:
    clusters, _, views = _controllers(status, create_status)
    body = {
        "apiVersion": "lmcache.dev/v1alpha1",
        "kind": "LMCacheCluster",
        "metadata": {"name": f"c{status}", "namespace": "team-a", "uid": "u1", "generation": 3},
        "spec": {"device": "cpu", "cache": {"cpuSize": "1Gi"}},
    }

    async def call() -> Exception:
        try:
            await clusters.reconcile(body)
        except (RetryLater, InvalidSpec) as exc:
            return exc
        raise AssertionError("reconcile did not fail")

    return asyncio.run(call()), views, clusters.metrics


def test_reconcile_retries_a_403_slowly() -> None:
    exc, views, metrics = _reconcile(403)
    assert isinstance(exc, RetryLater)
    assert exc.delay == FORBIDDEN_RETRY_S and exc.reason == "Forbidden"
    assert "may not patch daemonsets" in str(exc)
    applied = views.clusters[("team-a", "c403")].applied
    assert applied is not None and applied.forbidden and not applied.problems
    counted = metrics.reconciles.labels(kind="LMCacheCluster", result="forbidden")._value.get()
    assert counted == 1


def test_reconcile_retries_when_it_may_not_create_the_credential_secrets() -> None:
    exc, views, _ = _reconcile(200, create_status=403)
    assert isinstance(exc, RetryLater) and exc.reason == "Forbidden"
    assert "may not create secrets (apiGroup core) in namespace team-a" in str(exc)
    applied = views.clusters[("team-a", "c200")].applied
    assert applied is not None and applied.forbidden and not applied.problems


def test_reconcile_keeps_a_422_an_invalid_spec() -> None:
    exc, views, _ = _reconcile(422)
    assert isinstance(exc, InvalidSpec)
    applied = views.clusters[("team-a", "c422")].applied
    assert applied is not None and applied.problems and not applied.forbidden


def test_wiring_turns_outcomes_into_kopf_errors_and_events(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    warnings: list[str] = []
    monkeypatch.setattr(kopf, "warn", lambda body, *, reason, message: warnings.append(reason))
    body = kopf.Body({"metadata": {"name": "x", "namespace": "n"}})

    async def fail(exc: Exception) -> None:
        raise exc

    with pytest.raises(kopf.TemporaryError) as temporary:
        asyncio.run(as_kopf(body, fail(RetryLater("no", delay=30, reason="Forbidden"))))
    assert temporary.value.delay == 30
    with pytest.raises(kopf.PermanentError, match="invalid spec: bad field"):
        asyncio.run(as_kopf(body, fail(InvalidSpec("bad field"))))
    assert warnings == ["Forbidden", "InvalidSpec"]


def test_cluster_status_says_forbidden_and_config_stays_valid() -> None:
    status = compute_status(
        Observed(
            generation=2,
            applied_generation=1,
            min_daemonset_generation=1,
            problems=[],
            port=5555,
            node_selector={},
            daemonset=None,
            pods=[],
            previous={},
            forbidden="the operator may not patch daemonsets",
        )
    )
    conditions = {c["type"]: c for c in status["conditions"]}
    assert status["phase"] == "Pending"
    assert (conditions["Ready"]["status"], conditions["Ready"]["reason"]) == ("False", "Forbidden")
    assert conditions["Progressing"]["reason"] == "Forbidden"
    assert (conditions["ConfigValid"]["status"], conditions["ConfigValid"]["reason"]) == (
        "True",
        "Valid",
    )
    assert status["observedGeneration"] == 1  # generation 2 was never applied


def test_vllm_status_says_forbidden_and_config_stays_valid() -> None:
    observed = VLLMObserved(
        generation=1,
        desired_replicas=1,
        applied_generation=None,
        min_deployment_generation=0,
        problems=[],
        cache_enabled=False,
        cluster_ref="",
        cluster_found=False,
    )
    conditions = {
        c["type"]: c
        for c in vllm_status(replace(observed, forbidden="may not patch deployments"))["conditions"]
    }
    assert (conditions["Ready"]["status"], conditions["Ready"]["reason"]) == ("False", "Forbidden")
    assert conditions["Progressing"]["reason"] == "Forbidden"
    assert conditions["ConfigValid"]["status"] == "True"


def test_vllm_reconcile_retries_a_403_and_keeps_the_spec_valid() -> None:
    _, vllm, views = _controllers(403)
    key = ("team-a", "llm-forbidden")
    body = {
        "apiVersion": "lmcache.dev/v1alpha1",
        "kind": "VLLMDeployment",
        "metadata": {"name": key[1], "namespace": key[0], "uid": "u2", "generation": 1},
        "spec": {"model": {"name": "org/model"}, "cache": {"enabled": False}},
    }

    async def call() -> RetryLater:
        with pytest.raises(RetryLater) as raised:
            await vllm.reconcile(body)
        await vllm.status.close()
        return raised.value

    exc = asyncio.run(call())
    applied = views.vllm[key].applied
    assert applied is not None and applied.forbidden and not applied.problems
    assert exc.delay == FORBIDDEN_RETRY_S and exc.reason == "Forbidden"
