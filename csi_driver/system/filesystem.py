"""Filesystems and block devices: probe, format (only a blank device), grow, measure.

The one rule that matters here: a device that holds anything ``blkid`` recognises is never
formatted. Probing uses ``blkid -p`` (low-level superblock probing, no cache) so a stale
cache can never make a filesystem look absent.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from csi_driver.model import Usage
from csi_driver.system import fsinfo
from csi_driver.system.failure import SystemFailure
from csi_driver.system.runner import CommandError, Runner

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 30.0
FORMAT_TIMEOUT = 600.0
RESIZE_TIMEOUT = 600.0
QUERY_TIMEOUT = 30.0
#: <linux/fs.h>: set and get a block device's own read-only flag (_IO(0x12, 93) and 94)
BLKROSET = 0x125D
BLKROGET = 0x125E

#: blkid's exit status when it found no signature at all
BLKID_NOTHING_FOUND = 2

_EXT = ("ext2", "ext3", "ext4")

# Why these flags: no root-reserved blocks (a volume belongs to one application, a 5 % reserve
# would only be lost space); no discard pass (on large devices it can take minutes, and a
# blank device has nothing to discard). Neither tool is given a "force" flag: we only format
# after blkid found nothing, and mkfs.xfs then refuses anything it recognises as a second guard.
_MKFS: dict[str, tuple[str, ...]] = {
    "ext2": ("mkfs.ext2", "-q", "-m", "0", "-E", "nodiscard"),
    "ext3": ("mkfs.ext3", "-q", "-m", "0", "-E", "nodiscard"),
    "ext4": ("mkfs.ext4", "-q", "-m", "0", "-E", "nodiscard"),
    "xfs": ("mkfs.xfs", "-q", "-K"),
}


class FilesystemError(SystemFailure):
    """A probe, format, resize or measurement failed; the message says which and why."""


@dataclass(frozen=True)
class Signature:
    """What blkid found on a device."""

    type: str  # "ext4", "xfs", "LVM2_member", "gpt", ...
    usage: str  # "filesystem", "raid", "crypto", "other", or "partition table"

    @property
    def is_filesystem(self) -> bool:
        return self.usage == "filesystem"


def parse_blkid_export(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


class Filesystems:
    """Filesystem and block device operations through the runner. Knows nothing of CSI."""

    def __init__(self, runner: Runner) -> None:
        self._runner = runner

    @staticmethod
    def formattable() -> Sequence[str]:
        return tuple(_MKFS)

    @staticmethod
    def _require_block_device(device: str) -> None:
        try:
            st = os.stat(device)
        except OSError as exc:
            raise FilesystemError(f"{device}: {exc.strerror}") from exc
        if not stat.S_ISBLK(st.st_mode):
            raise FilesystemError(f"{device} is not a block device")

    def probe(self, device: str) -> Signature | None:
        """The signature on ``device``, or None when the device is blank.

        blkid exits 2 both for "nothing found" and for a path that does not exist, so the
        device is checked first: only a real block device with no signature counts as blank.
        """
        self._require_block_device(device)
        try:
            result = self._runner.run(
                ["blkid", "-p", "-o", "export", "--", device], timeout=PROBE_TIMEOUT, check=False
            )
        except CommandError as exc:
            raise FilesystemError(f"probing {device} failed: {exc}") from exc
        if result.returncode == BLKID_NOTHING_FOUND:
            return None
        if result.returncode != 0:
            detail = result.stderr.strip() or f"blkid exited with status {result.returncode}"
            raise FilesystemError(f"probing {device} failed: {detail}")
        fields = parse_blkid_export(result.stdout)
        if "TYPE" in fields:
            return Signature(fields["TYPE"], fields.get("USAGE", "other"))
        if "PTTYPE" in fields:
            return Signature(fields["PTTYPE"], "partition table")
        # blkid reported success but named nothing; treat it as data we do not understand.
        return Signature("unknown", "other")

    def format(self, device: str, fstype: str) -> None:
        """Create a ``fstype`` filesystem on a device that :meth:`probe` found blank."""
        argv = _MKFS.get(fstype)
        if argv is None:
            raise FilesystemError(
                f"cannot create a {fstype!r} filesystem; supported: {', '.join(_MKFS)}"
            )
        existing = self.probe(device)
        if existing is not None:
            raise FilesystemError(
                f"{device} already holds {existing.type} ({existing.usage}); refusing to format"
            )
        log.info("formatting", extra={"device": device, "fstype": fstype})
        try:
            self._runner.run([*argv, device], timeout=FORMAT_TIMEOUT, input="")
        except CommandError as exc:
            raise FilesystemError(f"creating {fstype} on {device} failed: {exc}") from exc

    def resize(self, device: str, mountpoint: str, fstype: str) -> None:
        """Grow the (mounted) filesystem on ``device`` to fill the device. A no-op when it
        already does, so retries are harmless."""
        if fstype in _EXT:
            argv = ["resize2fs", device]
        elif fstype == "xfs":
            argv = ["xfs_growfs", mountpoint]
        else:
            raise FilesystemError(f"growing a {fstype!r} filesystem is not supported")
        try:
            self._runner.run(argv, timeout=RESIZE_TIMEOUT)
        except CommandError as exc:
            raise FilesystemError(f"growing {fstype} on {device} failed: {exc}") from exc

    def block_device_size(self, device: str) -> int:
        """The size of a block device, read in-process (the path may be a descriptor's name,
        ``/proc/self/fd/N``, which a child process could not follow)."""
        self._require_block_device(device)
        try:
            fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
            try:
                return os.lseek(fd, 0, os.SEEK_END)
            finally:
                os.close(fd)
        except OSError as exc:
            raise FilesystemError(f"reading the size of {device} failed: {exc.strerror}") from exc

    def is_read_only(self, device: str) -> bool:
        """The device's own read-only flag, read in-process (BLKROGET, as ``blockdev
        --getro`` does, without a process per question)."""
        return self._read_only_ioctl(device, BLKROGET, 0, "reading the read-only flag of") != 0

    def set_read_only(self, device: str, read_only: bool) -> None:
        """Set the device's own read-only flag (BLKROSET, as ``blockdev --setro``/``--setrw``
        does). A read-only bind mount of a device node does not stop writes to the device;
        this does (writes fail with EPERM)."""
        what = "setting" if read_only else "clearing"
        self._read_only_ioctl(device, BLKROSET, int(read_only), f"{what} the read-only flag of")

    def _read_only_ioctl(self, device: str, request: int, value: int, what: str) -> int:
        self._require_block_device(device)
        try:
            fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
            try:
                answer = fcntl.ioctl(fd, request, struct.pack("i", value))
            finally:
                os.close(fd)
        except OSError as exc:
            raise FilesystemError(f"{what} {device} failed: {exc.strerror}") from exc
        return int(struct.unpack("i", answer)[0])

    @staticmethod
    def usage(path: str) -> Usage:
        """Bytes and inodes of the filesystem holding ``path``; ``available`` is what an
        unprivileged writer can still use."""
        try:
            return fsinfo.usage(path)
        except fsinfo.FsInfoError as exc:
            raise FilesystemError(str(exc), errno=exc.errno) from exc
