"""This node's volumes as the mount table shows them: the volume an id names, the key its
mounts show, where it is staged or published, and the refusals every mount step shares.

The node keeps no state of its own (see node.py): each step reads the mount table again and
compares the key of each mount (:class:`~csi_driver.system.mounter.Key`) with what the backend
says the volume is, its directory or its device. The staging and publishing steps of the
node service, of its block volumes and of its inline ephemeral volumes all look through here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from csi_driver import bounded, ids, model
from csi_driver.backends.base import Backend
from csi_driver.config import Config
from csi_driver.errors import FailedPrecondition, NotFound
from csi_driver.locks import KeyLocks, path_key
from csi_driver.system.confined import Confined, Jail
from csi_driver.system.filesystem import Filesystems
from csi_driver.system.mounter import Key, Mounter
from csi_driver.system_errors import system_errors

log = logging.getLogger(__name__)

TARGET_DIR_MODE = 0o750
TARGET_FILE_MODE = 0o640


class NodeVolumes:
    """The volumes of this node, the locks of their paths, and what the mount table says of them."""

    def __init__(
        self,
        config: Config,
        backend: Backend,
        locks: KeyLocks,
        mounter: Mounter,
        filesystems: Filesystems,
    ) -> None:
        self.backend = backend
        self.locks = locks
        self.mounter = mounter
        self.fs = filesystems
        self.node = config.node_id
        self.jail = Jail(str(config.kubelet_dir))

    # --- which volume ----------------------------------------------------------------------

    def volume(self, volume_id: str) -> model.Volume:
        """The volume, which must live on this node; NOT_FOUND otherwise."""
        parsed = ids.require_volume_id(volume_id)
        if parsed.node_id != self.node:
            raise NotFound(
                f"volume {volume_id!r} lives on node {parsed.node_id!r}, not on {self.node!r}"
            )
        volume = self.backend.get_volume(volume_id)
        if volume is None:
            raise NotFound(f"volume {volume_id!r} does not exist")
        return volume

    def check_fits(self, volume: model.Volume, cap: model.Capability) -> None:
        """The capability must describe the volume as it was created (FAILED_PRECONDITION,
        "exceeds capabilities", otherwise)."""
        if cap.access_type is not volume.access_type:
            raise FailedPrecondition(
                f"volume {volume.id!r} is a {volume.access_type.value} volume and cannot be"
                f" used with {cap.access_type.value} access"
            )
        if not cap.access_mode.single_node:
            raise FailedPrecondition(
                f"volume {volume.id!r} is local to node {self.node!r}; access mode"
                f" {cap.access_mode.name} is not supported"
            )
        if (
            cap.access_type is model.AccessType.MOUNT
            and cap.fs_type
            and volume.fs_type
            and cap.fs_type != volume.fs_type
        ):
            raise FailedPrecondition(
                f"volume {volume.id!r} was created with filesystem {volume.fs_type!r}, not"
                f" {cap.fs_type!r}"
            )

    def default_fs_type(self) -> str:
        supported = list(self.backend.supported_fs_types())
        return supported[0] if supported and supported[0] else "ext4"

    def lock_key(self, path: str) -> str:
        """The lock of a staging or target path, whichever spelling of the kubelet directory
        the request used (INVALID_ARGUMENT for a path outside it)."""
        with system_errors(request_paths=True):
            return path_key(self.jail.canonical(path))

    # --- where it is mounted ---------------------------------------------------------------

    def source_key(self, attachment: model.Attachment) -> Key | None:
        """What a staging mount of this attachment shows: the directory's key, or the root
        of the filesystem on the device."""
        if attachment.kind is model.AttachmentKind.DIRECTORY:
            return self.mounter.key_of(os.path.realpath(attachment.path))
        return self.mounter.key_of_device(attachment.path)

    def device_node_key(self, device: str) -> Key | None:
        """What a bind mount of the device node shows (a block publication)."""
        return self.mounter.key_of_device_node(device)

    def publications(self, key: Key | None, exclude: Sequence[str]) -> list[str]:
        """Mount points showing ``key`` (a staging mount, a device node), but ``exclude``."""
        if key is None:
            return []
        return [
            m.mount_point for m in self.mounter.mounts_with_key(key) if m.mount_point not in exclude
        ]

    # --- what every mount step refuses -----------------------------------------------------

    def refuse_hiding(self, where: Confined) -> None:
        """Never mount over a directory that holds files or has mounts below it, or over a
        file with data: they would be hidden (the kubelet hands over empty or absent paths;
        anything else below its directory is somebody's)."""
        if not where.is_empty():
            raise FailedPrecondition(
                f"{where.path} is not empty; refusing to mount over (and hide) what it holds"
            )
        below = self.mounter.mounts_below(where.path)
        if below:
            raise FailedPrecondition(
                f"{where.path} has other mounts below it ({bounded.listing(below)});"
                " refusing to hide them"
            )

    def check_single_writer(
        self, volume: model.Volume, cap: model.Capability, key: Key | None, exclude: Sequence[str]
    ) -> None:
        """SINGLE_NODE_SINGLE_WRITER allows one publication. SINGLE_NODE_WRITER is let through,
        as the spec asks, so that older COs can still publish a volume for several pods."""
        if cap.access_mode is not model.AccessMode.SINGLE_NODE_SINGLE_WRITER:
            return
        others = self.publications(key, exclude)
        if others:
            raise FailedPrecondition(
                f"volume {volume.id!r} has access mode SINGLE_NODE_SINGLE_WRITER and is already"
                f" published at {bounded.listing(others)}"
            )

    def clear_stale_read_only(self, device: str) -> None:
        """A device's read-only flag outlives its user: the kernel keeps it on a loop device
        number across detach and reuse. An unused device being staged must start writable
        (publishing makes it read-only again where asked)."""
        real = os.path.realpath(device)
        if self.fs.is_read_only(real) and not self.publications(self.device_node_key(real), []):
            log.info("clearing a stale read-only flag", extra={"device": real})
            self.fs.set_read_only(real, False)
