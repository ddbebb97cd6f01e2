"""Paths confined below one directory, walked without following a symlink at any component.

The kubelet hands a node plugin paths under its own directory, and pods with host access can
write there too. A string check (``startswith``) says nothing about where a path leads once a
parent directory is a symlink, so every path is walked here one component at a time from the
base directory's descriptor with ``O_PATH | O_NOFOLLOW``: a symlink, a file where a directory
should be, or a component the kernel refuses ends the walk. What the caller then does (create
the last component, stat it, mount onto it) goes through the parent's descriptor, never
through the name again.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass

from csi_driver.system.failure import Reason, SystemFailure

_DIR = os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC
_ANY = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_NAME_BYTES = 255


class PathRefused(SystemFailure):
    """The path is outside the base, or cannot be walked safely; nothing was touched."""

    default_reason = Reason.BAD_PATH


class PathMissing(SystemFailure):
    """A directory on the way does not exist (and the caller did not ask to create it)."""

    default_reason = Reason.ABSENT


class BaseUnusable(SystemFailure):
    """The base directory itself cannot be opened: nothing below it can be served."""

    default_reason = Reason.UNUSABLE


#: extended attribute naming the volume a file or directory was made for by this driver
TAG = "trusted.nodelocal-csi.volume"


def mount_id(fd: int) -> int:
    """The id of the mount a descriptor lies on (``mnt_id`` in its fdinfo)."""
    with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    raise OSError(errno.EINVAL, f"no mnt_id in the fdinfo of descriptor {fd}")


@dataclass
class Confined:
    """A path checked to lie strictly below the base: its parent held open, its last name."""

    path: str  # as the kernel shows it in the mount table: the real base plus the components
    parent_fd: int
    name: str

    def lstat(self) -> os.stat_result | None:
        """The last component itself (a symlink is not followed); None when absent."""
        try:
            return os.stat(self.name, dir_fd=self.parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def is_dir(self) -> bool:
        """True when the last component is a directory itself (not a symlink to one)."""
        st = self.lstat()
        return st is not None and stat.S_ISDIR(st.st_mode)

    def open(self) -> int:
        """An ``O_PATH`` descriptor of the last component, never through a symlink. On a
        mount point it holds what is mounted there (the topmost mount)."""
        fd = os.open(self.name, _ANY, dir_fd=self.parent_fd)
        if stat.S_ISLNK(os.fstat(fd).st_mode):
            os.close(fd)
            raise PathRefused(f"{self.path} is a symbolic link; refusing to use it")
        return fd

    @contextmanager
    def opened(self) -> Iterator[int]:
        fd = self.open()
        try:
            yield fd
        finally:
            os.close(fd)

    def make_dir(self, mode: int) -> bool:
        """Make the last component a directory unless it is one; refuse anything else. True
        when this call made it."""
        made = True
        try:
            os.mkdir(self.name, mode, dir_fd=self.parent_fd)
        except FileExistsError:
            made = False
        st = self.lstat()
        if st is None or not stat.S_ISDIR(st.st_mode):
            raise PathRefused(f"{self.path} exists and is not a directory")
        return made

    def make_file(self, mode: int) -> bool:
        """Make the last component an empty regular file unless it is one (or a device node
        bind-mounted onto one); refuse anything else. True when this call made it."""
        made = True
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            os.close(os.open(self.name, flags, mode, dir_fd=self.parent_fd))
        except FileExistsError:
            made = False
        st = self.lstat()
        if st is None or not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise PathRefused(f"{self.path} exists and is not a regular file")
        return made

    def _by_fd(self) -> str:
        """The last component through the parent's descriptor: never resolved by name."""
        return f"/proc/self/fd/{self.parent_fd}/{self.name}"

    def tag(self, owner: str) -> None:
        """Mark what this driver made here as made for ``owner`` (a volume id). Where the
        filesystem keeps no such attributes the mark is skipped: the thing is then never
        removed by the driver, and the kubelet removes it."""
        try:
            os.setxattr(self._by_fd(), TAG, owner.encode(), follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EPERM, errno.EACCES):
                raise

    def tagged(self) -> str | None:
        try:
            return os.getxattr(self._by_fd(), TAG, follow_symlinks=False).decode(errors="replace")
        except OSError:
            return None

    def is_empty(self) -> bool:
        """True for an absent path, an empty directory or an empty regular file: a place a
        mount can go without hiding anything."""
        st = self.lstat()
        if st is None:
            return True
        if stat.S_ISLNK(st.st_mode):
            raise PathRefused(f"{self.path} is a symbolic link; refusing to use it")
        if stat.S_ISREG(st.st_mode):
            return st.st_size == 0
        if not stat.S_ISDIR(st.st_mode):
            return False
        fd = os.open(
            self.name,
            os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
            dir_fd=self.parent_fd,
        )
        try:
            return not os.listdir(fd)
        finally:
            os.close(fd)

    def remove_empty(self, owner: str) -> bool:
        """Remove the last component if this driver made it for ``owner`` (see :meth:`tag`)
        and it is an empty directory or an empty regular file. True when nothing is there
        any more; False when something is left (not ours, or not empty)."""
        st = self.lstat()
        if st is None:
            return True
        if self.tagged() != owner:
            return False
        try:
            if stat.S_ISDIR(st.st_mode):
                os.rmdir(self.name, dir_fd=self.parent_fd)
            elif stat.S_ISREG(st.st_mode) and st.st_size == 0:
                os.unlink(self.name, dir_fd=self.parent_fd)
            else:
                return False
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EBUSY, errno.EEXIST):
                return False
            raise
        return True


