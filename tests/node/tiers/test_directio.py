"""O_DIRECT: a filesystem that refuses it falls back to buffered I/O with one warning."""

import errno
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from lmcache_node.tiers import directio
from lmcache_node.tiers.disk import DiskTier

from tests.node.tiers.conftest import make_keys, payload_for


def test_refused_odirect_falls_back_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    real_open = os.open
    refused: list[str] = []

    def open_without_odirect(path: Any, flags: int, mode: int = 0o777) -> int:
        if flags & directio._O_DIRECT:
            refused.append(str(path))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    direct = directio.DirectIO(True, opener=open_without_odirect)
    tier = DiskTier(tmp_path, 64 * 1024**2, use_odirect=True, direct_io=direct)
    keys = make_keys(3)
    with caplog.at_level(logging.WARNING):
        for key in keys:
            data = payload_for(key, 100_000)
            assert tier.store_from(key, [data], data.numel())
        for key in keys:
            out = torch.zeros(100_000, dtype=torch.uint8)
            assert tier.load_into(key, [out], out.numel())
            assert torch.equal(out, payload_for(key, 100_000))
    assert len(refused) == 1  # tried once, then buffered for good
    assert not tier.direct.enabled and tier.direct.requested
    assert caplog.text.count("O_DIRECT is not supported") == 1
    tier.close()


def test_odirect_files_have_exact_length(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 64 * 1024**2, use_odirect=True)
    key = make_keys(1)[0]
    data = payload_for(key, 12_345)
    assert tier.store_from(key, [data], data.numel())
    assert tier.path_for(key).stat().st_size == 4096 + 12_345
    tier.close()
