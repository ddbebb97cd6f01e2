"""The kernel's mount calls, made on file descriptors so that a mount is atomic and lands exactly
where it was checked.

Why not mount(8): a bind mount with flags takes two calls there (``--bind``, then
``remount,bind,ro``), so a kill between the two leaves a writable mount where a read-only one
was asked; and mount(8) resolves the target path again by name, after the caller checked it,
so a symlink swapped into a parent directory in between would steer the mount elsewhere.

The mount API of Linux 5.12+ closes both: ``open_tree(OPEN_TREE_CLONE)`` (a bind) or
``fsopen``/``fsconfig``/``fsmount`` (a filesystem) make a *detached* mount, ``mount_setattr``
gives it its flags while nobody can see it, and ``move_mount`` attaches it, complete, onto the
directory (or file) the caller holds open. A process killed before ``move_mount`` leaves
nothing: the detached mount dies with its file descriptor.

Unmounting has no descriptor form (an open descriptor would keep the mount busy), so it goes
by path with ``UMOUNT_NOFOLLOW``; callers check what is mounted there just before.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from csi_driver.system.failure import Reason, SystemFailure

log = logging.getLogger(__name__)

# The mount API's syscalls are numbered alike on every architecture (glibc 2.36 wraps them,
# Debian 12 has 2.36 but older images do not: the raw numbers work everywhere).
_SYS = {
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "mount_setattr": 442,
}

OPEN_TREE_CLONE = 1
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
FSOPEN_CLOEXEC = 1
FSMOUNT_CLOEXEC = 1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8

MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOUNT_ATTR__ATIME = 0x70
MOUNT_ATTR_RELATIME = 0x0
MOUNT_ATTR_NOATIME = 0x10
MOUNT_ATTR_STRICTATIME = 0x20
MOUNT_ATTR_NODIRATIME = 0x80
MOUNT_ATTR_NOSYMFOLLOW = 0x200000

#: per-mount flags: the name that sets the attribute, and the one that clears it
_ATTRS: dict[str, tuple[int, bool]] = {
    "ro": (MOUNT_ATTR_RDONLY, True),
    "rw": (MOUNT_ATTR_RDONLY, False),
    "nosuid": (MOUNT_ATTR_NOSUID, True),
    "suid": (MOUNT_ATTR_NOSUID, False),
    "nodev": (MOUNT_ATTR_NODEV, True),
    "dev": (MOUNT_ATTR_NODEV, False),
    "noexec": (MOUNT_ATTR_NOEXEC, True),
    "exec": (MOUNT_ATTR_NOEXEC, False),
    "nodiratime": (MOUNT_ATTR_NODIRATIME, True),
    "diratime": (MOUNT_ATTR_NODIRATIME, False),
    "nosymfollow": (MOUNT_ATTR_NOSYMFOLLOW, True),
    "symfollow": (MOUNT_ATTR_NOSYMFOLLOW, False),
}
_ATIME = {
    "noatime": MOUNT_ATTR_NOATIME,
    "atime": MOUNT_ATTR_RELATIME,
    "relatime": MOUNT_ATTR_RELATIME,
    "norelatime": MOUNT_ATTR_STRICTATIME,
    "strictatime": MOUNT_ATTR_STRICTATIME,
    "nostrictatime": MOUNT_ATTR_RELATIME,
}
#: every option that is a property of the mount rather than of the filesystem
MOUNT_FLAGS = frozenset(_ATTRS) | frozenset(_ATIME)


class MountError(SystemFailure):
    """A mount operation could not be done; the message says what and why, ``errno`` the
    kernel's reason when there is one. ENOENT from mount(2) means a device or directory went
    away under the driver, not that the request named nothing: the driver's failure."""

    def __init__(self, message: str, err: int | None = None) -> None:
        super().__init__(message, errno=err, reason=Reason.FAILED if err == errno.ENOENT else None)


@dataclass(frozen=True)
class Attributes:
    """``mount_setattr`` terms: the attribute bits to set and to clear."""

    set: int = 0
    clear: int = 0

    @classmethod
    def of(cls, flags: Sequence[str]) -> Attributes:
        """Per-mount flags as attributes; a flag that is no per-mount flag is a ValueError."""
        on = off = 0
        for flag in flags:
            if flag in _ATTRS:
                bit, setting = _ATTRS[flag]
                on, off = (on | bit, off & ~bit) if setting else (on & ~bit, off | bit)
            elif flag in _ATIME:
                on = (on & ~MOUNT_ATTR__ATIME) | _ATIME[flag]
                off |= MOUNT_ATTR__ATIME
            else:
                raise ValueError(f"{flag!r} is not a per-mount flag")
        return cls(on, off)


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _call(what: str, name: str, *args: object) -> int:
    result = int(_libc.syscall(_SYS[name], *args))
    if result < 0:
        err = ctypes.get_errno()
        raise MountError(f"{what}: {os.strerror(err)}", err)
    return result


