"""Mounts: the kernel's mount table, and mounting and unmounting onto confined paths.

The mount table is read from ``/proc/self/mountinfo`` rather than by comparing device numbers,
because a bind mount of a directory on the same filesystem has the same ``st_dev`` as its
parent and would look like no mount at all. Each entry's *key* (device, path inside the
filesystem) says what a mount shows, so a caller can tell its own mount from anybody else's
before it unmounts.

Mounting goes through :class:`~csi_driver.system.mountcalls.MountCalls` onto a descriptor of a
:class:`~csi_driver.system.confined.Confined` path: atomic, flags included, and exactly where
the path was checked. Unmounting goes by path, right after checking that the path still leads
(through no symlink) to the very mount the caller means.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from csi_driver import callmemo
from csi_driver.system.confined import Confined, mount_id
from csi_driver.system.mountcalls import Attributes, MountCalls, MountError
from csi_driver.system.mountflags import per_filesystem, per_mount

log = logging.getLogger(__name__)

MOUNTINFO = "/proc/self/mountinfo"
#: how many stacked mounts of one's own one unmount() call peels off before giving up
MAX_STACKED = 16

DELETED = "//deleted"
_OCTAL = re.compile(rb"\\([0-7]{3})")

Key = tuple[int, int, str]

__all__ = [
    "MOUNTINFO",
    "Key",
    "MountError",
    "MountInfo",
    "Mounter",
    "parse_mountinfo",
    "read_mountinfo",
]


@dataclass(frozen=True)
class MountInfo:
    """One line of ``/proc/<pid>/mountinfo`` (see proc(5))."""

    mount_id: int
    parent_id: int
    major: int
    minor: int
    root: str  # the path inside the mounted filesystem that is visible at mount_point
    mount_point: str
    options: tuple[str, ...]  # per-mount options: ro/rw, nosuid, noexec, ...
    optional: tuple[str, ...]  # propagation: shared:N, master:N, ...
    fs_type: str
    source: str
    super_options: tuple[str, ...]  # per-superblock (filesystem) options

    @property
    def read_only(self) -> bool:
        return "ro" in self.options

    @property
    def key(self) -> Key:
        """What is visible at the mount point: two mounts with the same key show the same
        directory (or device node) of the same filesystem, e.g. a bind mount and its source."""
        return (self.major, self.minor, self.root)

    def shows(self, key: Key | None) -> bool:
        """True when this mount shows ``key``, also after that directory was removed behind
        the mount's back (the kernel then adds ``//deleted`` to the root)."""
        if key is None:
            return False
        return self.key == key or self.key == (key[0], key[1], key[2] + DELETED)


def _unescape(field: bytes) -> str:
    """The kernel escapes space, tab, newline and backslash in paths as ``\\ooo``."""
    if b"\\" not in field:  # nearly every field: the table is parsed on every DeleteVolume
        return os.fsdecode(field)
    return os.fsdecode(_OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]), field))


def parse_mountinfo(data: bytes) -> list[MountInfo]:
    """Parse mountinfo content; lines that do not follow the format are skipped (and logged)
    rather than failing every mount operation on the node."""
    out: list[MountInfo] = []
    for line in data.splitlines():
        fields = line.split(b" ")
        try:
            sep = fields.index(b"-", 6)
            major, minor = fields[2].split(b":")
            out.append(
                MountInfo(
                    mount_id=int(fields[0]),
                    parent_id=int(fields[1]),
                    major=int(major),
                    minor=int(minor),
                    root=_unescape(fields[3]),
                    mount_point=_unescape(fields[4]),
                    options=tuple(os.fsdecode(fields[5]).split(",")),
                    optional=tuple(os.fsdecode(f) for f in fields[6:sep]),
                    fs_type=_unescape(fields[sep + 1]),
                    source=_unescape(fields[sep + 2]),
                    super_options=tuple(_unescape(fields[sep + 3]).split(","))
                    if len(fields) > sep + 3
                    else (),
                )
            )
        except (ValueError, IndexError):
            log.warning("skipping a malformed mountinfo line", extra={"line": line[:200]})
    return out


def read_mountinfo(path: str = MOUNTINFO) -> list[MountInfo]:
    """The mount table at ``path`` (OSError when it cannot be read): the one reader of it."""
    with open(path, "rb") as f:
        return parse_mountinfo(f.read())


def covering(mounts: list[MountInfo], path: str) -> MountInfo | None:
    """The mount that holds ``path`` (a real path): the longest mount point above it, the
    topmost one when several are stacked there (mountinfo lists them in mount order)."""
    best: MountInfo | None = None
    for m in mounts:
        mp = m.mount_point
        inside = path == mp or path.startswith(mp.rstrip("/") + "/")
        if inside and (best is None or len(mp) >= len(best.mount_point)):
            best = m
    return best


def device_key(device: str) -> Key:
    """The key of a filesystem mounted from block device ``device`` (its root)."""
    rdev = os.stat(device).st_rdev
    return (os.major(rdev), os.minor(rdev), "/")


