"""``NodeFeed._apply``: in-order batches apply, gaps and epochs ask for a resync."""

from __future__ import annotations

import zmq.asyncio
from lmcache_node.protocol.events import EventBatch, KeyEvent, NamespaceInfo
from lmcache_node.router.feed import NodeFeed
from lmcache_node.router.index import NodeIndex


def feed_at(seq: int, epoch: int = 7) -> NodeFeed:
    feed = NodeFeed(NodeIndex("n"), "tcp://127.0.0.1:1", context=zmq.asyncio.Context.instance())
    feed.epoch, feed.expected = epoch, seq + 1
    return feed


def stored(seq: int, *values: int, epoch: int = 7) -> EventBatch:
    digests = b"".join(v.to_bytes(8, "little") for v in values)
    return EventBatch(epoch, seq, 0.0, [KeyEvent("stored", "l1", digests)])


def test_in_order_batches_apply_and_old_ones_are_skipped() -> None:
    feed = feed_at(10)
    assert feed._apply(stored(9, 1)) is None  # covered by the snapshot: skipped
    assert feed.index.entries == {}
    assert feed._apply(stored(11, 2)) is None
    assert feed._apply(stored(12, 3)) is None
    assert feed.index.entries == {2: 1, 3: 1} and feed.expected == 13


def test_a_skipped_number_is_a_gap() -> None:
    feed = feed_at(10)
    assert feed._apply(stored(12, 1)) == "gap"
    assert feed.index.entries == {}


def test_a_heartbeat_ahead_of_us_is_a_gap() -> None:
    feed = feed_at(10)
    assert feed._apply(EventBatch(7, 10, 0.0)) is None  # the last number: in step
    assert feed._apply(EventBatch(7, 11, 0.0)) == "gap"  # we missed batch 11


def test_another_epoch_is_a_restarted_server() -> None:
    assert feed_at(10)._apply(stored(11, 1, epoch=8)) == "epoch"


def test_evictions_clears_and_namespaces_apply_in_order() -> None:
    feed = feed_at(0)
    ns = [NamespaceInfo(seed=b"s" * 16, model_name="m")]
    events = [
        KeyEvent("stored", "l1", (1).to_bytes(8, "little") + (2).to_bytes(8, "little")),
        KeyEvent("evicted", "l1", (1).to_bytes(8, "little")),
        KeyEvent("stored", "l2", (2).to_bytes(8, "little")),
    ]
    assert feed._apply(EventBatch(7, 1, 0.0, events, namespaces=ns)) is None
    assert feed.index.entries == {2: 3} and feed.index.namespaces == ns
    assert feed._apply(EventBatch(7, 2, 0.0, [KeyEvent("cleared", "l1")])) is None
    assert feed.index.entries == {2: 2}
