"""XFS project quotas: a hard size limit for a directory tree.

A directory gets a project id with the inherit flag, so everything created below it is
counted against that project; the project's hard block limit is the directory's size. XFS
enforces project quotas only when the filesystem is mounted with ``prjquota`` (the mount
table then shows ``prjquota`` among the superblock options; ``pqnoenforce`` means counted
but not enforced). ``statfs`` on such a directory reports the limit as the size, so ``df``
and kubelet's volume stats see the volume, not the whole filesystem.

``xfs_quota`` parses its ``-c`` command by splitting on white space, so a path handed to it
must not hold any; paths that would need quoting are refused rather than quoted.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import re
import struct
from pathlib import Path

from csi_driver.system.failure import SystemFailure
from csi_driver.system.mounter import MountInfo
from csi_driver.system.runner import CommandError, Runner

log = logging.getLogger(__name__)

XFS_QUOTA_TIMEOUT = 120.0
#: superblock options under which XFS enforces project quotas
ENFORCING_OPTIONS = frozenset({"prjquota", "pquota"})
MAX_PROJECT_ID = 2**32 - 2

# struct fsxattr (linux/fs.h): xflags, extsize, nextents, projid, cowextsize, 8 bytes pad
_FSXATTR = struct.Struct("=IIIII8x")
_FS_IOC_FSGETXATTR = 0x801C581F  # _IOR('X', 31, struct fsxattr)
_FS_XFLAG_PROJINHERIT = 0x00000200
_SAFE_PATH = re.compile(r"\A/[A-Za-z0-9._/+:@-]*\Z")


class QuotaError(SystemFailure):
    """A quota could not be read or set; the message says which and why."""


def enforces_project_quota(mount: MountInfo) -> bool:
    return mount.fs_type == "xfs" and bool(ENFORCING_OPTIONS & set(mount.super_options))


def quotable_path(path: str | Path) -> bool:
    """True when ``path`` can be handed to ``xfs_quota -c`` without quoting."""
    return bool(_SAFE_PATH.match(str(path)))


def project_of(path: str | Path) -> tuple[int, bool]:
    """(project id, inherit flag) of a file or directory, read with FS_IOC_FSGETXATTR;
    symlinks are not followed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise QuotaError(f"cannot open {path}: {exc.strerror}") from exc
    try:
        buf = fcntl.ioctl(fd, _FS_IOC_FSGETXATTR, bytes(_FSXATTR.size))
    except OSError as exc:
        raise QuotaError(f"cannot read the project id of {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    xflags, _, _, projid, _ = _FSXATTR.unpack(buf)
    return projid, bool(xflags & _FS_XFLAG_PROJINHERIT)


# quotactl(2) Q_XGETQUOTA for project quotas, and struct fs_disk_quota (linux/dqblk_xfs.h) up
# to the block count: version, flags, fieldmask, id, then u64 block hard and soft limits,
# inode hard and soft limits, block count; counts are in 512-byte basic blocks
_Q_XGETQUOTA = (ord("X") << 8) + 3
_PRJQUOTA = 2
_FS_DISK_QUOTA = struct.Struct("=bbHI5Q")
_FS_DISK_QUOTA_SIZE = 112
_BASIC_BLOCK = 512


class XfsProjectQuota:
    """Project quota operations on one mounted XFS filesystem. Knows nothing of CSI."""

    def __init__(self, runner: Runner, mountpoint: str, device: str = "") -> None:
        self._runner = runner
        self.mountpoint = mountpoint
        #: the block device it is mounted from, for reading a project's usage (:meth:`usage`)
        self.device = device

    def usage(self, project_id: int) -> tuple[int, int]:
        """(bytes used, hard limit in bytes; 0 for none) of project ``project_id``, read with
        one quotactl(2) call: cheap enough to ask for every volume every minute."""
        _check_id(project_id)
        if not self.device:
            raise QuotaError(f"the device of {self.mountpoint} is not known")
        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(_FS_DISK_QUOTA_SIZE)
        cmd = (_Q_XGETQUOTA << 8) | _PRJQUOTA
        if libc.quotactl(cmd, os.fsencode(self.device), ctypes.c_int(project_id), buf) != 0:
            err = ctypes.get_errno()
            raise QuotaError(
                f"cannot read the usage of project {project_id} on {self.device}:"
                f" {os.strerror(err)}",
                errno=err,
            )
        _, _, _, _, hard, _, _, _, used = _FS_DISK_QUOTA.unpack_from(buf.raw)
        return used * _BASIC_BLOCK, hard * _BASIC_BLOCK

    def assign(self, directory: Path, project_id: int) -> None:
        """Put ``directory`` and everything below it into project ``project_id`` and mark
        directories so new files inherit it. Checked by reading the id back."""
        _check_id(project_id)
        if not quotable_path(directory):
            raise QuotaError(f"path {str(directory)!r} cannot be passed to xfs_quota")
        self._xfs_quota(f"project -s -p {directory} {project_id}")
        projid, inherit = project_of(directory)
        if projid != project_id or not inherit:
            raise QuotaError(
                f"xfs_quota did not set project {project_id} on {directory} (it has project"
                f" {projid}, inherit {inherit})"
            )

    def set_limit(self, project_id: int, hard_bytes: int) -> None:
        """Set the project's hard block limit; 0 removes the limit."""
        _check_id(project_id)
        if hard_bytes < 0:
            raise QuotaError(f"a quota limit cannot be negative ({hard_bytes})")
        self._xfs_quota(f"limit -p bhard={hard_bytes} {project_id}")

    def _xfs_quota(self, command: str) -> None:
        argv = [
            "xfs_quota",
            "-x",
            # Project names and paths come from the command, never from the host's files.
            "-D",
            "/dev/null",
            "-P",
            "/dev/null",
            "-c",
            command,
            self.mountpoint,
        ]
        try:
            self._runner.run(argv, timeout=XFS_QUOTA_TIMEOUT)
        except CommandError as exc:
            raise QuotaError(f"xfs_quota {command!r} on {self.mountpoint} failed: {exc}") from exc


def _check_id(project_id: int) -> None:
    if not 0 < project_id <= MAX_PROJECT_ID:
        raise QuotaError(f"project id {project_id} is outside 1..{MAX_PROJECT_ID}")
