"""The chart's injection webhook: configuration, Service, certificates, operator flags."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.chart.conftest import Render, by_kind, one

CERT_MANAGER_API = "cert-manager.io/v1"
SERVICE_DNS = "lmc-lmcache-operator-webhook.lmcache-system.svc"


def _webhooks(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    config = one(objects, "MutatingWebhookConfiguration")
    return {hook["name"]: hook for hook in config["webhooks"]}


def _container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return dict(one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0])


def _selector(hook: dict[str, Any], key: str) -> dict[str, Any]:
    (expression,) = [e for e in hook["namespaceSelector"]["matchExpressions"] if e["key"] == key]
    return dict(expression)


def test_webhook_wires_labelled_pods_and_never_blocks_one(render: Render) -> None:
    objects = render()
    hooks = _webhooks(objects)
    assert set(hooks) == {"pods.webhook.lmcache.dev", "namespaces.webhook.lmcache.dev"}
    for hook in hooks.values():
        # the webhook being down never blocks pod creation, and never for long
        assert hook["failurePolicy"] == "Ignore"
        assert hook["timeoutSeconds"] == 5
        assert hook["sideEffects"] == "None"
        assert hook["rules"] == [
            {
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "operations": ["CREATE"],
                "resources": ["pods"],
                "scope": "Namespaced",
            }
        ]
        names = _selector(hook, "kubernetes.io/metadata.name")
        assert names["operator"] == "NotIn"
        assert {"kube-system", "kube-public", "kube-node-lease"} <= set(names["values"])
        assert {
            "key": "app.kubernetes.io/managed-by",
            "operator": "NotIn",
            "values": ["lmcache-operator"],
        } in hook["objectSelector"]["matchExpressions"]  # cache and VLLMDeployment pods
    pods, namespaced = hooks["pods.webhook.lmcache.dev"], hooks["namespaces.webhook.lmcache.dev"]
    assert {"key": "lmcache.dev/cluster", "operator": "Exists"} in pods["objectSelector"][
        "matchExpressions"
    ]
    assert pods["clientConfig"]["service"]["path"] == "/pods"
    # namespace opt-in: labelled namespaces, not the operator's own, pods may opt out
    assert _selector(namespaced, "lmcache.dev/cluster")["operator"] == "Exists"
    assert "lmcache-system" in _selector(namespaced, "kubernetes.io/metadata.name")["values"]
    assert {"key": "lmcache.dev/inject", "operator": "NotIn", "values": ["false"]} in namespaced[
        "objectSelector"
    ]["matchExpressions"]
    assert namespaced["clientConfig"]["service"]["path"] == "/namespaces"
    # the Service in front of both replicas
    (service,) = [
        s for s in by_kind(objects, "Service") if s["metadata"]["name"].endswith("webhook")
    ]
    assert pods["clientConfig"]["service"]["name"] == service["metadata"]["name"]
    assert service["spec"]["ports"] == [
        {"name": "https", "port": 443, "targetPort": "webhook", "protocol": "TCP"}
    ]
    deployment = one(objects, "Deployment")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    container = _container(objects)
    assert "--webhook-port=9443" in container["args"]
    assert "--webhook-cert-dir=/var/run/lmcache/webhook" in container["args"]
    assert {"name": "webhook", "containerPort": 9443, "protocol": "TCP"} in container["ports"]
    assert container["readinessProbe"]["tcpSocket"] == {"port": "webhook"}
    mount = {"name": "webhook-tls", "mountPath": "/var/run/lmcache/webhook", "readOnly": True}
    assert mount in container["volumeMounts"]
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert {
        "name": "webhook-tls",
        "secret": {"secretName": "lmc-lmcache-operator-webhook-tls"},
    } in (volumes)


def test_self_signed_certificate_is_valid_for_the_service(render: Render, tmp_path: Path) -> None:
    objects = render()
    secret = one(objects, "Secret")
    assert secret["metadata"]["name"] == "lmc-lmcache-operator-webhook-tls"
    assert secret["type"] == "kubernetes.io/tls"
    files = {}
    for key in ("ca.crt", "tls.crt", "tls.key"):
        path = tmp_path / key
        path.write_bytes(base64.b64decode(secret["data"][key]))
        files[key] = str(path)
    for hook in _webhooks(objects).values():
        assert hook["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
    # the API server checks the chain and the Service's DNS name
    verified = subprocess.run(
        ["openssl", "verify", "-CAfile", files["ca.crt"], files["tls.crt"]],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stderr
    names = subprocess.run(
        ["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", files["tls.crt"]],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert f"DNS:{SERVICE_DNS}" in names
    key_check = subprocess.run(
        ["openssl", "pkey", "-in", files["tls.key"], "-noout"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert key_check.returncode == 0, key_check.stderr


@pytest.mark.parametrize("how", ["detected", "asked"])
def test_cert_manager_issues_the_certificate_when_present(render: Render, how: str) -> None:
    objects = (
        render(api_versions=[CERT_MANAGER_API])
        if how == "detected"
        else render({"webhook.certificates": "cert-manager"})
    )
    assert not by_kind(objects, "Secret")  # cert-manager writes it
    certificate = one(objects, "Certificate")
    assert certificate["spec"]["secretName"] == "lmc-lmcache-operator-webhook-tls"
    assert SERVICE_DNS in certificate["spec"]["dnsNames"]
    issuer = one(objects, "Issuer")
    assert certificate["spec"]["issuerRef"] == {
        "kind": "Issuer",
        "name": issuer["metadata"]["name"],
    }
    config = one(objects, "MutatingWebhookConfiguration")
    assert config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == (
        "lmcache-system/lmc-lmcache-operator-webhook"
    )
    assert all("caBundle" not in hook["clientConfig"] for hook in config["webhooks"])


def test_self_signed_can_be_forced_beside_cert_manager(render: Render) -> None:
    objects = render({"webhook.certificates": "self-signed"}, api_versions=[CERT_MANAGER_API])
    assert not by_kind(objects, "Certificate") and one(objects, "Secret")


def test_watched_namespaces_only_and_no_namespace_reads(render: Render) -> None:
    objects = render({"watchNamespaces": "{ml-a,ml-b}"})
    hooks = _webhooks(objects)
    assert set(hooks) == {"pods.webhook.lmcache.dev"}  # the namespace label needs a ClusterRole
    names = _selector(hooks["pods.webhook.lmcache.dev"], "kubernetes.io/metadata.name")
    assert names == {"key": "kubernetes.io/metadata.name", "operator": "In",
                     "values": ["ml-a", "ml-b"]}  # fmt: skip
    assert not by_kind(objects, "ClusterRole")


def test_excluded_namespaces_and_timeout_reach_the_configuration(render: Render) -> None:
    hooks = _webhooks(
        render({"webhook.excludeNamespaces": "{batch}", "webhook.timeoutSeconds": "3"})
    )
    for hook in hooks.values():
        assert "batch" in _selector(hook, "kubernetes.io/metadata.name")["values"]
        assert hook["timeoutSeconds"] == 3


def test_without_the_webhook_nothing_of_it_is_rendered(render: Render) -> None:
    objects = render({"webhook.enabled": "false"})
    kinds = {o["kind"] for o in objects}
    assert not kinds & {"MutatingWebhookConfiguration", "Secret", "Certificate", "Issuer"}
    container = _container(objects)
    assert not [a for a in container["args"] if a.startswith("--webhook")]
    assert "readinessProbe" not in container
    (role,) = [r for r in by_kind(objects, "ClusterRole")]
    assert not [r for r in role["rules"] if "namespaces" in r["resources"]]
