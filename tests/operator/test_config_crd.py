"""spec.config and spec.configFrom on a real API server: stored as written, bounded."""

from __future__ import annotations

import json

import pytest
from lmcache_operator.api.lmcachecluster import LMCacheClusterSpec
from lmcache_operator.builders.lmcachecluster import node_config
from lmcache_operator.builders.user_config import check_user_config

from tests.operator.kubectl import Cluster

pytestmark = pytest.mark.k8s

CONFIG = {
    "chunk_size": 256,
    "use_layerwise": False,
    "blend_thresholds": [0.1, 0.2],
    "extra_config": {"use_odirect": True, "nested": {"deep": [1, "x"]}},
    "pd_allocation_timeout_sec": 1.5,
    "remote_serde": "cachegen",
}


def _cluster_doc(name: str, spec: dict[str, object]) -> str:
    doc = {"apiVersion": "lmcache.dev/v1alpha1", "kind": "LMCacheCluster",
           "metadata": {"name": name}, "spec": spec}  # fmt: skip
    return json.dumps(doc)


def test_spec_config_is_stored_as_written_and_validates(
    k8s_cluster: Cluster, namespace: str
) -> None:
    spec = {"device": "cpu", "config": CONFIG, "configFrom": {"name": "lmcache-config"}}
    k8s_cluster.apply(_cluster_doc("c1", spec), namespace)
    stored = k8s_cluster.get("lmcc", "c1", namespace)
    assert stored is not None
    assert stored["spec"]["config"] == CONFIG  # nothing pruned, types kept
    assert stored["spec"]["configFrom"] == {"name": "lmcache-config", "key": "lmcache.yaml"}
    model = LMCacheClusterSpec.model_validate(stored["spec"])  # what the operator reads
    result = check_user_config(model, node_config("c1", namespace, model), "max_workers: 1\n")
    assert result.problems == []
    assert len(result.warnings) == 5  # layerwise, blending, PD, cachegen, extra_config.nested


def test_api_server_bounds_spec_config(k8s_cluster: Cluster, namespace: str) -> None:
    too_many = {f"k{i}": i for i in range(257)}
    result = k8s_cluster.apply(_cluster_doc("big", {"config": too_many}), namespace, check=False)
    assert result.returncode != 0 and "spec.config" in result.stderr
    bad_ref = {"configFrom": {"name": "Bad_Name"}}
    result = k8s_cluster.apply(_cluster_doc("ref", bad_ref), namespace, check=False)
    assert result.returncode != 0 and "spec.configFrom.name" in result.stderr
