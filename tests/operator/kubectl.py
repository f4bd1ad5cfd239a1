"""Test helpers for the real API server: kubectl calls, bounded waits, watch recorders."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support import wait_until


@dataclass
class Cluster:
    """A running local cluster (../shared/k8s/up.sh)."""

    kubeconfig: Path
    bin_dir: Path
    directory: Path

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    def kubectl(
        self, *args: str, stdin: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["kubectl", *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        args = ["get", kind, name, "-o", "json"]
        if namespace:
            args += ["-n", namespace]
        result = self.kubectl(*args, check=False)
        if result.returncode != 0:
            if "NotFound" in result.stderr:
                return None
            raise AssertionError(result.stderr)
        data: dict[str, Any] = json.loads(result.stdout)
        return data

    def items(self, kind: str, namespace: str, selector: str | None = None) -> list[Any]:
        args = ["get", kind, "-n", namespace, "-o", "json"]
        if selector:
            args += ["-l", selector]
        items: list[Any] = json.loads(self.kubectl(*args).stdout)["items"]
        return items

    def apply(
        self, manifest: str, namespace: str, *, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self.kubectl("apply", "-n", namespace, "-f", "-", stdin=manifest, check=check)


class _Watch:
    """A ``kubectl get ... -w`` process whose output lines go to ``on_line`` on a thread."""

    def __init__(self, cluster: Cluster, args: list[str], on_line: Callable[[str], None]):
        self._proc = subprocess.Popen(
            ["kubectl", "get", *args, "-w"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=cluster.env,
        )  # fmt: skip
        self._on_line = on_line
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for raw in self._proc.stdout:
            self._on_line(raw)

    def stop(self) -> None:
        self._proc.terminate()
        self._proc.wait(timeout=10)


@dataclass
class StatusRecorder:
    """Every status the API server reports for one LMCacheCluster, through a watch."""

    cluster: Cluster
    namespace: str
    name: str
    seen: list[dict[str, Any]] = field(default_factory=list)
    _watch: _Watch | None = None

    def __enter__(self) -> StatusRecorder:
        args = ["lmcc", self.name, "-n", self.namespace, "-o", 'jsonpath={.status}{"\\n"}']
        self._watch = _Watch(self.cluster, args, self._line)
        return self

    def _line(self, raw: str) -> None:
        text = raw.strip()
        if text:
            self.seen.append(json.loads(text))

    def __exit__(self, *exc: object) -> None:
        if self._watch is not None:
            self._watch.stop()

    def phases(self) -> list[str]:
        return [s.get("phase", "") for s in self.seen]

    def wait(
        self, what: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30
    ) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            return next((s for s in reversed(self.seen) if predicate(s)), None)

        return wait_until(probe, timeout, what)


@dataclass
class ConfigMapRecorder:
    """Every value one key of a ConfigMap had, in order, through a watch (a value that held
    only between two polls is seen too)."""

    cluster: Cluster
    namespace: str
    name: str
    key: str
    seen: list[str] = field(default_factory=list)
    _lines: list[str] = field(default_factory=list)
    _watch: _Watch | None = None

    END = "--end-of-value--"  # a line of its own after each value (values span lines)

    def __enter__(self) -> ConfigMapRecorder:
        path = self.key.replace(".", "\\.")
        template = f'{{.data.{path}}}{{"\\n{self.END}\\n"}}'
        args = ["configmap", self.name, "-n", self.namespace, "-o", f"jsonpath={template}"]
        self._watch = _Watch(self.cluster, args, self._line)
        return self

    def _line(self, raw: str) -> None:
        text = raw.rstrip("\n")
        if text == self.END:
            self.seen.append("\n".join(self._lines))
            self._lines = []
        else:
            self._lines.append(text)

    def __exit__(self, *exc: object) -> None:
        if self._watch is not None:
            self._watch.stop()


@dataclass
class PodRecorder:
    """Every watch event of the pods matching ``selector``: (type, name, node, Ready,
    terminating, the cache-rollout annotation), in order."""

    cluster: Cluster
    namespace: str
    selector: str
    seen: list[tuple[str, str, str, bool, bool, str]] = field(default_factory=list)
    _watch: _Watch | None = None

    # "|"-separated: kubectl's watch output goes through a tabwriter, which turns tabs into
    # spaces; no name, node, timestamp or rollout mark holds a "|"
    TEMPLATE = (
        '{.type}{"|"}{.object.metadata.name}{"|"}{.object.spec.nodeName}{"|"}'
        '{.object.status.conditions[?(@.type=="Ready")].status}{"|"}'
        '{.object.metadata.deletionTimestamp}{"|"}'
        '{.object.metadata.annotations.lmcache\\.dev/cache-rollout}{"\\n"}'
    )

    def __enter__(self) -> PodRecorder:
        args = ["pods", "-n", self.namespace, "-l", self.selector, "--output-watch-events",
                "-o", f"jsonpath={self.TEMPLATE}"]  # fmt: skip
        self._watch = _Watch(self.cluster, args, self._line)
        return self

    def _line(self, raw: str) -> None:
        parts = raw.rstrip("\n").split("|", 5)
        if len(parts) == 6:
            kind, name, node, ready, deleting, mark = parts
            self.seen.append((kind, name, node, ready == "True", bool(deleting), mark))

    def __exit__(self, *exc: object) -> None:
        if self._watch is not None:
            self._watch.stop()

    def listed(self, count: int, timeout: float = 30) -> None:
        """Wait until the watch has reported ``count`` pods (its initial list)."""
        wait_until(
            lambda: len({name for _, name, *_ in self.seen}) >= count,
            timeout,
            f"the pod watch listing {count} pods",
        )

    def ready_pods(self, names_not_in: set[str]) -> set[str]:
        """Pods (not named in ``names_not_in``) the watch has seen Ready."""
        return {name for _, name, _, ready, _, _ in self.seen if ready} - names_not_in
