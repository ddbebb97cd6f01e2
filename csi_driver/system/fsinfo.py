"""Facts about the filesystem holding a path, and copying data within it.

Space and inode numbers come from ``statvfs`` (its one reader is :func:`usage`); the filesystem
type and its superblock options (which say, for example, whether XFS enforces project quotas)
come from the mount table, because ``statvfs`` does not report them. Copies go through ``cp``
with ``--reflink=auto`` so that a filesystem able to share extents (XFS with reflink, btrfs)
makes an instant, space-free copy and any other filesystem gets an ordinary one; ``cp`` also
keeps sparse files sparse. A tree is removed in this process (:func:`remove_tree`), by names
relative to directory descriptors: spawning ``rm`` took about a third of the CPU time of a
CreateVolume and DeleteVolume pair.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from csi_driver.model import Usage
from csi_driver.system.confined import mount_id
from csi_driver.system.failure import Reason, SystemFailure
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
    libc = ctypes.CDLL(None, use_errno=True)  # the libc this process runs on already
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise FsInfoError(f"syncfs {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


class TreeNotRemoved(FsInfoError):
    """Part of a tree could not be removed (a mount inside it, a file the kernel refused);
    everything else was removed, and the message names what is left and why."""


#: what a failed removal reports: the first few failures, then how many more there were
MAX_REMOVAL_ERRORS = 3
_READ_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class _Level:
    """One directory on the way down a removal: its name in its parent (empty for the top),
    its identity (to check that ``..`` leads back to it) and the subdirectories still to go."""

    name: str
    ident: tuple[int, int]
    subdirs: list[str]


class _Removal:
    """The walk of :func:`remove_tree`, from a descriptor of the top directory, by names
    relative to the directory at hand. It holds one directory descriptor at a time (climbing
    back through ``..``, checked to be the directory it came from), so no depth exhausts the
    descriptors; failures are counted and the first few kept."""

    def __init__(self, path: Path, top_fd: int, dev: int, mnt: int) -> None:
        self.path, self.fd, self.dev, self.mnt = path, top_fd, dev, mnt
        self.names: list[str] = []  # the way from the top, for messages
        self.errors: list[str] = []
        self.failures = 0
        self.mounts = 0  # mounts found inside and left alone

    def where(self, name: str = "") -> str:
        return "/".join([str(self.path), *self.names, *([name] if name else [])])

    def fail(self, what: str) -> None:
        self.failures += 1
        if len(self.errors) < MAX_REMOVAL_ERRORS:
            self.errors.append(what)

    def run(self) -> None:
        st = os.fstat(self.fd)
        levels = [_Level("", (st.st_dev, st.st_ino), self.clear_files())]
        while levels:
            level = levels[-1]
            if level.subdirs:
                name = level.subdirs.pop()
                child = self.enter(name)
                if child is not None:
                    os.close(self.fd)
                    self.fd = child
                    st = os.fstat(child)
                    self.names.append(name)
                    levels.append(_Level(name, (st.st_dev, st.st_ino), self.clear_files()))
                continue
            levels.pop()
            if levels:
                self.climb(levels[-1].ident)
                self.rmdir(level.name)

    def clear_files(self) -> list[str]:
        """Unlink everything in the directory at hand but its subdirectories; those are
        answered."""
        subdirs: list[str] = []
        with os.scandir(self.fd) as entries:
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        subdirs.append(entry.name)
                    else:
                        os.unlink(entry.name, dir_fd=self.fd)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    self.fail(f"cannot remove {self.where(entry.name)}: {exc.strerror}")
        return subdirs

    def enter(self, name: str) -> int | None:
        """A descriptor of subdirectory ``name``; None (a failure counted) when it is on
        another filesystem or another mount, or cannot be opened."""
        try:
            fd = os.open(name, _READ_DIR, dir_fd=self.fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self.fail(f"cannot open {self.where(name)}: {exc.strerror}")
            return None
        if os.fstat(fd).st_dev != self.dev or mount_id(fd) != self.mnt:
            os.close(fd)
            self.mounts += 1
            self.fail(f"skipping {self.where(name)}: a mount point (another filesystem or mount)")
            return None
        return fd

    def climb(self, ident: tuple[int, int]) -> None:
        """Back to the parent, which must still be the directory the walk came from."""
        up = os.open("..", _READ_DIR, dir_fd=self.fd)
        st = os.fstat(up)
        if (st.st_dev, st.st_ino) != ident:
            os.close(up)
            raise TreeNotRemoved(f"{self.where()} was moved while it was being removed")
        os.close(self.fd)
        self.fd = up
        self.names.pop()

    def rmdir(self, name: str) -> None:
        try:
            os.rmdir(name, dir_fd=self.fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno != errno.ENOTEMPTY or not self.failures:  # not just what was kept
                self.fail(f"cannot remove {self.where(name)}: {exc.strerror}")


def remove_tree(path: Path) -> None:
    """Remove ``path`` and everything below it, in this process. Symlinks are removed, never
    followed, and nothing on another filesystem or another mount is touched: a mount found
    inside is left alone, with all it holds, and the removal fails (:class:`TreeNotRemoved`)
    once everything else is gone. A
    ``path`` that is itself a mount point is refused with nothing removed."""
    try:
        parent = os.open(path.parent, _READ_DIR)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise FsInfoError(f"cannot open {path.parent}: {exc.strerror}", errno=exc.errno) from exc
    try:
        _remove_from(parent, path)
    finally:
        os.close(parent)


def _remove_from(parent: int, path: Path) -> None:
    name = path.name
    if name in ("", ".", "..") or path.name != os.path.basename(os.path.normpath(path)):
        raise ValueError(f"not a path to remove: {path}")
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=parent)
            return
        top = os.open(name, _READ_DIR, dir_fd=parent)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise TreeNotRemoved(f"cannot remove {path}: {exc.strerror}", errno=exc.errno) from exc
    removal = _Removal(path, top, os.fstat(parent).st_dev, mount_id(parent))
    try:
        if os.fstat(top).st_dev != removal.dev or mount_id(top) != removal.mnt:
            raise TreeNotRemoved(
                f"{path} is a mount point; refusing to remove it", reason=Reason.IN_USE
            )
        removal.run()
    except OSError as exc:
        raise TreeNotRemoved(f"cannot remove {removal.where()}: {exc.strerror}") from exc
    finally:
        os.close(removal.fd)
    try:
        if not removal.failures:
            os.rmdir(name, dir_fd=parent)
    except FileNotFoundError:
        pass
    except OSError as exc:
        removal.fail(f"cannot remove {path}: {exc.strerror}")
    if removal.failures:
        more = removal.failures - len(removal.errors)
        raise TreeNotRemoved(
            "; ".join(removal.errors) + (f"; and {more} more failures" if more > 0 else ""),
            # something is mounted inside: in use, not a failure of the host
            reason=Reason.IN_USE if removal.mounts else None,
        )
