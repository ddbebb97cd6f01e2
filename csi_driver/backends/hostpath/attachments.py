"""The node side of hostpath volumes: what a volume is on this node, for the node service to
mount. A directory volume is its directory, with nothing to attach; a block volume's image is
attached to a loop device at staging, looked up again by image (never remembered), resized
after an expansion and detached at unstaging.

Attaching is idempotent (an image's existing device is handed back, see
:mod:`csi_driver.system.loop`), so a restarted driver finds what its predecessor attached.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from csi_driver.backends.hostpath.layout import IMAGE_NAME, is_real_dir
from csi_driver.backends.hostpath.root import Root
from csi_driver.backends.hostpath.store import VolumeRow
from csi_driver.backends.hostpath.volumes import Volumes
from csi_driver.errors import FailedPrecondition
from csi_driver.model import AccessType, Attachment, AttachmentKind
from csi_driver.system_errors import system_errors


class Attachments:
    """Directories and loop devices of the volumes under one root."""

    def __init__(self, root: Root, volumes: Volumes) -> None:
        self._root = root
        self._volumes = volumes
        self._layout = root.layout
        self._loops = root.loops

    def attach(self, volume_id: str) -> Attachment:
        row = self._volumes.ready(volume_id)
        path = self._layout.volume(row.local_id)
        if row.access_type is AccessType.MOUNT:
            if not is_real_dir(path):
                raise FailedPrecondition(f"backing directory {path} of {volume_id!r} is missing")
            return Attachment(AttachmentKind.DIRECTORY, str(path))
        image = self._layout.image(row.local_id)
        if image is None:
            raise FailedPrecondition(
                f"backing image {path / IMAGE_NAME} of {volume_id!r} is missing"
            )
        with self._root.keys.hold(row.local_id), system_errors(f"attach {image}"):
            return Attachment(AttachmentKind.BLOCK_DEVICE, self._loops.attach(image))

    def _row(self, volume_id: str) -> VolumeRow | None:
        local = self._root.local(volume_id, "v")
        return self._root.store.volume(local) if local else None

    def locate(self, volume_id: str) -> Attachment | None:
        row = self._row(volume_id)
        if row is None:
            return None
        if row.access_type is AccessType.MOUNT:
            return Attachment(AttachmentKind.DIRECTORY, str(self._layout.volume(row.local_id)))
        image = self._layout.image(row.local_id)
        if image is None:
            return None
        with system_errors(f"look up the loop device of {image}"):
            devices = [d for d in self._loops.devices_for(image) if not d.autoclear]
        # the same device attach() hands out (one being detached lazily is not it)
        return Attachment(AttachmentKind.BLOCK_DEVICE, devices[0].name) if devices else None

    def detach(self, volume_id: str) -> None:
        self._on_image(volume_id, "detach", self._loops.detach_all)

    def refresh(self, volume_id: str) -> None:
        self._on_image(volume_id, "resize the loop device of", self._loops.refresh)

    def _on_image(self, volume_id: str, what: str, action: Callable[[Path], object]) -> None:
        """``action`` on the image of block volume ``volume_id``, under its lock; nothing for
        a volume that is unknown, a directory, or without its image."""
        row = self._row(volume_id)
        if row is None or row.access_type is not AccessType.BLOCK:
            return
        image = self._layout.image(row.local_id)
        if image is None:
            return
        with self._root.keys.hold(row.local_id), system_errors(f"{what} {image}"):
            action(image)
