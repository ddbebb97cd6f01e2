"""IO limits of one block device in one Pod's cgroup: the cgroup v2 ``io.max`` file.

A line of ``io.max`` reads ``MAJ:MIN rbps=N wbps=N riops=N wiops=N`` (``max`` for no limit);
the kernel keeps one line per device and drops a line whose four values are all ``max``, so
writing all-``max`` is how a limit is removed, and writing the same line twice is harmless.
Only the line of the one device asked for is ever written: lines of other devices, whoever set
them, are left as they are.

Where the Pod's cgroup is. The kubelet makes one cgroup per Pod, below its QoS class:

* systemd driver: ``kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid>.slice`` (the
  uid's dashes become underscores), or ``kubepods.slice/kubepods-pod<uid>.slice`` for a
  Guaranteed Pod;
* cgroupfs driver: ``kubepods/<qos>/pod<uid>``, or ``kubepods/pod<uid>``.

A kubelet started with ``--cgroup-root`` puts the same tree below that cgroup: given it
(``--kubelet-cgroup-root``), the fixed places are tried there, as given and as the systemd
driver turns it into slices, before the hierarchy's root. After the fixed places, a bounded
walk (depth, directories visited) from the same starts looks below directories named
``kubepods*``, ``kubelet*`` or ``*-kubepods*``. The uid is checked to be a
UUID before it is used in any name; the walk never follows a symbolic link, and every file is
opened from its directory's descriptor with ``O_NOFOLLOW``, so nothing outside the cgroup root
is touched.

This module knows nothing of volumes or Pods beyond those names; what a limit means for a
volume is the caller's business.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections import deque
from dataclasses import dataclass

DEFAULT_ROOT = "/sys/fs/cgroup"
#: the four keys of an io.max line, in the kernel's order
KEYS = ("rbps", "wbps", "riops", "wiops")
#: the kernel reads each value as an unsigned 64-bit number and takes U64_MAX as "max"; IOs per
#: second it clamps to 32 bits, where UINT_MAX is "max" again
LIMIT_MAX = 2**64 - 2
IOPS_MAX = 2**32 - 2
#: 0 is refused by the kernel (ERANGE) and 1 by older kernels: refuse both here
LIMIT_MIN = 2
#: bounds of the walk for a Pod's cgroup below a kubelet --cgroup-root
WALK_DEPTH = 4
WALK_DIRS = 2048
_UID = re.compile(r"\A[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
_QOS = ("burstable", "besteffort")
#: directories the walk enters: the kubelet's (``kubepods``, ``kubepods.slice``, ``kubelet``…),
#: also below a systemd --cgroup-root, whose children carry its prefix (``x-kubepods.slice``)
_KUBELET_DIR = re.compile(r"\A(kubepods|kubelet|[^/]*-kubepods)")
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: O_TRUNC as a shell's ``>`` has it: the kernel ignores it; a plain file (tests) is replaced
_WRITE = os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_LIMIT = 1 << 20


class CgroupError(Exception):
    """A cgroup operation that could not be done; the message says what and where."""


@dataclass(frozen=True)
class IoLimits:
    """Limits for one device; ``None`` is no limit (``max``)."""

    rbps: int | None = None
    wbps: int | None = None
    riops: int | None = None
    wiops: int | None = None

    def __post_init__(self) -> None:
        for key in KEYS:
            value = getattr(self, key)
            if value is not None and not LIMIT_MIN <= value <= LIMIT_MAX:
                raise ValueError(f"{key} must be from {LIMIT_MIN} to {LIMIT_MAX}, not {value}")

    @property
    def any(self) -> bool:
        return any(getattr(self, key) is not None for key in KEYS)

    def line(self, device: tuple[int, int]) -> str:
        values = [getattr(self, key) for key in KEYS]
        fields = " ".join(
            f"{k}={'max' if v is None else v}" for k, v in zip(KEYS, values, strict=True)
        )
        return f"{device[0]}:{device[1]} {fields}"


def is_pod_uid(value: str) -> bool:
    return bool(_UID.match(value))


def parse_io_max(text: str) -> dict[tuple[int, int], IoLimits]:
    """The lines of an ``io.max`` file, by device; malformed lines are skipped."""
    out: dict[tuple[int, int], IoLimits] = {}
    for raw in text.splitlines():
        parts = raw.split()
        if not parts:
            continue
        major, sep, minor = parts[0].partition(":")
        if not sep or not major.isdigit() or not minor.isdigit():
            continue
        values: dict[str, int | None] = {}
        for part in parts[1:]:
            key, sep, value = part.partition("=")
            if key in KEYS and sep:
                values[key] = None if value == "max" else _number(value)
        try:
            limits = IoLimits(**values)
        except ValueError:
            continue
        if limits.any:  # all max: the kernel's "no line"
            out[(int(major), int(minor))] = limits
    return out


def _number(value: str) -> int | None:
    return int(value) if value.isdigit() and len(value) <= 20 else None


def block_device(path: str) -> tuple[int, int]:
    """The device number of the block device at ``path`` (a symlink to it is followed: the
    backends hand out names such as ``/dev/<vg>/<lv>``)."""
    st = os.stat(path)
    if not stat.S_ISBLK(st.st_mode):
        raise CgroupError(f"{path} is not a block device")
    return os.major(st.st_rdev), os.minor(st.st_rdev)


class CgroupIo:
    """The cgroup v2 hierarchy at ``root`` (``/sys/fs/cgroup``; another for tests), with the
    kubelet's ``--cgroup-root`` within it as names (none: the hierarchy's root)."""

    def __init__(self, root: str = DEFAULT_ROOT, kubelet_root: tuple[str, ...] = ()) -> None:
        self.root = root
        self.kubelet_root = kubelet_root
        self._starts = self._bases(kubelet_root)

    def problem(self) -> str | None:
        """Why IO limits cannot be set on this host, or None when they can."""
        try:
            text = self._read(self.root, "cgroup.controllers")
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return (
                    f"this node has no cgroup v2 hierarchy at {self.root} (cgroup v1 or hybrid),"
                    " so the io controller that enforces IO limits is missing"
                )
            return f"{self.root}/cgroup.controllers cannot be read: {exc.strerror}"
        if "io" not in text.split():
            return (
                f"the cgroup v2 io controller is not available on this node ({self.root}"
                f"/cgroup.controllers lists {text.split()[:12]})"
            )
        return None

    def pod_cgroup(self, pod_uid: str) -> str | None:
        """The path of the Pod's cgroup directory, or None when there is none."""
        if not is_pod_uid(pod_uid):
            raise CgroupError(f"pod uid {pod_uid[:64]!r} is not a UUID")
        for base in self._starts:
            for relative in self._fixed_places(pod_uid):
                if self._is_dir((*base, *relative)):
                    return os.path.join(self.root, *base, *relative)
        found = self._walk(pod_uid)
        return os.path.join(self.root, *found) if found else None

    def limits(self, cgroup: str, device: tuple[int, int]) -> IoLimits | None:
        """The limits of ``device`` in ``cgroup``'s io.max, or None when it has no line."""
        try:
            text = self._read(cgroup, "io.max")
        except FileNotFoundError as exc:
            raise CgroupError(
                f"{cgroup} has no io.max: the io controller is not enabled for it (its parent's"
                " cgroup.subtree_control lacks io)"
            ) from exc
        return parse_io_max(text).get(device)

    def set_limits(self, cgroup: str, device: tuple[int, int], limits: IoLimits) -> None:
        """Write the line of ``device``: ``limits``, or none at all when they are all max."""
        self._check_confined(cgroup)
        if self.limits(cgroup, device) == (limits if limits.any else None):
            return
        self._write(cgroup, "io.max", limits.line(device))

    def clear(self, cgroup: str, device: tuple[int, int]) -> bool:
        """Remove the line of ``device``; whether there was one."""
        self._check_confined(cgroup)
        if self.limits(cgroup, device) is None:
            return False
        self._write(cgroup, "io.max", IoLimits().line(device))
        return True

    # --- finding the Pod's cgroup ----------------------------------------------------------

    @staticmethod
    def _bases(names: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
        """Where the kubelet's tree may start: below its --cgroup-root as given (cgroupfs
        driver), as the systemd driver turns it into slices (``/a/b``: ``a.slice/a-b.slice``,
        a dash in a name becoming an underscore), then the hierarchy's root."""
        bases: list[tuple[str, ...]] = []
        if names:
            bases.append(names)
            if not any(name.endswith(".slice") for name in names):
                escaped = [name.replace("-", "_") for name in names]
                bases.append(
                    tuple("-".join(escaped[: i + 1]) + ".slice" for i in range(len(escaped)))
                )
        bases.append(())
        return tuple(bases)

    @staticmethod
    def _fixed_places(uid: str) -> list[tuple[str, ...]]:
        under = uid.replace("-", "_")
        places: list[tuple[str, ...]] = [("kubepods.slice", f"kubepods-pod{under}.slice")]
        places += [
            ("kubepods.slice", f"kubepods-{q}.slice", f"kubepods-{q}-pod{under}.slice")
            for q in _QOS
        ]
        places.append(("kubepods", f"pod{uid}"))
        places += [("kubepods", q, f"pod{uid}") for q in _QOS]
        return places

    def _walk(self, uid: str) -> tuple[str, ...] | None:
        """Breadth-first below the kubelet's cgroup root and kubepods*/kubelet* directories,
        bounded in depth (from where it starts) and in directories visited."""
        wanted = (f"pod{uid}", f"-pod{uid.replace('-', '_')}.slice")
        # a start is checked for symlinks on its way; below it, scandir says what is a directory
        queue: deque[tuple[tuple[str, ...], int]] = deque(
            (start, 0) for start in self._starts if self._is_dir(start)
        )
        seen: set[tuple[str, ...]] = set()
        while queue and len(seen) < WALK_DIRS:
            relative, depth = queue.popleft()
            if relative in seen:
                continue
            seen.add(relative)
            try:
                with os.scandir(os.path.join(self.root, *relative)) as entries:
                    names = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
            except OSError:
                continue
            for name in names:
                if name == wanted[0] or name.endswith(wanted[1]):
                    return (*relative, name)
                if depth + 1 < WALK_DEPTH and _KUBELET_DIR.match(name):
                    queue.append(((*relative, name), depth + 1))
        return None

    def _is_dir(self, relative: tuple[str, ...]) -> bool:
        """Whether ``relative`` is a directory, every component of it a real directory."""
        try:
            return all(
                stat.S_ISDIR(os.lstat(os.path.join(self.root, *relative[: i + 1])).st_mode)
                for i in range(len(relative))
            )
        except OSError:
            return False

    # --- files -----------------------------------------------------------------------------

    def _check_confined(self, cgroup: str) -> None:
        relative = os.path.relpath(cgroup, self.root)
        if relative == "." or relative.startswith("..") or os.path.isabs(relative):
            raise CgroupError(f"{cgroup} is not below the cgroup root {self.root}")

    def _open_dir(self, directory: str) -> int:
        """``directory``, walked from the root one component at a time, no symlink followed."""
        fd = os.open(self.root, _DIR)
        relative = os.path.relpath(directory, self.root)
        try:
            for name in [] if relative == "." else relative.split(os.sep):
                if name in ("", ".", ".."):
                    raise CgroupError(f"{directory} is not below the cgroup root {self.root}")
                next_fd = os.open(name, _DIR, dir_fd=fd)
                os.close(fd)
                fd = next_fd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _read(self, directory: str, name: str) -> str:
        dir_fd = self._open_dir(directory)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        with os.fdopen(fd, "rb") as f:
            return f.read(_READ_LIMIT).decode("ascii", "replace")

    def _write(self, directory: str, name: str, line: str) -> None:
        dir_fd = self._open_dir(directory)
        try:
            fd = os.open(name, _WRITE, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        try:
            os.write(fd, line.encode("ascii"))
        except OSError as exc:
            raise CgroupError(
                f"writing {line!r} to {directory}/{name} failed: {exc.strerror}"
            ) from exc
        finally:
            os.close(fd)


__all__ = [
    "DEFAULT_ROOT",
    "KEYS",
    "LIMIT_MAX",
    "LIMIT_MIN",
    "CgroupError",
    "CgroupIo",
    "IoLimits",
    "block_device",
    "is_pod_uid",
    "parse_io_max",
]
