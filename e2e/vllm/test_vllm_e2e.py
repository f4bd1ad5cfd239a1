"""End-to-end: the real vLLM (CPU) with our connector against a real node server.

Correctness check throughout: greedy output with KV from the cache equals the output vLLM
computed itself (the model is random but deterministic; wrong KV changes the output).
vLLM's own prefix cache is off, so every hit comes from the node server.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import threading
import urllib.error
from pathlib import Path

import pytest
from lmcache_node.server.process import free_port
from lmcache_node.transfer.shm_pool import POOL_NAME

from e2e.vllm.conftest import Deployment
from e2e.vllm.harness import (
    metric,
    post_json,
    prompt_text,
    retrieved_tokens_logged,
    vllm_counter,
)
from tests.support import wait_until

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
# These run in .venv-vllm (make e2e-vllm); anywhere else they are skipped, not failed.
pytest.importorskip("vllm", reason="vLLM is not installed here: run `make e2e-vllm`")

CHUNK = 256
PROMPT_CHARS = 4000  # ~1200-1500 tokens with the generated tokenizer: 4-5 chunks


def retrieved_metric(dep: Deployment) -> float:
    return metric(dep.server.http_url, "lmcache_node_tokens_total", 'kind="retrieved"')


def stored_metric(dep: Deployment) -> float:
    return metric(dep.server.http_url, "lmcache_node_tokens_total", 'kind="stored"')


def hit_metric(dep: Deployment) -> float:
    return metric(dep.server.http_url, "lmcache_node_tokens_total", 'kind="hit"')


def test_kv_segments_live_in_the_servers_shm_directory(deployment: Deployment) -> None:
    """The connectors learn the directory from the handshake: the KV cache of every vLLM in
    shared mode is a segment there, and B's (engine mode) a staging area the server made
    there; all 0660 in the directory's group (2770), nothing for other users."""
    shm_dir = deployment.server.shm_dir
    shared = [i for i in deployment.instances if i is not deployment.b]

    def segments(kind: str) -> list[str]:
        return [n for n in os.listdir(shm_dir) if n.startswith(f"lmcache-node-{kind}-")]

    wait_until(lambda: len(segments("kv")) >= len(shared), 120, "KV segments")
    wait_until(lambda: len(segments("staging")) >= 1, 120, "B's staging segment")
    assert stat.S_IMODE(shm_dir.stat().st_mode) == 0o2770
    for name in segments("kv") + segments("staging"):
        info = (shm_dir / name).stat()
        assert stat.S_IMODE(info.st_mode) == 0o660, name
        assert info.st_gid == shm_dir.stat().st_gid and info.st_nlink == 1


def test_same_prompt_twice_hits_the_node_server(deployment: Deployment) -> None:
    dep = deployment
    prompt = prompt_text(1, PROMPT_CHARS)
    retrieved_before = retrieved_metric(dep)
    hits_before = hit_metric(dep)

    cold = dep.a.complete(prompt)
    warm = dep.a.complete(prompt)

    expected = (cold.prompt_tokens - 1) // CHUNK * CHUNK
    assert expected >= 3 * CHUNK, "the prompt should span several chunks"
    assert warm.text == cold.text
    assert retrieved_metric(dep) - retrieved_before == expected
    assert hit_metric(dep) - hits_before >= expected
    assert expected in retrieved_tokens_logged(dep.server.log_text())
    assert f"loaded {expected} tokens from the node server" in dep.a.log_text()


def test_every_worker_reaches_the_server_over_curve(deployment: Deployment) -> None:
    """The server runs with CURVE keys (as the operator runs it); each vLLM holds the client
    key, and the hits above went through those authenticated connections."""
    for instance in deployment.instances:
        assert f"tcp://127.0.0.1:{deployment.server.port} (CURVE)" in instance.log_text(), (
            instance.log_tail(3000)
        )
    first_run = (deployment.work_dir / "node-server-1.log").read_text(errors="replace")
    assert "(CURVE, server key " in first_run and "1 allowed client key(s)" in first_run


