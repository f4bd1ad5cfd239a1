"""Shm isolation: what a segment or directory must be before we map or use it.

Real files only. The test machine runs as root, so files of other owners and groups are
made with ``os.chown``, and processes of other users are real child processes that import
what they need as root (the interpreter lives under /root), then drop to another uid, gid
and group list (``setgroups``, ``setgid``, ``setuid``) before touching the directory.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from lmcache_node.transfer.shm import SharedMemoryError, ShmDirectory, new_segment_name

OTHER_UID = 54321  # a user that exists nowhere: neither the owner nor in any group
OTHER_GID = 54322
CLUSTER_GID = 54323

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="makes files of other users"),
]


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_created_segments_are_0660_and_the_directory_2770(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        directory = ShmDirectory.prepare(tmp_path / "shm", group=CLUSTER_GID)
        segment = directory.create("kv", 64)
    finally:
        os.umask(previous)
    assert mode_of(directory.path) == 0o2770
    assert os.stat(directory.path).st_gid == CLUSTER_GID
    info = os.stat(directory.path / segment.name)
    assert stat.S_IMODE(info.st_mode) == 0o660
    assert (info.st_uid, info.st_gid, info.st_size) == (os.geteuid(), CLUSTER_GID, 64)
    assert directory.map(segment.name, 64, owner=os.geteuid()).sum().item() == 0


def test_symlink_named_like_a_segment_is_refused_and_not_followed(
    shm_dir: ShmDirectory, tmp_path: Path
) -> None:
    target = tmp_path / "someone-elses-memory"
    target.write_bytes(b"secret" * 10 + b"1234")  # 64 bytes, right group, right mode
    os.chown(target, -1, shm_dir.gid)
    os.chmod(target, 0o660)
    name = new_segment_name("kv")
    os.symlink(target, shm_dir.path / name)
    with pytest.raises(SharedMemoryError, match="is a symbolic link: refusing to map it"):
        shm_dir.map(name, 64)
    assert shm_dir.sweep(min_age_s=0) == [name]  # the link goes, never what it points to
    assert target.read_bytes() == b"secret" * 10 + b"1234"


def test_fifo_named_like_a_segment_is_refused_without_blocking(shm_dir: ShmDirectory) -> None:
    name = new_segment_name("kv")
    os.mkfifo(shm_dir.path / name, 0o660)
    with pytest.raises(SharedMemoryError, match="not a regular file"):
        shm_dir.map(name, 64)
    assert shm_dir.unlink_if_unheld(name)


def test_segment_of_another_group_is_refused(shm_dir: ShmDirectory) -> None:
    segment = shm_dir.create("kv", 64)
    os.chown(shm_dir.path / segment.name, -1, OTHER_GID)
    expected = f"belongs to group {OTHER_GID}, expected {shm_dir.gid}"
    with pytest.raises(SharedMemoryError, match=expected):
        shm_dir.map(segment.name, 64)


@pytest.mark.parametrize("nbytes", [32, 128])
def test_segment_of_another_size_is_refused(shm_dir: ShmDirectory, nbytes: int) -> None:
    segment = shm_dir.create("kv", 64)
    with pytest.raises(SharedMemoryError, match=f"has 64 bytes, expected {nbytes}"):
        shm_dir.map(segment.name, nbytes)
    assert os.stat(shm_dir.path / segment.name).st_size == 64  # never grown


def test_hard_linked_segment_is_refused(shm_dir: ShmDirectory) -> None:
    segment = shm_dir.create("kv", 64)
    second = new_segment_name("kv")
    os.link(shm_dir.path / segment.name, shm_dir.path / second)
    for name in (segment.name, second):
        with pytest.raises(SharedMemoryError, match="has 2 hard links"):
            shm_dir.map(name, 64)


def test_segment_open_to_others_is_refused(shm_dir: ShmDirectory) -> None:
    segment = shm_dir.create("kv", 64)
    os.chmod(shm_dir.path / segment.name, 0o664)
    with pytest.raises(SharedMemoryError, match="accessible to other users"):
        shm_dir.map(segment.name, 64)


def test_segment_of_another_owner_is_refused_where_the_owner_is_known(
    shm_dir: ShmDirectory,
) -> None:
    segment = shm_dir.create("staging", 64)
    assert shm_dir.map(segment.name, 64, owner=os.geteuid()).numel() == 64
    os.chown(shm_dir.path / segment.name, OTHER_UID, -1)
    with pytest.raises(SharedMemoryError, match=f"owned by uid {OTHER_UID}, expected"):
        shm_dir.map(segment.name, 64, owner=os.geteuid())
    assert shm_dir.map(segment.name, 64).numel() == 64  # a client's: any group member


@pytest.mark.parametrize(
    "name",
    [
        "../{name}",
        "{name}/x",
        "sub/{name}",
        "..",
        "",
        "torch_123",
        "lmcache-node-kv-1-0123456789ABCDEF",
        "lmcache-node-kv-1-0123456789abcdef\n",
        "lmcache-node-other-1-0123456789abcdef",
    ],
)
def test_names_outside_the_pattern_are_refused_before_any_file_access(
    tmp_path: Path, name: str
) -> None:
    owner = ShmDirectory.prepare(tmp_path / "a")
    other = ShmDirectory.prepare(tmp_path / "b")
    segment = owner.create("kv", 64)
    # "../a/<segment>" from b resolves to a valid segment: refused all the same
    bad = name.format(name=f"../a/{segment.name}" if name.startswith("..") else segment.name)
    with pytest.raises(SharedMemoryError, match="is refused: names look like"):
        other.map(bad, 64)
    assert other.unlink(bad) is False
    assert other.unlink_if_unheld(bad) is False
    assert (owner.path / segment.name).exists()


def run_as(uid: int, gid: int, groups: list[int], imports: str, body: str, *args: str) -> str:
    """Run ``body`` in a child process as ``uid``/``gid``/``groups``; its stdout (stderr
    appended after a line ``--- stderr``)."""
    script = "\n".join(
        [
            imports,
            "import os, sys",
            f"os.setgroups({groups!r}); os.setgid({gid}); os.setuid({uid})",
            "assert os.getuid() != 0 and os.geteuid() != 0",
            textwrap.dedent(body),
        ]
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return done.stdout + "--- stderr\n" + done.stderr


OPEN_EACH = """
for path in sys.argv[1:]:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        print(os.strerror(exc.errno))
    else:
        print("opened", len(os.read(fd, 64)) if os.path.isfile(path) else "dir")
        os.close(fd)
