"""Byte streams over tensors: flat uint8 views and copies across segment boundaries.

Used on both sides of the wire (the client's engine-driven copies and the server's L1 pool),
so it lives in the transfer layer, which imports only torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor (no copy)."""
    if not tensor.is_contiguous():
        raise ValueError("as_bytes needs a contiguous tensor")
    flat = tensor.reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def copy_stream(dsts: Sequence[torch.Tensor], srcs: Iterable[torch.Tensor]) -> int:
    """Copy the concatenated bytes of ``srcs`` into the concatenated ``dsts``.

    Both are flat uint8 tensors (any devices torch can copy between). Returns the bytes
    copied; raises ValueError when the sources do not fit.
    """
    index = 0
    offset = 0
    copied = 0
    for src in srcs:
        remaining = src.numel()
        position = 0
        while remaining:
            if index >= len(dsts):
                raise ValueError("source bytes exceed the destination")
            dst = dsts[index]
            room = dst.numel() - offset
            step = min(room, remaining)
            dst[offset : offset + step].copy_(src[position : position + step], non_blocking=True)
            offset += step
            position += step
            remaining -= step
            copied += step
            if offset == dst.numel():
                index += 1
                offset = 0
    return copied
