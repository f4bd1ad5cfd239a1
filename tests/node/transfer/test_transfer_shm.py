"""POSIX shared memory: moving KV storage into /dev/shm and mapping it by name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lmcache_node.server.process import ServerProcess
from lmcache_node.transfer import shm
from lmcache_node.transfer.export import export_kv_caches


def test_move_keeps_values_and_aliasing_and_shares_pages() -> None:
    buffer = torch.randn(3, 8, 4)
    layers = list(buffer.unbind(0))
    expected = [t.clone() for t in layers]
    exported = export_kv_caches(layers, share=True)
    try:
        assert len(exported.segments) == 1  # one storage, one segment
        assert [d.storage_offset for d in exported.layers] == [0, 32, 64]
        for tensor, values in zip(layers, expected, strict=True):
            assert torch.equal(tensor, values)
        seg = exported.segments[0]
        mapped = shm.map_segment(seg.name, seg.nbytes)  # what the server sees
        layers[1][2, 3] = 42.0
        assert mapped.view(torch.float32)[32 + 2 * 4 + 3].item() == 42.0
        mapped.view(torch.float32)[0] = -1.0
        assert layers[0][0, 0].item() == -1.0
    finally:
        exported.unlink()
    assert not (shm.SHM_DIR / exported.segments[0].name).exists()


def test_separate_storages_get_separate_segments() -> None:
    layers = [torch.zeros(4, 4), torch.zeros(4, 4, dtype=torch.float16)]
    exported = export_kv_caches(layers, share=True)
    try:
        assert [d.segment for d in exported.layers] == [0, 1]
        assert [s.nbytes for s in exported.segments] == [64, 32]
    finally:
        exported.unlink()


@pytest.mark.parametrize("name", ["../etc/passwd", "torch_123", "lmcache-node-a/b", ""])
def test_foreign_names_are_refused(name: str) -> None:
    with pytest.raises(shm.SharedMemoryError, match="not ours"):
        shm.map_segment(name, 1)
    assert shm.unlink_segment(name) is False


def test_missing_or_short_segment() -> None:
    with pytest.raises(shm.SharedMemoryError, match="share /dev/shm"):
        shm.map_segment("lmcache-node-kv-missing-123", 8)
    name = shm.new_segment_name("test")
    shm.create_segment(name, 8)
    try:
        with pytest.raises(shm.SharedMemoryError, match="has 8 bytes"):
            shm.map_segment(name, 16)
    finally:
        assert shm.unlink_segment(name)


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


def test_bases_of_views_move_too_so_the_old_memory_is_freed() -> None:
    def vllm_like_views() -> list[torch.Tensor]:  # the raw buffer is only kept by the views
        raw = torch.arange(64, dtype=torch.int8)
        return [raw[i * 32 : (i + 1) * 32].view(torch.float16).view(4, 4) for i in range(2)]

    views = vllm_like_views()
    old_pointer = views[0].untyped_storage().data_ptr()
    expected = [v.clone() for v in views]
    exported = export_kv_caches(views, share=True)
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


@pytest.fixture
def private_shm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Sweeps in these tests must not touch segments of other processes."""
    monkeypatch.setattr(shm, "SHM_DIR", tmp_path)
    return tmp_path


def test_sweep_removes_only_segments_nobody_holds(private_shm: Path) -> None:
    held = shm.new_segment_name("kv")
    orphan = shm.new_segment_name("kv")
    shm.create_segment(held, 16)
    shm.create_segment(orphan, 16)
    fd = shm.hold_segment(held)
    try:
        assert shm.sweep_stale_segments(min_age_s=3600) == []  # too young to judge
        removed = shm.sweep_stale_segments(min_age_s=0)
        assert orphan in removed
        assert held not in removed
        assert (private_shm / held).exists()
        assert not (private_shm / orphan).exists()
    finally:
        os.close(fd)
        shm.unlink_segment(held)


def test_sweep_skips_a_segment_it_may_not_remove(
    private_shm: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Another user's leftover in the sticky /dev/shm (EPERM) is reported, not fatal."""
    foreign = shm.new_segment_name("kv")
    orphan = shm.new_segment_name("kv")
    shm.create_segment(foreign, 16)
    shm.create_segment(orphan, 16)
    unlink = Path.unlink

    def refuse_foreign(path: Path, missing_ok: bool = False) -> None:
        if path.name == foreign:
            raise PermissionError(1, "Operation not permitted", str(path))
        unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refuse_foreign)
    with caplog.at_level("WARNING", logger=shm.log.name):
        removed = shm.sweep_stale_segments(min_age_s=0)
    assert removed == [orphan]
    assert (private_shm / foreign).exists()
    assert any(
        foreign in r.getMessage() and "Operation not permitted" in r.getMessage()
        for r in caplog.records
    ), caplog.text
    monkeypatch.undo()
    shm.unlink_segment(foreign)


def test_exported_segments_are_held_until_unlinked(private_shm: Path) -> None:
    exported = export_kv_caches([torch.zeros(4, 4)], share=True)
    name = exported.shm_names[0]
    assert name not in shm.sweep_stale_segments(min_age_s=0)
    exported.unlink()
    assert not (shm.SHM_DIR / name).exists()
    assert exported.lock_fds == []


EXITING_CLIENT = """
import sys, torch
from lmcache_node.client import NodeClient
node = NodeClient(sys.argv[1], timeout_s=10)
node.connect()
reg = node.register_kv_caches([torch.zeros(8, 2, 16, 16)], block_dim=0, block_size=16)
print(reg.exported.shm_names[0], flush=True)
"""  # exits without close()


def test_a_client_exiting_without_close_removes_its_names(tmp_path: Path) -> None:
    with ServerProcess("--chunk-size", "64", "--cpu-buffer-size", "0.01") as server:
        done = subprocess.run(
            [sys.executable, "-c", EXITING_CLIENT, server.endpoint],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
    name = done.stdout.split()[0]
    assert name.startswith("lmcache-node-kv-")
    assert not (shm.SHM_DIR / name).exists()
