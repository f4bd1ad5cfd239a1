"""KV cache shape specifications: ``--kv_shape`` and ``--kvcache_shape_spec``.

A layer group is a shape, a dtype and a layer count. The standalone starter's shape is
LMCache's ``(num_layers, 2, chunk_size, num_kv_heads, head_size)`` per group, written
``(2,2,256,4,16):float16:2;(3,2,256,4,4):float32:3``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lmcache_node.dtypes import BUFFER_DTYPES, element_bytes, torch_dtype

if TYPE_CHECKING:  # torch is imported where a tensor dtype is needed: validating a config
    import torch  # (the operator does it with lmcache_node.lmcache_compat) stays torch-free

KV_DTYPES = BUFFER_DTYPES  # the dtypes a shape spec may name (lmcache_node.dtypes)

SPEC_FORMAT = "(shape):dtype:layer_count;..."
SPEC_EXAMPLE = "(2,2,256,4,16):float16:2;(3,2,256,4,4):float32:3"
_GROUP = re.compile(r"^\(\s*([0-9,\s]+)\s*\)\s*:\s*([a-z0-9]+)\s*:\s*([0-9]+)\s*$")


class KVSpecError(ValueError):
    """An invalid KV shape specification."""


@dataclass(frozen=True)
class LayerGroup:
    """A group of layers sharing one KV shape and dtype."""

    shape: tuple[int, ...]
    dtype_name: str
    num_layers: int

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype_name)

    @property
    def bytes_per_layer(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * element_bytes(self.dtype_name)

    def describe(self) -> str:
        shape = ",".join(str(d) for d in self.shape)
        return f"({shape}):{self.dtype_name}:{self.num_layers}"


def _invalid(spec: str, why: str) -> KVSpecError:
    return KVSpecError(
        f"Invalid KV shape specification {spec!r}: {why}. "
        f"The format is {SPEC_FORMAT}, for example {SPEC_EXAMPLE!r}"
    )


def parse_shape(text: str, *, spec: str | None = None) -> tuple[int, ...]:
    """Parse ``2,2,256,4,16`` into a tuple of positive ints."""
    source = spec if spec is not None else text
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise _invalid(source, "the shape is empty")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise _invalid(source, f"shape {text!r} must be comma-separated integers") from None
    if any(d <= 0 for d in shape):
        raise _invalid(source, f"every dimension of {text!r} must be positive")
    return shape


def parse_shape_spec(spec: str) -> list[LayerGroup]:
    """Parse a ``(shape):dtype:layers;...`` specification into layer groups."""
    groups: list[LayerGroup] = []
    for raw in spec.split(";"):
        if not raw.strip():
            continue
        match = _GROUP.match(raw.strip())
        if match is None:
            raise _invalid(spec, f"group {raw.strip()!r} does not match (shape):dtype:layer_count")
        shape = parse_shape(match.group(1), spec=spec)
        dtype_name = match.group(2)
        if dtype_name not in KV_DTYPES:
            raise _invalid(
                spec, f"dtype {dtype_name!r} is not one of {', '.join(sorted(KV_DTYPES))}"
            )
        layers = int(match.group(3))
        if layers <= 0:
            raise _invalid(spec, f"layer count in {raw.strip()!r} must be positive")
        if shape[0] != layers:
            raise _invalid(
                spec,
                f"group {raw.strip()!r}: the shape's first dimension ({shape[0]}) is the layer "
                f"count and must equal {layers}",
            )
        groups.append(LayerGroup(shape=shape, dtype_name=dtype_name, num_layers=layers))
    if not groups:
        raise _invalid(spec, "no layer group given")
    return groups


def groups_from_kv_shape(kv_shape: str, kv_dtype: str) -> list[LayerGroup]:
    """The single group described by ``--kv_shape`` (first dimension = layer count)."""
    shape = parse_shape(kv_shape)
    if len(shape) != 5:
        raise _invalid(
            kv_shape,
            "--kv_shape has 5 dimensions: num_layers,2,chunk_size,num_kv_heads,head_size",
        )
    if kv_dtype not in KV_DTYPES:
        raise KVSpecError(f"kv_dtype {kv_dtype!r} is not one of {', '.join(sorted(KV_DTYPES))}")
    return [LayerGroup(shape=shape, dtype_name=kv_dtype, num_layers=shape[0])]


def check_mla(groups: list[LayerGroup]) -> None:
    """MLA keeps one latent vector per token: the K/V dimension must be 1."""
    for group in groups:
        if len(group.shape) < 2 or group.shape[1] != 1:
            raise KVSpecError(
                f"use_mla is set but layer group {group.describe()} has a K/V dimension of "
                f"{group.shape[1] if len(group.shape) > 1 else 'none'}: MLA shapes have 1 there "
                "(e.g. (2,1,256,1,576):bfloat16:2); unset use_mla or fix the shape"
            )
