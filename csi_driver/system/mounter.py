"""Mounts: reading the kernel's mount table, mounting, bind-mounting and unmounting.

Everything goes through ``mount``/``umount`` argument lists run by the project's runner, so
each call is logged, counted and bounded by a timeout. The mount table is read from
``/proc/self/mountinfo`` rather than by comparing device numbers, because a bind mount of a
directory on the same filesystem has the same ``st_dev`` as its parent and would look like
no mount at all.

Paths handed to this module come from the CO and are untrusted: the last component of a
target is never followed if it is a symlink (a pod able to plant a symlink where the CO will
ask for a mount must not be able to steer the mount, or a removal, elsewhere on the host).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass

from csi_driver.system.runner import CommandError, Runner

log = logging.getLogger(__name__)

MOUNTINFO = "/proc/self/mountinfo"
MOUNT_TIMEOUT = 120.0
TARGET_DIR_MODE = 0o750
TARGET_FILE_MODE = 0o640
#: how many stacked mounts one unmount() call peels off before giving up
MAX_STACKED = 16

_OCTAL = re.compile(rb"\\([0-7]{3})")


class MountError(Exception):
    """A mount operation could not be done; the message says what and why."""


class UnsafePathError(MountError):
    """A path is not what the caller may act on: a symlink, or the wrong kind of file."""


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
    def key(self) -> tuple[int, int, str]:
        """What is visible at the mount point: two mounts with the same key show the same
        directory (or device node) of the same filesystem, e.g. a bind mount and its source."""
        return (self.major, self.minor, self.root)


def _unescape(field: bytes) -> str:
    """The kernel escapes space, tab, newline and backslash in paths as ``\\ooo``."""
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


def canonical(path: str) -> str:
    """``path`` with its parent directories resolved (as the kernel shows mount points) but
    the last component left alone, so a symlink there is never followed."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    if not name:
        return path
    return os.path.join(os.path.realpath(parent), name)


def check_options(options: Sequence[str]) -> None:
    """Options go into one ``-o`` argument joined by commas: an option holding a comma, or
    nothing, would smuggle in (or drop) another option."""
    for opt in options:
        if not opt or "," in opt or "\x00" in opt or opt != opt.strip():
            raise ValueError(f"malformed mount option {opt!r}")


