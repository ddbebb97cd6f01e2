"""Loop devices over image files: attached, detached and resized through ``losetup``, looked
up in-process (:mod:`csi_driver.system.loopinfo`).

Attaching is idempotent: an image that already has a loop device gets that device back, so a
restarted driver finds the devices its predecessor attached. An image's devices are those whose
backing file has the image's device and inode numbers, the rule of ``losetup --associated``: a
renamed image keeps its devices, and another file put at the image's path has none. A device
that is set to clear itself (``autoclear``: it was detached while still open) is on its way out
and is never reused. Looking up costs no command, so only an attach, a detach and a resize run
one; ``losetup`` stays for those because it already handles the races of claiming a free
device.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from csi_driver.system import loopinfo
from csi_driver.system.failure import SystemFailure
from csi_driver.system.runner import CommandError, Runner

log = logging.getLogger(__name__)

LOSETUP_TIMEOUT = 60.0
#: how long a detach waits for a device that someone else briefly holds open
DETACH_SETTLE = 5.0


class LoopError(SystemFailure):
    """A loop device operation failed; the message names the image and the cause."""


@dataclass(frozen=True)
class LoopDevice:
    name: str  # /dev/loopN
    backing_file: str  # as the kernel shows it now
    autoclear: bool


#: what sysfs appends to the backing file of a device whose file was deleted
DELETED_SUFFIX = " (deleted)"

#: what says that a path names no file, as ``Path.exists`` reads it
_ABSENT = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP})


def associated(devices: list[loopinfo.BoundLoop], st: os.stat_result) -> list[LoopDevice]:
    """The devices among ``devices`` whose backing file is the file ``st`` describes. A
    device whose backing file was deleted (sysfs says `` (deleted)``) backs no file that has a
    name: when the filesystem has given the freed inode number to a new image since, it must
    not be taken for that image's device."""
    return [
        LoopDevice(d.name, d.backing_file, d.status.autoclear)
        for d in devices
        if d.status.backs(st) and not d.backing_file.endswith(DELETED_SUFFIX)
    ]


class Loops:
    """Loop device operations on image files. Knows nothing of CSI."""

    def __init__(
        self,
        runner: Runner,
        bound: Callable[[], list[loopinfo.BoundLoop]] = loopinfo.bound,
    ) -> None:
        self._runner = runner
        self._bound = bound

    def devices_for(self, image: Path) -> list[LoopDevice]:
        """Loop devices whose backing file is ``image`` (none when it does not exist)."""
        try:
            st = os.stat(image)
        except OSError as exc:
            if exc.errno in _ABSENT:
                return []
            raise LoopError(f"cannot look at {image}: {exc.strerror}", errno=exc.errno) from exc
        try:
            devices = self._bound()
        except OSError as exc:
            raise LoopError(f"cannot list the loop devices of {image}: {exc}") from exc
        return associated(devices, st)

    def attach(self, image: Path) -> str:
        """The loop device of ``image``, attaching one when there is none."""
        for dev in self.devices_for(image):
            if not dev.autoclear:
                return dev.name
        out = self._run(
            ["losetup", "--find", "--show", "--direct-io=off", "--", str(image)],
            f"attach {image} to a loop device",
        ).strip()
        if not out.startswith("/dev/loop"):
            raise LoopError(f"losetup printed {out!r} instead of a loop device for {image}")
        log.info("attached loop device", extra={"device": out, "image": str(image)})
        return out

    def detach_all(self, image: Path, settle: float = DETACH_SETTLE) -> list[str]:
        """Detach every loop device of ``image``; the names detached.

        A device that something else holds open (a probe scanning block devices, a
        filesystem still mounted) is only marked to clear itself on its last close (the
        kernel's rule); this waits up to ``settle`` seconds for that and logs what remains.
        """
        done = []
        for dev in self.devices_for(image):
            self._run(["losetup", "--detach", dev.name], f"detach {dev.name} from {image}")
            log.info("detached loop device", extra={"device": dev.name, "image": str(image)})
            done.append(dev.name)
        if not done:
            return done
        deadline = time.monotonic() + settle
        while True:
            left = [d.name for d in self.devices_for(image) if d.name in done]
            if not left:
                return done
            if time.monotonic() >= deadline:
                log.warning(
                    "loop devices are still open elsewhere; they detach on their last close",
                    extra={"devices": left, "image": str(image)},
                )
                return done
            time.sleep(0.05)

    def refresh(self, image: Path) -> list[str]:
        """Make every loop device of ``image`` take the image's current size."""
        done = []
        for dev in self.devices_for(image):
            if dev.autoclear:
                continue
            self._run(["losetup", "--set-capacity", dev.name], f"resize {dev.name}")
            done.append(dev.name)
        return done

    def _run(self, argv: list[str], what: str) -> str:
        try:
            return self._runner.run(argv, timeout=LOSETUP_TIMEOUT).stdout
        except CommandError as exc:
            raise LoopError(f"cannot {what}: {exc}") from exc
