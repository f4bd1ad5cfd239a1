"""Start a real server process on loopback (tests, the bench, local tools)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """``python -m lmcache_node.server`` on 127.0.0.1 with free ports; a context manager."""

    def __init__(
        self,
        *args: str,
        port: int | None = None,
        http_port: int | None = None,
        log_file: Path | None = None,
        env: dict[str, str] | None = None,
        startup_timeout_s: float = 60.0,
        python: str | None = None,
    ) -> None:
        """``python``: the interpreter to run (default: this one); it needs ``[node]``."""
        self.python = python or sys.executable
        self.port = port or free_port()
        self.http_port = http_port or free_port()
        self.args = list(args)
        self.log_file = log_file
        self.env = env
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> ServerProcess:
        command = [
            self.python, "-m", "lmcache_node.server", "--host", "127.0.0.1",
            "--port", str(self.port), "--http-port", str(self.http_port), *self.args,
        ]  # fmt: skip
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        env = {**os.environ, **(self.env or {})}
        self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        if self.log_file:
            out.close()  # type: ignore[union-attr]
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"the server exited with {self.proc.returncode}: {self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.http_url + "/readyz", timeout=1) as response:  # noqa: S310
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"the server was not ready within {self.startup_timeout_s} s")

    def clear_cache(self, token: str | None = None) -> int:
        """POST /cache/clear (the admin path; CURVE clients cannot clear); chunks removed."""
        request = urllib.request.Request(self.http_url + "/cache/clear", method="POST")  # noqa: S310
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            return int(json.loads(response.read())["cleared"])

    def log_tail(self, chars: int = 4000) -> str:
        if self.log_file is None or not self.log_file.exists():
            return "(no log file)"
        return self.log_file.read_text(errors="replace")[-chars:]

    def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code (kills after ``timeout_s``)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.terminate()
