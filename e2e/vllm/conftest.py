"""Fixtures: one node server and four vLLM instances (started together) per session.

A and B are ``kv_both`` instances (cases 1, 2, 4, 5, 6), P is a ``kv_producer`` and C a
``kv_consumer`` (cases 3, 5). A runs in verify mode (``LMCACHE_NODE_VERIFY=1``), B registers
in engine mode (``LMCACHE_NODE_TRANSFER_MODE``), C runs with ``kv_load_failure_policy:
fail``. The model is generated locally (tiny, seeded). Logs
of every process stay in the session's work directory (printed on failure).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from lmcache_node.keygen import ALLOWED_CLIENTS_FILE, SERVER_SECRET_FILE
from lmcache_node.keygen import generate as generate_keys
from lmcache_node.server.process import ServerProcess, free_port

from e2e.vllm.harness import VLLMProcess, node_shm_dir, server_python
from e2e.vllm.make_model import make_model

CREDENTIALS_ENV = "LMCACHE_NODE_CREDENTIALS_DIR"


@dataclass
class NodeServer:
    """A node server that can be killed and restarted on the same ports, disk and shm
    directory (a restarted server adopts the directory and the segments still held). With
    ``keys_dir`` (``lmcache-node keys generate``) it serves CURVE, as in a cluster."""

    work_dir: Path
    disk_dir: Path
    shm_dir: Path = field(default_factory=lambda: node_shm_dir("node"))
    port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    keys_dir: Path | None = None
    generation: int = 0
    proc: ServerProcess | None = None

    @property
    def log_file(self) -> Path:
        return self.work_dir / f"node-server-{self.generation}.log"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        self.generation += 1
        self.proc = ServerProcess(
            "--chunk-size", "256", "--max-local-cpu-size", "0.5",
            "--local-disk", f"file://{self.disk_dir}/", "--max-local-disk-size", "1",
            "--log-level", "INFO", "--shm-dir", str(self.shm_dir), *self.curve_args(),
            port=self.port, http_port=self.http_port, log_file=self.log_file,
            python=server_python(),
        ).start()  # fmt: skip

    def curve_args(self) -> list[str]:
        if self.keys_dir is None:
            return []
        return [
            "--curve-server-key", str(self.keys_dir / SERVER_SECRET_FILE),
            "--curve-client-keys", str(self.keys_dir / ALLOWED_CLIENTS_FILE),
        ]  # fmt: skip

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()

    def stop(self) -> None:
        if self.proc is not None and self.proc.proc is not None and self.proc.proc.poll() is None:
            self.proc.terminate()


@dataclass
class Deployment:
    server: NodeServer
    a: VLLMProcess
    b: VLLMProcess
    producer: VLLMProcess
    consumer: VLLMProcess
    work_dir: Path

    @property
    def instances(self) -> list[VLLMProcess]:
        return [self.a, self.b, self.producer, self.consumer]


@pytest.fixture(scope="session")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm-e2e")


@pytest.fixture(scope="session")
def tiny_model(work_dir: Path) -> Path:
    cached = os.environ.get("LMCACHE_E2E_MODEL_DIR")
    return make_model("tiny", Path(cached) if cached else work_dir / "model-tiny")


@pytest.fixture(scope="session")
def deployment(work_dir: Path, tiny_model: Path) -> Iterator[Deployment]:
    disk = work_dir / "disk"
    disk.mkdir()
    keys = work_dir / "keys"  # CURVE on, as the operator runs it: the workers hold the keys
    generate_keys(keys)
    server = NodeServer(work_dir=work_dir, disk_dir=disk, keys_dir=keys)
    server.start()

    def make(
        name: str, role: str, env: dict[str, str] | None = None, **options: Any
    ) -> VLLMProcess:
        env = {CREDENTIALS_ENV: str(keys), **(env or {})}
        return VLLMProcess(
            name, tiny_model, work_dir=work_dir, kv_role=role, node_port=server.port, env=env,
            **options,
        )  # fmt: skip

    dep = Deployment(
        server=server,
        # A checks every chunk it loads against the digest saved with it (verify mode)
        a=make("a", "kv_both", env={"LMCACHE_NODE_VERIFY": "1"}),
        # B moves KV bytes through the server's staging area (the operator's transferMode)
        b=make("b", "kv_both", env={"LMCACHE_NODE_TRANSFER_MODE": "engine"}),
        producer=make("producer", "kv_producer"),
        consumer=make("consumer", "kv_consumer", load_failure_policy="fail"),
        work_dir=work_dir,
    )
    try:
        for instance in dep.instances:
            instance.start()
        for instance in dep.instances:
            instance.wait_ready()
        yield dep
    finally:
        for instance in dep.instances:
            instance.stop()
        server.stop()
        # segments of vLLM workers that died with no server left to sweep them
        shutil.rmtree(server.shm_dir, ignore_errors=True)
        keep = os.environ.get("LMCACHE_E2E_KEEP_LOGS")
        if keep:
            shutil.copytree(work_dir, keep, dirs_exist_ok=True, ignore=_skip_big)


def _skip_big(_: str, names: list[str]) -> list[str]:
    return [n for n in names if n in ("disk", "model-tiny", "vllm-cache", "inductor-cache", "tmp")]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        dep = item.funcargs.get("deployment") if hasattr(item, "funcargs") else None
        if isinstance(dep, Deployment):
            report.sections.append(("node server log", dep.server.log_text()[-4000:]))
            for instance in dep.instances:
                report.sections.append((f"vLLM {instance.name} log", instance.log_tail(3000)))
