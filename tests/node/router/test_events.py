"""The events stream of a real node server, followed by the router's own ``NodeFeed``.

Ground truth is the server's answer to lookups, never the stream itself: after stores,
evictions, a clear, a dropped stretch of events (a gap) or a restart, the subscriber's index
must equal what the server holds.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from lmcache_node.client import NodeClient
from lmcache_node.keygen import ALLOWED_CLIENTS_FILE, SERVER_SECRET_FILE, generate
from lmcache_node.keys import ChunkKey, KeyNamespace
from lmcache_node.protocol import messages as m
from lmcache_node.protocol.codec import decode_payload, encode_request
from lmcache_node.protocol.credentials import ClientCredentials, generate_keypair
from lmcache_node.protocol.events import digest_int
from lmcache_node.server.process import ServerProcess, free_port

from tests.node.router.feeds import FeedThread, Worker
from tests.support import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHUNK = 64  # 4 blocks of 16 tokens: 4 KiB per chunk with the Worker's one layer
NAMESPACE = KeyNamespace(model_name="model-a", layout="test-layout")


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    path = Path("/dev/shm") / f"lmcache-test-ev-{uuid.uuid4().hex[:12]}"
    yield path
    shutil.rmtree(path, ignore_errors=True)


def server_process(tmp_path: Path, shm_dir: Path, *args: str, **kw: int) -> ServerProcess:
    return ServerProcess(
        "--chunk-size", str(CHUNK), "--l1-page-size", "4096", "--shm-dir", str(shm_dir),
        "--max-workers", "2", *args, log_file=tmp_path / "server.log", **kw,
    )  # fmt: skip


def held_in_l1(client: NodeClient, keys: list[ChunkKey]) -> set[int]:
    """The digests of ``keys`` the server holds now (its own lookups say)."""
    return {digest_int(k) for k in keys if client.lookup([k])[0] == 1}


def metric(server: ServerProcess, name: str) -> float:
    with urllib.request.urlopen(server.http_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    values = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    return sum(float(v) for v in values)


def test_stores_evictions_and_clear_reach_the_subscriber(tmp_path: Path, shm_dir: Path) -> None:
    events_port = free_port()
    # 256 KiB of L1: 64 chunks of 4 KiB, so 120 chunks evict
    with (
        server_process(
            tmp_path, shm_dir, "--cpu-buffer-size", "256Ki", "--events-port", str(events_port)
        ) as server,  # fmt: skip
        NodeClient(server.endpoint, timeout_s=10, expected_chunk_size=CHUNK) as client,
    ):
        client.connect()
        worker = Worker(client, NAMESPACE, CHUNK)
        with FeedThread(server.endpoint) as follower:
            wait_until(lambda: follower.index.synced, 30.0, "the first snapshot")
            wait_until(lambda: bool(follower.index.namespaces), 30.0, "the worker's namespace")
            (published,) = follower.index.namespaces
            assert published.seed == NAMESPACE.seed()
            assert (published.model_name, published.worker_id) == ("model-a", 0)

            first = worker.keys(1, 20)
            assert worker.store(first) == 20
            wait_until(
                lambda: follower.keys("l1") == {digest_int(k) for k in first}, 30.0, "stores"
            )

            more = [k for p in range(2, 7) for k in worker.keys(p, 20)]
            worker.store(more)
            everything = first + more
            truth = held_in_l1(client, everything)
            assert 0 < len(truth) < len(everything)  # the pool evicted
            wait_until(lambda: follower.keys("l1") == truth, 30.0, "evictions")

            assert server.clear_cache() == len(truth)
            wait_until(lambda: not follower.index.entries, 30.0, "the clear")
            assert follower.feed.resyncs == {"connect": 1}  # no gap on the way
        assert metric(server, "lmcache_node_events_keys_total") >= len(everything)
        assert metric(server, "lmcache_node_events_snapshots_total") >= 1
        assert metric(server, "lmcache_node_events_dropped_keys_total") == 0


def test_a_gap_makes_the_subscriber_resync(tmp_path: Path, shm_dir: Path) -> None:
    """Events beyond the server's buffer are dropped (the server never waits); the
    subscriber sees the skipped number and resynchronises from a snapshot."""
    events_port = free_port()
    with (
        server_process(
            tmp_path,
            shm_dir,
            "--cpu-buffer-size",
            "0.05",
            "--events-port",
            str(events_port),
            "--events-flush-secs",
            "4",
            "--events-max-pending-keys",
            "64",
        ) as server,  # fmt: skip
        NodeClient(server.endpoint, timeout_s=10, expected_chunk_size=CHUNK) as client,
    ):
        client.connect()
        worker = Worker(client, NAMESPACE, CHUNK)
        with FeedThread(server.endpoint, silence_s=15.0, min_resync_s=0.1) as follower:
            wait_until(lambda: follower.index.synced, 30.0, "the first snapshot")
            keys = [k for p in range(4) for k in worker.keys(p, 25)]
            assert worker.store(keys) == 100  # more than 64 between two flushes
            wait_until(lambda: follower.keys("l1") == {digest_int(k) for k in keys}, 30.0, "resync")
            assert follower.feed.resyncs["gap"] >= 1
        assert metric(server, "lmcache_node_events_dropped_keys_total") >= 64


def test_a_restarted_server_is_followed_in_its_new_epoch(tmp_path: Path, shm_dir: Path) -> None:
    ports = {"port": free_port(), "http_port": free_port()}
    events = ("--cpu-buffer-size", "0.05", "--events-port", str(free_port()))
    server = server_process(tmp_path, shm_dir, *events, **ports).start()
    try:
        with FeedThread(server.endpoint, min_resync_s=0.1) as follower:
            with NodeClient(server.endpoint, timeout_s=10, expected_chunk_size=CHUNK) as client:
                client.connect()
                worker = Worker(client, NAMESPACE, CHUNK)
                before = worker.keys(1, 5)
                worker.store(before)
                wait_until(lambda: len(follower.index.entries) == 5, 30.0, "the first stores")
                first_epoch = follower.feed.epoch
            server.terminate()
            server = server_process(tmp_path, shm_dir, *events, **ports).start()
            wait_until(
                lambda: follower.index.synced and follower.feed.epoch != first_epoch,
                30.0,
                "the new epoch",
            )
            # the new server adopted its predecessor's pool: the new epoch's snapshot has them
            adopted = {digest_int(k) for k in before}
            wait_until(lambda: follower.keys("l1") == adopted, 30.0, "the adopted chunks")
            with NodeClient(server.endpoint, timeout_s=10, expected_chunk_size=CHUNK) as client:
                client.connect()
                worker = Worker(client, NAMESPACE, CHUNK)
                after = worker.keys(2, 3)
                worker.store(after)
                wait_until(
                    lambda: follower.keys("l1") == adopted | {digest_int(k) for k in after},
                    30.0,
                    "stores after the restart",
                )
    finally:
        server.terminate()


def test_disk_tier_keys_are_published_as_l2(tmp_path: Path, shm_dir: Path) -> None:
    disk = tmp_path / "disk"
    with (
        server_process(
            tmp_path,
            shm_dir,
            "--cpu-buffer-size",
            "0.05",
            "--events-port",
            str(free_port()),
            "--local-disk",
            f"file://{disk}/",
            "--max-local-disk-size",
            "0.05",
        ) as server,  # fmt: skip
        NodeClient(server.endpoint, timeout_s=10, expected_chunk_size=CHUNK) as client,
    ):
        client.connect()
        worker = Worker(client, NAMESPACE, CHUNK)
        with FeedThread(server.endpoint) as follower:
            wait_until(lambda: follower.index.synced, 30.0, "the first snapshot")
            keys = worker.keys(7, 6)
            worker.store(keys)
            digests = [digest_int(k) for k in keys]
            wait_until(lambda: follower.keys("l2") == set(digests), 30.0, "write-through to disk")
            assert follower.index.hold(digests).l1 == 6
            server.clear_cache()  # L1 only: the disk tier keeps its chunks
            wait_until(lambda: not follower.keys("l1"), 30.0, "the L1 clear")
            hold = follower.index.hold(digests)
            assert (hold.l1, hold.l2) == (0, 6)
            assert client.lookup(list(keys))[0] == 6  # the server agrees: found below L1


def request(endpoint: str, op: m.Op, payload: m.msgspec.Struct) -> tuple[int, bytes]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(endpoint)
    try:
        for this_op, body in ((m.Op.HANDSHAKE, m.HandshakeRequest(client_version="t")),
                              (op, payload)):  # fmt: skip
            sock.send_multipart(encode_request(this_op, 1, body))
            header, reply = sock.recv_multipart()
        return m.msgspec.msgpack.decode(header)[4], reply
    finally:
        sock.close(0)


def test_snapshot_requests_are_checked_and_bounded(tmp_path: Path, shm_dir: Path) -> None:
    with (
        server_process(
            tmp_path,
            shm_dir,
            "--cpu-buffer-size",
            "0.05",
            "--events-port",
            str(free_port()),
            "--events-snapshot-max-keys",
            "10",
        ) as server,  # fmt: skip
        NodeClient(server.endpoint, timeout_s=10, expected_chunk_size=CHUNK) as client,
    ):
        client.connect()
        worker = Worker(client, NAMESPACE, CHUNK)
        worker.store(worker.keys(3, 20))
        status, body = request(server.endpoint, m.Op.SNAPSHOT, m.SnapshotRequest(tiers=["l9"]))
        assert status == m.Status.ERROR
        error = decode_payload(body, m.ErrorReply)
        assert error.code == "bad_request" and "l1, l2" in error.message
        status, body = request(server.endpoint, m.Op.SNAPSHOT, m.SnapshotRequest(tiers=["l1"]))
        reply = decode_payload(body, m.SnapshotReply)
        assert len(reply.tiers["l1"]) == 10 * 8 and reply.truncated == ["l1"]
        assert reply.events_port and reply.chunk_size == CHUNK


def test_a_server_without_events_says_how_to_enable_them(tmp_path: Path, shm_dir: Path) -> None:
    with server_process(tmp_path, shm_dir, "--cpu-buffer-size", "0.05") as server:
        status, body = request(server.endpoint, m.Op.SNAPSHOT, m.SnapshotRequest())
        error = decode_payload(body, m.ErrorReply)
        assert status == m.Status.ERROR and error.code == "incompatible"
        assert "--events-port" in error.message


def test_only_the_clusters_clients_may_subscribe(tmp_path: Path, shm_dir: Path) -> None:
    keys = tmp_path / "keys"
    generate(keys)
    events_port = free_port()
    curve = ("--curve-server-key", str(keys / SERVER_SECRET_FILE),
             "--curve-client-keys", str(keys / ALLOWED_CLIENTS_FILE))  # fmt: skip
    events = ("--cpu-buffer-size", "0.05", "--events-port", str(events_port))
    with server_process(tmp_path, shm_dir, *events, *curve) as server:
        good = ClientCredentials.from_directory(keys)
        with NodeClient(server.endpoint, timeout_s=10, credentials=good) as client:
            client.connect()
            worker = Worker(client, NAMESPACE, CHUNK)
            worker.store(worker.keys(1, 4))
        with FeedThread(server.endpoint, credentials=good) as follower:
            wait_until(
                lambda: follower.index.synced and len(follower.index.entries) == 4,
                30.0,
                "the snapshot over CURVE",
            )
        public, secret = generate_keypair()
        stranger = dataclasses.replace(good, public_key=public, secret_key=secret)
        with FeedThread(server.endpoint, credentials=stranger, timeout_s=1.0) as follower:
            wait_until(lambda: "credentials" in follower.feed.last_error, 30.0, "a refusal")
            assert not follower.index.synced and not follower.index.entries
        sub = zmq.Context.instance().socket(zmq.SUB)  # no CURVE at all: nothing arrives
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.setsockopt(zmq.RCVTIMEO, 2500)  # heartbeats come every second
        sub.connect(f"tcp://127.0.0.1:{events_port}")
        try:
            with pytest.raises(zmq.Again):
                sub.recv_multipart()
        finally:
            sub.close(0)
