"""Project quotas on XFS and ext4: a hard size limit for a directory tree.

A directory gets a project id with the inherit flag, so everything created below it is
counted against that project; the project's hard block limit is the directory's size.
``statfs`` on such a directory then reports the limit as the size, so ``df`` and kubelet's
volume stats see the volume, not the whole filesystem.

Both filesystems take the same kernel interfaces, so one code path serves both, in this
process, without a quota tool: the project id and the inherit flag are set with
``FS_IOC_FSSETXATTR`` on a descriptor, the limit with quotactl(2) ``Q_XSETQLIM``, the usage
read with ``Q_XGETQUOTA``, and whether the kernel enforces project quotas at all with
``Q_XGETQSTAT``. quotactl(2) names a filesystem by its block device, whose node (say a udev
link such as ``/dev/mapper/vg-lv``) a container may not have; so each call goes through
quotactl_fd(2) (Linux 5.14) on a descriptor of the mount point first, and by the device path
only where the kernel lacks it.

A full project fails writes with EDQUOT on ext4 ("Disk quota exceeded") but with ENOSPC on
XFS ("No space left on device").

Where they are enforced (the one rule, :func:`enforcement_problem`):

- XFS mounted with ``prjquota`` (or ``pquota``); ``pqnoenforce`` counts without enforcing;
- ext4 with the ``project`` and ``quota`` features (``mkfs.ext4 -O quota,project``, or
  ``tune2fs -O project,quota`` on an unmounted filesystem) mounted with ``prjquota``. Without
  the mount option ext4 counts project usage but enforces nothing; without the ``project``
  feature the kernel refuses the option; without the ``quota`` feature it takes the option
  and never turns project quotas on. ext4's limits, kept by the kernel's generic quota code,
  do not hold a process with ``CAP_SYS_RESOURCE`` (a privileged container); XFS's hold
  everyone.

The mount options are read from the mount table; what the kernel says (``Q_XGETQSTAT``) has
the last word, so a filesystem that looks right but enforces nothing is never taken for one
that does.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as errnos
import fcntl
import logging
import os
import platform
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from csi_driver.system.failure import SystemFailure
from csi_driver.system.mounter import MountInfo
from csi_driver.system.usage_walk import VANISHED, Bounds, WalkError, opened_dir, walk

log = logging.getLogger(__name__)

#: per filesystem, the superblock options under which it enforces project quotas
ENFORCING_OPTIONS = {
    "xfs": frozenset({"prjquota", "pquota"}),
    "ext4": frozenset({"prjquota"}),
}
MAX_PROJECT_ID = 2**32 - 2

# struct fsxattr (linux/fs.h): xflags, extsize, nextents, projid, cowextsize, 8 bytes pad
_FSXATTR = struct.Struct("=IIIII8x")
_FS_IOC_FSGETXATTR = 0x801C581F  # _IOR('X', 31, struct fsxattr)
_FS_IOC_FSSETXATTR = 0x401C5820  # _IOW('X', 32, struct fsxattr)
_FS_XFLAG_PROJINHERIT = 0x00000200
_FS_XFLAG_HASATTR = 0x80000000
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY

# quotactl(2) commands of linux/dqblk_xfs.h for project quotas, and struct fs_disk_quota up
# to the inode count: version, flags, fieldmask, id, then u64 block hard and soft limits,
# inode hard and soft limits, block count, inode count; blocks are 512-byte basic blocks
_Q_XGETQUOTA = (ord("X") << 8) + 3
_Q_XSETQLIM = (ord("X") << 8) + 4
_Q_XGETQSTAT = (ord("X") << 8) + 5
_PRJQUOTA = 2
_FS_DQUOT_VERSION = 1
_FS_PROJ_QUOTA = 2
_FS_DQ_BHARD = 1 << 3
_FS_DISK_QUOTA = struct.Struct("=bbHI6Q")
_FS_DISK_QUOTA_SIZE = 112
# struct fs_quota_stat: version (s8), pad, flags (u16), ...; room for all of it
_FS_QUOTA_STAT_SIZE = 128
_FS_QUOTA_PDQ_ACCT = 1 << 4
_FS_QUOTA_PDQ_ENFD = 1 << 5
_BASIC_BLOCK = 512
#: a tree given a project at start (a root remounted with quotas) may be deep, never endless;
#: it is walked in the background (recovery.py), so its time is not bounded, only stoppable
_ASSIGN_BOUNDS = Bounds(max_entries=2**62, max_seconds=float("inf"), max_depth=512)
#: quotactl_fd(2): the same number on every architecture with the generic syscall table
_SYS_QUOTACTL_FD = {"x86_64": 443, "aarch64": 443}.get(platform.machine())
#: what quotactl_fd answers where the kernel (or a seccomp profile) does not have it
_NO_QUOTACTL_FD = frozenset({errnos.ENOSYS, errnos.EPERM})


class QuotaError(SystemFailure):
    """A quota could not be read or set; the message says which and why."""


@dataclass(frozen=True)
class QuotaState:
    """What the kernel does with the project quotas of one filesystem."""

    accounting: bool
    enforcing: bool


@dataclass(frozen=True)
class ProjectUsage:
    used_bytes: int
    used_inodes: int
    #: the hard block limit in bytes; 0 for none
    hard_bytes: int


def _quotactl_dev(cmd: int, device: str, qid: int, buf: ctypes.Array[ctypes.c_char]) -> None:
    """quotactl(2) on the filesystem of the block device ``device``; OSError with its errno."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.quotactl(cmd, os.fsencode(device), ctypes.c_int(qid), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _quotactl_fd(cmd: int, mountpoint: str, qid: int, buf: ctypes.Array[ctypes.c_char]) -> None:
    """quotactl_fd(2) on the filesystem mounted at ``mountpoint``; OSError with its errno
    (ENOSYS where this machine has no number for it)."""
    if _SYS_QUOTACTL_FD is None:
        raise OSError(errnos.ENOSYS, os.strerror(errnos.ENOSYS))
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        args = (ctypes.c_uint(fd), ctypes.c_uint(cmd), ctypes.c_uint(qid), buf)
        if libc.syscall(ctypes.c_long(_SYS_QUOTACTL_FD), *args) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def _quotactl(
    command: int, mountpoint: str, device: str, qid: int, buf: ctypes.Array[ctypes.c_char]
) -> None:
    """One project quotactl on the filesystem mounted at ``mountpoint`` from ``device``: by
    a descriptor of the mount point, else (no quotactl_fd, the mount point not openable) by
    the device path. OSError with its errno."""
    cmd = (command << 8) | _PRJQUOTA
    if mountpoint:
        try:
            _quotactl_fd(cmd, mountpoint, qid, buf)
            return
        except OSError as exc:
            if not device:
                raise
            if exc.errno in _NO_QUOTACTL_FD:
                log.debug(f"quotactl_fd is not available ({exc.strerror}); using {device}")
            elif exc.filename is None:
                raise  # the kernel's answer about the quota itself
    if not device:
        raise OSError(errnos.ENODEV, "neither the mount point nor the device is known")
    _quotactl_dev(cmd, device, qid, buf)


