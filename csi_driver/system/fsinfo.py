"""Facts about the filesystem holding a path, and copying data within it.

Space and inode numbers come from ``statvfs`` (its one reader is :func:`usage`); the filesystem
type and its superblock options (which say, for example, whether XFS enforces project quotas)
come from the mount table, because ``statvfs`` does not report them. Copies go through ``cp``
with ``--reflink=auto`` so that a filesystem able to share extents (XFS with reflink, btrfs)
makes an instant, space-free copy and any other filesystem gets an ordinary one; ``cp`` also
keeps sparse files sparse.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

from csi_driver.model import Usage
from csi_driver.system.failure import SystemFailure
from csi_driver.system.mounter import MOUNTINFO, MountInfo, covering, read_mountinfo
from csi_driver.system.runner import Runner

#: copying a large volume takes long; a hung copy must still end eventually
COPY_TIMEOUT = 6 * 3600.0


class FsInfoError(SystemFailure):
    """A filesystem fact could not be read; the message names the path and the cause."""


def usage(path: str | Path | int) -> Usage:
    """Bytes and inodes of the filesystem holding ``path`` (a path or an open descriptor), the
    one ``statvfs`` reader; ``available`` is what an unprivileged writer can still use."""
    try:
        st = os.statvfs(path)
    except OSError as exc:
        raise FsInfoError(f"statvfs {path}: {exc.strerror}") from exc
    unit = st.f_frsize or st.f_bsize
    return Usage(
        total_bytes=st.f_blocks * unit,
        used_bytes=max(0, (st.f_blocks - st.f_bfree) * unit),
        available_bytes=st.f_bavail * unit,
        total_inodes=st.f_files,
        used_inodes=max(0, st.f_files - st.f_ffree),
        available_inodes=st.f_favail,
    )


def mount_of(path: str | Path, mountinfo: str = MOUNTINFO) -> MountInfo:
    """The mount that holds ``path``: the longest mount point above it, the topmost one when
    several are stacked there (mountinfo lists them in mount order)."""
    real = os.path.realpath(path)
    try:
        mounts = read_mountinfo(mountinfo)
    except OSError as exc:
        raise FsInfoError(f"cannot read {mountinfo}: {exc.strerror}") from exc
    best = covering(mounts, real)
    if best is None:
        raise FsInfoError(f"no mount in {mountinfo} holds {real}")
    return best


def mounts_showing(path: str | Path, mountinfo: str = MOUNTINFO) -> list[str]:
    """Mount points that show ``path`` or something below it (bind mounts of a directory or
    of a device node): the ways it is in use through the mount table."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
        mounts = read_mountinfo(mountinfo)
    except OSError as exc:
        raise FsInfoError(f"cannot look up the mounts of {real}: {exc.strerror}") from exc
    holder = covering(mounts, real)  # the table just read: not a second read
    if holder is None:
        raise FsInfoError(f"no mount in {mountinfo} holds {real}")
    inner = os.path.normpath(os.path.join(holder.root, os.path.relpath(real, holder.mount_point)))
    dev = (os.major(st.st_dev), os.minor(st.st_dev))
    return [
        m.mount_point
        for m in mounts
        if (m.major, m.minor) == dev
        and (m.root == inner or m.root.startswith(inner.rstrip("/") + "/"))
    ]


def mounts_of_device(device: str, mountinfo: str = MOUNTINFO) -> list[str]:
    """Mount points of filesystems on block device ``device``."""
    try:
        rdev = os.stat(device).st_rdev
        mounts = read_mountinfo(mountinfo)
    except OSError as exc:
        raise FsInfoError(f"cannot look up the mounts of {device}: {exc.strerror}") from exc
    dev = (os.major(rdev), os.minor(rdev))
    return [m.mount_point for m in mounts if (m.major, m.minor) == dev]


def fs_type_of(path: str | Path, mountinfo: str = MOUNTINFO) -> str:
    return mount_of(path, mountinfo).fs_type


def copy_tree(runner: Runner, source: Path, destination: Path) -> None:
    """Copy the contents of directory ``source`` into the existing directory ``destination``,
    keeping ownership, modes, timestamps, links, xattrs and ACLs where the filesystem can;
    symlinks are copied as links, never followed."""
    runner.run(
        ["cp", "-a", "--reflink=auto", "--", f"{source}/.", f"{destination}/"],
        timeout=COPY_TIMEOUT,
    )


def copy_file(runner: Runner, source: Path, destination: Path) -> None:
    """Copy one regular file (a disk image), sharing extents where possible, holes kept."""
    runner.run(
        ["cp", "--reflink=auto", "--no-dereference", "--", str(source), str(destination)],
        timeout=COPY_TIMEOUT,
    )


def fsync_path(path: Path) -> None:
    """Make a file's data, or a directory's entries, durable."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_filesystem(path: Path) -> None:
    """``syncfs(2)`` on the filesystem holding ``path``: after a copy made by another
    program, the cheapest way to know every copied file is on disk."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise FsInfoError(f"syncfs {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def remove_tree(runner: Runner, path: Path) -> None:
    """Remove ``path`` and everything below it. Symlinks are removed, never followed, and
    nothing on another filesystem is touched: a mount found inside makes this fail instead
    of emptying whatever is mounted there."""
    if not os.path.lexists(path):
        return
    runner.run(
        ["rm", "-r", "-f", "--one-file-system", "--preserve-root=all", "--", str(path)],
        timeout=COPY_TIMEOUT,
    )
