"""``lmcache-node keys generate DIR``: CURVE keys for running the server by hand.

Writes ``server.key`` (the server's secret), ``server.pub``, ``client.key``, ``client.pub``
and ``clients.pub`` (the allowed client keys, for ``--curve-client-keys``) with mode 0600
for secrets. The operator makes the same files as Secrets for every LMCacheCluster.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lmcache_node.protocol.credentials import (
    CLIENT_PUBLIC_FILE,
    CLIENT_SECRET_FILE,
    SERVER_PUBLIC_FILE,
    generate_keypair,
)

SERVER_SECRET_FILE = "server.key"  # noqa: S105 - a file name
ALLOWED_CLIENTS_FILE = "clients.pub"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    generate = actions.add_parser("generate", help="write a server and a client keypair to DIR")
    generate.add_argument("directory", metavar="DIR", help="where to write the key files")
    generate.add_argument(
        "--force", action="store_true", help="overwrite key files that already exist"
    )


def _write(path: Path, text: bytes, mode: int, force: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_TRUNC if force else os.O_EXCL)
    fd = os.open(path, flags, mode)
    with os.fdopen(fd, "wb") as file:
        os.fchmod(file.fileno(), mode)
        file.write(text + b"\n")


def generate(directory: Path, *, force: bool = False) -> None:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    server_public, server_secret = generate_keypair()
    client_public, client_secret = generate_keypair()
    files = [
        (SERVER_SECRET_FILE, server_secret, 0o600),
        (SERVER_PUBLIC_FILE, server_public, 0o644),
        (CLIENT_SECRET_FILE, client_secret, 0o600),
        (CLIENT_PUBLIC_FILE, client_public, 0o644),
        (ALLOWED_CLIENTS_FILE, client_public, 0o644),
    ]
    for name, key, mode in files:
        _write(directory / name, key, mode, force)


def run(args: argparse.Namespace) -> int:
    directory = Path(args.directory)
    try:
        generate(directory, force=args.force)
    except FileExistsError as exc:
        print(
            f"lmcache-node keys: {exc.filename} exists; pass --force to replace the keys",
            file=sys.stderr,
        )
        return 2
    except OSError as exc:
        print(f"lmcache-node keys: cannot write keys to {directory}: {exc}", file=sys.stderr)
        return 1
    print(
        f"wrote CURVE keys to {directory}:\n"
        f"  server: lmcache-node serve --curve-server-key {directory / SERVER_SECRET_FILE} "
        f"--curve-client-keys {directory / ALLOWED_CLIENTS_FILE} ...\n"
        f"  vLLM:   LMCACHE_NODE_CREDENTIALS_DIR={directory} (reads {CLIENT_SECRET_FILE}, "
        f"{SERVER_PUBLIC_FILE})"
    )
    return 0
