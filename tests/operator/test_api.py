"""The API models: defaults, validation messages, and the CRDs generated from them."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from lmcache_operator.api import ALL_KINDS
from lmcache_operator.api.k8s_types import k8s_schema, kubernetes_version
from lmcache_operator.api.lmcachecluster import LMCacheClusterSpec
from lmcache_operator.api.policy import SHAPE_MESSAGE, SYSTEM_MESSAGE, PodPolicy, derived_group
from lmcache_operator.cli import main as cli_main
from lmcache_operator.crdgen import build_crd, crd_files, stale_crds
from lmcache_operator.k8s_openapi import TYPES
from lmcache_operator.quantity import QuantityError, parse_bytes
from pydantic import ValidationError

REPO = Path(__file__).resolve().parents[2]


def test_defaults_match_the_documented_api() -> None:
    spec = LMCacheClusterSpec.model_validate({})
    assert spec.server.port == 5555
    assert spec.server.chunk_size == 256
    assert spec.host_network is True
    assert spec.host_shm_path == "/dev/shm"
    assert spec.placement.node_selector == {"nvidia.com/gpu.present": "true"}
    assert spec.cache.disk is None and spec.cache.remote is None


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ({"server": {"port": 8080}}, "server.port and server.httpPort must differ"),
        ({"server": {"port": 5556}}, "server.eventsPort must differ from server.port"),
        ({"server": {"httpPort": 7, "eventsPort": 7}}, "server.eventsPort must differ"),
        ({"cache": {"cpuSize": "0"}}, "must be greater than zero"),
        ({"cache": {"cpuSize": "4GB"}}, "should match pattern"),
        ({"cache": {"disk": {"path": "/d"}}}, "cache.disk.size is required"),
        ({"cache": {"remote": {"serde": "lz4"}}}, "exactly one of cache.remote.url"),
        (
            {"cache": {"remote": {"url": "redis://r", "urlSecretRef": {"name": "s", "key": "k"}}}},
            "exactly one of cache.remote.url",
        ),
        ({"updateStrategy": {"maxSurge": 1}}, "maxSurge is not allowed with hostNetwork"),
        ({"serverr": {}}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_specs_are_rejected_with_the_reason(spec: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        LMCacheClusterSpec.model_validate(spec)


def test_max_surge_is_allowed_without_host_network() -> None:
    spec = LMCacheClusterSpec.model_validate(
        {"hostNetwork": False, "updateStrategy": {"maxSurge": "25%"}}
    )
    assert spec.update_strategy.max_surge == "25%"


def test_memory_override_below_the_cache_size_is_a_semantic_problem() -> None:
    spec = LMCacheClusterSpec.model_validate(
        {"cache": {"cpuSize": "8Gi"}, "resources": {"limits": {"memory": "4Gi"}}}
    )
    problems = spec.semantic_problems()
    assert len(problems) == 1
    assert "resources.limits.memory 4Gi is below cache.cpuSize 8Gi" in problems[0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4Gi", 4 * 1024**3), ("512Mi", 512 * 1024**2), ("1.5G", 1_500_000_000), ("100", 100)],
)
def test_quantities(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


def test_bad_quantity_names_the_format() -> None:
    with pytest.raises(QuantityError, match=r"e\.g\. 4Gi"):
        parse_bytes("4 GB")


def _walk(schema: dict[str, object], path: str = "") -> list[str]:
    """Paths of schema nodes that break Kubernetes' structural-schema rules."""
    bad = []
    for key in ("$ref", "anyOf", "allOf", "oneOf", "title", "const"):
        if key in schema:
            bad.append(f"{path}: {key}")
    if "properties" in schema and "additionalProperties" in schema:
        bad.append(f"{path}: properties with additionalProperties")
    is_int_or_string = schema.get("x-kubernetes-int-or-string")
    if "type" not in schema and not is_int_or_string:
        bad.append(f"{path}: no type")
    for name, sub in (schema.get("properties") or {}).items():  # type: ignore[attr-defined]
        bad += _walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        bad += _walk(schema["items"], f"{path}[]")  # type: ignore[arg-type]
    if isinstance(schema.get("additionalProperties"), dict):
        bad += _walk(schema["additionalProperties"], f"{path}{{}}")  # type: ignore[arg-type]
    return bad