"""


def open_as(uid: int, gid: int, groups: list[int], *paths: Path) -> list[str]:
    out = run_as(uid, gid, groups, "", OPEN_EACH, *map(str, paths))
    return out.split("--- stderr")[0].splitlines()


def test_a_process_outside_the_group_cannot_open_a_segment(dev_shm_path: Path) -> None:
    directory = ShmDirectory.prepare(dev_shm_path, group=CLUSTER_GID)
    segment = directory.create("kv", 64)
    path = directory.path / segment.name
    denied = os.strerror(13)  # EACCES
    # another cluster's pod: its own group, not ours
    assert open_as(OTHER_UID, OTHER_GID, [], path, directory.path) == [denied, denied]
    # the same user given the cluster's group (fsGroup / supplementalGroups) gets in
    assert open_as(OTHER_UID, OTHER_GID, [CLUSTER_GID], path, directory.path) == [
        "opened 64",
        "opened dir",
    ]


# --- the server's directory ---
def test_a_symlinked_directory_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "elsewhere"
    real.mkdir(mode=0o700)
    link = tmp_path / "shm"
    link.symlink_to(real)
    for use in (ShmDirectory.prepare, ShmDirectory.attach):
        with pytest.raises(SharedMemoryError, match=f"{link} is a symbolic link"):
            use(link)
    assert mode_of(real) == 0o700 and os.listdir(real) == []


@pytest.mark.parametrize("mode", [0o2777, 0o2771, 0o1777, 0o755])
def test_a_directory_open_to_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "shm"
    path.mkdir()
    os.chmod(path, mode)
    for use in (ShmDirectory.prepare, ShmDirectory.attach):
        with pytest.raises(SharedMemoryError, match=r"accessible to other users.*remove it"):
            use(path)
    assert mode_of(path) == mode  # refused, not silently "fixed"


def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "shm"
    path.mkdir(mode=0o770)
    os.chown(path, OTHER_UID, -1)
    with pytest.raises(SharedMemoryError, match=f"owned by uid {OTHER_UID}, not by this server"):
        ShmDirectory.prepare(path)


def test_a_directory_of_another_group_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "shm"
    ShmDirectory.prepare(path, group=OTHER_GID).close()
    with pytest.raises(SharedMemoryError, match=f"group {OTHER_GID}, expected {CLUSTER_GID}"):
        ShmDirectory.prepare(path, group=CLUSTER_GID)


def test_a_directory_left_by_an_earlier_run_is_adopted(tmp_path: Path) -> None:
    first = ShmDirectory.prepare(tmp_path / "shm", group=CLUSTER_GID)
    alive = first.create("kv", 64)  # a worker that outlives the server
    alive.tensor[:5] = 7
    dead = first.create("kv", 64)
    dead.release()
    first.close()
    os.chmod(first.path, 0o750)  # drifted, still closed to others
    second = ShmDirectory.prepare(tmp_path / "shm", group=CLUSTER_GID)
    assert mode_of(second.path) == 0o2770
    assert second.map(alive.name, 64)[:5].tolist() == [7] * 5
    assert second.sweep(min_age_s=0) == [dead.name]


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("relative/shm", "shm_dir must be an absolute path"),
        ("/nonexistent-parent-dir/shm", "/nonexistent-parent-dir does not exist; mount it"),
    ],
)
def test_unusable_paths_say_what_to_do(path: str, message: str) -> None:
    with pytest.raises(SharedMemoryError, match=message):
        ShmDirectory.prepare(path)


def test_a_client_outside_the_group_gets_a_clear_error(dev_shm_path: Path) -> None:
    ShmDirectory.prepare(dev_shm_path, group=CLUSTER_GID)
    out = run_as(
        OTHER_UID, OTHER_GID, [],
        "from lmcache_node.transfer.shm import ShmDirectory",
        """
        try:
            ShmDirectory.attach(sys.argv[1])
        except OSError as exc:
            print(exc)
        """,
        str(dev_shm_path),
    )  # fmt: skip
    assert f"groups [{OTHER_GID}]) is not in its group {CLUSTER_GID}" in out, out
    assert "supplementalGroups" in out


def test_sweep_logs_a_segment_it_may_not_remove_and_goes_on(dev_shm_path: Path) -> None:
    """A root-made sticky directory: the server (not root) cannot remove another user's
    leftover (EPERM); it says so and removes the rest."""
    made_by_root = ShmDirectory.prepare(dev_shm_path, group=CLUSTER_GID)
    foreign = made_by_root.create("kv", 16)
    orphan = made_by_root.create("kv", 16)
    foreign.release()
    orphan.release()
    os.chown(dev_shm_path / orphan.name, OTHER_UID, -1)  # the server's own leftover
    os.chmod(dev_shm_path, 0o3770)  # sticky: only a file's owner (or root) may remove it
    out = run_as(
        OTHER_UID, CLUSTER_GID, [],
        "import json, logging\nfrom lmcache_node.transfer.shm import ShmDirectory",
        """
        logging.basicConfig(level=logging.WARNING)
        directory = ShmDirectory.prepare(sys.argv[1], group=int(sys.argv[2]))
        print(json.dumps(directory.sweep(min_age_s=0)))
        """,
        str(dev_shm_path), str(CLUSTER_GID),
    )  # fmt: skip
    stdout, stderr = out.split("--- stderr\n")
    assert json.loads(stdout) == [orphan.name], stderr
    assert (dev_shm_path / foreign.name).exists()
    assert foreign.name in stderr and "Operation not permitted" in stderr
