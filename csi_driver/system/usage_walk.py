"""What one directory tree holds, found by walking it: for directories on a filesystem whose
project quotas do not count them (ext4 without project quotas, btrfs, tmpfs...), where
nothing else tells one directory's use apart from its neighbours'.

The walk goes through descriptors only (each directory opened relative to its parent with
``O_NOFOLLOW``, then checked to be the inode that was listed), so a symlink is counted as
itself and never followed, and a rename during the walk cannot lead it out of the tree. It
never leaves the mount it starts on: a directory on another filesystem (another ``st_dev``)
or on another mount of the same one (a bind mount: another mount id in
``/proc/self/fdinfo``) is neither counted nor entered, as ``du -x`` does.

Bytes are allocated blocks (``st_blocks`` times 512, what ``du -s -B1 -x`` prints), a file with
several hard links counted once; inodes are the entries counted, the top directory included
(``du -s -x --inodes``). Entries that vanish while the walk runs are skipped: an entry that is
gone (ENOENT), no longer a directory (ENOTDIR), replaced by a symlink (ELOOP) or by another
inode. Any other failure (EMFILE, ENFILE, ENOMEM, EACCES...) ends the walk with its reason in
:attr:`TreeUsage.stopped`: what could not be read was not counted, so the walk is not complete.

Its cost is bounded (:class:`Bounds`: entries visited, seconds, depth). A walk that reaches a
bound stops there and says so (:attr:`TreeUsage.stopped`): what it counted is a lower bound
of the truth, never a guess. Results are kept per key for a time (:class:`WalkCache`), so a
caller asking every few seconds walks at most once per period, and only a few walks run at
once (``max_walks``): a caller that finds no free slot gets the last result kept, else waits
for a slot at most one walk's time.
"""

from __future__ import annotations

import contextlib
import errno as errnos
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from csi_driver.system.failure import SystemFailure

#: st_blocks counts 512-byte units on Linux, whatever the filesystem's block size
_ST_BLOCK = 512
#: how often (in entries) the clock is read
_CLOCK_EVERY = 256
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
#: the errnos that mean an entry went away (or was swapped for a link) under the walk
VANISHED = frozenset({errnos.ENOENT, errnos.ENOTDIR, errnos.ELOOP})

#: what a walk is given of each entry: the descriptor of its directory, its name, its lstat
Visitor = Callable[[int, str, os.stat_result], None]


class WalkError(SystemFailure):
    """The top of a walk cannot be opened or read."""


class _Unreadable(Exception):
    """An entry that exists could not be read: the walk ends, incomplete."""

    def __init__(self, name: str, exc: OSError) -> None:
        super().__init__(f"{name} could not be read: {exc.strerror or exc}")


def _vanished_or_raise(name: str, exc: OSError) -> None:
    if exc.errno not in VANISHED:
        raise _Unreadable(name, exc) from exc


@dataclass(frozen=True)
class Bounds:
    """What one walk may cost at most."""

    max_entries: int = 100_000
    max_seconds: float = 2.0
    #: directories open at once (two descriptors each: the directory's and its listing's)
    max_depth: int = 64


@dataclass(frozen=True)
class TreeUsage:
    used_bytes: int
    used_inodes: int
    #: why the walk stopped before the end ("" when it saw everything)
    stopped: str = ""

    @property
    def complete(self) -> bool:
        return not self.stopped


def mount_id(fd: int) -> int | None:
    """The id of the mount ``fd`` is on (``mnt_id`` in ``/proc/self/fdinfo``)."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
            for line in f:
                if line.startswith(b"mnt_id:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _open_child(parent: int, name: str, listed: os.stat_result) -> int | None:
    """The directory ``name`` in ``parent`` opened without following a link, if it still is
    the inode that was listed; None when it vanished or was replaced; :class:`_Unreadable`
    when it is there but cannot be opened."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
    except OSError as exc:
        _vanished_or_raise(name, exc)
        return None
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (listed.st_dev, listed.st_ino):
        os.close(fd)
        return None
    return fd


def walk(
    top: int,
    visit: Visitor,
    bounds: Bounds | None = None,
    clock: Callable[[], float] = time.monotonic,
    stopping: Callable[[], bool] | None = None,
) -> str:
    """Call ``visit`` for every entry below the open directory ``top`` (not for ``top``
    itself), depth first, within ``bounds``; "" when every entry was visited, else why not
    (a bound reached, an entry that could not be read, or ``stopping`` saying so)."""
    bounds = bounds or Bounds()
    deadline = clock() + bounds.max_seconds
    top_st = os.fstat(top)
    top_mount = mount_id(top)
    stack: list[tuple[int, Iterator[os.DirEntry[str]]]] = []

    def enter(fd: int, name: str) -> None:
        try:
            stack.append((fd, os.scandir(fd)))
        except OSError as exc:
            os.close(fd)
            _vanished_or_raise(name, exc)

    try:
        enter(os.dup(top), ".")
        return _walk(stack, enter, visit, bounds, deadline, clock, stopping, top_st, top_mount)
    except _Unreadable as exc:
        return f"it stopped: {exc}"
    finally:
        for fd, entries in stack:
            _close(fd, entries)