class Jail:
    """Resolves paths that must lie strictly below ``base`` (an operator-given directory)."""

    def __init__(self, base: str) -> None:
        self.base = os.path.normpath(base)
        self.real_base = os.path.realpath(base)

    def base_problem(self) -> str | None:
        """Why the base cannot be walked from, naming it; None when it can."""
        try:
            st = os.stat(self.real_base)
        except OSError as exc:
            return f"{self.base}: {exc.strerror}"
        if not stat.S_ISDIR(st.st_mode):
            return f"{self.base} is not a directory"
        return None

    def _components(self, path: str) -> list[str]:
        for prefix in (self.base, self.real_base):
            if path.startswith(prefix.rstrip("/") + "/"):
                parts = path[len(prefix.rstrip("/")) + 1 :].split("/")
                if all(p not in ("", ".", "..") for p in parts):
                    return parts
        raise PathRefused(f"{path} is not below the kubelet directory {self.base}")

    def canonical(self, path: str) -> str:
        """``path`` spelled from the real base, whichever spelling of the base it used: the
        one name of a place, for locks."""
        return "/".join([self.real_base.rstrip("/"), *self._components(path)])

    def check(self, path: str) -> None:
        """Raise PathRefused unless ``path`` names something strictly below the base (a
        textual check; :meth:`resolve` is the one that walks)."""
        for part in self._components(path):
            if len(os.fsencode(part)) > MAX_NAME_BYTES:
                raise PathRefused(f"a component of {path} is longer than {MAX_NAME_BYTES} bytes")

    @contextmanager
    def resolve(
        self, path: str, *, create_parents: bool = False, dir_mode: int = 0o750
    ) -> Iterator[Confined]:
        """Walk to the parent of ``path``; with ``create_parents`` missing directories on the
        way are made. Raises PathRefused or PathMissing; the descriptor is closed after."""
        self.check(path)
        parts = self._components(path)
        try:
            fd = os.open(self.real_base, _DIR)
        except OSError as exc:
            raise BaseUnusable(f"the kubelet directory {self.base}: {exc.strerror}") from exc
        try:
            walked = self.real_base.rstrip("/")
            for depth, part in enumerate(parts[:-1]):
                walked = f"{walked}/{part}"
                parent, fd = fd, -1
                fd = self._step(parent, part, walked, create_parents, dir_mode, depth)
            yield Confined(f"{walked}/{parts[-1]}", fd, parts[-1])
        finally:
            if fd >= 0:
                os.close(fd)

    @contextmanager
    def existing(self, path: str) -> Iterator[Confined | None]:
        """Like :meth:`resolve`, but None when a directory on the way is missing (nothing can
        be there then)."""
        with ExitStack() as stack:
            try:
                confined: Confined | None = stack.enter_context(self.resolve(path))
            except PathMissing:
                confined = None
            yield confined

    @staticmethod
    def _step(fd: int, part: str, walked: str, create: bool, mode: int, depth: int) -> int:
        """The descriptor of directory ``part`` below ``fd``; ``fd`` is closed in any case.

        A mount point is crossed only right below the base (a containerised driver sees the
        kubelet's ``pods`` and ``plugins`` as mounts of their own); deeper, a mount on the
        way could be anything a pod or another plugin put there, and the walk stops."""
        try:
            nxt = Jail._open_dir(fd, part, walked, create, mode)
            try:
                if depth > 0 and mount_id(nxt) != mount_id(fd):
                    raise PathRefused(
                        f"{walked} is a mount point inside the kubelet directory; refusing to"
                        " walk into another filesystem"
                    )
            except BaseException:
                os.close(nxt)
                raise
            return nxt
        finally:
            os.close(fd)

    @staticmethod
    def _open_dir(fd: int, part: str, walked: str, create: bool, mode: int) -> int:
        try:
            try:
                return os.open(part, _DIR, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise PathMissing(f"{walked} does not exist") from None
                with suppress(FileExistsError):
                    os.mkdir(part, mode, dir_fd=fd)
                return os.open(part, _DIR, dir_fd=fd)
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                raise PathRefused(
                    f"{walked} is not a directory (a file or a symbolic link); refusing to"
                    " walk through it"
                ) from exc
            if exc.errno == errno.ENAMETOOLONG:
                raise PathRefused(f"{walked} is too long") from exc
            raise
