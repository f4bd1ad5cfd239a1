"""An RBAC 403 is the operator's permissions, retried; a 422/400 stays an invalid spec."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import kopf
import pytest
from lmcache_operator.builders.vllm_status import VLLMObserved
from lmcache_operator.builders.vllm_status import compute_status as vllm_status
from lmcache_operator.handlers import lmcachecluster as cluster_handlers
from lmcache_operator.handlers import vllmdeployment as vllm_handlers
from lmcache_operator.kube import FORBIDDEN_RETRY_S, KubeError, forbidden_message
from lmcache_operator.state import REGISTRY
from lmcache_operator.status import Observed, compute_status

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
    def __init__(self, status: int) -> None:
        self.status = status

    async def get(self, *args: Any) -> dict[str, Any] | None:
        return None  # no ServiceMonitor CRD

    async def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        raise KubeError(self.status, "PATCH", DS_PATH, DENIED)


def _reconcile(
    monkeypatch: pytest.MonkeyPatch, status: int
) -> tuple[kopf.TemporaryError | kopf.PermanentError, list[str]]:
    warnings: list[str] = []
    monkeypatch.setattr(cluster_handlers.Context, "client", RefusingClient(status))
    monkeypatch.setattr(cluster_handlers.Context, "crd_seen", {})
    monkeypatch.setattr(kopf, "warn", lambda body, *, reason, message: warnings.append(reason))
    monkeypatch.setattr(REGISTRY, "refresh", None)  # no status writes without a cluster
    key = ("team-a", f"c{status}")
    REGISTRY.forget(key)
    body = {
        "apiVersion": "lmcache.dev/v1alpha1",
        "kind": "LMCacheCluster",
        "metadata": {"name": key[1], "namespace": key[0], "uid": "u1", "generation": 3},
        "spec": {"device": "cpu", "cache": {"cpuSize": "1Gi"}},
    }

    async def call() -> kopf.TemporaryError | kopf.PermanentError:
        try:
            await cluster_handlers.reconcile(
                body=kopf.Body(body),
                spec=kopf.Spec(body),
                name=key[1],
                namespace=key[0],
                meta=kopf.Meta(body),
            )
        except (kopf.TemporaryError, kopf.PermanentError) as exc:
            return exc
        raise AssertionError("reconcile did not fail")

    exc = asyncio.run(call())
    applied = REGISTRY.view(key).applied
    assert applied is not None
    if status == 403:
        assert applied.forbidden and not applied.problems
    else:
        assert applied.problems and not applied.forbidden
    REGISTRY.forget(key)
    return exc, warnings


def test_reconcile_retries_a_403_slowly(monkeypatch: pytest.MonkeyPatch) -> None:
    exc, warnings = _reconcile(monkeypatch, 403)
    assert isinstance(exc, kopf.TemporaryError)
    assert exc.delay == FORBIDDEN_RETRY_S
    assert "may not patch daemonsets" in str(exc)
    assert warnings == ["Forbidden"]


def test_reconcile_keeps_a_422_an_invalid_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    exc, warnings = _reconcile(monkeypatch, 422)
    assert isinstance(exc, kopf.PermanentError)
    assert warnings == ["InvalidSpec"]


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


def test_vllm_reconcile_retries_a_403_and_keeps_the_spec_valid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    warnings: list[str] = []
    refreshed: list[tuple[str, str]] = []
    monkeypatch.setattr(cluster_handlers.Context, "client", RefusingClient(403))
    monkeypatch.setattr(kopf, "warn", lambda body, *, reason, message: warnings.append(reason))
    monkeypatch.setattr(vllm_handlers.STATUS, "request", refreshed.append)
    key = ("team-a", "llm-forbidden")
    body = {
        "apiVersion": "lmcache.dev/v1alpha1",
        "kind": "VLLMDeployment",
        "metadata": {"name": key[1], "namespace": key[0], "uid": "u2", "generation": 1},
        "spec": {"model": {"name": "org/model"}, "cache": {"enabled": False}},
    }

    async def call() -> kopf.TemporaryError:
        with pytest.raises(kopf.TemporaryError) as raised:
            await vllm_handlers.reconcile(body=kopf.Body(body), name=key[1], namespace=key[0])
        return raised.value

    try:
        exc = asyncio.run(call())
        applied = vllm_handlers.VIEWS[key].applied
        assert applied is not None and applied.forbidden and not applied.problems
    finally:
        vllm_handlers.VIEWS.pop(key, None)
    assert exc.delay == FORBIDDEN_RETRY_S
    assert warnings == ["Forbidden"]
    assert key in refreshed