class Mounter:
    """The mount table and mount operations. Knows nothing of CSI."""

    def __init__(self, calls: MountCalls | None = None, *, mountinfo: str = MOUNTINFO) -> None:
        self._calls = calls or MountCalls()
        self._mountinfo = mountinfo

    # --- the mount table ----------------------------------------------------------------

    def mounts(self) -> list[MountInfo]:
        return read_mountinfo(self._mountinfo)

    def mounts_at(self, path: str) -> list[MountInfo]:
        """Mounts whose mount point is ``path`` (a real path), bottom first."""
        return [m for m in self.mounts() if m.mount_point == path]

    def mount_at(self, path: str) -> MountInfo | None:
        """The visible (topmost) mount at ``path``, or None when ``path`` is no mount point."""
        found = self.mounts_at(path)
        return found[-1] if found else None

    def is_mount_point(self, path: str) -> bool:
        return bool(self.mounts_at(path))

    def key_of(self, path: str) -> Key | None:
        """The key ``path`` (a real path) would have if it were bind-mounted somewhere: the
        longest mount covering it, and the path inside that mount's filesystem."""
        best = covering(self.mounts(), path)
        if best is None:
            return None
        rel = os.path.relpath(path, best.mount_point)
        root = best.root if rel == "." else os.path.join(best.root, rel)
        return (best.major, best.minor, root)

    def key_of_device(self, device: str) -> Key | None:
        """The key of a filesystem mounted from block device ``device`` (its root); None when
        the device cannot be looked at (it is gone)."""
        try:
            return device_key(device)
        except OSError:
            return None

    def key_of_device_node(self, device: str) -> Key | None:
        """The key a bind mount of the device node ``device`` (symlinks followed) shows."""
        return self.key_of(os.path.realpath(device))

    def writable_mount_of_device(self, device: str) -> str | None:
        """A writable mount point of the filesystem on block device ``device`` (OSError when
        the device cannot be looked at)."""
        key = device_key(device)
        for m in self.mounts():
            if m.shows(key) and not m.read_only:
                return m.mount_point
        return None

    def mounts_below(self, path: str) -> list[str]:
        """Mount points strictly below ``path``: mounting onto ``path`` would hide them."""
        prefix = path.rstrip("/") + "/"
        return [m.mount_point for m in self.mounts() if m.mount_point.startswith(prefix)]

    def mount_reached(self, target: Confined) -> MountInfo | None:
        """The mount that ``target`` leads to when opened (without following a symlink), if
        it is mounted right there; None when ``target`` is no mount point or leads elsewhere
        (a directory on the way has something mounted over it)."""
        if target.lstat() is None:
            return None
        with target.opened() as fd:
            return self.mount_of_fd(fd, target.path)

    def mount_of_fd(self, fd: int, path: str) -> MountInfo | None:
        """The mount ``fd`` lies on, if its mount point is ``path`` (see :meth:`mount_reached`)."""
        on = mount_id(fd)
        for m in self.mounts():
            if m.mount_id == on:
                return m if m.mount_point == path else None
        return None

    def mounts_with_key(self, key: Key) -> list[MountInfo]:
        return [m for m in self.mounts() if m.shows(key)]

    # --- mounting ---------------------------------------------------------------------

    def bind(self, source: str, target: Confined, flags: tuple[str, ...] | list[str]) -> None:
        """Bind-mount ``source`` (a directory or a device node the caller trusts, never
        followed if it is a symlink) onto ``target``, with the per-mount ``flags``."""
        try:
            src = os.open(source, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise MountError(f"bind {source}: {exc.strerror}", exc.errno) from exc
        try:
            self.bind_fd(src, source, target, flags)
        finally:
            os.close(src)

    def bind_fd(
        self, source_fd: int, source: str, target: Confined, flags: tuple[str, ...] | list[str]
    ) -> None:
        """Bind-mount what ``source_fd`` holds open (named ``source`` in messages)."""
        attrs = Attributes.of(per_mount(flags))
        callmemo.forget()  # a mount changes what lvm2 reports of a device (open or not)
        with target.opened() as dst:
            self._calls.bind(source_fd, dst, attrs, f"{source} on {target.path}")

    def mount(self, device: str, target: Confined, fs_type: str, flags: list[str]) -> None:
        """Mount the filesystem on block device ``device`` onto ``target``."""
        if not fs_type or any(c in fs_type for c in ",\x00/ "):
            raise ValueError(f"malformed filesystem type {fs_type!r}")
        attrs = Attributes.of(per_mount(flags))
        callmemo.forget()
        with target.opened() as dst:
            self._calls.mount(
                device, fs_type, per_filesystem(flags), attrs, dst, f"{device} on {target.path}"
            )

    def unmount(self, target: Confined, is_ours: Callable[[MountInfo], bool]) -> bool:
        """Unmount the mounts at ``target`` for which ``is_ours`` holds, topmost first, and
        stop at the first that is not (it is left alone). True when something was unmounted.

        Each unmount is preceded by a check that the path, opened without following a
        symlink, lies on that very mount."""
        did = False
        for _ in range(MAX_STACKED):
            top = self.mount_at(target.path)
            if top is None or not is_ours(top):
                return did
            with target.opened() as fd:
                on = mount_id(fd)
            if on != top.mount_id:
                raise MountError(
                    f"{target.path} does not lead to the mount the table shows there (something"
                    " is mounted over a directory on the way); left alone",
                    errno.ESTALE,
                )
            callmemo.forget()
            try:
                self._calls.unmount(target.path)
            except MountError:
                if self.mount_at(target.path) == top:
                    raise
                # unmounted by someone else between our look and the umount
            did = True
        raise MountError(f"{target.path} still has mounts after {MAX_STACKED} unmounts")
