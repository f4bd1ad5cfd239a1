"""The L1 memory pool's pages and spans (lmcache_node.engine.memory), byte for byte."""

from __future__ import annotations

import torch
from lmcache_node.engine.memory import MemoryPool


def test_a_span_over_scattered_pages_reads_back_its_bytes() -> None:
    pool = MemoryPool(8 * 4, 4, pin_memory=False)
    pages = pool.alloc(3)
    assert pages == [0, 1, 2]
    span = pool.span([5, 6, 2], 10)  # a run of two pages, then one elsewhere
    data = bytes(range(1, 11))
    assert span.write([torch.frombuffer(bytearray(data), dtype=torch.uint8)]) == 10
    assert span.to_bytes() == data
    assert [s.numel() for s in span.segments()] == [8, 2]
    assert bytes(pool.buffer[20:28].numpy()) == data[:8]
    assert bytes(pool.buffer[8:10].numpy()) == data[8:]
    out = torch.zeros(10, dtype=torch.uint8)
    assert span.read_into([out]) == 10
    assert bytes(out.numpy()) == data
