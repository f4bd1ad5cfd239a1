"""Block geometry of registered KV tensors and the gather/scatter views of a chunk.

A layer's KV tensor is a strided view of a byte segment (shared memory or a CUDA
allocation). Blocks are opaque: the bytes of block ``b`` are, for every index of the
dimensions before the block dimension (the "outer" dimensions, e.g. K/V in the vLLM GPU
layout ``[2, num_blocks, block_size, heads, head_dim]``), one contiguous run of the
dimensions after it. A chunk's bytes are the runs of all its blocks, layer by layer,
outer index by outer index, in block order; store and retrieve use the same order, so the
copy is byte-exact whatever the layout. Consecutive block ids merge into one run.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmcache_node.dtypes import DtypeError, element_bytes, name_of, torch_dtype

MAX_DIMS = 8
MAX_OUTER_RUNS = 64  # byte runs per block and layer (K and V: 2; MLA, CPU layouts: 1)


class LayoutError(ValueError):
    """A tensor description that cannot be served; the message says why."""


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of ``dtype`` (lmcache_node.dtypes); LayoutError when unsupported."""
    try:
        return name_of(dtype)
    except DtypeError as exc:
        raise LayoutError(str(exc)) from None


def dtype_of(name: str) -> torch.dtype:
    """The ``torch.dtype`` a wire name stands for; LayoutError when unsupported."""
    try:
        return torch_dtype(name)
    except DtypeError as exc:
        raise LayoutError(str(exc)) from None


@dataclass(frozen=True)
class LayerGeometry:
    """Where the blocks of one layer lie in its segment's bytes."""

    base: torch.Tensor  # flat uint8 view of the whole segment
    num_blocks: int
    inner_bytes: int  # bytes of one block under one outer index
    block_stride_bytes: int
    outer_offsets: tuple[int, ...]  # byte offset of block 0 for each outer index

    @property
    def block_bytes(self) -> int:
        return self.inner_bytes * len(self.outer_offsets)

    @classmethod
    def describe(
        cls,
        base: torch.Tensor,
        *,
        dtype: str,
        shape: Sequence[int],
        stride: Sequence[int],
        storage_offset: int,
        block_dim: int,
    ) -> LayerGeometry:
        """Check a strided description against its segment and compute the block runs."""
        ndim = len(shape)
        if ndim == 0 or len(stride) != ndim:
            raise LayoutError(f"shape {list(shape)} and stride {list(stride)} do not match")
        if ndim > MAX_DIMS:
            raise LayoutError(f"a KV tensor has at most {MAX_DIMS} dimensions, got {ndim}")
        if not 0 <= block_dim < ndim:
            raise LayoutError(f"block_dim {block_dim} is outside a {ndim}-dimensional tensor")
        if any(d <= 0 for d in shape) or any(s < 0 for s in stride) or storage_offset < 0:
            raise LayoutError(
                f"shape {list(shape)}, stride {list(stride)} and offset {storage_offset} "
                "must be positive (non-negative strides and offset)"
            )
        outer_runs = math.prod(shape[:block_dim])
        if outer_runs > MAX_OUTER_RUNS:
            raise LayoutError(
                f"the dimensions before block_dim {block_dim} of shape {list(shape)} give "
                f"{outer_runs} byte runs per block; at most {MAX_OUTER_RUNS} are supported: "
                "pass the dimension of the block index as block_dim"
            )
        try:
            elem = element_bytes(dtype)
        except DtypeError as exc:
            raise LayoutError(str(exc)) from None
        expected = 1
        for dim in range(ndim - 1, block_dim, -1):
            if shape[dim] > 1 and stride[dim] != expected:
                raise LayoutError(
                    f"dimensions after block_dim {block_dim} must be contiguous: shape "
                    f"{list(shape)} has stride {list(stride)}; pass the dimension of the "
                    "block index as block_dim"
                )
            expected *= shape[dim]
        inner = expected * elem
        extent = storage_offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
        if (extent + 1) * elem > base.numel():
            raise LayoutError(
                f"the tensor (shape {list(shape)}, stride {list(stride)}, offset "
                f"{storage_offset}) reaches byte {(extent + 1) * elem} but its shared segment "
                f"has {base.numel()} bytes"
            )
        outer = tuple(
            (storage_offset + sum(i * s for i, s in zip(index, stride[:block_dim], strict=True)))
            * elem
            for index in itertools.product(*(range(n) for n in shape[:block_dim]))
        )
        return cls(
            base=base,
            num_blocks=shape[block_dim],
            inner_bytes=inner,
            block_stride_bytes=stride[block_dim] * elem,
            outer_offsets=outer,
        )


def block_runs(block_ids: Sequence[int]) -> list[tuple[int, int]]:
    """Merge ids into (first, count) runs of consecutive blocks."""
    runs: list[tuple[int, int]] = []
    for block in block_ids:
        if runs and runs[-1][0] + runs[-1][1] == block:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((block, 1))
    return runs


@dataclass(frozen=True)
class KVGeometry:
    """All layers of one registration."""

    layers: tuple[LayerGeometry, ...]
    block_size: int
    blocks_per_chunk: int

    @property
    def num_blocks(self) -> int:
        return min(layer.num_blocks for layer in self.layers)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block across every layer."""
        return sum(layer.block_bytes for layer in self.layers)

    @property
    def chunk_bytes(self) -> int:
        return self.block_bytes * self.blocks_per_chunk

    def check_blocks(self, block_ids: Sequence[int]) -> None:
        if not block_ids:
            return
        low, high = min(block_ids), max(block_ids)
        if low < 0 or high >= self.num_blocks:
            raise IndexError(
                f"block ids must lie in [0, {self.num_blocks}); got {low if low < 0 else high}"
            )

    def split(self, num_keys: int, block_ids: Sequence[int]) -> list[Sequence[int]]:
        """Cut a flat block id list into per-chunk lists (the last may be partial)."""
        per = self.blocks_per_chunk
        if not (num_keys - 1) * per < len(block_ids) <= num_keys * per:
            raise ValueError(
                f"{num_keys} key(s) need {num_keys * per} block ids ({per} per chunk; the "
                f"last chunk may have fewer), got {len(block_ids)}"
            )
        return [block_ids[i * per : (i + 1) * per] for i in range(num_keys)]

    def chunk_views(self, block_ids: Sequence[int]) -> list[torch.Tensor]:
        """Flat uint8 views of a chunk's bytes, in the canonical order (no copy)."""
        runs = block_runs(block_ids)
        views: list[torch.Tensor] = []
        for layer in self.layers:
            inner = layer.inner_bytes
            stride = layer.block_stride_bytes
            base = layer.base
            merged = stride == inner
            for outer in layer.outer_offsets:
                for first, count in runs:
                    if merged:
                        start = outer + first * stride
                        views.append(base[start : start + count * inner])
                    else:
                        for block in range(first, first + count):
                            start = outer + block * stride
                            views.append(base[start : start + inner])
        return views