def quota_state(device: str, mountpoint: str = "") -> QuotaState:
    """Whether the kernel counts and enforces project quotas on the filesystem of ``device``
    mounted at ``mountpoint`` (``Q_XGETQSTAT``; a filesystem without any quota turned on
    answers ENOSYS)."""
    buf = ctypes.create_string_buffer(_FS_QUOTA_STAT_SIZE)
    try:
        _quotactl(_Q_XGETQSTAT, mountpoint, device, 0, buf)
    except OSError as exc:
        if exc.errno in (errnos.ENOSYS, errnos.ESRCH):
            return QuotaState(False, False)
        raise QuotaError(
            f"cannot read the quota state of {device}: {exc.strerror}", errno=exc.errno
        ) from exc
    (flags,) = struct.unpack_from("=H", buf.raw, 2)
    return QuotaState(bool(flags & _FS_QUOTA_PDQ_ACCT), bool(flags & _FS_QUOTA_PDQ_ENFD))


def options_problem(mount: MountInfo) -> str | None:
    """Why the mount options of ``mount`` cannot enforce project quotas; None when they can."""
    wanted = ENFORCING_OPTIONS.get(mount.fs_type)
    if wanted is None:
        return (
            f"it is on {mount.fs_type or 'an unknown filesystem'}, which has no project quotas"
            " (XFS mounted with prjquota, or ext4 with the project and quota features mounted"
            " with prjquota, would enforce them)"
        )
    if wanted & set(mount.super_options):
        return None
    if mount.fs_type == "xfs":
        return "it is on XFS mounted without prjquota (mount it with prjquota to enforce them)"
    return (
        "it is on ext4 mounted without prjquota (give the filesystem the project and quota"
        " features, e.g. mkfs.ext4 -O quota,project or tune2fs -O project,quota while it is"
        " unmounted, and mount it with prjquota to enforce them)"
    )


