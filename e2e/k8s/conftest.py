"""Settings of the end-to-end suite, from the environment (run.sh or e2e/kind/run.sh sets them).

E2E_KUBECONFIG                  the cluster (never $KUBECONFIG: the suite installs and deletes
                                things); kubectl and helm on PATH
E2E_NODE                        the real node the cache pod must serve on (node-0; kind-worker)
E2E_IMAGE_REGISTRY, E2E_IMAGE_TAG  where the loaded images are (lmcache.local, 0.1.0)
E2E_HOST_REACHES_NODE           1 when this machine can open the node's IP (real node: yes)
E2E_TIMINGS                     file the timings are appended to (JSON lines)
E2E_NO_CLUSTER_DNS              1 when the cluster has no DNS add-on (../shared/k8s): the operator
                                pod then maps kubernetes.default.svc (kopf's in-cluster address)
                                to the kubernetes Service's ClusterIP with hostAliases
E2E_VLLM_MODEL_DIR              a model directory on the real node (e2e/vllm/make_model.py):
                                when set, a vLLM pod (lmcache-vllm-cpu image) joins the tests
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from e2e.k8s.kube import Kube, Timings

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Settings:
    node: str
    registry: str
    tag: str
    host_reaches_node: bool
    vllm_model_dir: str | None = None
    no_cluster_dns: bool = False
    operator_namespace: str = "lmcache-system"
    cache_namespace: str = "e2e-cache"
    release: str = "lmc"

    def image(self, name: str) -> str:
        """The built image of ``name`` (the cache server's is its CPU variant, <tag>-cpu)."""
        tag = f"{self.tag}-cpu" if name == "node" else self.tag
        return f"{self.registry}/lmcache-{name}:{tag}"

    @property
    def service_account(self) -> str:
        return f"{self.operator_namespace}:{self.release}-lmcache-operator"


@pytest.fixture(scope="session")
def kube() -> Kube:
    kubeconfig = os.environ.get("E2E_KUBECONFIG")
    if not kubeconfig or not Path(kubeconfig).is_file():
        message = (
            "E2E CLUSTER UNAVAILABLE: set E2E_KUBECONFIG (run `make e2e`, which starts a real "
            "node, builds and loads the images, then runs this suite)"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message}; under CI=true this is a failure", pytrace=False)
        pytest.skip(message)
    return Kube(kubeconfig)


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings(
        node=os.environ.get("E2E_NODE", "node-0"),
        registry=os.environ.get("E2E_IMAGE_REGISTRY", "lmcache.local"),
        tag=os.environ.get("E2E_IMAGE_TAG", "0.1.0"),
        host_reaches_node=os.environ.get("E2E_HOST_REACHES_NODE", "1") == "1",
        vllm_model_dir=os.environ.get("E2E_VLLM_MODEL_DIR") or None,
        no_cluster_dns=os.environ.get("E2E_NO_CLUSTER_DNS") == "1",
    )


@pytest.fixture(scope="session")
def timings() -> Timings:
    return Timings(os.environ.get("E2E_TIMINGS"))
