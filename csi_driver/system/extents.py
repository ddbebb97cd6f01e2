"""Byte work on files, knowing nothing of volumes: making and growing a sparse image, and
overwriting with zeros the extents of files that hold data.

Every file is opened without following a symlink: a link planted where a file is expected
makes the call fail (or, inside a wipe, is skipped), never redirects it.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from pathlib import Path

from csi_driver.system.failure import SystemFailure

WIPE_CHUNK = 1 << 20


class Stopped(Exception):
    """A wipe ended early because it was asked to stop (the backend is closing)."""


class ExtentError(SystemFailure):
    """A file to grow is not a regular file; the message names it."""


def create_image(image: Path, mode: int) -> None:
    """Create ``image`` empty (it must not exist yet), with ``mode``."""
    fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    os.close(fd)


def grow_image(image: Path, size: int) -> None:
    """Make the image at least ``size`` bytes (holes, no data written); never shrink."""
    fd = os.open(image, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ExtentError(f"{image} is not a regular file")
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def wipe(path: Path, stop: threading.Event | None = None) -> None:
    """Overwrite the data of every regular file under ``path`` with zeros, in place (only
    the extents that hold data: holes stay holes), and flush it to the disk. Symlinks are
    never followed: a link a pod left in its volume cannot point the wipe elsewhere."""
    zeros = bytes(WIPE_CHUNK)
    for directory, _, files in os.walk(path, followlinks=False):
        for name in files:
            try:
                fd = os.open(
                    os.path.join(directory, name),
                    os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                )
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENXIO, errno.ENOENT):
                    continue  # a symlink, a socket or fifo, or already gone
                raise
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    continue
                end = os.fstat(fd).st_size
                offset = 0
                while offset < end:
                    try:
                        offset = os.lseek(fd, offset, os.SEEK_DATA)
                        hole = os.lseek(fd, offset, os.SEEK_HOLE)
                    except OSError as exc:
                        if exc.errno == errno.ENXIO:
                            break  # no data past offset
                        raise
                    while offset < hole:
                        if stop is not None and stop.is_set():
                            raise Stopped
                        offset += os.pwrite(fd, zeros[: min(WIPE_CHUNK, hole - offset)], offset)
                os.fsync(fd)
            finally:
                os.close(fd)
