"""The router's HTTP proxy: pass-through, bounds, failover, and cache-aware choices made
from real node servers' events (the replicas are stand-ins; e2e/vllm runs real vLLM)."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from lmcache_node.client import NodeClient
from lmcache_node.keys import KeyNamespace
from lmcache_node.router.core import keys_for
from lmcache_node.router.tokenize import PromptTokenizer
from lmcache_node.server.process import ServerProcess, free_port

from tests.node.router.feeds import Worker
from tests.node.router.harness import RouterThread, get, make_tokenizer, post
from tests.node.router.upstream import Upstream
from tests.support import wait_until

CHUNK = 64
MODEL = "model-a"


def replicas_of(upstreams: list[Upstream], caches: list[str] | None = None) -> str:
    caches = caches or [""] * len(upstreams)
    return ",".join(u.url + (f"={c}" if c else "") for u, c in zip(upstreams, caches, strict=True))


@pytest.fixture
def upstreams() -> Iterator[list[Upstream]]:
    yield [Upstream("a"), Upstream("b")]


def started(flags: list[str], upstreams: list[Upstream]) -> RouterThread:
    router = RouterThread(*flags)
    for upstream in upstreams:
        router.call(upstream.start())
    return router


def test_streams_pass_through_and_round_robin_alternates(upstreams: list[Upstream]) -> None:
    flags = ["--policy", "round-robin", "--endpoints", replicas_of(upstreams)]
    with started(flags, upstreams) as router:
        seen = []
        for _ in range(4):
            status, body, headers = post(
                router.url + "/v1/completions",
                {"model": "tiny", "prompt": "hello", "stream": True},
                {"Authorization": "Bearer k"},
            )
            assert status == 200 and headers["Content-Type"] == "text/event-stream"
            events = [line[6:] for line in body.decode().split("\n\n") if line]
            assert events[-1] == "[DONE]" and len(events) == 4  # 3 pieces, then [DONE]
            replicas = {json.loads(e)["replica"] for e in events[:-1]}
            assert len(replicas) == 1
            seen.append(replicas.pop())
        assert seen[0] != seen[1] and seen[:2] == seen[2:]  # in turn
        assert all(h.get("Authorization") == "Bearer k" for u in upstreams for h in u.headers)
        status, body, _ = post(router.url + "/v1/chat/completions",
                               {"model": "tiny", "messages": []})  # fmt: skip
        assert status == 200 and json.loads(body)["choices"][0]["text"] == "abc"
        status, body = get(router.url + "/v1/models")
        assert status == 200 and json.loads(body)["data"][0]["id"] == "tiny"
        status, text = get(router.url + "/metrics")
        page = text.decode()
        assert re.search(r'lmcache_router_requests_total\{api="completions",outcome="200",'
                         r'replica="http://127.0.0.1:\d+"\} 2.0', page)  # fmt: skip
        assert 'lmcache_router_decisions_total{policy="round-robin",reason="round_robin"}' in page
        for upstream in upstreams:
            router.call(upstream.stop())


def test_bounds_on_body_size_json_and_concurrency(upstreams: list[Upstream]) -> None:
    upstreams[0].delay_s = upstreams[1].delay_s = 1.5
    flags = ["--endpoints", replicas_of(upstreams), "--max-body-bytes", "4096",
             "--max-concurrent-requests", "1"]  # fmt: skip
    with started(flags, upstreams) as router:
        status, body, _ = post(router.url + "/v1/completions", {"prompt": "x" * 5000})
        assert status == 413 and "--max-body-bytes" in json.loads(body)["error"]["message"]
        status, body, _ = post(router.url + "/v1/completions", b"{not json")
        assert status == 400 and "not JSON" in json.loads(body)["error"]["message"]
        results: list[tuple[int, dict[str, str]]] = []

        def one() -> None:
            status, _, headers = post(router.url + "/v1/completions", {"prompt": "slow"})
            results.append((status, headers))

        threads = [threading.Thread(target=one) for _ in range(2)]
        for thread in threads:
            thread.start()
            time.sleep(0.3)
        for thread in threads:
            thread.join(30)
        statuses = sorted(s for s, _ in results)
        assert statuses == [200, 503]
        assert next(h for s, h in results if s == 503)["Retry-After"] == "1"
        for upstream in upstreams:
            router.call(upstream.stop())


def test_an_unreachable_replica_is_avoided(upstreams: list[Upstream]) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    flags = ["--policy", "round-robin", "--endpoints", f"{upstreams[0].url},{dead}",
             "--metrics-interval-secs", "0.2"]  # fmt: skip
    with started(flags, upstreams[:1]) as router:
        for _ in range(4):
            status, body, _ = post(router.url + "/v1/completions", {"prompt": "p"})
            assert status == 200 and json.loads(body)["replica"] == "a"
        page = get(router.url + "/metrics")[1].decode()
        assert f'lmcache_router_replica_healthy{{replica="{dead}"}} 0.0' in page
        assert get(router.url + "/readyz")[0] == 200
        router.call(upstreams[0].stop())
        wait_until(lambda: get(router.url + "/readyz")[0] == 503, 30.0, "no healthy replica")
        status, body, _ = post(router.url + "/v1/completions", {"prompt": "p"})
        assert status == 502


@pytest.fixture
def shm_dirs() -> Iterator[list[Path]]:
    paths = [Path("/dev/shm") / f"lmcache-test-rt-{uuid.uuid4().hex[:12]}" for _ in range(2)]
    yield paths
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_requests_go_to_the_replica_whose_node_holds_their_prefix(
    tmp_path: Path, shm_dirs: list[Path], upstreams: list[Upstream]
) -> None:
    tokenizer_dir = make_tokenizer(tmp_path / "tokenizer")
    tokenizer = PromptTokenizer.load(str(tokenizer_dir))
    namespace = KeyNamespace(model_name=MODEL, kv_dtype="bfloat16", layout="test")
    nodes = [
        ServerProcess("--chunk-size", str(CHUNK), "--cpu-buffer-size", "0.05",
                      "--l1-page-size", "4096", "--shm-dir", str(shm),
                      "--events-port", str(free_port()), log_file=tmp_path / f"node{i}.log")
        for i, shm in enumerate(shm_dirs)
    ]  # fmt: skip
    with nodes[0], nodes[1]:
        clients = [NodeClient(n.endpoint, timeout_s=10, expected_chunk_size=CHUNK) for n in nodes]
        for client in clients:
            client.connect()
        workers = [Worker(c, namespace, CHUNK) for c in clients]
        caches = [n.endpoint for n in nodes]
        flags = ["--endpoints", replicas_of(upstreams, caches), "--tokenizer",
                 str(tokenizer_dir), "--model-name", MODEL]  # fmt: skip
        with started(flags, upstreams) as router:
            prompt = " ".join(f"word{i} and more text" for i in range(120))
            tokens = tokenizer.completion({"prompt": prompt})
            assert len(tokens) >= 4 * CHUNK
            keys = keys_for(tokens, CHUNK, namespace.seed())
            assert keys == workers[1].worker_keys(tokens)  # the connector's keys
            workers[1].store(keys)  # node 1 (replica b) holds the prompt

            def explain(body: dict[str, object], api: str = "completions") -> dict[str, object]:
                return json.loads(post(f"{router.url}/debug/route?api={api}", body)[1])

            wait_until(
                lambda: explain({"prompt": prompt})["reason"] == "cache", 30.0, "node 1's events"
            )
            explained = explain({"prompt": prompt})
            assert explained["replica"] == upstreams[1].url
            held = explained["replicas"]  # type: ignore[index]
            assert held[upstreams[1].url]["l1_tokens"] == len(keys) * CHUNK
            assert held[upstreams[0].url]["l1_tokens"] == 0
            for _ in range(4):
                body = post(router.url + "/v1/completions", {"prompt": prompt})[1]
                assert json.loads(body)["replica"] == "b"

            chat = {"messages": [{"role": "system", "content": prompt[:1500]},
                                 {"role": "user", "content": "hi"}]}  # fmt: skip
            chat_keys = keys_for(tokenizer.chat(chat), CHUNK, namespace.seed())
            assert len(chat_keys) >= 2
            workers[0].store(chat_keys)  # node 0 (replica a) holds the chat's prefix
            wait_until(lambda: explain(chat, "chat")["replica"] == upstreams[0].url
                     and explain(chat, "chat")["reason"] == "cache", 30.0, "chat")  # fmt: skip
            body = post(router.url + "/v1/chat/completions", chat)[1]
            assert json.loads(body)["replica"] == "a"

            cleared_at = time.monotonic()
            nodes[1].clear_cache()
            wait_until(lambda: explain({"prompt": prompt})["reason"] == "load", 30.0, "the clear")
            print(f"router stopped preferring the cleared node after "
                  f"{time.monotonic() - cleared_at:.3f} s")  # fmt: skip
            for upstream in upstreams:
                router.call(upstream.stop())
        for client in clients:
            client.close()


def test_prefix_hash_and_session_are_sticky(tmp_path: Path) -> None:
    tokenizer_dir = make_tokenizer(tmp_path / "tokenizer")
    for policy, vary in (("prefix-hash", "prompt"), ("session", "session")):
        ups = [Upstream("a"), Upstream("b")]
        flags = ["--policy", policy, "--endpoints", replicas_of(ups),
                 "--tokenizer", str(tokenizer_dir)]  # fmt: skip
        with started(flags, ups) as router:
            owners: dict[str, set[str]] = {}
            for key in range(12):
                for repeat in range(3):
                    headers = {"x-session-id": f"s{key}"} if vary == "session" else {}
                    prompt = f"shared prefix {key} " * 100 + f"turn {repeat}"
                    body = post(router.url + "/v1/completions", {"prompt": prompt}, headers)[1]
                    owners.setdefault(str(key), set()).add(json.loads(body)["replica"])
            assert all(len(o) == 1 for o in owners.values()), (policy, owners)
            assert {o.pop() for o in owners.values()} == {"a", "b"}  # both used
            for upstream in ups:
                router.call(upstream.stop())
