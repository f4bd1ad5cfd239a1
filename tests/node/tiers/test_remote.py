"""The remote tier against a real redis-server: values, damage, outages, slowness, sharing."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from lmcache_node.assembly import build_engine
from lmcache_node.config import load_config
from lmcache_node.engine import CacheEngine
from lmcache_node.retry import RetryPolicy
from lmcache_node.tiers.disk import DiskTier
from lmcache_node.tiers.frame import Codec, build_frame
from lmcache_node.tiers.manager import TieredStore
from lmcache_node.tiers.remote import RemoteTier
from lmcache_node.tiers.resilience import BreakerState, CircuitBreaker

from tests.node.tiers.conftest import RedisServer, make_keys, payload_for
from tests.support import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.redis]

CHUNK = 50_000
SECRET = b"tests-remote-secret-0123456789"


def remote(server: RedisServer, **kwargs: object) -> RemoteTier:
    options: dict[str, object] = {
        "secret": SECRET,
        "timeout_secs": 1.0,  # the whole operation: generous for a loaded machine
        "retry": RetryPolicy(attempts=2, base_s=0.01, deadline_s=1.0),
        "breaker": CircuitBreaker(threshold=2, cooldown_secs=0.5),
    }
    options.update(kwargs)
    return RemoteTier(server.url, **options)  # type: ignore[arg-type]


def store(tier: RemoteTier, key: bytes, nbytes: int = CHUNK) -> bool:
    data = payload_for(key, nbytes)  # type: ignore[arg-type]
    return tier.store_from(key, [data[:100], data[100:]], nbytes)  # type: ignore[arg-type]


def load(tier: RemoteTier, key: bytes, nbytes: int = CHUNK) -> torch.Tensor | None:
    out = torch.zeros(nbytes, dtype=torch.uint8)
    ok = tier.load_into(key, [out[:3], out[3:]], nbytes)  # type: ignore[arg-type]
    return out if ok else None


@pytest.mark.parametrize("serde", ["naive", "zstd", "lz4"])
def test_round_trip_with_namespaced_keys_and_ttl(redis_server: RedisServer, serde: str) -> None:
    tier = remote(redis_server, serde=serde, ttl_secs=600, key_prefix="team-a")
    keys = make_keys(3)
    for key in keys:
        assert store(tier, key)
    assert tier.locate(keys) == [CHUNK] * 3
    for key in keys:
        out = load(tier, key)
        assert out is not None and torch.equal(out, payload_for(key, CHUNK))
    client = redis_server.client()
    names = sorted(k.decode() for k in client.keys("*"))
    assert names == sorted(tier.redis_key(k) for k in keys)
    assert all(n.startswith("team-a:v2:") and len(n) == len("team-a:v2:") + 64 for n in names)
    values = b"".join(client.get(n) for n in names)
    assert not any(k.hex() in "".join(names) or bytes(k) in values for k in keys)  # no chunk key
    assert 0 < client.pttl(names[0]) <= 600_000
    other = remote(redis_server, key_prefix="team-b")  # another namespace sees nothing
    assert other.locate(keys) == [] and load(other, keys[0]) is None
    tier.close()
    other.close()


def test_garbage_and_foreign_values_are_misses(redis_server: RedisServer) -> None:
    tier = remote(redis_server)
    keys = make_keys(3)
    for key in keys:
        assert store(tier, key)
    client = redis_server.client()
    client.set(tier.redis_key(keys[1]), b"not a frame at all" * 10)
    frame = bytearray(client.get(tier.redis_key(keys[2])))
    frame[-5] ^= 1
    client.set(tier.redis_key(keys[2]), bytes(frame))
    assert tier.locate(keys) == [CHUNK]  # the garbage header ends the prefix
    assert load(tier, keys[1]) is None
    assert load(tier, keys[2]) is None  # bad payload checksum
    client.set(tier.redis_key(keys[0]), build_frame(keys[1], b"x" * CHUNK, Codec.NAIVE))
    assert load(tier, keys[0]) is None  # a frame of another key, without a MAC
    assert tier.stats().corrupt >= 3
    tier.close()


def test_redis_down_is_a_miss_then_recovers(redis_server: RedisServer) -> None:
    tier = remote(redis_server)
    first, second = make_keys(2)
    assert store(tier, first)
    redis_server.stop()
    assert tier.locate([first]) == []
    assert load(tier, first) is None
    assert not store(tier, second)
    stats = tier.stats()
    assert not stats.available and stats.state == "open"
    errors = stats.errors
    assert tier.locate([first]) == []  # the open breaker answers without calling Redis
    assert tier.stats().errors == errors

    redis_server.start()  # same port, empty (no persistence)
    wait_until(lambda: store(tier, second), 20, "a store once Redis is back")
    assert tier.stats().available and tier.stats().state == "closed"
    out = load(tier, second)
    assert out is not None and torch.equal(out, payload_for(second, CHUNK))
    tier.close()


def test_slow_redis_times_out_as_misses(redis_server: RedisServer) -> None:
    tier = remote(redis_server)
    key = make_keys(1)[0]
    assert store(tier, key)
    redis_server.pause()  # SIGSTOP: connections hang, nothing answers
    try:
        assert tier.locate([key]) == []
        assert load(tier, key) is None
        assert tier.breaker.state is BreakerState.OPEN
    finally:
        redis_server.resume()
    wait_until(lambda: tier.locate([key]) == [CHUNK], 20, "a hit once Redis answers again")
    out = load(tier, key)
    assert out is not None and torch.equal(out, payload_for(key, CHUNK))
    tier.close()


def test_engine_keeps_serving_l1_when_redis_dies(redis_server: RedisServer) -> None:
    engine = CacheEngine(64 * 4096, 4096, pin_memory=False)
    tier = remote(redis_server)
    store_ = TieredStore([tier])
    store_.attach(engine)
    keys = make_keys(3)
    engine.put(keys[0], payload_for(keys[0], CHUNK))
    assert store_.flush(30)
    redis_server.stop()
    assert engine.lookup(keys).hits == 1  # L1 hit, the remote part is a miss
    engine.put(keys[1], payload_for(keys[1], CHUNK))  # write-down fails quietly
    assert store_.flush(30)
    assert engine.lookup(keys).hits == 2
    assert engine.tier_stats()["remote"]["available"] is False
    engine.close()


SECOND_NODE = textwrap.dedent(
    """
    import json, sys, torch
    from lmcache_node.config import load_config
    from lmcache_node.assembly import build_engine
    from tests.node.tiers.conftest import make_keys, payload_for

    config = load_config(json.loads(sys.argv[1]), environ={})
    engine = build_engine(config)
    keys = make_keys(int(sys.argv[2]))
    hits = engine.lookup(keys).hits
    exact = 0
    for key in keys[:hits]:
        out = torch.zeros(int(sys.argv[3]), dtype=torch.uint8)
        if engine.get(key, out) and torch.equal(out, payload_for(key, out.numel())):
            exact += 1
    engine.lower_tiers.flush(30)
    disk = engine.tier_stats().get("disk", {}).get("entries", -1)
    engine.close()
    print(json.dumps({"hits": hits, "exact": exact, "disk_entries": disk}))
    """
)


def test_second_node_process_reads_what_the_first_stored(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    secret_file = tmp_path / "remote.key"
    secret_file.write_bytes(SECRET + b"\n")
    common = {
        "remote_secret_file": str(secret_file),
        "max_local_cpu_size": 0.01,
        "l1_page_size": 4096,
        "max_local_disk_size": 0.05,
        "remote_url": redis_server.url,
        "remote_serde": "lz4",
        "remote_timeout_secs": 2.0,
    }
    first = build_engine(
        load_config({**common, "local_disk": f"file://{tmp_path}/node-a/"}, environ={})
    )
    keys = make_keys(4)
    for key in keys:
        first.put(key, payload_for(key, CHUNK))
    first.close()

    other = {**common, "local_disk": f"file://{tmp_path}/node-b/"}
    import json

    done = subprocess.run(
        [sys.executable, "-c", SECOND_NODE, json.dumps(other), "4", str(CHUNK)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).resolve().parents[3],
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"hits": 4, "exact": 4, "disk_entries": 4}  # L3 hits land in its L2 too
    assert DiskTier(tmp_path / "node-b", 1024**3).locate(keys) == [CHUNK] * 4


def test_url_forms_reach_the_same_database(redis_server: RedisServer) -> None:
    key = make_keys(1)[0]
    writer = remote(redis_server)
    assert store(writer, key)
    urls = [
        f"valkey://127.0.0.1:{redis_server.port}/0",
        f"unix://{redis_server.socket_path}?db=0",
    ]
    for url in urls:
        tier = RemoteTier(url, secret=SECRET, timeout_secs=1.0)
        out = load(tier, key)
        assert out is not None and torch.equal(out, payload_for(key, CHUNK)), url
        tier.close()
    writer.close()


def test_nodes_with_different_serde_read_each_other(redis_server: RedisServer) -> None:
    keys = make_keys(3)
    writers = [remote(redis_server, serde=s) for s in ("naive", "zstd", "lz4")]
    for key, writer in zip(keys, writers, strict=True):
        assert store(writer, key)
    reader = remote(redis_server, serde="naive")
    assert reader.locate(keys) == [CHUNK] * 3
    for key in keys:
        out = load(reader, key)
        assert out is not None and torch.equal(out, payload_for(key, CHUNK))
    for tier in [*writers, reader]:
        tier.close()


def test_sentinel_url_finds_the_master(redis_server: RedisServer, tmp_path: Path) -> None:
    from tests.node.tiers.conftest import REDIS_SERVER, free_port

    port = free_port()
    config = tmp_path / "sentinel.conf"
    config.write_text(
        f"port {port}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 {redis_server.port} 1\n"
    )
    sentinel = subprocess.Popen(
        [REDIS_SERVER, str(config), "--sentinel"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        key = make_keys(1)[0]
        writer = remote(redis_server)
        assert store(writer, key)
        url = f"redis-sentinel://127.0.0.1:{port}/mymaster/0"
        wait_until(lambda: _sentinel_ready(url), 20, "the sentinel to name the master")
        tier = RemoteTier(url, secret=SECRET, timeout_secs=1.0)
        out = load(tier, key)
        assert out is not None and torch.equal(out, payload_for(key, CHUNK))
        tier.close()
        writer.close()
    finally:
        sentinel.terminate()
        sentinel.wait(timeout=10)


def _sentinel_ready(url: str) -> bool:
    tier = RemoteTier(url, secret=SECRET, timeout_secs=1.0)
    try:
        return tier.locate(make_keys(1)) is not None and tier.stats().errors == 0
    finally:
        tier.close()
