"""Processes for the end-to-end tests and the demo: vLLM with our connector, the proxy.

Everything listens on 127.0.0.1 with free ports and writes a log file; waits are bounded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmcache_node.server.process import free_port

from tests.support import WaitTimeoutError, wait_until

CONNECTOR_CLASS = "LMCacheNodeConnector"
CONNECTOR_MODULE = "lmcache_node.vllm.connector"
SERVER_PYTHON_ENV = "LMCACHE_E2E_SERVER_PYTHON"


def server_python() -> str:
    """The node server's interpreter: .venv-vllm holds only vLLM and the connector, so the
    server runs from the main venv (``make setup``) or ``$LMCACHE_E2E_SERVER_PYTHON``."""
    chosen = os.environ.get(SERVER_PYTHON_ENV)
    if chosen:
        return chosen
    main_venv = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "python"
    if main_venv.exists():
        return str(main_venv)
    if importlib.util.find_spec("pydantic_settings") is not None:
        return sys.executable  # a venv with the server's dependencies too
    raise RuntimeError(
        "the node server needs the project's [node] dependencies, which .venv-vllm does not "
        f"have: run `make setup` (it builds .venv) or set {SERVER_PYTHON_ENV}=/path/to/python"
    )


def vllm_env(work_dir: Path, kv_cache_gib: int = 1) -> dict[str, str]:
    """Environment for a vLLM CPU process: offline, quiet, its caches under ``work_dir``."""
    tmp = work_dir / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),  # whole GiB only
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_CACHE_ROOT": str(work_dir / "vllm-cache"),
        "TORCHINDUCTOR_CACHE_DIR": str(work_dir / "inductor-cache"),
        "TMPDIR": str(tmp),
        "PYTHONHASHSEED": "0",
    }


def node_shm_dir(tag: str) -> Path:
    """A fresh shm directory for one run's node server (``--shm-dir``; the server creates
    it 2770 and names it to the connectors in the handshake, as a cluster's would be)."""
    return Path("/dev/shm") / f"lmcache-e2e-{tag}-{os.getpid()}"


def kv_transfer_config(
    role: str, node_port: int, load_failure_policy: str = "recompute", **extra: Any
) -> str:
    return json.dumps(
        {
            "kv_connector": CONNECTOR_CLASS,
            "kv_connector_module_path": CONNECTOR_MODULE,
            "kv_role": role,
            "kv_load_failure_policy": load_failure_policy,
            "kv_connector_extra_config": {
                "lmcache.node.host": "tcp://127.0.0.1",
                "lmcache.node.port": node_port,
                **extra,
            },
        }
    )


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    ttft_s: float
    total_s: float


class VLLMProcess:
    """``python -m vllm.entrypoints.openai.api_server`` with our connector."""

    def __init__(
        self,
        name: str,
        model: Path,
        *,
        work_dir: Path,
        kv_role: str | None,
        node_port: int,
        max_model_len: int = 4096,
        extra_args: tuple[str, ...] = (),
        kv_cache_gib: int = 1,
        load_failure_policy: str = "recompute",
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.model = model
        self.port = free_port()
        self.work_dir = work_dir
        self.log_file = work_dir / f"vllm-{name}.log"
        self.args = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model), "--host", "127.0.0.1", "--port", str(self.port),
            "--enforce-eager", "--no-enable-prefix-caching",
            "--max-model-len", str(max_model_len), "--seed", "0",
            # float32: the generated model's weights are random, so in bfloat16 its greedy
            # choices are near-ties that can flip between a full prefill and one over loaded
            # KV even when every KV byte is the same (verify mode checks the bytes)
            "--dtype", "float32",
            *extra_args,
        ]  # fmt: skip
        if kv_role is not None:
            self.args += [
                "--kv-transfer-config",
                kv_transfer_config(kv_role, node_port, load_failure_policy),
            ]
        self.env = {**vllm_env(work_dir, kv_cache_gib), **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> VLLMProcess:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as out:
            self.proc = subprocess.Popen(
                self.args, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                start_new_session=True,
            )  # fmt: skip
        return self

    def wait_ready(self, timeout_s: float = 400.0) -> VLLMProcess:
        def healthy() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"vLLM {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                return bool(response.status == 200)

        try:
            wait_until(healthy, timeout_s, f"vLLM {self.name} /health", interval=0.5,
                       ignore=(OSError,))  # fmt: skip
        except WaitTimeoutError as exc:
            raise RuntimeError(f"{exc}:\n{self.log_tail()}") from None
        return self

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_text()[-chars:]

    def complete(
        self, prompt: str | list[int], max_tokens: int = 16, timeout_s: float = 300.0
    ) -> Completion:
        """Greedy completion, streamed so the time to the first token is measured."""
        return stream_completion(self.url, str(self.model), prompt, max_tokens, timeout_s)

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def stream_completion(
    base_url: str,
    model: str,
    prompt: str | list[int],
    max_tokens: int = 16,
    timeout_s: float = 300.0,
) -> Completion:
    """A greedy /v1/completions request to vLLM at ``base_url``, streamed (TTFT measured)."""
    body = json.dumps(
        {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    request = urllib.request.Request(
        base_url + "/v1/completions", body, {"Content-Type": "application/json"}
    )
    return read_stream(request, timeout_s)


def read_stream(request: urllib.request.Request, timeout_s: float) -> Completion:
    started = time.perf_counter()
    first: float | None = None
    parts: list[str] = []
    prompt_tokens = 0
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            for choice in event.get("choices") or []:
                if first is None:
                    first = time.perf_counter()
                parts.append(choice.get("text", ""))
            if event.get("usage"):
                prompt_tokens = int(event["usage"]["prompt_tokens"])
    end = time.perf_counter()
    return Completion(
        text="".join(parts),
        prompt_tokens=prompt_tokens,
        ttft_s=(first or end) - started,
        total_s=end - started,
    )


def post_json(url: str, payload: dict[str, Any], timeout_s: float = 300.0) -> dict[str, Any]:
    request = urllib.request.Request(
        url, json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        result: dict[str, Any] = json.load(response)
    return result


def metric(http_url: str, name: str, labels: str = "") -> float:
    """One sample of the node server's Prometheus metrics (0 when absent)."""
    with urllib.request.urlopen(http_url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    pattern = re.compile(rf"^{re.escape(name)}(\{{{re.escape(labels)}\}})?\s+(\S+)$", re.M)
    match = pattern.search(text)
    return float(match.group(2)) if match else 0.0


def vllm_counter(base_url: str, name: str, **labels: str) -> float:
    """The sum of a counter on vLLM's /metrics over the series whose labels include
    ``labels`` (vLLM adds its own: engine, model_name)."""
    with urllib.request.urlopen(base_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    total = 0.0
    for match in re.finditer(rf"^{re.escape(name)}\{{([^}}]*)\}}\s+(\S+)$", text, re.M):
        present = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        if all(present.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


def retrieved_tokens_logged(log_text: str) -> list[int]:
    return [int(n) for n in re.findall(r"Retrieved (\d+) tokens", log_text)]


def prompt_text(seed: int, approx_chars: int) -> str:
    """A deterministic long prompt, different for every seed (local text, no network)."""
    sources = sorted(Path("/usr/share/common-licenses").glob("*")) or sorted(
        Path("/usr/share/doc").glob("*/copyright")
    )
    text = ""
    index = seed
    while len(text) < approx_chars + 2000:
        path = sources[index % len(sources)]
        if path.is_file():
            text += path.read_text(errors="replace")
        index += 7
    offset = (seed * 997) % 1000
    return f"[{seed}] " + text[offset : offset + approx_chars]
