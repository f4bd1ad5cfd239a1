"""What makes an shm directory or segment trustworthy, and the errors that say why not.

Every refusal names the path, what is wrong and what to do. ``shm.ShmDirectory`` calls
these on open descriptors (``fstat``), never on names it would resolve again.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

DIR_MODE = 0o2770  # rwx for the owner and the group, setgid so segments inherit the group
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_REFUSE = "refusing to map it; remove it"


class SharedMemoryError(OSError):
    """A segment or shm directory that cannot be created, found, trusted or mapped."""


def describe(st: os.stat_result) -> str:
    return f"mode {stat.filemode(st.st_mode)}, owner uid {st.st_uid}, group {st.st_gid}"


def open_directory(path: Path, whose: str) -> int:
    """``path`` opened as a directory, never through a symbolic link."""
    try:
        return os.open(path, _DIR_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and path.is_symlink():
            raise SharedMemoryError(
                f"{whose} {path} is a symbolic link: refusing to use it (it could point "
                f"anywhere); remove it (rm {path}) and restart the cache server"
            ) from None
        if exc.errno == errno.ENOTDIR:
            raise SharedMemoryError(
                f"{whose} {path} exists and is not a directory; remove it or choose another shm_dir"
            ) from None
        if exc.errno == errno.ENOENT:
            raise SharedMemoryError(
                f"{whose} {path} does not exist here: the vLLM worker and the cache server "
                "must share /dev/shm (same host; in pods a hostPath /dev/shm)"
            ) from None
        if exc.errno == errno.EACCES:
            try:
                group = str(os.stat(path).st_gid)
            except OSError:
                group = "?"
            groups = sorted({os.getegid(), *os.getgroups()})
            raise SharedMemoryError(
                f"cannot open {whose} {path}: permission denied: this process (uid "
                f"{os.geteuid()}, groups {groups}) is not in its group {group}; run it with "
                "that group (pod securityContext supplementalGroups or fsGroup; the operator "
                "sets it)"
            ) from None
        raise SharedMemoryError(f"cannot open {whose} {path}: {exc.strerror}") from None


def make_directory(path: Path) -> bool:
    """mkdir 0700 (group and mode are set on the open directory); False if it exists."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return False
    except FileNotFoundError:
        raise SharedMemoryError(
            f"cannot create the shm directory {path}: {path.parent} does not exist; mount "
            "it (in pods: a hostPath volume of the host's /dev/shm) or fix shm_dir"
        ) from None
    except OSError as exc:
        raise SharedMemoryError(
            f"cannot create the shm directory {path}: {exc.strerror}; the server needs write "
            f"access to {path.parent}"
        ) from None
    return True


def give_group(fd: int, path: Path, gid: int) -> None:
    """A directory we just made: group ``gid``, mode 2770 (whatever the umask)."""
    try:
        if os.fstat(fd).st_gid != gid:
            os.fchown(fd, -1, gid)
        os.fchmod(fd, DIR_MODE)
    except OSError as exc:
        raise SharedMemoryError(
            f"cannot give the shm directory {path} the group {gid} (shm_group): "
            f"{exc.strerror}; run the server with that group (pod securityContext fsGroup or "
            "supplementalGroups) or leave shm_group unset"
        ) from None


def check_server_directory(fd: int, path: Path, gid: int) -> None:
    """The server's directory: ours or root's, group ``gid``, nothing for others.

    One we own gets mode 2770 again; one root made must already allow the group in.
    """
    st = os.fstat(fd)
    uid = os.geteuid()
    if st.st_uid not in (uid, 0):
        raise SharedMemoryError(
            f"the shm directory {path} is owned by uid {st.st_uid}, not by this server (uid "
            f"{uid}) or root: another user made it; remove it (rm -r {path}) or choose another "
            "shm_dir"
        )
    if st.st_gid != gid:
        raise SharedMemoryError(
            f"the shm directory {path} belongs to group {st.st_gid}, expected {gid} "
            f"(shm_group): remove it (rm -r {path}) so the server recreates it, or set "
            f"shm_group to {st.st_gid}"
        )
    if st.st_mode & 0o007:
        raise SharedMemoryError(
            f"the shm directory {path} is accessible to other users ({describe(st)}): any "
            f"local user could read or plant KV segments there; remove it (rm -r {path}) so "
            "the server recreates it with mode 2770"
        )
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid == uid and mode != DIR_MODE:
        os.fchmod(fd, DIR_MODE)
        log.info("adopted the shm directory %s: mode %o set to 2770", path, mode)
    elif st.st_uid != uid and mode & 0o2070 != 0o2070:
        raise SharedMemoryError(
            f"the shm directory {path} (owned by root) has mode {mode:o}; it needs 2770 "
            f"(group rwx, setgid): chmod 2770 {path}"
        )


def check_client_directory(fd: int, path: Path) -> None:
    """The directory a server named: our KV cache must not be readable by others there."""
    st = os.fstat(fd)
    if st.st_mode & 0o007:
        raise SharedMemoryError(
            f"the cache server's shm directory {path} is accessible to other users "
            f"({describe(st)}): refusing to put the KV cache there; remove it and restart "
            "the cache server (it recreates it with mode 2770)"
        )


def check_type(path: Path, st: os.stat_result) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise SharedMemoryError(f"shared memory {path} is a symbolic link: {_REFUSE}")
    if not stat.S_ISREG(st.st_mode):
        raise SharedMemoryError(
            f"shared memory {path} is not a regular file ({describe(st)}): {_REFUSE}"
        )


def check_segment(
    path: Path, st: os.stat_result, *, nbytes: int, gid: int, owner: int | None
) -> None:
    """An opened segment: a regular file, one link, group ``gid``, nothing for others,
    owned by ``owner`` (when given), exactly ``nbytes`` long."""
    check_type(path, st)
    if st.st_nlink != 1:
        raise SharedMemoryError(
            f"shared memory {path} has {st.st_nlink} hard links (another name shares its "
            f"memory): {_REFUSE}"
        )
    if st.st_gid != gid:
        raise SharedMemoryError(
            f"shared memory {path} belongs to group {st.st_gid}, expected {gid} (the group "
            f"of {path.parent}, shm_group): {_REFUSE}"
        )
    if st.st_mode & 0o007:
        raise SharedMemoryError(
            f"shared memory {path} is accessible to other users ({describe(st)}): {_REFUSE}"
        )
    if owner is not None and st.st_uid != owner:
        raise SharedMemoryError(
            f"shared memory {path} is owned by uid {st.st_uid}, expected {owner} (the "
            f"process that created it): {_REFUSE}"
        )
    if st.st_size != nbytes:
        raise SharedMemoryError(
            f"shared memory {path} has {st.st_size} bytes, expected {nbytes}: the "
            "registration does not describe this segment; refusing to map it"
        )
