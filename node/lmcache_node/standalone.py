"""The standalone starter: the engine without vLLM or a GPU (``python -m lmcache_node.standalone``).

Allocates KV buffers of the configured shapes on the device, proves a store/retrieve round
trip through the engine, logs what it runs with and serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch
from aiohttp import web

from lmcache_node.config import ConfigError, NodeConfig, load_config
from lmcache_node.engine import CacheEngine, build_engine
from lmcache_node.engine.memory import as_bytes
from lmcache_node.keys import KeyNamespace, chunk_keys
from lmcache_node.kvspec import KV_DTYPES, LayerGroup
from lmcache_node.logs import setup_logging
from lmcache_node.sizes import format_bytes

log = logging.getLogger("lmcache_node.standalone")

_FLAGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--model_name", {"help": "model name (key namespace)"}),
    ("--worker_id", {"type": int, "help": "worker rank (default 0)"}),
    ("--world_size", {"type": int, "help": "number of workers (default 1)"}),
    ("--kv_dtype", {"choices": sorted(KV_DTYPES), "help": "KV dtype (default float16)"}),
    ("--kv_shape", {"help": "num_layers,2,chunk_size,num_kv_heads,head_size (2,2,256,4,16)"}),
    ("--kvcache_shape_spec", {"help": '"(2,2,256,4,16):float16:2;(3,2,256,4,4):float32:3"'}),
    ("--device", {"choices": ["cpu", "cuda", "xpu"], "help": "device of the buffers (cpu)"}),
    ("--fmt", {"choices": ["vllm"], "help": "KV layout family (vllm)"}),
    ("--chunk_size", {"type": int, "help": "tokens per chunk (256)"}),
    ("--max_local_cpu_size", {"help": "L1 size in GB or a quantity like 4Gi (5.0)"}),
)


class StartupError(RuntimeError):
    """The starter cannot run with what it was given."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (else LMCACHE_CONFIG_FILE)")
    for flag, options in _FLAGS:
        parser.add_argument(flag, flag.replace("_", "-"), dest=flag[2:], **options)
    parser.add_argument("--use_mla", "--use-mla", action="store_true", default=None)
    parser.add_argument(
        "--internal_api_server_enabled",
        "--internal-api-server-enabled",
        action="store_true",
        default=None,
        help="serve /healthz and /stats on internal_api_server_port_start",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="any config key")


def parse_overrides(items: Sequence[str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"Override {item!r} is not key=value (e.g. chunk_size=128)")
        values[key.strip().replace("-", "_")] = value
    return values


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    cli: dict[str, Any] = {name[2:]: getattr(args, name[2:]) for name, _ in _FLAGS}
    cli["use_mla"] = args.use_mla
    cli["internal_api_server_enabled"] = args.internal_api_server_enabled
    cli.update(parse_overrides(args.overrides))
    if args.config is not None and not args.config.strip():
        raise ConfigError(
            "No config file specified: --config was given an empty name; pass a YAML file "
            "or drop the flag"
        )
    return load_config(cli, config_file=args.config or None)


def check_device(device: str) -> torch.device:
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "xpu": hasattr(torch, "xpu") and torch.xpu.is_available(),
    }
    if not available.get(device, False):
        raise StartupError(
            f"Device not available: {device!r} is not usable by this PyTorch build or machine; "
            "use --device cpu (the CPU fallback) or run where the device exists"
        )
    return torch.device(device)


def check_chunk_tokens(groups: Sequence[LayerGroup], chunk_size: int) -> None:
    for group in groups:
        if len(group.shape) != 5 or group.shape[2] != chunk_size:
            raise StartupError(
                f"Invalid KV shape specification: layer group {group.describe()} must be "
                f"(num_layers,2,chunk_size,num_kv_heads,head_size) with chunk_size {chunk_size} "
                "in the third place, for example (2,2,256,4,16):float16:2"
            )


