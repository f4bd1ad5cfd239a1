"""Start a real server process on loopback (tests, the bench, local tools).

Unless the arguments may name one (``--shm-dir``, ``--config``, ``LMCACHE_SHM_DIR``), each
ServerProcess gets an shm directory of its own, removed with everything in it (its L1 pool
too) when it is stopped or killed: servers started one after another never adopt each
other's pools, and none leaves memory behind. A test of a restart passes ``--shm-dir``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import weakref
from pathlib import Path
from types import TracebackType

_HANDED_OUT: set[int] = set()
_FREE_PORT_TRIES = 1000  # binds to port 0 before giving up (repeats are ~8 % here)


def free_port(*, handed_out: set[int] | None = None) -> int:
    """A loopback TCP port nothing listens on, never one this process handed out before.

    The kernel can give a port it gave a moment ago to the next bind to port 0, so two
    callers that bind later (a vLLM and another vLLM, both with SO_REUSEPORT) could share one
    and split each other's connections; remembering the ports handed out rules that out.
    ``handed_out`` replaces this process's record (tests).
    """
    seen = _HANDED_OUT if handed_out is None else handed_out
    for _ in range(_FREE_PORT_TRIES):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in seen:
            seen.add(port)
            return port
    raise RuntimeError(
        f"free_port: {_FREE_PORT_TRIES} binds to port 0 gave only ports this process handed "
        f"out before ({len(seen)} of them): the loopback ephemeral range is used up; "
        "stop processes that hold ports, or widen net.ipv4.ip_local_port_range"
    )


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
        self.private_shm_dir: Path | None = None
        if not _names_shm_dir(self.args, env):
            name = f"lmcache-proc-{uuid.uuid4().hex[:12]}"
            self.private_shm_dir = Path("/dev/shm") / name  # noqa: S108 - a directory of ours
            self.args += ["--shm-dir", str(self.private_shm_dir)]
            # also when this object goes away unstopped (a test that forgot it), or at exit
            weakref.finalize(self, shutil.rmtree, self.private_shm_dir, True)

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
        finally:
            self._drop_private_shm_dir()

    def kill(self) -> None:
        """SIGKILL and wait (the private shm directory goes with it; a named one stays)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._drop_private_shm_dir()

    def _drop_private_shm_dir(self) -> None:
        if self.private_shm_dir is not None and (self.proc is None or self.proc.poll() is not None):
            shutil.rmtree(self.private_shm_dir, ignore_errors=True)

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
        self._drop_private_shm_dir()


def _names_shm_dir(args: list[str], env: dict[str, str] | None) -> bool:
    flags = ("--shm-dir", "--shm_dir", "--config")
    given = any(a in flags or a.startswith(tuple(f + "=" for f in flags)) for a in args)
    environ = {**os.environ, **(env or {})}
    return given or "LMCACHE_SHM_DIR" in environ or "LMCACHE_CONFIG_FILE" in environ
