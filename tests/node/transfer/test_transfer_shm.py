"""POSIX shared memory: moving KV storage into segments of an shm directory, mapping them,
sweeping the ones nobody holds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lmcache_node.server.process import ServerProcess
from lmcache_node.transfer.export import export_kv_caches
from lmcache_node.transfer.shm import SharedMemoryError, ShmDirectory

pytestmark = pytest.mark.integration  # real server processes / subprocesses


def test_move_keeps_values_and_aliasing_and_shares_pages(shm_dir: ShmDirectory) -> None:
    buffer = torch.randn(3, 8, 4)
    layers = list(buffer.unbind(0))
    expected = [t.clone() for t in layers]
    exported = export_kv_caches(layers, share=True, shm_dir=shm_dir)
    try:
        assert len(exported.segments) == 1  # one storage, one segment
        assert [d.storage_offset for d in exported.layers] == [0, 32, 64]
        for tensor, values in zip(layers, expected, strict=True):
            assert torch.equal(tensor, values)
        seg = exported.segments[0]
        assert (shm_dir.path / seg.name).is_file()
        mapped = shm_dir.map(seg.name, seg.nbytes)  # what the server sees
        layers[1][2, 3] = 42.0
        assert mapped.view(torch.float32)[32 + 2 * 4 + 3].item() == 42.0
        mapped.view(torch.float32)[0] = -1.0
        assert layers[0][0, 0].item() == -1.0
    finally:
        exported.unlink()
    assert not (shm_dir.path / exported.segments[0].name).exists()


def test_separate_storages_get_separate_segments(shm_dir: ShmDirectory) -> None:
    layers = [torch.zeros(4, 4), torch.zeros(4, 4, dtype=torch.float16)]
    exported = export_kv_caches(layers, share=True, shm_dir=shm_dir)
    try:
        assert [d.segment for d in exported.layers] == [0, 1]
        assert [s.nbytes for s in exported.segments] == [64, 32]
        assert sorted(os.listdir(shm_dir.path)) == sorted(exported.shm_names)
    finally:
        exported.unlink()


def test_sharing_cpu_tensors_needs_a_directory() -> None:
    with pytest.raises(ValueError, match="shm directory"):
        export_kv_caches([torch.zeros(4, 4)], share=True)


def test_missing_segment_says_what_to_share(shm_dir: ShmDirectory) -> None:
    expected = "does not exist: the worker and the cache server must share"
    with pytest.raises(SharedMemoryError, match=expected):
        shm_dir.map("lmcache-node-kv-1-0123456789abcdef", 8)


def test_layout_tag_names_device_geometry_and_groups() -> None:
    from lmcache_node.transfer import layout_tag

    cpu = [torch.zeros(10, 8, 128, 256, dtype=torch.float16)] * 2
    assert layout_tag(cpu, block_dim=0, block_size=128) == "cpu-bd0-bs128-2xfloat16[N,8,128,256]"
    gpu_like = [torch.zeros(2, 10, 16, 4, 8), torch.zeros(2, 10, 16, 1, 8)]
    tag = layout_tag(gpu_like, block_dim=1, block_size=16)
    assert tag == "cpu-bd1-bs16-1xfloat32[2,N,16,4,8]+1xfloat32[2,N,16,1,8]"
    more_blocks = [torch.zeros(99, 8, 128, 256, dtype=torch.float16)] * 2
    assert layout_tag(more_blocks, block_dim=0, block_size=128) == layout_tag(
        cpu, block_dim=0, block_size=128
    )


def test_bases_of_views_move_too_so_the_old_memory_is_freed(shm_dir: ShmDirectory) -> None:
    def vllm_like_views() -> list[torch.Tensor]:  # the raw buffer is only kept by the views
        raw = torch.arange(64, dtype=torch.int8)
        return [raw[i * 32 : (i + 1) * 32].view(torch.float16).view(4, 4) for i in range(2)]

    views = vllm_like_views()
    old_pointer = views[0].untyped_storage().data_ptr()
    expected = [v.clone() for v in views]
    exported = export_kv_caches(views, share=True, shm_dir=shm_dir)
    try:
        new_pointer = views[0].untyped_storage().data_ptr()
        assert new_pointer != old_pointer
        base = views[0]._base
        assert base is not None
        assert base.untyped_storage().data_ptr() == new_pointer  # nothing keeps the old memory
        for view, values in zip(views, expected, strict=True):
            assert torch.equal(view, values)
    finally:
        exported.unlink()


def test_sweep_removes_only_segments_nobody_holds(shm_dir: ShmDirectory) -> None:
    held = shm_dir.create("kv", 16)
    orphan = shm_dir.create("kv", 16)
    orphan.release()  # as if its creator had died
    try:
        assert shm_dir.sweep(min_age_s=3600) == []  # too young to judge
        assert shm_dir.sweep(min_age_s=0) == [orphan.name]
        assert (shm_dir.path / held.name).exists()
        assert not (shm_dir.path / orphan.name).exists()
    finally:
        held.release()
        shm_dir.unlink(held.name)


def test_sweep_leaves_other_files_alone(shm_dir: ShmDirectory) -> None:
    other = shm_dir.path / "torch_1234_5678"  # not one of our names
    other.write_bytes(b"x")
    assert shm_dir.sweep(min_age_s=0) == []
    assert other.exists()


def test_exported_segments_are_held_until_unlinked(shm_dir: ShmDirectory) -> None:
    exported = export_kv_caches([torch.zeros(4, 4)], share=True, shm_dir=shm_dir)
    name = exported.shm_names[0]
    assert shm_dir.sweep(min_age_s=0) == []
    exported.unlink()
    assert not (shm_dir.path / name).exists()
    assert exported.shared == []


def test_a_failed_export_removes_the_segments_it_made(shm_dir: ShmDirectory) -> None:
    layers = [torch.zeros(4, 4), torch.zeros(0)]  # the second storage cannot be shared
    with pytest.raises(SharedMemoryError, match="0 bytes"):
        export_kv_caches(layers, share=True, shm_dir=shm_dir)
    assert os.listdir(shm_dir.path) == []
    assert torch.equal(layers[0], torch.zeros(4, 4))  # moved, still valid


EXITING_CLIENT = """
import sys, torch
from lmcache_node.client import NodeClient
node = NodeClient(sys.argv[1], timeout_s=10)
node.connect()
reg = node.register_kv_caches([torch.zeros(8, 2, 16, 16)], block_dim=0, block_size=16)
print(reg.exported.shm_names[0], flush=True)
"""  # exits without close()


def test_a_client_exiting_without_close_removes_its_names(tmp_path: Path) -> None:
    shm_path = tmp_path / "shm"
    args = ("--chunk-size", "64", "--cpu-buffer-size", "0.01", "--shm-dir", str(shm_path))
    with ServerProcess(*args) as server:
        done = subprocess.run(
            [sys.executable, "-c", EXITING_CLIENT, server.endpoint],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
    name = done.stdout.split()[0]
    assert name.startswith("lmcache-node-kv-")
    assert shm_path.is_dir()
    assert not (shm_path / name).exists()