@dataclass
class StandaloneNode:
    config: NodeConfig
    engine: CacheEngine
    buffers: list[torch.Tensor]

    def self_test(self) -> int:
        """Store every buffer as one chunk and read it back byte-exact; returns bytes moved."""
        moved = 0
        for index, buffer in enumerate(self.buffers):
            namespace = KeyNamespace(
                model_name=self.config.model_name,
                world_size=self.config.world_size,
                worker_id=self.config.worker_id,
                kv_dtype=str(buffer.dtype).removeprefix("torch."),
                layout=f"{self.config.fmt}-standalone-{buffer.device.type}-group{index}",
            )
            tokens = list(range(self.config.chunk_size))
            (key,) = chunk_keys(tokens, self.config.chunk_size, namespace)
            staged = buffer.to("cpu").contiguous()
            self.engine.put(key, staged)
            back = torch.empty_like(staged)
            if not self.engine.get(key, back) or not torch.equal(as_bytes(back), as_bytes(staged)):
                raise StartupError(f"round trip of layer group {index} did not return its bytes")
            moved += staged.numel() * staged.element_size()
        return moved


def start(config: NodeConfig) -> StandaloneNode:
    device = check_device(config.device)
    groups = config.layer_groups()
    check_chunk_tokens(groups, config.chunk_size)
    generator = torch.Generator().manual_seed(0)
    buffers = []
    for group in groups:
        data = torch.randn(group.shape, generator=generator).to(group.dtype)
        buffers.append(data.to(device))
    engine = build_engine(config)
    log.info(
        "Standalone node: model=%s worker_id=%d world_size=%d device=%s chunk_size=%d "
        "L1=%s groups=%d",
        config.model_name,
        config.worker_id,
        config.world_size,
        config.device,
        config.chunk_size,
        format_bytes(engine.pool.capacity_bytes),
        len(groups),
    )
    for index, group in enumerate(groups):
        log.debug(
            "layer group %d: shape=%s dtype=%s layers=%d bytes/chunk=%d",
            index,
            group.shape,
            group.dtype_name,
            group.num_layers,
            group.bytes_per_layer,
        )
    return StandaloneNode(config=config, engine=engine, buffers=buffers)


def _serve_http(node: StandaloneNode, stop: threading.Event) -> None:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def stats(_: web.Request) -> web.Response:
        return web.json_response(vars(node.engine.stats()))

    async def main() -> None:
        app = web.Application()
        app.add_routes([web.get("/healthz", healthz), web.get("/stats", stats)])
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", node.config.internal_api_server_port_start)
        await site.start()
        log.info("internal API on http://127.0.0.1:%d", node.config.internal_api_server_port_start)
        while not stop.is_set():
            await asyncio.sleep(0.2)
        await runner.cleanup()

    asyncio.run(main())


def serve_forever(node: StandaloneNode) -> None:
    stop = threading.Event()

    def on_signal(signum: int, _: FrameType | None) -> None:
        log.info("received signal %d, stopping", signum)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    http: threading.Thread | None = None
    if node.config.internal_api_server_enabled:
        http = threading.Thread(target=_serve_http, args=(node, stop), daemon=True)
        http.start()
    log.info("Standalone node ready; press Ctrl-C to stop")
    while not stop.wait(1.0):
        node.engine.expire_locks()
    if http is not None:
        http.join(timeout=5)
    log.info("Standalone node stopped")


def run(args: argparse.Namespace) -> int:
    setup_logging()
    try:
        config = config_from_args(args)
        setup_logging(config.log_level if "LMCACHE_LOG_LEVEL" not in os.environ else None)
        for warning in config.compat_warnings:  # LMCache keys and values this node ignores
            log.warning("config: %s", warning)
        node = start(config)
        moved = node.self_test()
    except (ConfigError, StartupError) as exc:
        print(f"lmcache-node standalone: {exc}", file=sys.stderr)
        return 2
    log.info("self-test: stored and retrieved %s byte-exact", format_bytes(moved))
    serve_forever(node)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lmcache_node.standalone", description=__doc__.splitlines()[0]
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
