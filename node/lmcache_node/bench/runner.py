"""`lmcache-node bench`: run the bench sections and print one JSON object."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import platform
import sys
import time
from collections.abc import Callable
from typing import cast

import torch

from lmcache_node import __version__
from lmcache_node.bench.common import BenchUnavailableError

log = logging.getLogger(__name__)

Section = Callable[[bool], dict[str, float | int | bool | str]]

# name -> (module, function); sections owned by later issues join this table.
SECTIONS: dict[str, tuple[str, str]] = {
    "engine": ("lmcache_node.bench.engine", "run_engine_bench"),
    "server": ("lmcache_node.bench.server", "run_server_bench"),
    "disk": ("lmcache_node.bench.disk", "run_disk_bench"),
    "gpu": ("lmcache_node.bench.gpu", "run_gpu_bench"),
    "restart": ("lmcache_node.bench.restart", "run_restart_bench"),
}
CPU_SECTIONS = ("engine", "server", "disk", "restart")  # the default on --device cpu


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    parser.add_argument("--quick", action="store_true", help="short runs (smoke test)")
    parser.add_argument(
        "--sections",
        default=None,
        help=(
            f"comma-separated sections to run (known: {','.join(SECTIONS)}; default: "
            f"{','.join(CPU_SECTIONS)}, or gpu with --device cuda)"
        ),
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: the CUDA IPC path against the GPU's D2H/H2D copy limit (the gpu section)",
    )


def _load(name: str) -> Section | None:
    module_name, function = SECTIONS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        return None
    return cast(Section, getattr(module, function))


def run(args: argparse.Namespace) -> int:
    default = "gpu" if args.device == "cuda" else ",".join(CPU_SECTIONS)
    names = [n.strip() for n in (args.sections or default).split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        print(f"unknown bench section(s) {unknown}; known: {list(SECTIONS)}", file=sys.stderr)
        return 2
    result: dict[str, object] = {
        "version": __version__,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpus": torch.get_num_threads(),
    }
    started = time.perf_counter()
    for name in names:
        section = _load(name)
        if section is None:
            result[f"{name}_skipped"] = "not built yet"
            continue
        if not args.json:
            print(f"running bench section {name} ...", file=sys.stderr)
        try:
            figures = section(args.quick)
        except BenchUnavailableError as exc:
            print(f"lmcache-node bench: section {name}: {exc}", file=sys.stderr)
            return 2
        for key, value in figures.items():
            if key in result and key == "memcpy_gbps":
                result[f"{name}_memcpy_gbps"] = value  # each section's own same-run limit
                continue
            result[key] = value
    result["bench_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, sort_keys=False))
    return 0
