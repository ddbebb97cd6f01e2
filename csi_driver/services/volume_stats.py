"""NodeGetVolumeStats and NodeExpandVolume: measuring and growing what is mounted at a path
the CO names.

Both look at a volume path below the kubelet directory, check that the mount there is this
volume's (its staging mount, a publication, its device node), and then work through a
descriptor of that path (``/proc/self/fd/N``), so that what is measured or grown is what was
checked. A path that is malformed, outside the kubelet directory or not this volume's is
NOT_FOUND, as csi-sanity expects.

A volume's usage is the ``statvfs`` of what is mounted there, unless the backend knows the
volume's own (:meth:`~csi_driver.backends.base.Backend.volume_usage`): a hostpath directory
shares its filesystem with its neighbours, so its usage comes from its project quota or from
a bounded walk of it, and its total is its capacity.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from csi_driver import bounded, ids, model
from csi_driver.errors import CsiError, InvalidArgument, NotFound
from csi_driver.failpoints import reach
from csi_driver.proto import csi_pb2
from csi_driver.services import convert, sizing
from csi_driver.services.ephemeral import EphemeralVolumes
from csi_driver.services.node_volumes import NodeVolumes
from csi_driver.system import fshealth
from csi_driver.system.confined import PathRefused
from csi_driver.system.filesystem import FilesystemError
from csi_driver.system.mounter import DELETED, MountInfo
from csi_driver.system_errors import system_errors

log = logging.getLogger(__name__)

#: the usage of a volume that cannot be measured
_UNKNOWN_USAGE = (csi_pb2.VolumeUsage(unit=csi_pb2.VolumeUsage.BYTES),)


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
        self,
        volume: model.Volume,
        path: str,
        *,
        any_mount: bool,
        attachment: model.Attachment | None = None,
    ) -> Iterator[tuple[MountInfo, str]]:
        """The mount at ``path`` (below the kubelet directory) and a name for it that goes
        through a descriptor (``/proc/self/fd/N``), so what is measured is what was checked.
        The mount must be this volume's (its staging mount, a publication, its device node:
        of ``attachment``, looked up when not given), or with ``any_mount`` merely a mount.
        NOT_FOUND otherwise."""
        with self._volumes.jail.resolve(path) as where:
            if where.lstat() is None:
                raise NotFound(f"volume {volume.id!r} is not staged or published at {path}")
            with where.opened() as fd:
                mount = self._mounter.mount_of_fd(fd, where.path)
                if mount is not None and not any_mount:
                    attachment = attachment or self._backend.locate(volume.id)
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
        """The usage and the condition of a volume at a path. The condition of the volume's
        storage is the backend's (the same answer ListVolumes and ControllerGetVolume give);
        what only the node can see is added here (:meth:`_node_problem`). An abnormal volume
        always gets a usage, zero when it cannot be measured: the kubelet drops a reply
        without one, and its condition with it."""
        volume_id = convert.require(request.volume_id, "volume_id")
        path = convert.require(request.volume_path, "volume_path")
        with system_errors(request_paths=True):
            try:
                volume = self._ephemeral.volume_or_ephemeral(volume_id)
            except NotFound as exc:
                return self._vanished(volume_id, path, exc)
            self._check_volume_path(volume, path)
            condition = self._backend.volume_condition(volume.id)
            attachment = self._backend.locate(volume.id)
            detached = volume.access_type is model.AccessType.BLOCK and attachment is None
            problem = None
            usage: list[csi_pb2.VolumeUsage] = []
            mounted: model.Usage | None = None
            with self._volume_at(
                volume, path, any_mount=condition.abnormal or detached, attachment=attachment
            ) as (mount, by_fd):
                if not condition.abnormal:
                    problem = self._node_problem(volume, mount, path, detached, request)
                try:
                    if volume.access_type is model.AccessType.BLOCK:
                        size = self._fs.block_device_size(by_fd)
                        usage = [csi_pb2.VolumeUsage(unit=csi_pb2.VolumeUsage.BYTES, total=size)]
                    else:
                        mounted = self._fs.usage(by_fd)  # read even when not shown: a probe
                except FilesystemError as exc:
                    problem = problem or (
                        f"the volume at {path} cannot be read ({exc}): its filesystem may have"
                        " shut down after an error (see the kernel log); unpublish and unstage"
                        " the volume, repair it (xfs_repair, e2fsck) and stage it again"
                    )
            # Outside the mount's descriptor: a walk of the volume (its backing directory,
            # up to seconds) must not keep an unmount of the path busy meanwhile.
            if mounted is not None:
                usage = convert.usage_to_pb(self._own_usage(volume) or mounted)
        if problem and not condition.abnormal:
            condition = model.VolumeCondition(True, problem)
        return csi_pb2.NodeGetVolumeStatsResponse(
            usage=usage or _UNKNOWN_USAGE, volume_condition=convert.condition_to_pb(condition)
        )

    def _own_usage(self, volume: model.Volume) -> model.Usage | None:
        """The backend's word on what the volume holds, where the filesystem mounted there is
        shared with other volumes (a hostpath directory): without it, ``statvfs`` would show
        the whole filesystem. A failure to read it is logged and the mount's usage shown."""
        try:
            return self._backend.volume_usage(volume.id)
        except CsiError as exc:
            log.warning(
                "cannot read the volume's own usage; showing its filesystem's",
                extra={"volume_id": volume.id, "error": str(exc)},
            )
            return None

    def _node_problem(
        self,
        volume: model.Volume,
        mount: MountInfo,
        path: str,
        detached: bool,
        request: csi_pb2.NodeGetVolumeStatsRequest,
    ) -> str | None:
        """What is wrong with the volume as this node has it, when its storage is fine: its
        device detached, what is mounted deleted, its filesystem stopped, its staging mount
        read-only under a writable publication."""
        again = "; unpublish and unstage the volume, then stage and publish it again"
        if detached:
            device = f"/dev{mount.root}" if mount.fs_type == "devtmpfs" else "its device"
            return (
                f"block volume {volume.id!r} is published at {path} from {device}, which no"
                " longer holds the volume (detached outside the driver): its users get I/O"
                f" errors; attach the volume to {device} again, or unmount {path} by hand,"
                " then unpublish and stage the volume again"
            )
        if mount.root.endswith(DELETED):
            return f"what is mounted at {path} was deleted from the node{again}"
        if volume.access_type is model.AccessType.BLOCK:
            return None
        fault = fshealth.fault(mount)
        if fault:
            return (
                f"{fault}; unpublish and unstage the volume, check its filesystem (e2fsck,"
                " xfs_repair) and stage it again"
            )
        return self._staging_problem(mount, request.staging_target_path)

    def _staging_problem(self, mount: MountInfo, staging: str) -> str | None:
        """The staging mount (when the CO names it: the kubelet does not) made read-only
        outside the driver while the volume is published writable. The driver stages every
        filesystem writable unless its mount flags say ``ro``, and then publishes it read-only
        everywhere; without the staging path a read-only staging mount cannot be told apart
        from a read-only publication, so nothing is said."""
        if not staging:
            return None
        try:
            staged = self._mounter.mount_at(self._volumes.jail.canonical(staging))
        except (PathRefused, ValueError):
            return None
        if staged is None or not staged.read_only or not staged.shows(mount.key):
            return None
        writable = [
            m.mount_point
            for m in self._mounter.mounts_with_key(staged.key)
            if not m.read_only and m.mount_point != staged.mount_point
        ]
        if not writable:
            return None
        return (
            f"the staging mount at {staged.mount_point} is read-only although the volume is"
            f" published read-write at {bounded.listing(writable)}: it was remounted outside the"
            " driver; unpublish and unstage the volume, then stage and publish it again"
        )

    def _vanished(
        self, volume_id: str, path: str, missing: NotFound
    ) -> csi_pb2.NodeGetVolumeStatsResponse:
        """A volume of this node the backend no longer knows (an LV removed by hand) while
        something is still mounted where the CO says it is published: its condition, as the
        backend tells it, rather than NOT_FOUND, which the kubelet would only log."""
        parsed = ids.parse(volume_id, "v")
        if parsed is None or parsed.node_id != self._volumes.node:
            raise missing
        try:
            condition = self._backend.volume_condition(volume_id)
            self._volumes.jail.check(path)
            with self._volumes.jail.resolve(path) as where:
                mounted = self._mounter.mount_reached(where) is not None
        except (NotFound, InvalidArgument, PathRefused, OSError):
            raise missing from None
        if not condition.abnormal or not mounted:
            raise missing
        return csi_pb2.NodeGetVolumeStatsResponse(
            usage=_UNKNOWN_USAGE, volume_condition=convert.condition_to_pb(condition)
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
