"""What authentication costs: the same calls through a CURVE server and a plain one.

Two real server processes on loopback, one with CURVE keys (the default off loopback) and
one without, each with its own client and registration. Every round runs the same store,
retrieve and lookup on both, back to back in alternating order, so both see the same machine
load; each ratio is the median over rounds of the round's ratio (paired samples). Bulk
bytes never cross ZMQ, so the ratio should stay near 1.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmcache_node.bench.common import LLAMA8B_HEAD_DIM, LLAMA8B_KV_HEADS, gbps
from lmcache_node.client import NodeClient, Registration
from lmcache_node.keygen import ALLOWED_CLIENTS_FILE, SERVER_SECRET_FILE, generate
from lmcache_node.protocol.credentials import ClientCredentials
from lmcache_node.server.process import ServerProcess

BLOCK = 128
CHUNK_TOKENS = 256
CHUNKS = 8


def curve_server_args(keys: Path) -> list[str]:
    return [
        "--curve-server-key", str(keys / SERVER_SECRET_FILE),
        "--curve-client-keys", str(keys / ALLOWED_CLIENTS_FILE),
    ]  # fmt: skip


@contextmanager
def curve_keys(directory: Path) -> Iterator[tuple[list[str], ClientCredentials]]:
    """Fresh keys in ``directory``: the server's flags and the client's credentials."""
    generate(directory)
    yield curve_server_args(directory), ClientCredentials.from_directory(directory)


@dataclass
class _Side:
    client: NodeClient
    registration: Registration
    prefix: list[bytes]
    store_s: list[float] = field(default_factory=list)
    retrieve_s: list[float] = field(default_factory=list)
    lookup_s: list[float] = field(default_factory=list)


def _kv(layers: int) -> list[torch.Tensor]:
    shape = (CHUNKS * CHUNK_TOKENS // BLOCK, LLAMA8B_KV_HEADS, BLOCK, 2 * LLAMA8B_HEAD_DIM)
    return [torch.ones(shape, dtype=torch.float16) for _ in range(layers)]


def _round(side: _Side, chunk: int) -> None:
    per = CHUNK_TOKENS // BLOCK
    blocks = list(range(chunk * per, (chunk + 1) * per))
    key = os.urandom(16)
    start = time.perf_counter()
    if side.client.store(side.registration, [key], blocks, timeout_s=60) != 1:
        raise RuntimeError("auth bench: a store was not kept")
    side.store_s.append(time.perf_counter() - start)
    start = time.perf_counter()
    if side.client.retrieve(side.registration, [key], blocks, timeout_s=60) != 1:
        raise RuntimeError("auth bench: a retrieve found nothing")
    side.retrieve_s.append(time.perf_counter() - start)
    start = time.perf_counter()
    if side.client.lookup(side.prefix)[0] != len(side.prefix):
        raise RuntimeError("auth bench: the lookup prefix was not all hits")
    side.lookup_s.append(time.perf_counter() - start)


def measure_auth_overhead(*, layers: int, rounds: int, tmp: Path) -> dict[str, float]:
    chunk_bytes = layers * 2 * CHUNK_TOKENS * LLAMA8B_KV_HEADS * LLAMA8B_HEAD_DIM * 2
    l1_gb = max(0.25, 3 * CHUNKS * chunk_bytes / 1024**3)
    common = [
        "--chunk-size", str(CHUNK_TOKENS), "--cpu-buffer-size", f"{l1_gb:.3f}",
        "--max-workers", "1", "--log-level", "WARNING",
    ]  # fmt: skip
    with ExitStack() as stack:
        server_args, credentials = stack.enter_context(curve_keys(tmp / "auth-keys"))
        sides: dict[str, _Side] = {}
        for name, extra, creds in (("auth", server_args, credentials), ("noauth", [], None)):
            server = stack.enter_context(
                ServerProcess(*common, *extra, log_file=tmp / f"{name}.log", startup_timeout_s=300)
            )
            client = stack.enter_context(
                NodeClient(server.endpoint, timeout_s=60, credentials=creds)
            )
            client.connect()
            registration = client.register_kv_caches(
                _kv(layers), block_dim=0, block_size=BLOCK, layout=f"bench-auth-{name}"
            )
            tiny = client.register_kv_caches(
                [torch.zeros(2, 1, BLOCK, 2, dtype=torch.float16)], block_dim=0,
                block_size=BLOCK, layout=f"bench-auth-lookup-{name}",
            )  # fmt: skip
            prefix = [os.urandom(16) for _ in range(100)]
            for key in prefix:
                client.store(tiny, [key], [0, 1])
            sides[name] = _Side(client, registration, prefix)
        for chunk in range(CHUNKS):  # warm-up: fault in both servers' mappings
            for side in sides.values():
                _round(side, chunk)
        for side in sides.values():
            side.store_s.clear()
            side.retrieve_s.clear()
            side.lookup_s.clear()
        order = list(sides.values())
        for index in range(rounds):
            for side in order if index % 2 == 0 else reversed(order):
                _round(side, index % CHUNKS)
    auth, plain = sides["auth"], sides["noauth"]

    def speed(samples: list[float]) -> float:
        return gbps(chunk_bytes, statistics.median(samples))

    def paired(slow: list[float], fast: list[float]) -> float:
        """The median over rounds of ``slow[i] / fast[i]``: the two calls of a round ran back
        to back, so each ratio compares them under the same load."""
        return statistics.median(a / b for a, b in zip(slow, fast, strict=True))

    store_ratio = paired(plain.store_s, auth.store_s)  # speed with auth / speed without
    retrieve_ratio = paired(plain.retrieve_s, auth.retrieve_s)
    lookup_auth = statistics.median(auth.lookup_s) * 1000
    lookup_plain = statistics.median(plain.lookup_s) * 1000
    lookup_growth = paired(auth.lookup_s, plain.lookup_s) - 1
    return {
        "auth_store_gbps": round(speed(auth.store_s), 2),
        "auth_retrieve_gbps": round(speed(auth.retrieve_s), 2),
        "noauth_store_gbps": round(speed(plain.store_s), 2),
        "noauth_retrieve_gbps": round(speed(plain.retrieve_s), 2),
        "auth_overhead_store_ratio": round(store_ratio, 3),
        "auth_overhead_retrieve_ratio": round(retrieve_ratio, 3),
        "auth_overhead_ratio": round(min(store_ratio, retrieve_ratio), 3),
        "auth_lookup_100_chunks_p50_ms": round(lookup_auth, 3),
        "noauth_lookup_100_chunks_p50_ms": round(lookup_plain, 3),
        "auth_lookup_p50_growth": round(lookup_growth, 3),
    }