def enforcement_problem(
    mount: MountInfo, state_of: Callable[[str], QuotaState] | None = None
) -> str | None:
    """Why directory sizes on ``mount`` cannot be enforced with project quotas; None when they
    can: its options ask for enforcement and the kernel (``state_of`` its device; by default
    :func:`quota_state` of the mount) does it."""
    problem = options_problem(mount)
    if problem is not None:
        return problem
    try:
        if state_of is None:
            state = quota_state(mount.source, mount.mount_point)
        else:
            state = state_of(mount.source)
    except QuotaError as exc:
        return f"the kernel's quota state cannot be read ({exc})"
    if state.enforcing:
        return None
    if mount.fs_type == "ext4":
        return (
            f"it is on ext4 mounted with prjquota, but the kernel does not enforce project"
            f" quotas on {mount.source} (the filesystem lacks the quota feature or its project"
            " quota inode: tune2fs -O quota -Q prjquota while it is unmounted)"
        )
    return f"the kernel does not enforce project quotas on {mount.source}"


def enforces_project_quota(mount: MountInfo) -> bool:
    """True when the mount options of ``mount`` ask for enforced project quotas."""
    return options_problem(mount) is None


@contextlib.contextmanager
def _opened(path: str | Path, dir_fd: int | None = None) -> Iterator[int]:
    try:
        fd = os.open(path, _OPEN_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        raise QuotaError(f"cannot open {path}: {exc.strerror}", errno=exc.errno) from exc
    try:
        yield fd
    finally:
        os.close(fd)


def _fsxattr(fd: int, what: str | Path) -> tuple[int, int, int, int, int]:
    try:
        buf = fcntl.ioctl(fd, _FS_IOC_FSGETXATTR, bytes(_FSXATTR.size))
    except OSError as exc:
        raise QuotaError(
            f"cannot read the project id of {what}: {exc.strerror}", errno=exc.errno
        ) from exc
    xflags, extsize, nextents, projid, cowextsize = _FSXATTR.unpack(buf)
    return xflags, extsize, nextents, projid, cowextsize


def project_of(path: str | Path) -> tuple[int, bool]:
    """(project id, inherit flag) of a file or directory, read with FS_IOC_FSGETXATTR;
    symlinks are not followed."""
    with _opened(path) as fd:
        xflags, _, _, projid, _ = _fsxattr(fd, path)
    return projid, bool(xflags & _FS_XFLAG_PROJINHERIT)


def set_project(fd: int, project_id: int, inherit: bool, what: str | Path) -> None:
    """Put the inode open at ``fd`` into project ``project_id``, with the inherit flag when
    ``inherit`` (directories); nothing is written when it is so already."""
    xflags, extsize, nextents, projid, cowextsize = _fsxattr(fd, what)
    xflags &= ~_FS_XFLAG_HASATTR  # reported, never set
    wanted = xflags | _FS_XFLAG_PROJINHERIT if inherit else xflags
    if (projid, xflags) == (project_id, wanted):
        return
    packed = _FSXATTR.pack(wanted, extsize, nextents, project_id, cowextsize)
    try:
        fcntl.ioctl(fd, _FS_IOC_FSSETXATTR, packed)
    except OSError as exc:
        raise QuotaError(
            f"cannot set project {project_id} on {what}: {exc.strerror}", errno=exc.errno
        ) from exc


class ProjectQuota:
    """Project quota operations on one mounted XFS or ext4 filesystem. Knows nothing of CSI."""

    def __init__(self, mountpoint: str, device: str = "") -> None:
        self.mountpoint = mountpoint
        #: the block device it is mounted from: quotactl(2) names a filesystem by it
        self.device = device

    def _call(self, command: int, project_id: int, buf: ctypes.Array[ctypes.c_char]) -> None:
        _check_id(project_id)
        if not self.device:
            raise QuotaError(f"the device of {self.mountpoint} is not known")
        _quotactl(command, self.mountpoint, self.device, project_id, buf)

    def usage(self, project_id: int) -> ProjectUsage:
        """The bytes and inodes project ``project_id`` holds and its hard limit, read with one
        quotactl(2) call: cheap enough to ask for every volume every few seconds."""
        buf = ctypes.create_string_buffer(_FS_DISK_QUOTA_SIZE)
        try:
            self._call(_Q_XGETQUOTA, project_id, buf)
        except OSError as exc:
            raise QuotaError(
                f"cannot read the usage of project {project_id} on {self.device}: {exc.strerror}",
                errno=exc.errno,
            ) from exc
        fields = _FS_DISK_QUOTA.unpack_from(buf.raw)
        hard, blocks, inodes = fields[4], fields[8], fields[9]
        return ProjectUsage(blocks * _BASIC_BLOCK, inodes, hard * _BASIC_BLOCK)

    def in_use(self, project_id: int) -> bool:
        """Whether project ``project_id`` holds anything or has a limit on this filesystem
        (another root here, the kubelet, the admin): such an id is not handed out. XFS
        answers ENOENT for a project it has never seen."""
        try:
            found = self.usage(project_id)
        except QuotaError as exc:
            if exc.errno == errnos.ENOENT:
                return False
            raise
        return bool(found.used_bytes or found.used_inodes or found.hard_bytes)

    def set_limit(self, project_id: int, hard_bytes: int) -> None:
        """Set the project's hard block limit (rounded up to 512 bytes); 0 removes it."""
        _check_id(project_id)
        if hard_bytes < 0:
            raise QuotaError(f"a quota limit cannot be negative ({hard_bytes})")
        blocks = -(-hard_bytes // _BASIC_BLOCK)
        packed = _FS_DISK_QUOTA.pack(
            _FS_DQUOT_VERSION, _FS_PROJ_QUOTA, _FS_DQ_BHARD, project_id, blocks, 0, 0, 0, 0, 0
        )
        buf = ctypes.create_string_buffer(packed, _FS_DISK_QUOTA_SIZE)
        try:
            self._call(_Q_XSETQLIM, project_id, buf)
        except OSError as exc:
            raise QuotaError(
                f"cannot set the limit of project {project_id} on {self.device} to"
                f" {hard_bytes} bytes: {exc.strerror}",
                errno=exc.errno,
            ) from exc

    def assign(
        self, directory: Path, project_id: int, stopping: Callable[[], bool] | None = None
    ) -> None:
        """Put ``directory`` and every directory and regular file below it (on the same
        mount; symlinks are not followed) into project ``project_id``, and mark directories
        so that what is created in them inherits it. Symlinks, device nodes, fifos and
        sockets already there keep their project: no descriptor of theirs takes the ioctl.
        They hold no data blocks (a long symlink target aside), and what is made after
        this inherits the project. Entries that vanish or are swapped meanwhile are skipped.

        ``directory`` itself gets its project first, so that what is created in it while the
        walk runs inherits it; an assignment cut short (a kill, a failure, ``stopping``)
        therefore leaves a top that looks done. The mark of a finished one is the caller's:
        the limit set after it (limits.py)."""
        _check_id(project_id)
        try:
            with opened_dir(directory) as top:
                set_project(top, project_id, True, directory)

                def give(parent: int, name: str, st: os.stat_result) -> None:
                    if stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
                        try:
                            fd = os.open(name, _OPEN_FLAGS, dir_fd=parent)
                        except OSError as exc:
                            if exc.errno in VANISHED or exc.errno == errnos.ENXIO:
                                return  # gone, or swapped for a link or a socket
                            raise QuotaError(
                                f"cannot open {name}: {exc.strerror}", errno=exc.errno
                            ) from exc
                        try:
                            if os.fstat(fd).st_ino == st.st_ino:
                                set_project(fd, project_id, stat.S_ISDIR(st.st_mode), name)
                        finally:
                            os.close(fd)

                stopped = walk(top, give, _ASSIGN_BOUNDS, stopping=stopping)
        except WalkError as exc:
            raise QuotaError(str(exc), errno=exc.errno) from exc
        if stopped:
            raise QuotaError(f"project {project_id} was not given to all of {directory}: {stopped}")
        projid, inherit = project_of(directory)
        if projid != project_id or not inherit:
            raise QuotaError(
                f"project {project_id} did not stick on {directory} (it has project {projid},"
                f" inherit {inherit})"
            )


def _check_id(project_id: int) -> None:
    if not 0 < project_id <= MAX_PROJECT_ID:
        raise QuotaError(f"project id {project_id} is outside 1..{MAX_PROJECT_ID}")
