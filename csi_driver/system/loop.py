"""Loop devices over image files, through ``losetup``.

Attaching is idempotent: an image that already has a loop device gets that device back, so a
restarted driver finds the devices its predecessor attached. ``losetup --associated`` matches
the image by device and inode number, not only by name. A device that is set to clear itself
(``autoclear``: it was detached while still open) is on its way out and is never reused.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

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
    backing_file: str
    autoclear: bool


def parse_list(text: str) -> list[LoopDevice]:
    """Parse ``losetup --list --json --output NAME,AUTOCLEAR,BACK-FILE``."""
    if not text.strip():
        return []
    try:
        data = json.loads(text)
        return [
            LoopDevice(
                name=str(d["name"]),
                backing_file=str(d.get("back-file") or "").strip(),
                autoclear=d.get("autoclear") in (True, "1", 1),
            )
            for d in data.get("loopdevices", [])
        ]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LoopError(f"cannot parse losetup output: {exc}: {text[:200]!r}") from exc


class Loops:
    """Loop device operations on image files. Knows nothing of CSI."""

    def __init__(self, runner: Runner) -> None:
        self._runner = runner

    def devices_for(self, image: Path) -> list[LoopDevice]:
        """Loop devices whose backing file is ``image`` (none when it does not exist)."""
        if not image.exists():
            return []
        result = self._run(
            [
                "losetup",
                "--list",
                "--json",
                "--output",
                "NAME,AUTOCLEAR,BACK-FILE",
                "--associated",
                str(image),
            ],
            f"list the loop devices of {image}",
        )
        return parse_list(result)

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
