"""The per-token prefill cost of the real vLLM (CPU), measured in the bench's own run.

vLLM (``--vllm-python``, the ``.venv-vllm`` of ``make vllm-venv``) serves the locally
generated model without any connector and with its prefix cache off; prompts of random
token ids at several lengths are sent one at a time, streamed, ``max_tokens`` 1. The time to
the first token grows linearly with the prompt; the slope is the prefill cost per token
(the intercept, HTTP and scheduling, is left out of the simulated TTFT).
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from lmcache_node.server.process import free_port

LENGTHS = (256, 1024, 2048, 3072)


def _env(work: Path) -> dict[str, str]:
    (work / "tmp").mkdir(parents=True, exist_ok=True)
    return {
        **os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
        "VLLM_CACHE_ROOT": str(work / "vllm-cache"),
        "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor-cache"), "TMPDIR": str(work / "tmp"),
    }  # fmt: skip


def _ttft(url: str, model: str, tokens: list[int]) -> float:
    body = json.dumps({"model": model, "prompt": tokens, "max_tokens": 1, "temperature": 0,
                       "stream": True}).encode()  # fmt: skip
    request = urllib.request.Request(  # noqa: S310 - loopback
        url + "/v1/completions", body, {"Content-Type": "application/json"}
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=300) as response:  # noqa: S310 - loopback
        for raw in response:
            if raw.startswith(b"data:") and b"[DONE]" not in raw:
                return time.perf_counter() - started
    raise RuntimeError("vLLM streamed no token")


def fit_slope(samples: dict[int, list[float]]) -> tuple[float, float]:
    """Least squares over the medians: (seconds per token, intercept seconds)."""
    xs = sorted(samples)
    ys = [statistics.median(samples[x]) for x in xs]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mean_x) ** 2 for x in xs
    )
    return slope, mean_y - slope * mean_x


def measure_prefill(python: str, model_dir: Path, repeat: int = 3) -> dict[str, float]:
    """Start vLLM, measure TTFT per prompt length, stop it; the fitted per-token cost."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-router-vllm-") as tmp:
        work = Path(tmp)
        log = open(work / "vllm.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
             "--host", "127.0.0.1", "--port", str(port), "--enforce-eager",
             "--no-enable-prefix-caching", "--max-model-len", "4096", "--seed", "0"],
            stdout=log, stderr=subprocess.STDOUT, env=_env(work), start_new_session=True,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(url, proc, work / "vllm.log")
            rng = random.Random(7)  # noqa: S311 - a reproducible workload
            _ttft(url, str(model_dir), [rng.randrange(10, 4000) for _ in range(64)])  # warm-up
            samples: dict[int, list[float]] = {n: [] for n in LENGTHS}
            for _ in range(repeat):
                for length in LENGTHS:
                    tokens = [rng.randrange(10, 4000) for _ in range(length)]
                    samples[length].append(_ttft(url, str(model_dir), tokens))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()
    slope, intercept = fit_slope(samples)
    return {
        "prefill_s_per_token": slope,
        "prefill_intercept_s": intercept,
        **{f"vllm_ttft_{n}_tokens_s": statistics.median(v) for n, v in samples.items()},
    }


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited: {log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:  # noqa: S310
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"vLLM was not ready within {timeout} s")
