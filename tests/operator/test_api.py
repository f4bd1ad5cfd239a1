"""The API models: defaults, validation messages, and the CRDs generated from them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from lmcache_operator.api import ALL_KINDS
from lmcache_operator.api.lmcachecluster import LMCacheClusterSpec
from lmcache_operator.cli import main as cli_main
from lmcache_operator.crdgen import build_crd, crd_files, stale_crds
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


def test_crds_command_writes_and_checks(tmp_path: Path) -> None:
    assert cli_main(["crds", "--output-dir", str(tmp_path), "--check"]) == 1  # empty: stale
    assert cli_main(["crds", "--output-dir", str(tmp_path)]) == 0
    assert cli_main(["crds", "--output-dir", str(tmp_path), "--check"]) == 0
    for name, text in crd_files().items():
        assert yaml.safe_load((tmp_path / name).read_text()) == yaml.safe_load(text)
