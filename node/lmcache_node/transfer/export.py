"""Worker side of registration: describe KV tensors and share their memory with the server."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from lmcache_node.protocol.messages import LayerDesc, SegmentDesc
from lmcache_node.transfer import cuda_ipc, shm
from lmcache_node.transfer.layout import KVGeometry, LayerGeometry, dtype_name

log = logging.getLogger(__name__)


@dataclass
class ExportedKV:
    """What a registration sends, plus what the worker must keep alive or clean up."""

    device: str
    segments: list[SegmentDesc]
    layers: list[LayerDesc]
    shm_dir: shm.ShmDirectory | None = field(default=None, repr=False)
    shared: list[shm.Segment] = field(default_factory=list, repr=False)  # held until unlink

    @property
    def shm_names(self) -> list[str]:
        return [segment.name for segment in self.shared]

    def unlink(self) -> None:
        """Remove our segments' names and drop their flocks (the tensors keep the memory)."""
        for segment in self.shared:
            if self.shm_dir is not None:
                self.shm_dir.unlink(segment.name)
            segment.release()
        self.shared.clear()


def _group_by_storage(tensors: list[torch.Tensor]) -> list[list[int]]:
    groups: dict[tuple[str, int], list[int]] = {}
    for index, tensor in enumerate(tensors):
        storage = tensor.untyped_storage()
        groups.setdefault((str(tensor.device), storage.data_ptr()), []).append(index)
    return list(groups.values())


def describe_layers(
    tensors: list[torch.Tensor], segment_of: dict[int, int] | None = None
) -> list[LayerDesc]:
    return [
        LayerDesc(
            dtype=dtype_name(t.dtype),
            shape=list(t.shape),
            stride=list(t.stride()),
            storage_offset=int(t.storage_offset()),
            segment=(segment_of or {}).get(i, 0),
        )
        for i, t in enumerate(tensors)
    ]


def device_kind(tensors: list[torch.Tensor]) -> str:
    kinds = {t.device.type for t in tensors}
    if len(kinds) != 1:
        raise ValueError(f"all KV tensors must be on one device type, got {sorted(kinds)}")
    return kinds.pop()


def export_kv_caches(
    tensors: list[torch.Tensor], *, share: bool, shm_dir: shm.ShmDirectory | None = None
) -> ExportedKV:
    """Describe ``tensors``; with ``share``, move CPU storage into segments in ``shm_dir``
    (rebinding the tensors in place) or export CUDA IPC handles."""
    if not tensors:
        raise ValueError("register at least one KV tensor")
    device = device_kind(tensors)
    exported = ExportedKV(device=device, segments=[], layers=[], shm_dir=shm_dir)
    segment_of: dict[int, int] = {}
    try:
        for group in _group_by_storage(tensors):
            members = [tensors[i] for i in group]
            storage = members[0].untyped_storage()
            for i in group:
                segment_of[i] = len(exported.segments)
            if not share:
                exported.segments.append(SegmentDesc(kind="none", nbytes=storage.nbytes()))
            elif device == "cpu":
                if shm_dir is None:
                    raise ValueError("sharing CPU tensors needs the server's shm directory")
                segment = shm.move_to_segment(members, shm_dir)
                exported.shared.append(segment)
                exported.segments.append(
                    SegmentDesc(kind="shm", nbytes=storage.nbytes(), name=segment.name)
                )
            elif device == "cuda":
                fields = cuda_ipc.export_storage(storage)
                exported.segments.append(
                    SegmentDesc(kind="cuda_ipc", nbytes=storage.nbytes(), cuda=fields)
                )
            else:
                raise ValueError(
                    f"sharing {device} tensors is not supported: use transfer_mode='engine'"
                )
    except BaseException:
        exported.unlink()  # segments made so far: their tensors keep working
        raise
    exported.layers = describe_layers(tensors, segment_of)
    return exported


def local_geometry(
    tensors: list[torch.Tensor], *, block_dim: int, block_size: int, blocks_per_chunk: int
) -> KVGeometry:
    """The geometry over the worker's own tensors (engine mode gathers and scatters here)."""
    layers = []
    for tensor in tensors:
        base = shm.storage_bytes(tensor.untyped_storage())
        layers.append(
            LayerGeometry.describe(
                base,
                dtype=dtype_name(tensor.dtype),
                shape=list(tensor.shape),
                stride=list(tensor.stride()),
                storage_offset=int(tensor.storage_offset()),
                block_dim=block_dim,
            )
        )
    return KVGeometry(tuple(layers), block_size, blocks_per_chunk)


def layout_tag(tensors: list[torch.Tensor], *, block_dim: int, block_size: int) -> str:
    """A namespace layout string: device kind, block geometry and per-layer shapes.

    Put it in ``KeyNamespace.layout`` so chunks of different layouts never share keys,
    e.g. ``cpu-bd0-bs128-32xfloat16[N,8,128,256]``. The block count is left out (it
    varies with vLLM's memory budget and does not change a block's bytes).
    """
    groups: list[tuple[str, int]] = []
    for tensor in tensors:
        shape = [str(d) for d in tensor.shape]
        shape[block_dim] = "N"
        signature = f"{dtype_name(tensor.dtype)}[{','.join(shape)}]"
        if groups and groups[-1][0] == signature:
            groups[-1] = (signature, groups[-1][1] + 1)
        else:
            groups.append((signature, 1))
    body = "+".join(f"{count}x{signature}" for signature, count in groups)
    return f"{device_kind(tensors)}-bd{block_dim}-bs{block_size}-{body}"
