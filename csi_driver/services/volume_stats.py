"""NodeGetVolumeStats and NodeExpandVolume: measuring and growing what is mounted at a path
the CO names.

Both look at a volume path below the kubelet directory, check that the mount there is this
volume's (its staging mount, a publication, its device node), and then work through a
descriptor of that path (``/proc/self/fd/N``), so that what is measured or grown is what was
checked. A path that is malformed, outside the kubelet directory or not this volume's is
NOT_FOUND, as csi-sanity expects.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from csi_driver import ids, model
from csi_driver.errors import InvalidArgument, NotFound
from csi_driver.failpoints import reach
from csi_driver.proto import csi_pb2
from csi_driver.services import convert, sizing
from csi_driver.services.ephemeral import EphemeralVolumes
from csi_driver.services.node_volumes import NodeVolumes
from csi_driver.system.confined import PathRefused
from csi_driver.system.filesystem import FilesystemError
from csi_driver.system.mounter import MountInfo
from csi_driver.system_errors import system_errors

log = logging.getLogger(__name__)


class VolumeStats:
    """The statistics and the node-side expansion of mounted volumes."""

    def __init__(self, volumes: NodeVolumes, ephemeral: EphemeralVolumes) -> None:
        self._volumes = volumes
        self._ephemeral = ephemeral
        self._backend = volumes.backend
        self._mounter = volumes.mounter
        self._fs = volumes.fs

    def _check_volume_path(self, volume: model.Volume, path: str) -> None:
        """A volume path that is malformed or outside the kubelet directory cannot be where
        the volume is: NOT_FOUND, as csi-sanity expects of NodeGetVolumeStats."""
        try:
            convert.require_abs_path(path, "volume_path")
            self._volumes.jail.check(path)
        except (InvalidArgument, PathRefused) as exc:
            raise NotFound(f"volume {volume.id!r} is not staged or published there: {exc}") from exc

    @contextlib.contextmanager
    def _volume_at(
        self, volume: model.Volume, path: str, *, any_mount: bool
    ) -> Iterator[tuple[MountInfo, str]]:
        """The mount at ``path`` (below the kubelet directory) and a name for it that goes
        through a descriptor (``/proc/self/fd/N``), so what is measured is what was checked.
        The mount must be this volume's (its staging mount, a publication, its device node),
        or with ``any_mount`` merely a mount. NOT_FOUND otherwise."""
        with self._volumes.jail.resolve(path) as where:
            if where.lstat() is None:
                raise NotFound(f"volume {volume.id!r} is not staged or published at {path}")
            with where.opened() as fd:
                mount = self._mounter.mount_of_fd(fd, where.path)
                if mount is not None and not any_mount:
                    attachment = self._backend.locate(volume.id)
                    keys = set()
                    if attachment is not None:
                        keys.add(self._volumes.source_key(attachment))
                        if attachment.kind is model.AttachmentKind.BLOCK_DEVICE:
                            keys.add(self._volumes.device_node_key(attachment.path))
                    if not any(mount.shows(k) for k in keys):
                        mount = None
                if mount is None:
                    raise NotFound(f"volume {volume.id!r} is not staged or published at {path}")
                yield mount, f"/proc/self/fd/{fd}"

    def stats(
        self, request: csi_pb2.NodeGetVolumeStatsRequest
    ) -> csi_pb2.NodeGetVolumeStatsResponse:
        volume_id = convert.require(request.volume_id, "volume_id")
        path = convert.require(request.volume_path, "volume_path")
        with system_errors(request_paths=True):
            volume = self._ephemeral.volume_or_ephemeral(volume_id)
            self._check_volume_path(volume, path)
            condition = self._backend.volume_condition(volume.id)
            problem = None
            usage: list[csi_pb2.VolumeUsage] = []
            with self._volume_at(volume, path, any_mount=condition.abnormal) as (mount, by_fd):
                if mount.root.endswith("//deleted"):
                    problem = f"what is mounted at {path} was deleted from the node"
                try:
                    if volume.access_type is model.AccessType.BLOCK:
                        size = self._fs.block_device_size(by_fd)
                        usage = [csi_pb2.VolumeUsage(unit=csi_pb2.VolumeUsage.BYTES, total=size)]
                    else:
                        usage = convert.usage_to_pb(self._fs.usage(by_fd))
                except FilesystemError as exc:
                    problem = problem or f"the volume at {path} cannot be read: {exc}"
        if problem and not condition.abnormal:
            condition = model.VolumeCondition(True, problem)
        return csi_pb2.NodeGetVolumeStatsResponse(
            usage=usage, volume_condition=convert.condition_to_pb(condition)
        )

    def expand(self, request: csi_pb2.NodeExpandVolumeRequest) -> csi_pb2.NodeExpandVolumeResponse:
        volume_id = convert.require(request.volume_id, "volume_id")
        path = convert.require(request.volume_path, "volume_path")
        cap = (
            convert.capability_from_pb(request.volume_capability)
            if request.HasField("volume_capability")
            else None
        )
        required, limit = (
            convert.capacity_range(request.capacity_range)
            if request.HasField("capacity_range")
            else (0, 0)
        )
        ids.require_volume_id(volume_id)
        with self._volumes.locks.hold(volume_id), system_errors(request_paths=True):
            volume = self._volumes.volume(volume_id)
            self._check_volume_path(volume, path)
            if cap is not None and cap.access_type is not volume.access_type:
                raise InvalidArgument(
                    f"volume {volume_id!r} is a {volume.access_type.value} volume, not"
                    f" {cap.access_type.value}"
                )
            with self._volume_at(volume, path, any_mount=False) as (mount, _):
                pass
            wanted = sizing.expansion_target(self._backend, volume, required, limit)
            if wanted > volume.capacity_bytes:
                volume = self._backend.expand_volume(volume_id, wanted)
                reach("expand.grown")
            self._backend.refresh_attachment(volume_id)
            reach("expand.refreshed")
            attachment = self._backend.attach(volume_id)
            if (
                volume.access_type is model.AccessType.MOUNT
                and attachment.kind is model.AttachmentKind.BLOCK_DEVICE
            ):
                # growing through a read-only publication fails (EROFS); the staging mount
                # is writable
                where = self._mounter.writable_mount_of_device(attachment.path)
                self._fs.resize(attachment.path, where or mount.mount_point, mount.fs_type)
        log.info(
            "expanded on node",
            extra={"volume_id": volume_id, "capacity_bytes": volume.capacity_bytes},
        )
        return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=volume.capacity_bytes)
