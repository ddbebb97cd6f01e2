"""What the hostpath tests of the VM lane share: a filesystem made on a sparse file and
mounted through a loop device (gone again afterwards, also when the test fails), backends
opened on a root there, and a writer that fills a volume until the kernel says no.

Used by test_hostpath_quota.py (XFS), test_hostpath_ext4_quota.py (ext4) and
test_hostpath_metrics.py.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from testkit import hostpath_backends as testkit_hostpath

NODE = "vm-node"


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


@contextlib.contextmanager
def formatted_loop(image: Path, size: int, mkfs: Sequence[str]) -> Iterator[str]:
    """A filesystem made by ``mkfs`` (the image's path is added last) on the sparse file
    ``image``, attached to a loop device, which is yielded and detached afterwards; a loop
    device left behind fails."""
    with image.open("wb") as f:
        f.truncate(size)
    sh(*mkfs, str(image))
    device = sh("losetup", "--find", "--show", str(image)).stdout.strip()
    try:
        yield device
    finally:
        sh("losetup", "--detach", device, check=False)
    leftover = sh("losetup", "--list", "--noheadings", "--associated", str(image)).stdout
    assert not leftover.strip(), f"loop device left behind: {leftover}"


@contextlib.contextmanager
def loop_filesystem(
    image: Path, size: int, mkfs: Sequence[str], mnt: Path, options: str = ""
) -> Iterator[str]:
    """:func:`formatted_loop`, mounted at ``mnt`` with ``options`` for the block."""
    mnt.mkdir(exist_ok=True)
    with formatted_loop(image, size, mkfs) as device, mounted(device, mnt, options):
        yield device


@contextlib.contextmanager
def mounted(device: str, mnt: Path, options: str = "") -> Iterator[None]:
    """``device`` mounted at ``mnt`` (with ``options``) for the block; a mount the kernel
    refuses fails the test: giving such mounts is what this lane exists for."""
    argv = ["mount", *(["-o", options] if options else []), device, str(mnt)]
    done = sh(*argv, check=False)
    if done.returncode != 0:
        pytest.fail(
            f"{' '.join(argv)} failed ({done.stderr.strip()}): this kernel does not give the"
            " quota support the VM lane exists for"
        )
    try:
        yield
    finally:
        if sh("umount", str(mnt), check=False).returncode != 0:
            sh("umount", "--lazy", str(mnt), check=False)


class Backends(testkit_hostpath.Backends):
    """Backends on one root (the filesystem's free space as capacity); opening a new one is a
    restart. :meth:`teardown` deletes what the test left."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, NODE)

    def teardown(self) -> None:
        b = self.current or self.open()
        try:
            for volume in b.list_volumes():
                b.delete_volume(volume.id)
            for snapshot in b.list_snapshots():
                b.delete_snapshot(snapshot.id)
        finally:
            self.close()


#: the writer of :func:`fill`, run in a process of its own
_FILLER = """
import os, sys
path, limit = sys.argv[1], int(sys.argv[2])
written, err = 0, None
chunk = os.urandom(1 << 20)
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
while written < limit:
    try:
        n = os.write(fd, chunk)
        os.fsync(fd)
    except OSError as exc:
        err = exc.errno
        break
    written += n  # a short write is followed by one that says why
os.close(fd)
print(written, err if err is not None else -1)
"""


def fill(path: Path, limit: int) -> tuple[int, int | None]:
    """Write 1 MiB chunks (flushed, so blocks are really allocated) until ``limit`` bytes or
    an error; (bytes written, errno or None). The writer is a process without
    CAP_SYS_RESOURCE, as a Pod's is: the kernel's generic quota code (ext4) lets a process
    holding it write past a hard limit; XFS does not."""
    out = sh(
        "setpriv",
        "--inh-caps=-sys_resource",
        "--bounding-set=-sys_resource",
        sys.executable,
        "-c",
        _FILLER,
        str(path),
        str(limit),
    ).stdout.split()
    written, err = int(out[0]), int(out[1])
    return written, (err if err >= 0 else None)


def du(path: str | Path) -> tuple[int, int]:
    """(allocated bytes, inodes) of the tree at ``path`` on its own filesystem, by du(1)."""
    size = sh("du", "-s", "-x", "-B1", str(path)).stdout.split()[0]
    inodes = sh("du", "-s", "-x", "--inodes", str(path)).stdout.split()[0]
    return int(size), int(inodes)
