"""The router's own cost: added latency on real HTTP requests, and index memory per key.

Latency: ``lmcache-node router`` (a real process, the model's tokenizer, following the
bench's real node servers, whose caches hold the prompts' chunks so every decision walks a
long prefix) in front of instant stand-in replicas; each chat request is sent once directly
to a replica and once through the router, alternately; the overhead is the difference of
the percentiles. Memory: ``tracemalloc`` around an index of a million keys.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from lmcache_node.bench.router_sim import NAMESPACE, NUM_BLOCKS, SimReplica
from lmcache_node.protocol.events import split_digests
from lmcache_node.router.core import keys_for
from lmcache_node.router.index import NodeIndex
from lmcache_node.router.tokenize import PromptTokenizer
from lmcache_node.server.process import free_port

_SSE = b"".join(b'data: {"choices":[{"text":"x"}]}\n\n' for _ in range(3)) + b"data: [DONE]\n\n"


def index_bytes_per_key(keys: int = 1_000_000) -> float:
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        values = split_digests(os.urandom(8 * keys))  # the int objects the index will own
        index = NodeIndex("measure", max_keys=2 * keys)
        index.stored("l1", values)
        del values
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    return used / len(index.entries)


def _texts(count: int, rng: random.Random) -> list[str]:
    sources = sorted(Path("/usr/share/common-licenses").glob("*")) or sorted(
        Path("/usr/share/doc").glob("*/copyright")
    )
    corpus = "".join(p.read_text(errors="replace") for p in sources[:40] if p.is_file())
    if len(corpus) < 20_000:
        corpus = (corpus + " lorem ipsum dolor sit amet") * (20_000 // max(1, len(corpus)) + 1)
    texts = []
    for _ in range(count):
        size = rng.randint(4000, 14000)  # about 1k to 4k tokens
        start = rng.randrange(0, max(1, len(corpus) - size))
        texts.append(corpus[start : start + size])
    return texts


async def _stub(request: web.Request) -> web.StreamResponse:
    await request.read()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(_SSE)
    await response.write_eof()
    return response


async def _post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> float:
    started = time.perf_counter()
    async with session.post(url, json=body) as response:
        await response.read()
        if response.status != 200:
            raise RuntimeError(f"{url}: HTTP {response.status}")
    return time.perf_counter() - started


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure_overhead(
    replicas: list[SimReplica], model_dir: Path, chunk: int, requests: int = 300
) -> dict[str, float]:
    tokenizer = PromptTokenizer.load(str(model_dir))
    rng = random.Random(11)  # noqa: S311 - a reproducible workload
    systems = _texts(20, rng)
    bodies = [
        {"model": "m", "stream": True, "messages": [
            {"role": "system", "content": systems[i % len(systems)]},
            {"role": "user", "content": f"question {i}: " + systems[(i * 7) % 20][:300]},
        ]}
        for i in range(requests)
    ]  # fmt: skip
    tokens = [tokenizer.chat(body) for body in bodies]
    for i, body_tokens in enumerate(tokens[: len(systems)]):  # every system prompt is cached
        keys = keys_for(body_tokens, chunk, NAMESPACE.seed())[:NUM_BLOCKS]
        owner = replicas[i % len(replicas)]
        owner.client.store(owner.registration, list(keys), list(range(len(keys))))
    app = web.Application(client_max_size=64 * 1024**2)
    app.router.add_post("/v1/chat/completions", _stub)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    ports = [free_port() for _ in replicas]
    for port in ports:
        await web.TCPSite(runner, "127.0.0.1", port).start()
    endpoints = ",".join(
        f"http://127.0.0.1:{port}={r.endpoint}" for port, r in zip(ports, replicas, strict=True)
    )
    router_port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmcache_node.cli", "router", "--host", "127.0.0.1",
         "--port", str(router_port), "--endpoints", endpoints, "--tokenizer", str(model_dir),
         "--model-name", NAMESPACE.model_name, "--log-level", "WARNING"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    direct_url = f"http://127.0.0.1:{ports[0]}/v1/chat/completions"
    router_url = f"http://127.0.0.1:{router_port}/v1/chat/completions"
    try:
        async with aiohttp.ClientSession() as session:
            await _wait_synced(session, router_port, proc, len(replicas))
            for body in bodies[:20]:  # warm both paths
                await _post(session, direct_url, body)
                await _post(session, router_url, body)
            direct: list[float] = []
            routed: list[float] = []
            for number, body in enumerate(bodies):
                pair = [(direct, direct_url), (routed, router_url)]
                for samples, url in pair if number % 2 else reversed(pair):
                    samples.append(await _post(session, url, body))
    finally:
        proc.terminate()
        proc.wait(30)
        await runner.cleanup()
    tokenize_s = []
    for body in bodies[:100]:
        started = time.perf_counter()
        tokenizer.chat(body)
        tokenize_s.append(time.perf_counter() - started)
    return {
        "routing_overhead_p50_ms": (_pct(routed, 0.5) - _pct(direct, 0.5)) * 1000,
        "routing_overhead_p99_ms": (_pct(routed, 0.99) - _pct(direct, 0.99)) * 1000,
        "routing_direct_p50_ms": _pct(direct, 0.5) * 1000,
        "routing_tokenize_p50_ms": statistics.median(tokenize_s) * 1000,
        "routing_prompt_tokens_p50": statistics.median(len(t) for t in tokens),
    }


async def _wait_synced(
    session: aiohttp.ClientSession, port: int, proc: subprocess.Popen[bytes], nodes: int
) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            error = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"the router exited: {error[-2000:]}")
        try:
            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                page = await response.text()
            synced = sum(
                1 for line in page.splitlines()
                if line.startswith("lmcache_router_node_synced{") and line.endswith(" 1.0")
            )  # fmt: skip
            if synced == nodes:
                return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError("the router did not get in step with the node servers in 120 s")
