"""Block geometry and gather/scatter through L1 pages, in process (no server)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
from lmcache_node.engine import CacheEngine
from lmcache_node.keys import ChunkKey
from lmcache_node.transfer import KVGeometry, LayerGeometry, LayoutError, block_runs
from lmcache_node.transfer.export import local_geometry
from lmcache_node.transfer.layout import dtype_name


def test_block_runs_merge_consecutive_ids() -> None:
    assert block_runs([3, 4, 5, 9, 10, 2]) == [(3, 3), (9, 2), (2, 1)]
    assert block_runs([]) == []


def describe(tensor: torch.Tensor, block_dim: int) -> LayerGeometry:
    base = torch.empty(0, dtype=torch.uint8).set_(tensor.untyped_storage())
    return LayerGeometry.describe(
        base,
        dtype=dtype_name(tensor.dtype),
        shape=list(tensor.shape),
        stride=list(tensor.stride()),
        storage_offset=tensor.storage_offset(),
        block_dim=block_dim,
    )


def test_gpu_layout_has_two_runs_per_block() -> None:
    tensor = torch.zeros(2, 10, 16, 4, 8, dtype=torch.float16)
    geometry = describe(tensor, 1)
    assert geometry.num_blocks == 10
    assert geometry.inner_bytes == 16 * 4 * 8 * 2
    assert geometry.outer_offsets == (0, 10 * 16 * 4 * 8 * 2)
    assert geometry.block_bytes == 2 * geometry.inner_bytes


def test_view_with_offset_into_a_larger_storage() -> None:
    buffer = torch.arange(3 * 6 * 4, dtype=torch.float32).reshape(3, 6, 4)
    layer = buffer[1]  # storage offset 24 elements
    geometry = describe(layer, 0)
    assert geometry.outer_offsets == (24 * 4,)
    kv = KVGeometry((geometry,), block_size=1, blocks_per_chunk=2)
    views = kv.chunk_views([2, 3])
    assert len(views) == 1  # consecutive blocks merge
    assert torch.equal(views[0].view(torch.float32), layer[2:4].reshape(-1))


@pytest.mark.parametrize(
    ("shape", "stride", "offset", "dim", "match"),
    [
        ([4, 8], [8, 1], 0, 2, "outside"),
        ([4, 8], [1, 4], 0, 0, "contiguous"),
        ([4, 8], [8], 0, 0, "do not match"),
        ([4, 0], [8, 1], 0, 0, "positive"),
        ([4, 8], [8, 1], 1, 0, "reaches byte"),
    ],
)
def test_invalid_descriptions(
    shape: list[int], stride: list[int], offset: int, dim: int, match: str
) -> None:
    base = torch.zeros(4 * 8 * 2, dtype=torch.uint8)
    with pytest.raises(LayoutError, match=match):
        LayerGeometry.describe(
            base, dtype="float16", shape=shape, stride=stride, storage_offset=offset, block_dim=dim
        )


def test_unknown_dtype() -> None:
    with pytest.raises(LayoutError, match="not supported"):
        LayerGeometry.describe(
            torch.zeros(8, dtype=torch.uint8), dtype="int128", shape=[1], stride=[1],
            storage_offset=0, block_dim=0,
        )  # fmt: skip


def test_split_and_check_blocks() -> None:
    kv = KVGeometry((describe(torch.zeros(8, 4), 0),), block_size=4, blocks_per_chunk=2)
    assert kv.split(2, [0, 1, 2]) == [[0, 1], [2]]
    with pytest.raises(ValueError, match="need 4 block ids"):
        kv.split(2, [0, 1])
    with pytest.raises(ValueError, match="need 4 block ids"):
        kv.split(2, [0, 1, 2, 3, 4])
    with pytest.raises(IndexError, match=r"\[0, 8\)"):
        kv.check_blocks([0, 8])
    with pytest.raises(IndexError):
        kv.check_blocks([-1])


def padded_blocks() -> torch.Tensor:
    """Blocks with a gap between them: block stride 100 elements, block size 96."""
    return torch.randn(12, 100)[:, :96].unflatten(1, (3, 32))


LAYOUTS: dict[str, tuple[Callable[[], torch.Tensor], int]] = {
    "vllm-cpu": (functools.partial(torch.randn, 12, 2, 16, 16, dtype=torch.float16), 0),
    "vllm-gpu": (functools.partial(torch.randn, 2, 12, 16, 2, 8, dtype=torch.bfloat16), 1),
    "mla": (functools.partial(torch.randn, 12, 16, 24, dtype=torch.float16), 0),
    "padded-blocks": (padded_blocks, 0),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gather_scatter_through_engine_pages_is_exact(layout: str) -> None:
    make, dim = LAYOUTS[layout]
    tensors = [make() for _ in range(3)]
    originals = [t.clone() for t in tensors]
    kv = local_geometry(tensors, block_dim=dim, block_size=16, blocks_per_chunk=4)
    engine = CacheEngine(1 << 20, page_size=1000)  # odd page size: copies straddle pages
    key = ChunkKey(b"k" * 16)
    source, target = [5, 6, 0, 11], [1, 2, 3, 7]
    outcome, reservation = engine.reserve(key, kv.block_bytes * 4)
    assert reservation is not None, outcome
    assert reservation.span.write(kv.chunk_views(source)) == kv.block_bytes * 4
    engine.commit(reservation)
    pinned = engine.pin([key])
    pinned[0].span.read_into(kv.chunk_views(target))
    engine.unpin(pinned)
    for tensor, original in zip(tensors, originals, strict=True):
        for src, dst in zip(source, target, strict=True):
            assert torch.equal(tensor.select(dim, dst), original.select(dim, src))
        untouched = [b for b in range(12) if b not in target]
        for block in untouched:
            assert torch.equal(tensor.select(dim, block), original.select(dim, block))
