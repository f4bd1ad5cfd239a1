"""`lmcache-node`: the cache node's command line (serve, standalone, bench, keys, pool, vllm,
router)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Protocol, cast

from lmcache_node import __version__


class _Command(Protocol):
    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...
    def run(self, args: argparse.Namespace) -> int: ...


# subcommand -> (module providing add_arguments/run, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("lmcache_node.serve", "run the cache server (ZMQ + HTTP)"),
    "standalone": ("lmcache_node.standalone", "start the engine without vLLM or a GPU"),
    "bench": ("lmcache_node.bench.runner", "measure the engine against memcpy"),
    "keys": ("lmcache_node.keygen", "generate CURVE keys for the server and its clients"),
    "vllm": (
        "lmcache_node.vllm.launcher",
        "start `vllm serve ARGS`, with the cache when ENABLE_LMCACHE=1 (Dynamo style)",
    ),
    "router": (
        "lmcache_node.router.cli",
        "route OpenAI requests to the vLLM replica whose node cache holds their prefix",
    ),
    "pool": ("lmcache_node.poolcli", "show or remove the L1 pool a server keeps in shm_dir"),
}
# Commands that take everything after their name as their own arguments: dispatched before
# the parser is built, so they need none of the other commands' dependencies (the launcher
# runs in vLLM images, which lack the server's).
PASS_THROUGH = ("vllm",)


def _load(module: str) -> _Command:
    return cast(_Command, importlib.import_module(module))


def build_parser(
    load: Callable[[str], _Command] = _load,
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmcache-node",
        description="Per-node KV cache server for vLLM.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        load(module).add_arguments(command_parser)
        command_parser.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    if given and given[0] in PASS_THROUGH:  # the launcher: vLLM's own arguments, untouched
        module, _ = COMMANDS[given[0]]
        return _load(module).run(argparse.Namespace(vllm_args=given[1:]))
    try:
        parser = build_parser()
        args = parser.parse_args(given)
        if args.command is None:
            parser.print_help()
            return 2
        return _load(args._module).run(args)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] == "lmcache_node":
            raise
        # `pip install lmcache-k8s` is the vLLM connector only; the server is an extra.
        print(
            f"lmcache-node: the module {exc.name!r} is missing: the cache server needs its "
            "dependencies, install them with: pip install 'lmcache-k8s[node]'",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