def _fs_context_messages(fd: int) -> str:
    """What the filesystem said while its context was configured (``e ...`` lines)."""
    out = []
    for _ in range(8):
        try:
            line = os.read(fd, 1024)
        except OSError:
            break
        if not line:
            break
        out.append(line.decode("utf-8", "replace").strip())
    return "; ".join(out)


@contextlib.contextmanager
def _fd(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


class MountCalls:
    """The kernel mount calls this driver makes. Tests of error paths swap it for a fake."""

    def bind(self, source_fd: int, target_fd: int, attributes: Attributes, what: str) -> None:
        """Attach a copy of the mount at ``source_fd`` (a directory or a device node, held
        open with ``O_PATH``) onto ``target_fd``, with ``attributes`` from the start."""
        start = time.monotonic()
        flags = OPEN_TREE_CLONE | os.O_CLOEXEC | AT_EMPTY_PATH
        with _fd(_call(f"bind {what}", "open_tree", source_fd, b"", flags)) as tree:
            self._set_attributes(tree, attributes, what)
            self._move(tree, target_fd, what)
        log.debug("bind mounted", extra={"what": what, "seconds": time.monotonic() - start})

    def mount(
        self,
        device: str,
        fs_type: str,
        fs_options: Sequence[str],
        attributes: Attributes,
        target_fd: int,
        what: str,
    ) -> None:
        """Mount the filesystem on ``device`` onto ``target_fd``; ``fs_options`` are the
        filesystem's own (``discard``, ``errors=remount-ro``), ``attributes`` the mount's."""
        start = time.monotonic()
        fs = _call(f"mount {what}", "fsopen", fs_type.encode(), FSOPEN_CLOEXEC)
        with _fd(fs):
            try:
                _call(
                    f"mount {what}",
                    "fsconfig",
                    fs,
                    FSCONFIG_SET_STRING,
                    b"source",
                    os.fsencode(device),
                    0,
                )
                for opt in fs_options:
                    key, eq, value = opt.partition("=")
                    args: tuple[int, bytes, bytes | None, int]
                    if eq:
                        args = (FSCONFIG_SET_STRING, key.encode(), value.encode(), 0)
                    else:
                        args = (FSCONFIG_SET_FLAG, key.encode(), None, 0)
                    _call(f"mount {what} with {opt!r}", "fsconfig", fs, *args)
                _call(f"mount {what}", "fsconfig", fs, FSCONFIG_CMD_CREATE, None, None, 0)
                mnt = _call(f"mount {what}", "fsmount", fs, FSMOUNT_CLOEXEC, attributes.set)
            except MountError as exc:
                said = _fs_context_messages(fs)
                raise MountError(f"{exc}{f' ({said})' if said else ''}", exc.errno) from exc
        with _fd(mnt):
            self._move(mnt, target_fd, what)
        log.debug("mounted", extra={"what": what, "seconds": time.monotonic() - start})

    def set_attributes(self, path_fd: int, attributes: Attributes, what: str) -> None:
        """Change the flags of the mount whose root ``path_fd`` holds open."""
        self._set_attributes(path_fd, attributes, what)

    def unmount(self, path: str, *, lazy: bool = False) -> None:
        flags = UMOUNT_NOFOLLOW | (MNT_DETACH if lazy else 0)
        if _libc.umount2(os.fsencode(path), flags) != 0:
            err = ctypes.get_errno()
            raise MountError(f"unmount {path}: {os.strerror(err)}", err)

    @staticmethod
    def _set_attributes(fd: int, attributes: Attributes, what: str) -> None:
        if not attributes.set and not attributes.clear:
            return
        attr = _MountAttr(attributes.set, attributes.clear, 0, 0)
        _call(
            f"set the flags of {what}",
            "mount_setattr",
            fd,
            b"",
            AT_EMPTY_PATH,
            ctypes.byref(attr),
            ctypes.sizeof(attr),
        )

    @staticmethod
    def _move(tree: int, target_fd: int, what: str) -> None:
        flags = MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH
        _call(f"attach {what}", "move_mount", tree, b"", target_fd, b"", flags)


def is_busy(exc: MountError) -> bool:
    return exc.errno == errno.EBUSY
