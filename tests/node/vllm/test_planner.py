from __future__ import annotations

import pytest
from lmcache_node.vllm.planner import Planner, TransferOp, invalid_blocks

CHUNK, BLOCK = 256, 128  # 2 blocks per chunk


def planner(**kwargs: bool) -> Planner:
    return Planner(CHUNK, BLOCK, **kwargs)


def test_chunk_must_be_a_multiple_of_the_block() -> None:
    with pytest.raises(ValueError, match="multiple of vLLM's block size"):
        Planner(200, 128)


def test_lookup_never_covers_the_last_token() -> None:
    p = planner()
    t = p.track("r", list(range(512)))
    assert p.lookup_chunks(t, 512) == 1  # 511 usable tokens: one whole chunk
    t2 = p.track("r2", list(range(513)))
    assert p.lookup_chunks(t2, 513) == 2


def test_hit_beyond_vllm_prefix_is_reported_and_loaded_whole_chunks() -> None:
    p = planner()
    t = p.track("r", list(range(1000)))
    # server has 3 chunks (768 tokens); vLLM's own prefix cache has 1 block (128 tokens)
    assert p.record_lookup(t, 3, 128) == 768 - 128
    blocks = list(range(100, 108))
    op = p.record_alloc(t, blocks, 768 - 128)
    assert op is not None
    assert (op.start_chunk, op.end_chunk) == (0, 3)
    assert op.block_ids == blocks[:6]
    assert op.tokens == list(range(768))
    assert p.take_loads() == [op]
    assert p.take_loads() == []


def test_vllm_prefix_covering_whole_chunks_skips_them() -> None:
    p = planner()
    t = p.track("r", list(range(1000)))
    assert p.record_lookup(t, 3, 512) == 256
    op = p.record_alloc(t, list(range(8)), 256)
    assert op is not None
    assert (op.start_chunk, op.end_chunk, op.block_ids) == (2, 3, [4, 5])


def test_no_load_when_vllm_has_everything_or_vllm_declines() -> None:
    p = planner()
    t = p.track("r", list(range(1000)))
    assert p.record_lookup(t, 2, 512) == 0
    assert p.record_alloc(t, list(range(8)), 0) is None
    t2 = p.track("s", list(range(1000)))
    assert p.record_lookup(t2, 2, 0) == 512
    assert p.record_alloc(t2, list(range(8)), 0) is None  # vLLM chose not to load


def test_producer_never_loads_consumer_never_stores() -> None:
    producer = planner(can_load=False)
    t = producer.track("r", list(range(1000)))
    assert producer.record_lookup(t, 3, 0) == 0
    assert producer.record_alloc(t, list(range(8)), 0) is None
    consumer = planner(can_store=False)
    consumer.track("r", list(range(1000)))
    assert consumer.record_scheduled("r", list(range(8)), replace_blocks=True,
                                     computed_after_step=1000) is None  # fmt: skip


def test_store_after_prefill_covers_full_prompt_chunks_only() -> None:
    p = planner()
    t = p.track("r", list(range(700)))
    p.record_lookup(t, 0, 0)
    op = p.record_scheduled("r", list(range(6)), replace_blocks=True, computed_after_step=700)
    assert op is not None
    assert (op.start_chunk, op.end_chunk, op.block_ids) == (0, 2, [0, 1, 2, 3])
    # decode steps never store generated tokens
    assert p.record_scheduled("r", [6], replace_blocks=False, computed_after_step=800) is None


def test_chunked_prefill_stores_as_chunks_complete() -> None:
    p = planner()
    p.track("r", list(range(1100)))
    first = p.record_scheduled("r", [0, 1, 2], replace_blocks=True, computed_after_step=300)
    assert first is not None and (first.start_chunk, first.end_chunk) == (0, 1)
    assert p.record_scheduled("r", [3], replace_blocks=False, computed_after_step=500) is None
    second = p.record_scheduled("r", [4, 5, 6, 7, 8], replace_blocks=False,
                                computed_after_step=1100)  # fmt: skip
    assert second is not None
    assert (second.start_chunk, second.end_chunk) == (1, 4)
    assert second.block_ids == [2, 3, 4, 5, 6, 7]
    assert second.tokens == list(range(1024))


def test_hit_chunks_are_not_stored_again() -> None:
    p = planner()
    t = p.track("r", list(range(1100)))
    p.record_lookup(t, 3, 0)
    op = p.record_scheduled("r", list(range(9)), replace_blocks=True, computed_after_step=1100)
    assert op is not None and (op.start_chunk, op.end_chunk) == (3, 4)


def test_resumed_request_replaces_its_blocks() -> None:
    p = planner()
    p.track("r", list(range(600)))
    p.record_scheduled("r", [0, 1], replace_blocks=True, computed_after_step=200)
    op = p.record_scheduled("r", [9, 8, 7, 6, 5], replace_blocks=True, computed_after_step=600)
    assert op is not None and op.block_ids == [9, 8, 7, 6]


def test_store_waits_for_allocated_blocks() -> None:
    p = planner()
    p.track("r", list(range(600)))
    assert p.record_scheduled("r", [0], replace_blocks=True, computed_after_step=600) is None


def test_finish_forgets_the_request_and_its_pending_load() -> None:
    p = planner()
    t = p.track("r", list(range(600)))
    p.record_lookup(t, 2, 0)
    p.record_alloc(t, list(range(5)), 512)
    assert p.finish("r") is t
    assert p.take_loads() == []
    assert p.record_scheduled("r", [1], replace_blocks=False, computed_after_step=600) is None


def test_lookup_again_after_preemption_plans_a_new_load() -> None:
    p = planner()
    t = p.track("r", list(range(600)))
    p.record_lookup(t, 2, 0)
    assert p.record_alloc(t, list(range(5)), 512) is not None
    p.take_loads()
    p.record_lookup(t, 2, 0)
    assert p.record_alloc(t, [7, 8, 9, 10, 11], 512) is not None


def test_invalid_blocks_are_those_after_the_loaded_chunks() -> None:
    op = TransferOp("r", list(range(768)), 0, 3, [10, 11, 12, 13, 14, 15])
    assert invalid_blocks(op, 3, 2) == set()
    assert invalid_blocks(op, 1, 2) == {12, 13, 14, 15}
    assert invalid_blocks(op, 0, 2) == set(op.block_ids)
