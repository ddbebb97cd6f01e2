"""Whether a mounted filesystem is still fit for writing, from what the kernel already shows.

Asked every minute for every mounted volume, so nothing here runs a program: one line of the
mount table (read anyway) and at most one small sysfs file.

What is reliable (checked on Linux 6.x with ext4 and XFS):

* A filesystem the kernel stopped writing after an error: older kernels set the superblock
  read-only, which mountinfo shows as ``ro`` among the *superblock* options (the per-mount
  ``ro``/``rw`` is only the mount's own flag); ext4 on newer kernels (6.x) keeps the superblock
  ``rw`` and adds ``emergency_ro`` there instead. ``statvfs`` does not say ``ST_RDONLY`` in
  that case, so the mount table is the place to look.
* ext4 counts its errors in the superblock (``/sys/fs/ext4/<device>/errors_count``) whatever
  its ``errors=`` behaviour, also with the default ``continue`` that stays writable, and keeps
  the count until ``e2fsck`` clears it.
* XFS shuts down after an error: every call on it, ``statvfs`` included, fails with EIO; the
  caller sees that when it measures the volume.

Knows nothing of CSI.
"""

from __future__ import annotations

import os

from csi_driver.system.mounter import MountInfo

SYSFS = "/sys"


def stopped(mount: MountInfo) -> bool:
    """The kernel stopped writes to the filesystem under this mount: ext4's ``emergency_ro``,
    or a read-only superblock under a mount that is itself read-write (a filesystem mounted
    read-only on purpose, with ``ro`` among its mount flags, is read-only in both)."""
    sb = mount.super_options
    return "emergency_ro" in sb or ("ro" in sb and "rw" in mount.options)


def fault(mount: MountInfo, sysfs: str = SYSFS) -> str | None:
    """What is wrong with the filesystem of ``mount``, in a sentence, or None."""
    where = f"the {mount.fs_type} filesystem on {mount.source}"
    if stopped(mount):
        return (
            f"{where} is read-only although it was mounted read-write: the kernel stops writes"
            " to a filesystem after an I/O or metadata error (see the kernel log), or it was"
            " remounted read-only outside the driver"
        )
    if mount.fs_type == "ext4":
        errors = ext4_error_count(mount.major, mount.minor, sysfs)
        if errors:
            return f"{where} has recorded {errors} error(s) since it was last checked"
    return None


def ext4_error_count(major: int, minor: int, sysfs: str = SYSFS) -> int:
    """The errors ext4 recorded on the block device ``major:minor``; 0 when it has none or
    the count cannot be read (not a block device, not ext4, an older kernel)."""
    try:
        name = os.path.basename(os.readlink(f"{sysfs}/dev/block/{major}:{minor}"))
        with open(f"{sysfs}/fs/ext4/{name}/errors_count", "rb") as f:
            return int(f.read(32).strip() or 0)
    except (OSError, ValueError):
        return 0
