"""The one dtype table (lmcache_node.dtypes) against torch, and config validation without it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from lmcache_node import dtypes
from lmcache_node.kvspec import parse_shape_spec
from lmcache_node.transfer.layout import LayoutError, dtype_name, dtype_of


@pytest.mark.parametrize("name", sorted(dtypes.ELEMENT_BYTES))
def test_the_table_matches_torch(name: str) -> None:
    dtype = dtypes.torch_dtype(name)
    assert torch.empty((), dtype=dtype).element_size() == dtypes.element_bytes(name)
    assert dtypes.name_of(dtype) == name
    assert dtype_of(name) is dtype
    assert dtype_name(dtype) == name


def test_buffer_dtypes_are_in_the_table() -> None:
    assert set(dtypes.BUFFER_DTYPES) <= set(dtypes.ELEMENT_BYTES)
    assert len(dtypes.BUFFER_DTYPES) == 4


def test_an_unsupported_dtype_is_named_with_the_supported_ones() -> None:
    with pytest.raises(dtypes.DtypeError, match=r"complex64. is not supported; supported: float16"):
        dtypes.element_bytes("complex64")
    with pytest.raises(dtypes.DtypeError, match=r"torch.complex64 is not supported"):
        dtypes.name_of(torch.complex64)
    with pytest.raises(dtypes.DtypeError):
        dtypes.torch_dtype("Tensor")  # a torch attribute, but not a dtype of the table
    with pytest.raises(LayoutError, match="not supported"):
        dtype_of("int64")
    with pytest.raises(LayoutError, match="not supported"):
        dtype_name(torch.int64)


def test_layer_bytes_come_from_the_table() -> None:
    (group,) = parse_shape_spec("(2,2,16,4,8):bfloat16:2")
    assert group.bytes_per_layer == 2 * 2 * 16 * 4 * 8 * 2
    assert group.dtype is torch.bfloat16


@pytest.mark.integration
def test_config_validation_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from lmcache_node.config import load_config\n"
        "load_config({'kv_dtype': 'bfloat16', 'kvcache_shape_spec': '(2,2,16,4,8):float16:2'})\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
