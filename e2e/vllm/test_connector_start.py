"""The connector's start-up against vLLM's real config objects (no engine started).

What vLLM hands the connector at start decides whether it may run at all: a model whose KV
cache has several groups is refused, a bad credentials directory fails the start, and
vLLM's ``kv_load_failure_policy`` is left as the user set it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.vllm]
pytest.importorskip("vllm", reason="vLLM is not installed here: run `make e2e-vllm`")

import torch  # noqa: E402 - after the skip: vLLM's torch
from lmcache_node.protocol.credentials import generate_keypair  # noqa: E402
from lmcache_node.server.process import free_port  # noqa: E402
from lmcache_node.vllm.connector import LMCacheNodeConnector  # noqa: E402
from lmcache_node.vllm.settings import ConnectorConfigError  # noqa: E402
from vllm.config import KVTransferConfig, VllmConfig  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.v1.kv_cache_interface import (  # noqa: E402
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    SlidingWindowSpec,
)

from e2e.vllm.harness import CONNECTOR_CLASS, CONNECTOR_MODULE  # noqa: E402


@pytest.fixture(scope="module")
def base_config(tiny_model: Path) -> VllmConfig:
    args = EngineArgs(
        model=str(tiny_model),
        enforce_eager=True,
        max_model_len=1024,
        kv_transfer_config=transfer_config(),
    )
    return args.create_engine_config()


def transfer_config(policy: str = "recompute", **extra: Any) -> KVTransferConfig:
    return KVTransferConfig(
        kv_connector=CONNECTOR_CLASS,
        kv_connector_module_path=CONNECTOR_MODULE,
        kv_role="kv_both",
        kv_load_failure_policy=policy,
        kv_connector_extra_config={
            "lmcache.node.port": free_port(),  # nobody listens: the link retries quietly
            "lmcache.node.reconnect_s": 60,
            **extra,
        },
    )


def spec(**sliding: int) -> FullAttentionSpec | SlidingWindowSpec:
    kind = SlidingWindowSpec if sliding else FullAttentionSpec
    return kind(block_size=128, num_kv_heads=2, head_size=32, dtype=torch.bfloat16, **sliding)


def kv_cache_config(*groups: KVCacheGroupSpec) -> KVCacheConfig:
    return KVCacheConfig(num_blocks=16, kv_cache_tensors=[], kv_cache_groups=list(groups))


ONE_GROUP = (KVCacheGroupSpec(["model.layers.0.attn", "model.layers.1.attn"], spec()),)
HYBRID = (
    KVCacheGroupSpec(["model.layers.0.attn"], spec()),
    KVCacheGroupSpec(["model.layers.1.attn"], spec(sliding_window=256)),
)


@pytest.fixture
def start(base_config: VllmConfig) -> Iterator[Any]:
    """Start a scheduler-side connector on ``base_config`` with the given transfer config."""
    started: list[LMCacheNodeConnector] = []

    def run(transfer: KVTransferConfig, groups: tuple[KVCacheGroupSpec, ...] = ONE_GROUP) -> Any:
        base_config.kv_transfer_config = transfer
        connector = LMCacheNodeConnector(
            base_config, KVConnectorRole.SCHEDULER, kv_cache_config(*groups)
        )
        started.append(connector)
        return connector

    yield run
    for connector in started:
        connector.shutdown()


def test_a_model_with_several_kv_cache_groups_is_refused(start: Any) -> None:
    with pytest.raises(ValueError, match="this model has 2 KV cache groups") as info:
        start(transfer_config(), HYBRID)
    message = str(info.value)
    assert "group 1: SlidingWindowSpec (1 layers)" in message
    assert "serve this model without --kv-transfer-config" in message


def test_one_kv_cache_group_starts(start: Any) -> None:
    connector = start(transfer_config())
    assert connector.planner.blocks_per_chunk == 2  # 256-token chunks of 128-token blocks


@pytest.fixture
def connector_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Our records (the connector gives the lmcache_node logger its own handler)."""
    logger = logging.getLogger("lmcache_node")
    caplog.set_level(logging.INFO, logger="lmcache_node")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def test_fail_policy_is_left_to_vllm(start: Any, connector_log: pytest.LogCaptureFixture) -> None:
    transfer = transfer_config(policy="fail")
    connector = start(transfer)
    assert transfer.kv_load_failure_policy == "fail"  # vLLM's scheduler reads it after us
    assert connector.fail_on_load_error
    assert "kv_load_failure_policy fail (a failed load fails its request)" in connector_log.text


def test_a_bad_credentials_directory_fails_the_start(start: Any, tmp_path: Path) -> None:
    missing = tmp_path / "client-credentials"
    with pytest.raises(ConnectorConfigError) as info:
        start(transfer_config(**{"lmcache.node.credentials_dir": str(missing)}))
    message = str(info.value)
    assert f"{str(missing)!r} does not exist" in message
    assert "kv_connector_extra_config['lmcache.node.credentials_dir']" in message


def test_a_credentials_directory_starts_with_curve(
    start: Any, tmp_path: Path, connector_log: pytest.LogCaptureFixture
) -> None:
    public, secret = generate_keypair()
    server_public, _ = generate_keypair()
    (tmp_path / "client.key").write_bytes(secret + b"\n")
    (tmp_path / "client.pub").write_bytes(public + b"\n")
    (tmp_path / "server.pub").write_bytes(server_public + b"\n")
    connector = start(transfer_config(**{"lmcache.node.credentials_dir": str(tmp_path)}))
    assert f"server {connector.settings.url} (CURVE)" in connector_log.text
