"""CUDA IPC and the CUDA copy path, for real (skipped without CUDA)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from lmcache_node.client import NodeClient
from lmcache_node.server.process import ServerProcess
from lmcache_node.transfer import cuda_ipc

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(scope="module")
def cuda_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("gpu") / "server.log"
    with ServerProcess(
        "--chunk-size", "64", "--cpu-buffer-size", "0.25", "--device", "cuda", log_file=log
    ) as proc:  # fmt: skip
        yield proc


def test_export_and_open_in_process_roundtrip() -> None:
    tensor = torch.arange(1024, dtype=torch.float16, device="cuda")
    fields = cuda_ipc.export_storage(tensor.untyped_storage())
    assert len(fields) == 8
    event = torch.cuda.Event(interprocess=True)
    event.record()
    assert len(cuda_ipc.export_event(event)) > 0


@pytest.mark.parametrize(("shape", "dim"), [((2, 24, 16, 2, 8), 1), ((24, 16, 24), 0)])
@pytest.mark.parametrize("mode", ["shared", "engine"])
def test_cuda_roundtrip_is_byte_exact(
    cuda_server: ServerProcess, shape: tuple[int, ...], dim: int, mode: str
) -> None:
    with NodeClient(cuda_server.endpoint, timeout_s=30, expected_chunk_size=64) as node:
        node.connect()
        layers = [torch.randn(shape, device="cuda").to(torch.bfloat16) for _ in range(3)]
        originals = [t.clone() for t in layers]
        reg = node.register_kv_caches(layers, block_dim=dim, block_size=16, transfer_mode=mode)
        keys = [os.urandom(16) for _ in range(2)]
        assert node.store(reg, keys, [0, 1, 2, 3, 8, 9, 10, 11]) == 2
        for tensor in layers:
            tensor.zero_()
        assert node.retrieve(reg, keys, [4, 5, 6, 7, 12, 13, 14, 15]) == 2
        torch.cuda.synchronize()
        for tensor, original in zip(layers, originals, strict=True):
            assert torch.equal(tensor.select(dim, 4), original.select(dim, 0))
            assert torch.equal(tensor.select(dim, 15), original.select(dim, 11))
        node.unregister(reg)


def test_the_l1_pool_is_pinned_with_cuda() -> None:
    """Pinned host pages: the D2H/H2D copies of stores and retrieves run at full PCIe speed."""
    from lmcache_node.engine.memory import MemoryPool

    pool = MemoryPool(64 * 1024**2, 1024**2)
    assert pool.pinned and pool.buffer.is_pinned()


def test_the_server_reports_cuda(cuda_server: ServerProcess) -> None:
    with NodeClient(cuda_server.endpoint, timeout_s=30) as node:
        assert node.connect().device == "cuda"
        assert node.stats()["device"] == "cuda"
