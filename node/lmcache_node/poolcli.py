"""`lmcache-node pool`: show or remove the L1 pool a cache server keeps in its shm directory.

    lmcache-node pool show --shm-dir DIR
    lmcache-node pool remove --shm-dir DIR [--wait-s SECONDS] [--keep-dir]

``remove`` is what a cleanup job runs when a cache cluster is deleted (a server's own exit
never removes the pool: a rollout's SIGTERM must keep it). It waits until no live server
holds the pool, removes it, removes the segments no live process holds, then the directory
when that left it empty. It refuses a directory open to other users and a file under the
pool's name that is not a pool. Each prints one JSON object. Exit status: 0 done (also
when there was nothing to remove), 1 a live server still holds the pool, 2 refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from lmcache_node.engine.journal import (
    HEADER_BYTES,
    IncompatiblePoolError,
    PoolJournal,
    foreign_header,
    read_header,
)
from lmcache_node.transfer.shm import ShmDirectory
from lmcache_node.transfer.shm_checks import SharedMemoryError
from lmcache_node.transfer.shm_pool import POOL_NAME, PoolBusyError, is_held, remove_pool

DEFAULT_WAIT_S = 60.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = sub.add_parser("show", help="describe the pool (read only)")
    remove = sub.add_parser("remove", help="remove the pool once no live server holds it")
    for action in (show, remove):
        action.add_argument(
            "--shm-dir", required=True, help="the cache server's shm_dir (absolute path)"
        )
    remove.add_argument(
        "--wait-s",
        type=float,
        default=DEFAULT_WAIT_S,
        help=f"how long to wait for a live server to exit (default {DEFAULT_WAIT_S:g})",
    )
    remove.add_argument(
        "--keep-dir", action="store_true", help="keep the directory even when it is empty"
    )


def run(args: argparse.Namespace) -> int:
    path = Path(args.shm_dir)
    if not path.is_absolute():
        return _fail(args.action, f"--shm-dir must be an absolute path, got {args.shm_dir!r}")
    if not path.exists():
        _print({"shm_dir": str(path), "exists": False})
        return 0
    try:
        directory = ShmDirectory.attach(path)
    except SharedMemoryError as exc:
        return _fail(args.action, str(exc))
    try:
        return _show(directory) if args.action == "show" else _remove(directory, args)
    finally:
        directory.close()


def _show(directory: ShmDirectory) -> int:
    report: dict[str, object] = {"shm_dir": str(directory.path), "pool": POOL_NAME}
    try:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(POOL_NAME, flags, dir_fd=directory.fileno())
    except FileNotFoundError:
        _print({**report, "exists": False})
        return 0
    except OSError as exc:
        return _fail("show", f"cannot open {directory.path / POOL_NAME}: {exc.strerror}")
    try:
        report.update(exists=True, bytes=os.fstat(fd).st_size, held=is_held(fd))
        try:
            geometry = read_header(os.pread(fd, HEADER_BYTES, 0))
        except IncompatiblePoolError as exc:
            report["adoptable"] = str(exc)
            _print(report)
            return 0
        # a private copy of the index: reading never writes the pool
        index = bytearray(os.pread(fd, geometry.data_offset, 0))
        scan = PoolJournal(torch.frombuffer(index, dtype=torch.uint8), geometry).scan()
    finally:
        os.close(fd)
    report.update(
        page_size=geometry.page_size,
        pages=geometry.num_pages,
        chunk_size=geometry.chunk_size,
        key_namespace=geometry.namespace,
        entries=len(scan.entries),
        entry_bytes=sum(e.nbytes for e in scan.entries),
        damaged_records=scan.dropped,
    )
    _print(report)
    return 0


def _remove(directory: ShmDirectory, args: argparse.Namespace) -> int:
    try:
        removed = remove_pool(directory, wait_s=args.wait_s, not_a_pool=foreign_header)
    except PoolBusyError as exc:
        print(f"lmcache-node pool remove: {exc}; stop it first", file=sys.stderr)
        return 1
    except SharedMemoryError as exc:
        return _fail("remove", f"{exc}: refusing to remove it")
    swept = directory.sweep(min_age_s=0)
    directory_removed = False
    if not args.keep_dir:
        try:
            os.rmdir(directory.path)
            directory_removed = True
        except OSError:
            pass  # segments of live processes are still there: theirs to remove
    _print(
        {
            "shm_dir": str(directory.path),
            "pool_removed": removed,
            "segments_removed": len(swept),
            "directory_removed": directory_removed,
        }
    )
    return 0


def _fail(action: str, message: str) -> int:
    print(f"lmcache-node pool {action}: {message}", file=sys.stderr)
    return 2


def _print(report: dict[str, object]) -> None:
    print(json.dumps(report))