def test_transfer_mode_env_is_honoured(deployment: Deployment) -> None:
    """B runs with LMCACHE_NODE_TRANSFER_MODE=engine, the others with the default (shared)."""
    first_run = (deployment.work_dir / "node-server-1.log").read_text(errors="replace")
    modes = re.findall(r"Registered KV cache for worker .* (shared|engine) on cpu", first_run)
    assert sorted(modes) == ["engine", "shared", "shared", "shared"], first_run[-3000:]
    assert "transfer mode engine" in deployment.b.log_text()
    assert "transfer mode engine" not in deployment.a.log_text()


def test_second_instance_hits_what_the_first_stored(deployment: Deployment) -> None:
    dep = deployment
    prompt = prompt_text(2, PROMPT_CHARS)
    on_a = dep.a.complete(prompt)
    retrieved_before = retrieved_metric(dep)

    on_b = dep.b.complete(prompt)

    expected = (on_a.prompt_tokens - 1) // CHUNK * CHUNK
    assert on_b.text == on_a.text
    assert retrieved_metric(dep) - retrieved_before == expected
    assert f"loaded {expected} tokens from the node server" in dep.b.log_text()


def test_disaggregated_prefill_through_a_proxy(deployment: Deployment) -> None:
    dep = deployment
    prompt = prompt_text(3, PROMPT_CHARS)
    request = {"model": str(dep.b.model), "prompt": prompt, "max_tokens": 16, "temperature": 0}
    stored_before = stored_metric(dep)
    retrieved_before = retrieved_metric(dep)

    # Reference: the consumer alone computes everything (a miss; a consumer never stores).
    alone = post_json(dep.consumer.url + "/v1/completions", request)
    assert stored_metric(dep) == stored_before
    assert retrieved_metric(dep) == retrieved_before

    port = free_port()
    with open(dep.work_dir / "proxy.log", "ab") as log:
        proxy = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("disagg_proxy.py")), "--port",
             str(port), "--prefill", dep.producer.url, "--decode", dep.consumer.url],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until(lambda: _up(f"http://127.0.0.1:{port}/health"), 30, "the proxy")
        answer = post_json(f"http://127.0.0.1:{port}/v1/completions", request)
    finally:
        proxy.terminate()
        proxy.wait(10)

    expected = (answer["usage"]["prompt_tokens"] - 1) // CHUNK * CHUNK
    assert expected >= 3 * CHUNK
    assert answer["choices"][0]["text"] == alone["choices"][0]["text"]
    # The producer stored the whole prompt's chunks, the consumer loaded all it may use.
    full_chunks = answer["usage"]["prompt_tokens"] // CHUNK * CHUNK
    assert stored_metric(dep) - stored_before == full_chunks
    assert retrieved_metric(dep) - retrieved_before == expected
    assert f"loaded {expected} tokens from the node server" in dep.consumer.log_text()
    assert "from the node server" not in dep.producer.log_text()  # a producer never loads


VERIFY = "vllm:lmcache_node_verify_chunks_total"


def verify_counts(dep: Deployment) -> dict[str, float]:
    return {
        outcome: vllm_counter(dep.a.url, VERIFY, outcome=outcome)
        for outcome in ("saved", "matched", "mismatched", "unknown")
    }


def all_at_once(dep: Deployment, prompts: list[str]) -> list[str]:
    """Send every prompt to A at the same moment; the answers in prompt order."""
    answers: list[str | BaseException] = [""] * len(prompts)
    start = threading.Barrier(len(prompts))

    def ask(index: int) -> None:
        start.wait()
        try:
            answers[index] = dep.a.complete(prompts[index]).text
        except BaseException as exc:  # re-raised below, in the test's thread
            answers[index] = exc

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    failed = [a for a in answers if isinstance(a, BaseException)]
    assert not failed, failed
    return [str(a) for a in answers]


