"""Copy paths: share KV tensors (POSIX shm on CPU, CUDA IPC on GPU) and move whole blocks."""

from lmcache_node.transfer.export import (
    ExportedKV,
    export_kv_caches,
    layout_tag,
    local_geometry,
)
from lmcache_node.transfer.layout import KVGeometry, LayerGeometry, LayoutError, block_runs
from lmcache_node.transfer.shm import SharedMemoryError, ShmDirectory

__all__ = [
    "ExportedKV",
    "KVGeometry",
    "LayerGeometry",
    "LayoutError",
    "SharedMemoryError",
    "ShmDirectory",
    "block_runs",
    "export_kv_caches",
    "layout_tag",
    "local_geometry",
]
