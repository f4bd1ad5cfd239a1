"""The standalone starter as a real process: flags, errors and clean shutdown."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from lmcache_node.server.process import free_port

from tests.support import wait_until

pytestmark = pytest.mark.integration  # real server processes / subprocesses

STARTER = [sys.executable, "-m", "lmcache_node.standalone"]


def run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        STARTER + args,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


def start_and_stop(args: list[str], env: dict[str, str] | None = None) -> str:
    proc = subprocess.Popen(
        STARTER + args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert proc.stdout is not None
    lines = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "ready" in line:
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, "".join(lines) + out
    return "".join(lines) + out


@pytest.mark.slow
def test_starts_with_every_flag_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("max_local_cpu_size: 0.05\n")
    output = start_and_stop(
        [
            "--config",
            str(config),
            "--model_name",
            "tiny",
            "--worker_id",
            "1",
            "--world_size",
            "2",
            "--kv_dtype",
            "bfloat16",
            "--kv_shape",
            "2,2,128,4,16",
            "--device",
            "cpu",
            "--fmt",
            "vllm",
            "--chunk_size",
            "128",
            "--max_local_cpu_size",
            "0.02",
            "log_level=DEBUG",
        ]
    )
    assert "model=tiny worker_id=1 world_size=2 device=cpu chunk_size=128" in output
    assert "byte-exact" in output
    assert "20.00 MiB" in output  # CLI size wins over the file
    assert "layer group 0: shape=(2, 2, 128, 4, 16) dtype=bfloat16" in output
    assert "stopped" in output


@pytest.mark.slow
def test_shape_spec_groups_and_debug_details() -> None:
    output = start_and_stop(
        [
            "--kvcache_shape_spec",
            "(2,2,256,4,16):float16:2;(3,2,256,4,4):float32:3",
            "--max_local_cpu_size",
            "16Mi",
        ],
        env={"LMCACHE_LOG_LEVEL": "DEBUG"},
    )
    assert "groups=2" in output
    assert "layer group 1: shape=(3, 2, 256, 4, 4) dtype=float32 layers=3" in output


@pytest.mark.slow
def test_mla_shape_runs() -> None:
    output = start_and_stop(
        ["--use_mla", "--kv_shape", "2,1,256,1,64", "--max_local_cpu_size", "8Mi"]
    )
    assert "byte-exact" in output


@pytest.mark.slow
def test_internal_api_server_serves_stats(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            *STARTER,
            "--internal_api_server_enabled",
            "--max_local_cpu_size",
            "8Mi",
            f"internal_api_server_port_start={port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        body = wait_until(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=2).read(),
            60,
            "the standalone starter's /stats",
            interval=0.2,
            ignore=(OSError,),
        )
        assert json.loads(body)["stores"] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--config", ""], {}, "No config file specified"),
        (["--config", "/nonexistent/c.yaml"], {}, "does not exist"),
        ([], {"LMCACHE_CONFIG_FILE": "/nonexistent/x.yaml"}, "does not exist"),
        (["--kvcache_shape_spec", "(2,2):half:2"], {}, "(shape):dtype:layer_count"),
        (["--kv_shape", "2,2,256"], {}, "Invalid KV shape specification"),
        (["--kv_shape", "2,2,128,4,16"], {}, "chunk_size 256"),
        (["--use_mla"], {}, "use_mla"),
        (["chunk_size"], {}, "key=value"),
        (["no_such_key=1"], {}, "Unknown setting"),
        (["--max_local_cpu_size", "lots"], {}, "max_local_cpu_size"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(
    args: list[str], env: dict[str, str], expected: str
) -> None:
    result = run(args, env)
    assert result.returncode == 2
    assert expected in result.stderr


@pytest.mark.parametrize("device", ["cuda", "xpu"])
def test_missing_device_suggests_cpu(device: str) -> None:
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    result = run(["--device", device])
    assert result.returncode == 2
    assert "Device not available" in result.stderr and "--device cpu" in result.stderr
