"""The kernel's own account of its loop devices, read in-process: no ``losetup`` per question.

A bound loop device has a ``loop/`` directory in sysfs (``/sys/block/loopN/loop/backing_file``
and its siblings), which is how ``losetup`` tells bound devices from free ones too. The
``LOOP_GET_STATUS64`` ioctl on the device node answers with the device and inode numbers of the
backing file and the device's flags (autoclear among them). Those numbers are what identifies
an image, as ``losetup --associated`` uses them: sysfs gives the backing file's path as the
kernel sees it now (a renamed image shows its new name, an unlinked one ends in
``(deleted)``), and a path says nothing about which file is there today.

A device can be detached at any moment, also between the listing and the reading: one whose
sysfs directory or node has gone (ENOENT) or that has no backing file any more (ENXIO, or
ENODEV for a device being removed) is simply not bound. Any other failure is raised as the
``OSError`` it is.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

SYS_BLOCK = "/sys/block"
DEV = "/dev"

#: linux/loop.h
LOOP_GET_STATUS64 = 0x4C05
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
#: struct loop_info64: lo_device, lo_inode, lo_rdevice, lo_offset, lo_sizelimit, lo_number,
#: lo_encrypt_type, lo_encrypt_key_size, lo_flags, lo_file_name[64], lo_crypt_name[64],
#: lo_encrypt_key[32], lo_init[2]
LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32sQQ")

#: what a device that was detached under the reader answers
_GONE = frozenset({errno.ENOENT, errno.ENXIO, errno.ENODEV})


@dataclass(frozen=True)
class LoopStatus:
    """A bound loop device as ``LOOP_GET_STATUS64`` describes it."""

    backing_device: int  # st_dev of the backing file, encoded as stat() encodes it
    backing_inode: int
    offset: int
    sizelimit: int
    flags: int
    #: the name given at attach time, cut to 63 bytes; not updated by a rename
    file_name: str

    @property
    def autoclear(self) -> bool:
        """Detached already, while open: it goes away on its last close."""
        return bool(self.flags & LO_FLAGS_AUTOCLEAR)

    def backs(self, st: os.stat_result) -> bool:
        """True when the file ``st`` describes is this device's backing file."""
        return self.backing_device == st.st_dev and self.backing_inode == st.st_ino


@dataclass(frozen=True)
class BoundLoop:
    name: str  # /dev/loopN
    #: the backing file's path as sysfs shows it (`` (deleted)`` appended once unlinked)
    backing_file: str
    status: LoopStatus


def parse_status(raw: bytes) -> LoopStatus:
    """Decode a ``struct loop_info64``."""
    device, inode, _, offset, sizelimit, _, _, _, flags, name, _, _, _, _ = LOOP_INFO64.unpack(raw)
    return LoopStatus(
        backing_device=device,
        backing_inode=inode,
        offset=offset,
        sizelimit=sizelimit,
        flags=flags,
        file_name=os.fsdecode(name.split(b"\0", 1)[0]),
    )


def read_status(device: str) -> LoopStatus:
    """``LOOP_GET_STATUS64`` of ``device``. The node is opened read-only, as ``losetup`` does,
    so closing it tells no one (udev) that the device was written."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return parse_status(fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(LOOP_INFO64.size)))
    finally:
        os.close(fd)


def _number(name: str) -> int | None:
    rest = name.removeprefix("loop")
    return int(rest) if rest != name and rest.isdigit() else None


def _gone(exc: OSError) -> bool:
    return exc.errno in _GONE


def bound(
    sys_block: str = SYS_BLOCK,
    dev: str = DEV,
    status: Callable[[str], LoopStatus] = read_status,
) -> list[BoundLoop]:
    """Every bound loop device, by device number."""
    numbers = sorted(n for n in map(_number, os.listdir(sys_block)) if n is not None)
    found = []
    for n in numbers:
        node = os.path.join(dev, f"loop{n}")
        try:
            with open(os.path.join(sys_block, f"loop{n}", "loop", "backing_file"), "rb") as f:
                backing = os.fsdecode(f.read().removesuffix(b"\n"))
            found.append(BoundLoop(node, backing, status(node)))
        except OSError as exc:
            if not _gone(exc):
                raise
    return found
