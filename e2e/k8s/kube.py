"""kubectl/helm calls, bounded waits and a timing recorder for the end-to-end suite."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmcache_node.server.process import free_port

from tests.support import wait_until


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body); status 0 when the connection failed."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as exc:
        return 0, str(exc)


@dataclass
class Kube:
    """kubectl and helm against one cluster (KUBECONFIG), binaries on PATH."""

    kubeconfig: str

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": self.kubeconfig}

    def run(
        self, *args: str, stdin: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            list(args),
            input=stdin,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} failed ({result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-2000:]}"
            )
        return result

    def kubectl(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.run("kubectl", *args, **kwargs)

    def helm(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.run("helm", *args, **kwargs)

    def apply(self, obj: dict[str, Any]) -> None:
        self.kubectl("apply", "--server-side", "-f", "-", stdin=json.dumps(obj))

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        args = ["get", kind, name, "-o", "json"] + (["-n", namespace] if namespace else [])
        result = self.kubectl(*args, check=False)
        if result.returncode != 0:
            if "NotFound" in result.stderr or "not found" in result.stderr:
                return None
            raise AssertionError(result.stderr)
        data: dict[str, Any] = json.loads(result.stdout)
        return data

    def items(
        self, kind: str, namespace: str | None = None, selector: str | None = None
    ) -> list[dict[str, Any]]:
        args = ["get", kind, "-o", "json"]
        args += ["-n", namespace] if namespace else ["-A"]
        if selector:
            args += ["-l", selector]
        result = self.kubectl(*args, check=False)
        if result.returncode != 0:
            if "the server doesn't have a resource type" in result.stderr:
                return []
            raise AssertionError(result.stderr)
        items: list[dict[str, Any]] = json.loads(result.stdout)["items"]
        return items

    def can_i(self, service_account: str, verb: str, resource: str, *extra: str) -> bool:
        """`kubectl auth can-i` as a ServiceAccount ("ns:name"). ``resource/sub`` asks about
        the subresource (can-i itself would read it as TYPE/NAME: an object named ``sub``)."""
        resource, _, subresource = resource.partition("/")
        if subresource:
            extra = (f"--subresource={subresource}", *extra)
        result = self.kubectl(
            "auth",
            "can-i",
            verb,
            resource,
            f"--as=system:serviceaccount:{service_account}",
            *extra,
            check=False,
        )
        answer = result.stdout.strip()
        if answer not in ("yes", "no"):
            raise AssertionError(f"kubectl auth can-i {verb} {resource}: {result.stderr.strip()}")
        return answer == "yes"

    @contextmanager
    def watch_values(
        self, kind: str, name: str, namespace: str, jsonpath: str
    ) -> Iterator[list[str]]:
        """``kubectl get -w``: every value ``jsonpath`` takes on the object, changes only.

        A watch sees each version the API server stores, so a state that lasts less than a
        polling interval (or that passes while the test is busy) is still recorded.
        """
        process = subprocess.Popen(
            ["kubectl", "get", kind, name, "-n", namespace, "-w",
             "-o", f"jsonpath={jsonpath}{{\"\\n\"}}"],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        values: list[str] = []

        def read() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                value = line.strip()
                if not values or values[-1] != value:
                    values.append(value)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            wait_until(lambda: bool(values), 30, f"the first {kind}/{name} event", interval=0.5)
            yield values
        finally:
            process.terminate()
            process.wait(timeout=10)
            reader.join(timeout=10)

    @contextmanager
    def port_forward(self, namespace: str, target: str, port: int) -> Iterator[str]:
        """``kubectl port-forward`` to ``target`` (pod/x, svc/x): yields http://127.0.0.1:<p>."""
        local = free_port()
        process = subprocess.Popen(
            ["kubectl", "port-forward", "-n", namespace, target, f"{local}:{port}",
             "--address", "127.0.0.1"],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:

            def listening() -> bool:
                if process.poll() is not None:
                    _, err = process.communicate()
                    raise AssertionError(f"kubectl port-forward {target} exited: {err.strip()}")
                try:
                    socket.create_connection(("127.0.0.1", local), timeout=1).close()
                except OSError:
                    return False
                return True

            wait_until(listening, 30, f"kubectl port-forward {target} {local}:{port}", interval=0.5)
            yield f"http://127.0.0.1:{local}"
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class Timings:
    """Named durations, appended as JSON lines to $E2E_TIMINGS (run.sh prints the table)."""

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        self.values: dict[str, float] = {}

    def record(self, name: str, seconds: float) -> None:
        self.values[name] = seconds
        print(f"e2e timing: {name}: {seconds:.2f}s")
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps({"name": name, "seconds": round(seconds, 3)}) + "\n")