class Mounter:
    """Mount operations through the runner. Knows nothing of CSI."""

    def __init__(
        self, runner: Runner, *, mountinfo: str = MOUNTINFO, timeout: float = MOUNT_TIMEOUT
    ) -> None:
        self._runner = runner
        self._mountinfo = mountinfo
        self._timeout = timeout

    # --- the mount table ----------------------------------------------------------------

    def mounts(self) -> list[MountInfo]:
        with open(self._mountinfo, "rb") as f:
            return parse_mountinfo(f.read())

    def mounts_at(self, path: str) -> list[MountInfo]:
        """Mounts whose mount point is ``path``, bottom first (the last one is visible)."""
        where = canonical(path)
        return [m for m in self.mounts() if m.mount_point == where]

    def mount_at(self, path: str) -> MountInfo | None:
        """The visible (topmost) mount at ``path``, or None when ``path`` is no mount point."""
        found = self.mounts_at(path)
        return found[-1] if found else None

    def is_mount_point(self, path: str) -> bool:
        return bool(self.mounts_at(path))

    def key_of(self, path: str) -> tuple[int, int, str] | None:
        """The mount key (device, path inside the filesystem) ``path`` would have if it were
        bind-mounted somewhere; None if no mount covers it. Used to find every place a
        directory or device node is mounted."""
        where = canonical(path)
        best: MountInfo | None = None
        for m in self.mounts():
            mp = m.mount_point
            covers = where == mp or where.startswith(mp.rstrip("/") + "/")
            if covers and (best is None or len(mp) >= len(best.mount_point)):
                best = m
        if best is None:
            return None
        rel = os.path.relpath(where, best.mount_point)
        root = best.root if rel == "." else os.path.join(best.root, rel)
        return (best.major, best.minor, root)

    def mounts_with_key(self, key: tuple[int, int, str]) -> list[MountInfo]:
        return [m for m in self.mounts() if m.key == key]

    # --- targets ----------------------------------------------------------------------

    def make_dir_target(self, path: str) -> None:
        """Make ``path`` a directory (parents too) unless it already is one; refuse a symlink
        or anything that is not a directory."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            with contextlib.suppress(FileExistsError):  # a concurrent creator: checked below
                os.makedirs(path, mode=TARGET_DIR_MODE)
            st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            raise UnsafePathError(f"{path} is a symbolic link; refusing to use it")
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafePathError(f"{path} exists and is not a directory")

    def make_file_target(self, path: str) -> None:
        """Make ``path`` an empty regular file, the mount point for a device node; an existing
        regular file (or the device bind-mounted on it) is accepted."""
        parent = os.path.dirname(path)
        if parent and not os.path.isdir(parent):
            self.make_dir_target(parent)
        try:
            fd = os.open(
                path,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                TARGET_FILE_MODE,
            )
            os.close(fd)
        except FileExistsError:
            pass
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            raise UnsafePathError(f"{path} is a symbolic link; refusing to use it")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise UnsafePathError(f"{path} exists and is not a regular file")

    def remove_target(self, path: str) -> None:
        """Remove what :meth:`make_dir_target` or :meth:`make_file_target` made: an empty
        directory or an empty regular file. Anything else (a symlink, data someone left
        there, a path still mounted) is left alone and reported."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if self.is_mount_point(path):
            raise MountError(f"{path} is still a mount point; refusing to remove it")
        if stat.S_ISLNK(st.st_mode):
            raise UnsafePathError(f"{path} is a symbolic link; refusing to remove it")
        try:
            if stat.S_ISDIR(st.st_mode):
                os.rmdir(path)
            elif stat.S_ISREG(st.st_mode) and st.st_size == 0:
                os.unlink(path)
            else:
                raise UnsafePathError(
                    f"{path} is not an empty file or directory; refusing to remove it"
                )
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno == errno.ENOTEMPTY:
                raise UnsafePathError(
                    f"{path} is a directory that is not empty; refusing to remove it"
                ) from exc
            raise MountError(f"cannot remove {path}: {exc.strerror}") from exc

    @staticmethod
    def refuse_symlink(path: str) -> None:
        """Raise when the last component of ``path`` is a symlink (missing is fine)."""
        try:
            if stat.S_ISLNK(os.lstat(path).st_mode):
                raise UnsafePathError(f"{path} is a symbolic link; refusing to use it")
        except FileNotFoundError:
            return

    # --- mounting ---------------------------------------------------------------------

    def mount(self, source: str, target: str, fstype: str, options: Sequence[str] = ()) -> None:
        """Mount a filesystem (``source`` is a device) on the directory ``target``."""
        check_options(options)
        if not fstype or "," in fstype or "\x00" in fstype:
            raise ValueError(f"malformed filesystem type {fstype!r}")
        self.refuse_symlink(target)
        argv = ["mount", "-t", fstype]
        if options:
            argv += ["-o", ",".join(options)]
        self._run([*argv, "--", source, target], f"mount {source} on {target}")

    def bind(
        self, source: str, target: str, *, read_only: bool = False, options: Sequence[str] = ()
    ) -> None:
        """Bind-mount ``source`` (a directory or a device node) on ``target``.

        The kernel ignores flags given with the first bind, so ``ro`` and the other per-mount
        flags are applied by a second ``remount,bind``; if that fails the half-made mount is
        removed again, so a caller never ends up with a writable mount it asked to be
        read-only.
        """
        check_options(options)
        self.refuse_symlink(target)
        self._run(["mount", "--bind", "--", source, target], f"bind {source} on {target}")
        flags = [o for o in options if o not in ("ro", "rw")]
        if read_only or flags:
            opts = ["remount", "bind", "ro" if read_only else "rw", *flags]
            try:
                self._run(
                    ["mount", "-o", ",".join(opts), "--", target],
                    f"remount {target} with {','.join(opts[2:])}",
                )
            except MountError:
                self._unmount_once(target, lazy=False)
                raise

    def unmount(self, path: str, *, lazy: bool = False) -> bool:
        """Unmount everything mounted at ``path``. True when something was unmounted, False
        when nothing was mounted there (so calling it again is harmless)."""
        did = False
        for _ in range(MAX_STACKED):
            if not self.is_mount_point(path):
                return did
            self._unmount_once(path, lazy=lazy)
            did = True
        raise MountError(f"{path} still has mounts after {MAX_STACKED} unmounts")

    def _unmount_once(self, path: str, *, lazy: bool) -> None:
        argv = ["umount", *(["--lazy"] if lazy else []), "--", canonical(path)]
        try:
            self._run(argv, f"unmount {path}")
        except MountError:
            if self.is_mount_point(path):
                raise
            # unmounted by someone else between our look and the umount

    def _run(self, argv: list[str], what: str) -> None:
        try:
            self._runner.run(argv, timeout=self._timeout)
        except CommandError as exc:
            detail = exc.stderr.strip().splitlines()[-1] if exc.stderr.strip() else str(exc)
            if exc.timed_out:
                detail = f"timed out after {self._timeout:g} s"
            raise MountError(f"{what} failed: {detail}") from exc
