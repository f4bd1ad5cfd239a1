"""``lmcache-node serve`` (also ``python -m lmcache_node.serve`` and ``python -m
lmcache_node.server``): flags and the run loop.

The one module that wires the ZMQ server and the HTTP API together, so it sits above both
(the import contracts in pyproject.toml: the HTTP API sees the server through
``lmcache_node.httpapi.view.NodeView`` only).

Flags follow LMCache's server (``--host --port --chunk-size --cpu-buffer-size
--max-workers``) plus ``--http-port --device --config`` and one flag per node config key
(dashes or underscores). Only flags the user gives override the config file and the
``LMCACHE_*`` environment.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from types import FrameType
from typing import Any

import yaml

from lmcache_node.config import ConfigError, NodeConfig, load_config
from lmcache_node.logs import setup_logging

log = logging.getLogger(__name__)

# LMCache's server flag names that differ from the config keys.
ALIASES: dict[str, list[str]] = {"max_local_cpu_size": ["--cpu-buffer-size", "--cpu_buffer_size"]}


def _flag_names(key: str) -> list[str]:
    names = [f"--{key.replace('_', '-')}"]
    if "_" in key:
        names.append(f"--{key}")
    return names + ALIASES.get(key, [])


def _mapping(text: str) -> dict[str, Any]:
    value = yaml.safe_load(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"expected a mapping such as '{{use_odirect: true}}', got {text!r}"
        )
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", default=None, help="YAML config file (else $LMCACHE_CONFIG_FILE)."
    )
    for key, field in NodeConfig.model_fields.items():
        help_text = f"{field.description} (config key {key})"
        annotation = field.annotation
        if annotation is bool:
            parser.add_argument(
                *_flag_names(key), dest=key, default=None, nargs="?", const="true",
                metavar="BOOL", help=help_text,
            )  # fmt: skip
        elif key == "extra_config":
            parser.add_argument(
                *_flag_names(key),
                dest=key,
                default=None,
                type=_mapping,
                metavar="YAML",
                help=help_text,
            )
        else:
            parser.add_argument(
                *_flag_names(key), dest=key, default=None, metavar="VALUE", help=help_text
            )


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    cli = {key: getattr(args, key, None) for key in NodeConfig.model_fields}
    return load_config(cli, config_file=args.config)


def run(args: argparse.Namespace) -> int:
    from lmcache_node.server.transport import (  # noqa: PLC0415 - keeps `--help` fast
        Transport,
        TransportSecurityError,
    )

    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"lmcache-node serve: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level)
    for warning in config.compat_warnings:  # LMCache keys and values this node ignores
        log.warning("config: %s", warning)
    try:  # before torch and the engine are loaded: a refusal is immediate
        transport = Transport.from_config(config)
    except TransportSecurityError as exc:
        print(f"lmcache-node serve: {exc}", file=sys.stderr)
        return 2
    from lmcache_node.devices import DeviceUnavailableError  # noqa: PLC0415
    from lmcache_node.httpapi import HttpApi  # noqa: PLC0415
    from lmcache_node.server.node_server import NodeServer  # noqa: PLC0415

    try:
        server = NodeServer(config, transport=transport)
    except DeviceUnavailableError as exc:
        print(f"lmcache-node serve: {exc}", file=sys.stderr)
        return 2
    http: HttpApi | None = None
    if config.http_port:  # first, so /healthz answers and /readyz says 503 while starting
        try:
            http = HttpApi.from_config(server, config)
        except ValueError as exc:  # the token file or http_host cannot be used
            print(f"lmcache-node serve: {exc}", file=sys.stderr)
            return 2
        try:
            http.start()
        except OSError as exc:
            print(f"lmcache-node serve: {exc}", file=sys.stderr)
            return 1
    try:
        server.start()
    except (OSError, ValueError) as exc:
        print(f"lmcache-node serve: {exc}", file=sys.stderr)
        if http is not None:
            http.stop()
        return 1

    def on_signal(signum: int, _: FrameType | None) -> None:
        log.info("received %s", signal.Signals(signum).name)
        server.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not server.wait(0.5):
        pass
    if http is not None:
        http.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lmcache_node.serve", description="Run the lmcache-node cache server."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