@pytest.mark.parametrize("kind", ALL_KINDS, ids=lambda k: k.kind)
def test_crd_schema_is_structural_and_documented(kind: object) -> None:
    crd = build_crd(kind)  # type: ignore[arg-type]
    version = crd["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    assert _walk(schema) == []
    assert version["subresources"]["status"] == {}
    spec = schema["properties"]["spec"]
    undocumented = [n for n, s in spec["properties"].items() if not s.get("description")]
    assert undocumented == []


def test_lmcachecluster_crd_names_columns_and_rules() -> None:
    crd = build_crd(ALL_KINDS[0])
    assert crd["spec"]["names"]["shortNames"] == ["lmcc"]
    version = crd["spec"]["versions"][0]
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Ready", "Desired", "Phase", "Port", "Cache", "Age"]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = [r["rule"] for r in spec["x-kubernetes-validations"]]
    assert any("httpPort" in r for r in rules)
    assert any("maxSurge" in r for r in rules)
    cache = spec["properties"]["cache"]["properties"]
    assert "isGreaterThan" in cache["cpuSize"]["x-kubernetes-validations"][0]["rule"]
    assert cache["disk"]["x-kubernetes-validations"][0]["rule"] == "has(self.size)"
    remote_rule = cache["remote"]["x-kubernetes-validations"][0]["rule"]
    assert remote_rule == "has(self.url) != has(self.urlSecretRef)"
    max_unavailable = spec["properties"]["updateStrategy"]["properties"]["maxUnavailable"]
    assert max_unavailable.get("x-kubernetes-int-or-string") is True


def test_committed_crds_are_up_to_date() -> None:
    stale = stale_crds(REPO / "crds")
    assert stale == [], f"crds/ is stale ({stale}): run `make crds` and commit the result"


@pytest.mark.integration
def test_crds_command_writes_and_checks(tmp_path: Path) -> None:
    assert cli_main(["crds", "--output-dir", str(tmp_path), "--check"]) == 1  # empty: stale
    assert cli_main(["crds", "--output-dir", str(tmp_path)]) == 0
    assert cli_main(["crds", "--output-dir", str(tmp_path), "--check"]) == 0
    for name, text in crd_files().items():
        assert yaml.safe_load((tmp_path / name).read_text()) == yaml.safe_load(text)


# ---- guard rails (api/policy.py) and typed pass-through -------------------------------------


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ({"cache": {"disk": {"path": "/etc", "size": "1Gi"}}}, "system directory"),
        ({"cache": {"disk": {"path": "/var", "size": "1Gi"}}}, "or a parent of one"),
        ({"cache": {"disk": {"path": "/mnt/../etc", "size": "1Gi"}}}, "normalised absolute"),
        ({"cache": {"disk": {"path": "/mnt//a", "size": "1Gi"}}}, "normalised absolute"),
        ({"cache": {"disk": {"path": "/mnt/a/", "size": "1Gi"}}}, "normalised absolute"),
        ({"cache": {"disk": {"path": "/dev/shm/d", "size": "1Gi"}}}, "that is memory"),
        ({"hostShmPath": "/"}, "system directory"),
        ({"hostShmPath": "/proc/1"}, "system directory"),
        ({"shmGroup": 10}, "at least 1000"),
        ({"shmGroup": 2000000000}, "reserved for derived groups"),
        ({"pod": {"hostPID": True}}, "Extra inputs are not permitted"),
    ],
)
def test_always_refused_host_paths_and_ids(spec: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        LMCacheClusterSpec.model_validate(spec)


PREFIXES_FIX = "chart value allowedHostPathPrefixes"
ADMIN_FIX = "allowPrivilegedPassThrough: true in the chart"


@pytest.mark.parametrize(
    ("spec", "fragment", "fix"),
    [
        (
            {"cache": {"disk": {"path": "/opt/cache", "size": "1Gi"}}},
            "spec.cache.disk.path: '/opt/cache' is not under an allowed host path prefix",
            PREFIXES_FIX,
        ),
        (
            {"cache": {"disk": {"path": "/mnt2/cache", "size": "1Gi"}}},  # not under /mnt
            "spec.cache.disk.path: '/mnt2/cache' is not under",
            PREFIXES_FIX,
        ),
        ({"hostShmPath": "/tmp/shm"}, "spec.hostShmPath: '/tmp/shm' is not under", PREFIXES_FIX),
        (
            {"pod": {"containerSecurityContext": {"privileged": True}}},
            "spec.pod.containerSecurityContext.privileged: privileged containers are refused",
            ADMIN_FIX,
        ),
        (
            {"pod": {"containerSecurityContext": {"capabilities": {"add": ["NET_ADMIN"]}}}},
            "spec.pod.containerSecurityContext.capabilities.add: adding ['NET_ADMIN']",
            ADMIN_FIX,
        ),
        (
            {"pod": {"volumes": [{"name": "r", "hostPath": {"path": "/"}}]}},
            "spec.pod.volumes[0].hostPath.path: '/' must not be / or a system directory",
            ADMIN_FIX,
        ),
        (
            {"pod": {"volumes": [{"name": "k", "hostPath": {"path": "/var/lib/kubelet"}}]}},
            "spec.pod.volumes[0].hostPath.path: '/var/lib/kubelet' must not be",
            ADMIN_FIX,
        ),
        (
            {"pod": {"volumes": [{"name": "o", "hostPath": {"path": "/opt/data"}}]}},
            "spec.pod.volumes[0].hostPath.path: '/opt/data' is not under an allowed",
            ADMIN_FIX,
        ),
        (
            {"pod": {"securityContext": {"runAsUser": 1879048193}}},
            "spec.pod.securityContext.runAsUser: 1879048193 lies in the range reserved",
            "choose an id outside it",
        ),
    ],
)
def test_guard_rails_are_config_problems_naming_the_field_and_the_fix(
    spec: dict[str, object], fragment: str, fix: str
) -> None:
    problems = LMCacheClusterSpec.model_validate(spec).semantic_problems()
    assert len(problems) == 1 and fragment in problems[0], problems
    assert fix in problems[0]


def test_privileged_pass_through_needs_the_charts_consent_but_host_paths_never_do() -> None:
    trusted = PodPolicy(allow_privileged_pass_through=True)
    privileged = LMCacheClusterSpec.model_validate(
        {
            "pod": {
                "containerSecurityContext": {"privileged": True, "capabilities": {"add": ["X"]}},
                "volumes": [{"name": "r", "hostPath": {"path": "/var/run/docker.sock"}}],
            }
        }
    )
    assert len(privileged.semantic_problems()) == 3
    assert privileged.semantic_problems(trusted) == []
    # the cache's own host paths stay under the prefixes whatever the chart trusts
    disk = LMCacheClusterSpec.model_validate({"cache": {"disk": {"path": "/opt/c", "size": "1Gi"}}})
    assert "spec.cache.disk.path" in disk.semantic_problems(trusted)[0]


def test_prefixes_match_on_component_boundaries() -> None:
    policy = PodPolicy(("/mnt", "/var/cache/lmcache"))
    assert policy.prefix_of("/mnt") == "/mnt"
    assert policy.prefix_of("/mnt/a/b") == "/mnt"
    assert policy.prefix_of("/mnt2") is None
    assert policy.prefix_of("/var/cache/lmcache-x") is None
    assert policy.prefix_of("/var/cache") is None


@pytest.mark.parametrize(
    ("prefixes", "fragment"),
    [
        ((), "allowedHostPathPrefixes is empty"),
        (("/",), "'/' must not be / or a system directory"),
        (("/etc",), "'/etc' must not be"),
        (("mnt",), "'mnt' must be a normalised absolute path"),
        (("/mnt/../etc",), "normalised"),
    ],
)
def test_unusable_prefixes_are_refused(prefixes: tuple[str, ...], fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        PodPolicy(prefixes)


def test_derived_groups_are_stable_distinct_and_in_the_reserved_range() -> None:
    groups = {derived_group(ns, name) for ns in ("a", "b", "a-b") for name in ("c", "b-c", "x")}
    assert len(groups) == 9
    assert all(1879048192 <= g <= 2147483646 for g in groups)
    assert derived_group("a", "c") == derived_group("a", "c")
    assert (
        derived_group("ml", "cache")
        == 0x70000000 + int.from_bytes(hashlib.sha256(b"ml/cache").digest()[:8], "big") % 0x0FFFFFFF
    )


def _spec_schema(kind_name: str) -> dict[str, Any]:
    kind = next(k for k in ALL_KINDS if k.kind == kind_name)
    schema: dict[str, Any] = build_crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return dict(schema["properties"]["spec"])


def _free_form_paths(schema: dict[str, Any], path: str = "spec") -> list[str]:
    found = [path] if schema.get("x-kubernetes-preserve-unknown-fields") else []
    for name, sub in (schema.get("properties") or {}).items():
        found += _free_form_paths(sub, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            found += _free_form_paths(schema[key], f"{path}[]")
    return found


@pytest.mark.parametrize("kind", ["LMCacheCluster", "VLLMDeployment"])
def test_pass_through_fields_are_typed_with_the_core_v1_schemas(kind: str) -> None:
    spec = _spec_schema(kind)
    # nothing is accepted without a schema, except the cache server's own settings: LMCache's
    # keys and ours, checked by the node's loader (builders.user_config) instead
    assert _free_form_paths(spec) == (["spec.config"] if kind == "LMCacheCluster" else [])
    tolerations = spec["properties"]["placement"]["properties"]["tolerations"]
    assert set(tolerations["items"]["properties"]) >= {"key", "operator", "value", "effect"}
    pod = spec["properties"]["pod"]["properties"]
    assert pod["env"]["items"]["required"] == ["name"]
    volume = pod["volumes"]["items"]["properties"]["hostPath"]["properties"]["path"]
    assert volume["maxLength"] == 1024
    assert volume["x-kubernetes-validations"][0]["message"].startswith("must be a normalised")
    assert "privileged" in pod["containerSecurityContext"]["properties"]
    assert "description" in pod["containerSecurityContext"]  # ours, for kubectl explain


def test_core_v1_schemas_record_their_kubernetes_version() -> None:
    assert re.fullmatch(r"v1\.\d+\.\d+", kubernetes_version())
    for name in TYPES:
        assert k8s_schema(name)["type"] == "object"
    with pytest.raises(KeyError, match=r"k8s_openapi\.TYPES"):
        k8s_schema("Pod")


def test_crds_stay_well_under_the_etcd_and_apply_limits() -> None:
    for name, text in crd_files().items():
        size = len(text.encode("utf-8"))
        # 1.5 MB is etcd's object limit; 256 KiB is client-side `kubectl apply`'s annotation
        assert size < 256 * 1024, (name, size)


def test_cluster_crd_rules_refuse_system_paths_with_the_models_messages() -> None:
    spec = _spec_schema("LMCacheCluster")
    shm = spec["properties"]["hostShmPath"]["x-kubernetes-validations"]
    assert [r["message"] for r in shm] == [SHAPE_MESSAGE, SYSTEM_MESSAGE]
    disk = spec["properties"]["cache"]["properties"]["disk"]["properties"]["path"]
    assert len(disk["x-kubernetes-validations"]) == 3
    group = spec["properties"]["shmGroup"]["x-kubernetes-validations"][0]["rule"]
    assert group == "self >= 1000 && self < 1879048192"