def test_verify_mode_concurrent_loads_are_byte_exact(deployment: Deployment) -> None:
    """A runs with LMCACHE_NODE_VERIFY=1. Four requests sharing a prefix, at once: computed
    and saved; the same four at once again: every whole chunk is loaded and its bytes equal
    the bytes saved (no mismatch, nothing unknown, every expected chunk matched)."""
    dep = deployment
    shared = prompt_text(60, 1500)
    prompts = [shared + prompt_text(61 + i, 2000) for i in range(4)]
    tokens = [
        len(post_json(dep.a.url + "/tokenize", {"model": str(dep.a.model), "prompt": p})["tokens"])
        for p in prompts
    ]
    expected_chunks = sum((n - 1) // CHUNK for n in tokens)
    assert expected_chunks >= 4 * 3, tokens
    before = verify_counts(dep)

    first = all_at_once(dep, prompts)
    wait_until(lambda: verify_counts(dep)["saved"] > before["saved"], 60, "saved digests")
    # the first wave may already load the shared prefix one of its requests saved
    between = verify_counts(dep)
    retrieved_before = retrieved_metric(dep)
    second = all_at_once(dep, prompts)

    assert second == first
    wait_until(
        lambda: verify_counts(dep)["matched"] - between["matched"] >= expected_chunks,
        60,
        f"{expected_chunks} matched chunks in vLLM's metrics (now {verify_counts(dep)})",
    )
    after = verify_counts(dep)
    assert after["mismatched"] == before["mismatched"] == 0
    assert after["unknown"] == before["unknown"]
    assert after["matched"] - between["matched"] == expected_chunks
    assert retrieved_metric(dep) - retrieved_before == expected_chunks * CHUNK
    assert "verify mode on" in dep.a.log_text()
    assert "verify: request" not in dep.a.log_text()  # the first-mismatch ERROR


def test_verify_mode_sequential_output_through_the_cache(deployment: Deployment) -> None:
    """One request alone: computed by vLLM (a miss), then loaded through the cache with
    every chunk verified; the greedy output is the same."""
    dep = deployment
    prompt = prompt_text(70, PROMPT_CHARS)
    before = verify_counts(dep)

    computed = dep.a.complete(prompt, max_tokens=32)
    through_cache = dep.a.complete(prompt, max_tokens=32)

    chunks = (computed.prompt_tokens - 1) // CHUNK
    assert through_cache.text == computed.text
    wait_until(
        lambda: verify_counts(dep)["matched"] - before["matched"] >= chunks,
        60,
        f"{chunks} matched chunks",
    )
    assert verify_counts(dep)["mismatched"] == 0


def _up(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def prompt_keys(dep: Deployment, prompt: str) -> list[bytes]:
    """The chunk keys instance A's connector uses for ``prompt`` (tokens as vLLM sees them)."""
    from lmcache_node.keys import KeyNamespace, chunk_keys
    from lmcache_node.vllm.connector import kv_layout

    tokens = post_json(dep.a.url + "/tokenize", {"model": str(dep.a.model), "prompt": prompt})
    namespace = KeyNamespace(
        model_name=str(dep.a.model),
        world_size=1,
        worker_id=0,
        kv_dtype="float32",  # the harness serves the model in float32
        layout=kv_layout("cpu", 128, use_mla=False),
    )
    return list(chunk_keys(tokens["tokens"], CHUNK, namespace))


def chunk_file(disk: Path, key: bytes) -> Path | None:
    found = [p for p in disk.rglob(key.hex() + "*") if not p.name.startswith(".")]
    return found[0] if found else None


def test_corrupted_disk_chunk_is_detected_and_recomputed(deployment: Deployment) -> None:
    dep = deployment
    prompt = prompt_text(5, PROMPT_CHARS)
    keys = prompt_keys(dep, prompt)
    assert len(keys) >= 4
    first = dep.a.complete(prompt)
    wait_until(
        lambda: all(chunk_file(dep.server.disk_dir, k) is not None for k in keys),
        60,
        "the prompt's chunks to reach the disk tier",
    )
    dep.server.stop()
    # drop the L1 pool the stopped server leaves (a restarted server would adopt it and serve
    # the prompt from memory): the disk tier alone survives this restart
    (dep.server.shm_dir / POOL_NAME).unlink()
    victim = chunk_file(dep.server.disk_dir, keys[2])
    assert victim is not None
    data = bytearray(victim.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    victim.write_bytes(bytes(data))
    dep.server.start()
    a_log_before = len(dep.a.log_text())
    consumer_log_before = len(dep.consumer.log_text())
    wait_until(lambda: _connected_again(dep), 60, "the connectors to reconnect")

    # The consumer runs with kv_load_failure_policy "fail": its load stops at chunk 2 and vLLM
    # fails the request (HTTP 500) instead of recomputing.
    request = {"model": str(dep.consumer.model), "prompt": prompt, "max_tokens": 16,
               "temperature": 0}  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as failed:
        post_json(dep.consumer.url + "/v1/completions", request)
    assert failed.value.code == 500
    consumer_log = dep.consumer.log_text()[consumer_log_before:]
    assert f"loaded only {2 * CHUNK} of " in consumer_log, consumer_log[-3000:]
    assert "kv_load_failure_policy is 'fail', so vLLM fails the request" in consumer_log
    assert "Failing 1 request(s) due to KV load failure" in consumer_log
    server_log = dep.server.log_text()
    assert f"dropped bad chunk file {victim}" in server_log
    assert chunk_file(dep.server.disk_dir, keys[2]) is None  # the bad file was dropped

    # A runs with "recompute": same prompt, chunks 0 and 1 loaded, the rest recomputed.
    again = dep.a.complete(prompt)

    assert again.text == first.text
    new_a_log = dep.a.log_text()[a_log_before:]
    # chunk 2 left the server with the consumer's failed load: A's lookup stops before it
    assert f"loaded {2 * CHUNK} tokens from the node server" in new_a_log, new_a_log[-3000:]

    # A stored the chunks it recomputed: chunk 2 is on disk again, with the right bytes
    def stored_again() -> bool:
        found = chunk_file(dep.server.disk_dir, keys[2])
        return found is not None and found.read_bytes() != bytes(data)

    wait_until(stored_again, 60, "chunk 2, recomputed by A, to reach the disk tier again")


def _connected_again(dep: Deployment) -> bool:
    try:
        stats = post_json_get(dep.server.http_url + "/stats")
    except OSError:
        return False
    # every instance has two clients (scheduler and worker); the worker also re-registers
    workers = stats.get("registered_workers", 0)
    sessions = stats.get("sessions", 0)
    return (
        isinstance(workers, int)
        and workers >= len(dep.instances)
        and isinstance(sessions, int)
        and sessions >= 2 * len(dep.instances)
    )


def post_json_get(url: str) -> dict[str, object]:
    import json
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as response:
        result: dict[str, object] = json.load(response)
    return result


def test_server_killed_mid_run_then_back(deployment: Deployment) -> None:
    dep = deployment
    prompts = [prompt_text(40 + i, PROMPT_CHARS) for i in range(3)]
    references = {p: dep.a.complete(p).text for p in prompts}  # computed (and stored)
    answers: list[tuple[str, str]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            for p in prompts:
                try:
                    answers.append((p, dep.a.complete(p).text))
                except BaseException as exc:  # collected and asserted below
                    errors.append(exc)

    worker = threading.Thread(target=traffic)
    worker.start()
    wait_until(lambda: answers or errors, 300, "the first answer through the cache")
    dep.server.kill()  # SIGKILL while requests are in flight
    killed_at = len(answers)
    wait_until(
        lambda: len(answers) >= killed_at + 3 or errors, 300, "answers while the server is down"
    )
    stop.set()
    worker.join(120)

    assert not errors, errors
    assert all(text == references[p] for p, text in answers)

    # A new prompt while the server is down: computed, not stored.
    fresh = prompt_text(50, PROMPT_CHARS)
    fresh_reference = dep.a.complete(fresh).text

    dep.server.start()  # empty L1; the connectors reconnect by themselves
    wait_until(lambda: _connected_again(dep), 60, "the connectors to reconnect")
    retrieved_before = retrieved_metric(dep)
    dep.a.complete(fresh)  # stores it now
    again = dep.a.complete(fresh)  # hits
    assert again.text == fresh_reference
    assert retrieved_metric(dep) - retrieved_before >= 3 * CHUNK
