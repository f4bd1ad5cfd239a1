"""The KV dtypes the node knows: one table of names and element sizes, torch looked up late.

Validating a config (``kv_dtype``, ``kvcache_shape_spec``) needs names and sizes only, so
this module imports no torch: ``lmcache-node serve`` refuses a bad config before torch
loads. The copy paths turn a name into a ``torch.dtype`` with :func:`torch_dtype` and back
with :func:`name_of`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    import torch

# name (as torch spells it) -> bytes per element: what registered KV tensors may hold.
ELEMENT_BYTES: dict[str, int] = {
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "uint8": 1,
    "int8": 1,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}

# The dtypes the standalone starter allocates buffers of (``kv_dtype``, shape specs).
BufferDtype = Literal["float16", "float32", "bfloat16", "uint8"]
BUFFER_DTYPES: tuple[str, ...] = get_args(BufferDtype)


class DtypeError(ValueError):
    """A dtype the node does not serve; the message names the supported ones."""


def element_bytes(name: str) -> int:
    """Bytes per element of dtype ``name``."""
    try:
        return ELEMENT_BYTES[name]
    except KeyError:
        raise _unsupported(repr(name)) from None


def torch_dtype(name: str) -> torch.dtype:
    """The ``torch.dtype`` called ``name`` (imports torch)."""
    import torch  # noqa: PLC0415 - only the copy paths need it; config validation does not

    element_bytes(name)
    dtype: torch.dtype = getattr(torch, name)
    return dtype


def name_of(dtype: torch.dtype) -> str:
    """The table's name of ``dtype`` (``torch.bfloat16`` -> ``"bfloat16"``)."""
    name = str(dtype).removeprefix("torch.")
    if name not in ELEMENT_BYTES:
        raise _unsupported(str(dtype))
    return name


def _unsupported(what: str) -> DtypeError:
    return DtypeError(f"KV dtype {what} is not supported; supported: {', '.join(ELEMENT_BYTES)}")