def _walk(
    stack: list[tuple[int, Iterator[os.DirEntry[str]]]],
    enter: Callable[[int, str], None],
    visit: Visitor,
    bounds: Bounds,
    deadline: float,
    clock: Callable[[], float],
    stopping: Callable[[], bool] | None,
    top_st: os.stat_result,
    top_mount: int | None,
) -> str:
    seen = 0
    while stack:
        fd, entries = stack[-1]
        try:
            entry = next(entries, None)
        except OSError as exc:
            _vanished_or_raise("a directory", exc)
            entry = None  # the directory went away under the walk: what it had is gone
        if entry is None:
            stack.pop()
            _close(fd, entries)
            continue
        seen += 1
        if seen > bounds.max_entries:
            return f"it reached its bound of {bounds.max_entries} entries"
        if seen % _CLOCK_EVERY == 0:
            if clock() > deadline:
                return f"it ran out of its {bounds.max_seconds:g} s"
            if stopping is not None and stopping():
                return "it was asked to stop"
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError as exc:
            _vanished_or_raise(entry.name, exc)
            continue
        if st.st_dev != top_st.st_dev:
            continue  # a mount point of another filesystem
        if not stat.S_ISDIR(st.st_mode):
            visit(fd, entry.name, st)
            continue
        child = _open_child(fd, entry.name, st)
        if child is None:
            continue
        where = mount_id(child)
        if where != top_mount:
            os.close(child)  # another mount of the same filesystem (a bind mount)
            if where is None:
                return f"it stopped: the mount of {entry.name} could not be read"
            continue
        visit(fd, entry.name, st)
        if len(stack) >= bounds.max_depth:
            os.close(child)
            return f"it reached its bound of {bounds.max_depth} nested directories"
        enter(child, entry.name)
    return ""


def _close(fd: int, entries: Iterator[os.DirEntry[str]]) -> None:
    close = getattr(entries, "close", None)
    if close is not None:
        close()
    os.close(fd)


@contextlib.contextmanager
def opened_dir(path: str | Path) -> Iterator[int]:
    """``path`` opened as a directory without following a symlink at its end."""
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError as exc:
        raise WalkError(f"cannot open directory {path}: {exc.strerror}", errno=exc.errno) from exc
    try:
        yield fd
    finally:
        os.close(fd)


def measure(
    path: str | Path, bounds: Bounds | None = None, clock: Callable[[], float] = time.monotonic
) -> TreeUsage:
    """The allocated bytes and the inodes of the tree at ``path`` (see the module's rules)."""
    with opened_dir(path) as top:
        top_st = os.fstat(top)
        used = [top_st.st_blocks * _ST_BLOCK, 1]
        linked: set[int] = set()

        def count(_dir: int, _name: str, st: os.stat_result) -> None:
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                if st.st_ino in linked:
                    return
                linked.add(st.st_ino)
            used[0] += st.st_blocks * _ST_BLOCK
            used[1] += 1

        stopped = walk(top, count, bounds, clock)
    return TreeUsage(used[0], used[1], stopped)


class WalkCache:
    """Walk results kept per key (a volume) for ``ttl`` seconds, with at most ``max_walks``
    walks at once (the stats RPCs of many volumes arrive together). Two callers asking for
    the same key at once may both walk; the cost stays bounded by :class:`Bounds` either
    way."""

    def __init__(
        self,
        bounds: Bounds | None = None,
        ttl: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        max_walks: int = 2,
    ) -> None:
        self.bounds = bounds or Bounds()
        self.ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._kept: dict[str, tuple[float, TreeUsage]] = {}
        self._slots = threading.BoundedSemaphore(max_walks)

    def measure(self, key: str, path: str | Path) -> tuple[TreeUsage, bool]:
        """(the usage of the tree at ``path``, whether it is new rather than kept). With every
        slot taken: the kept result however old, else, after waiting a walk's time for a slot
        in vain, nothing counted and the reason (a new result, so that it is logged)."""
        now = self._clock()
        with self._lock:
            kept = self._kept.get(key)
        if kept is not None and now - kept[0] < self.ttl:
            return kept[1], False
        if not self._slots.acquire(blocking=False):
            if kept is not None:
                return kept[1], False
            if not self._slots.acquire(timeout=self.bounds.max_seconds):
                return TreeUsage(0, 0, "too many walks were running at once"), True
        try:
            usage = measure(path, self.bounds, self._clock)
        finally:
            self._slots.release()
        with self._lock:
            self._kept[key] = (self._clock(), usage)
        return usage, True

    def forget(self, key: str) -> None:
        with self._lock:
            self._kept.pop(key, None)
