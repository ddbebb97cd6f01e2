"""Block access on the node: staging attaches the device and mounts nothing; publishing binds
the device node onto a file at the target.

The staging path of a block volume stays an empty directory, so anything mounted there or
left in it is not this volume's. A read-only bind mount does not stop writes to a device
node, so the device itself is made read-only (its kernel flag, BLKROSET); since that flag belongs
to the device, one volume cannot be published read-only and writable at the same time on one
node, and the flag is cleared when the last read-only publication goes (node.py) or when an
unused device is staged again.
"""

from __future__ import annotations

import os

from csi_driver import bounded, model
from csi_driver.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from csi_driver.failpoints import reach
from csi_driver.services.node_volumes import TARGET_DIR_MODE, TARGET_FILE_MODE, NodeVolumes
from csi_driver.system import mountflags
from csi_driver.system.confined import Confined


def _require_device(volume: model.Volume, attachment: model.Attachment) -> None:
    if attachment.kind is not model.AttachmentKind.BLOCK_DEVICE:
        raise FailedPrecondition(
            f"volume {volume.id!r} is not backed by a block device and cannot be used with"
            " block access"
        )


class BlockVolumes:
    """The staging and publishing steps of volumes used with block access."""

    def __init__(self, volumes: NodeVolumes) -> None:
        self._volumes = volumes
        self._mounter = volumes.mounter
        self._fs = volumes.fs

    def stage(self, volume: model.Volume, attachment: model.Attachment, staging: Confined) -> None:
        _require_device(volume, attachment)
        staging.make_dir(TARGET_DIR_MODE)
        reach("stage.dir")
        if self._mounter.is_mount_point(staging.path):
            raise AlreadyExists(
                f"staging_target_path {staging.path} has something mounted, but block volume"
                f" {volume.id!r} is staged without a mount; unstage it first"
            )
        # a block volume's staging path stays an empty directory: anything else is not ours
        self._volumes.refuse_hiding(staging)
        self._volumes.clear_stale_read_only(attachment.path)

    def publish(
        self,
        volume: model.Volume,
        cap: model.Capability,
        attachment: model.Attachment,
        staging: Confined,
        target: Confined,
        read_only: bool,
    ) -> None:
        _require_device(volume, attachment)
        if target.path == staging.path:
            raise InvalidArgument("target_path must differ from staging_target_path")
        if (
            not staging.is_dir()
            or not staging.is_empty()
            or self._mounter.mounts_below(staging.path)
        ):
            raise FailedPrecondition(
                f"volume {volume.id!r} is not staged at {staging.path}; call NodeStageVolume first"
            )
        device = os.path.realpath(attachment.path)
        key = self._volumes.device_node_key(device)
        current = self._mounter.mount_at(target.path)
        if current is not None:
            if not current.shows(key):
                raise AlreadyExists(f"target_path {target.path} has another device mounted")
            if self._fs.is_read_only(device) != read_only:
                raise AlreadyExists(
                    f"volume {volume.id!r} is already published at {target.path} but"
                    f" {'read-only' if not read_only else 'writable'}; unpublish it first"
                )
            return
        others = self._volumes.publications(key, [target.path])
        self._volumes.check_single_writer(volume, cap, key, [target.path])
        if self._fs.is_read_only(device) != read_only:
            if others:
                raise FailedPrecondition(
                    f"block volume {volume.id!r} is published"
                    f" {'writable' if read_only else 'read-only'} at {bounded.listing(others)};"
                    " a device cannot be read-only for one publication and writable for another"
                )
            self._fs.set_read_only(device, read_only)
            reach("publish.device-flag")
        self._volumes.refuse_hiding(target)
        if target.make_file(TARGET_FILE_MODE):
            target.tag(volume.id)
        reach("publish.target")
        self._mounter.bind(device, target, [mountflags.access(read_only)])
