"""End-to-end: the router in front of two real vLLM (CPU) instances, each with its own node
server (events on), as on two nodes.

A prompt prefilled on one instance is routed back to it and its node server serves the
hit (same greedy output); once that node server's cache is cleared, the router stops
preferring it (the time it took is printed). Run: ``make e2e-vllm PYTEST_ARGS="-k router"``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from lmcache_node.server.process import ServerProcess, free_port

from e2e.vllm.harness import (
    VLLMProcess,
    metric,
    node_shm_dir,
    post_json,
    prompt_text,
    server_python,
    stream_completion,
    wait_until,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
pytest.importorskip("vllm", reason="vLLM is not installed here: run `make e2e-vllm`")

CHUNK = 256
PROMPT_CHARS = 4000


@dataclass
class Node:
    server: ServerProcess
    vllm: VLLMProcess
    shm_dir: Path


class RouterProcess:
    """`lmcache-node router` as the node image runs it: with the node extra's libraries."""

    def __init__(self, work_dir: Path, endpoints: str, model: Path) -> None:
        self.port = free_port()
        self.log_file = work_dir / "router.log"
        self.args = [
            server_python(), "-m", "lmcache_node.cli", "router", "--host", "127.0.0.1",
            "--port", str(self.port), "--endpoints", endpoints, "--tokenizer", str(model),
            "--model-name", str(model), "--metrics-interval-secs", "0.5",
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RouterProcess:
        with open(self.log_file, "ab") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT)
        return self

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as response:
            return str(response.read().decode())

    def routed(self, replica: str) -> float:
        labels = rf'[^}}]*replica="{re.escape(replica)}"[^}}]*'
        pattern = rf"^lmcache_router_requests_total\{{{labels}\}} (\S+)$"
        return sum(float(v) for v in re.findall(pattern, self.metrics(), re.M))

    def explain(self, prompt: str) -> dict[str, object]:
        return post_json(self.url + "/debug/route", {"prompt": prompt}, timeout_s=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


@pytest.fixture(scope="module")
def routed(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path
) -> Iterator[tuple[RouterProcess, list[Node]]]:
    work = tmp_path_factory.mktemp("router-e2e")
    nodes: list[Node] = []
    router: RouterProcess | None = None
    try:
        for name in ("a", "b"):
            shm = node_shm_dir(f"router-{name}")
            server = ServerProcess(
                "--chunk-size", str(CHUNK), "--max-local-cpu-size", "0.5", "--shm-dir",
                str(shm), "--events-port", str(free_port()), "--log-level", "INFO",
                log_file=work / f"node-{name}.log", startup_timeout_s=300,
                python=server_python(),
            ).start()  # fmt: skip
            vllm = VLLMProcess(name, tiny_model, work_dir=work, kv_role="kv_both",
                               node_port=server.port)  # fmt: skip
            nodes.append(Node(server, vllm.start(), shm))
        for node in nodes:
            node.vllm.wait_ready()
        endpoints = ",".join(f"{n.vllm.url}={n.server.endpoint}" for n in nodes)
        router = RouterProcess(work, endpoints, tiny_model).start()

        def in_step() -> bool:
            try:
                page = router.metrics() if router is not None else ""
            except OSError:
                return False
            return len(re.findall(r"^lmcache_router_node_synced\{.*\} 1\.0$", page, re.M)) == 2

        wait_until(in_step, 120, "the router to follow both node servers")
        yield router, nodes
    finally:
        if router is not None:
            router.stop()
        for node in nodes:
            node.vllm.stop()
            node.server.terminate()
            shutil.rmtree(node.shm_dir, ignore_errors=True)


def retrieved(node: Node) -> float:
    return metric(node.server.http_url, "lmcache_node_tokens_total", 'kind="retrieved"')


def test_a_prompt_goes_back_to_the_node_that_holds_it(
    routed: tuple[RouterProcess, list[Node]],
) -> None:
    router, nodes = routed
    prompt = prompt_text(71, PROMPT_CHARS)
    model = str(nodes[0].vllm.model)
    before = {n.vllm.url: router.routed(n.vllm.url) for n in nodes}
    first = stream_completion(router.url, model, prompt)
    # the router counts a request once its stream has ended: a moment after the client saw it
    owner = wait_until(
        lambda: next((n for n in nodes if router.routed(n.vllm.url) > before[n.vllm.url]), None),
        10,
        "the first request counted for its replica",
    )
    other = next(n for n in nodes if n is not owner)
    expected = (first.prompt_tokens - 1) // CHUNK * CHUNK
    assert expected >= 3 * CHUNK

    # the owner's node server published the prompt's chunks: the router knows where they are
    wait_until(lambda: router.explain(prompt)["reason"] == "cache", 30, "the owner's events")
    decision = router.explain(prompt)
    assert decision["replica"] == owner.vllm.url
    held = decision["replicas"][owner.vllm.url]  # type: ignore[index]
    assert held["l1_tokens"] >= expected  # type: ignore[index]

    retrieved_before = {id(n): retrieved(n) for n in nodes}
    routed_before = router.routed(owner.vllm.url)
    again = stream_completion(router.url, model, prompt)
    wait_until(
        lambda: router.routed(owner.vllm.url) >= routed_before + 1,
        10,
        "the second request counted for the owner",
    )
    assert router.routed(owner.vllm.url) == routed_before + 1  # routed back to the owner
    assert again.text == first.text
    assert retrieved(owner) - retrieved_before[id(owner)] == expected  # a hit on its node
    assert retrieved(other) == retrieved_before[id(other)]

    cleared_at = time.monotonic()
    owner.server.clear_cache()
    wait_until(lambda: router.explain(prompt)["reason"] == "load", 10, "the clear to reach it")
    took = time.monotonic() - cleared_at
    print(f"the router stopped preferring the cleared node after {took:.3f} s")
    decision = router.explain(prompt)
    assert decision["replicas"][owner.vllm.url]["l1_tokens"] == 0  # type: ignore[index]
    log = (router.log_file.read_text(errors="replace"))[-3000:]
    assert "Traceback" not in log, log
    print(json.dumps({"router_clear_reaction_s": round(took, 3)}))
