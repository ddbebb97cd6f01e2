"""The CSI Node service: validate, lock the volume and its paths, attach, mount, reply.

The node keeps no state of its own: what is staged or published is read back from the kernel's
mount table and compared with what the backend says the volume is (the key of its directory,
or its device number). A restarted driver therefore picks up exactly where the old one
stopped, and a retried call finds its earlier work done.

Kills and retries. Every mount is made in one step (a detached mount gets its flags, then is
attached; see :mod:`csi_driver.system.mountcalls`), so a kill leaves either no mount or the
finished one, never a writable mount where a read-only one was asked. The steps between
mounts (make the target, format a blank device, set a device read-only, unmount, remove the
target, detach) are each idempotent and checked again by the retry, which finishes the job.

Paths. The staging and target paths must lie strictly below the kubelet directory
(``--kubelet-dir``); they are walked from there without following a symlink at any component
(:mod:`csi_driver.system.confined`) and mounted onto through the descriptor that walk holds.
Nothing is unmounted or removed unless it is this volume's own mount (its key matches the
volume's directory, device or staging mount); an unknown volume is NOT_FOUND, and a path that
holds something else is left alone.

Staging (``NodeStageVolume``):

* mount access, directory attachment (hostpath): the directory is bind-mounted at the staging
  path; only per-mount flags (``noexec``, ``nosuid``, ...) can apply to a bind.
* mount access, block device attachment: the device is probed; a blank one is formatted with the
  requested filesystem (else the volume's, else the backend's default), one holding anything
  else is never touched (FAILED_PRECONDITION); then it is mounted with the mount flags.
* block access: the device is attached and nothing is mounted; publishing binds the device
  node onto a file at the target.

Read-only block publications: a read-only bind mount does not stop writes to a device node,
so the device itself is made read-only (its kernel flag, BLKROSET); since that flag belongs to the
device, one volume cannot be published read-only and writable at the same time on one node.

This module holds the RPCs and the steps of mount access; the rest is in its own module:
what the mount table says of a volume and the refusals every step shares (node_volumes.py),
block access (block_volumes.py), stats and expansion (volume_stats.py), inline ephemeral
volumes (ephemeral.py), and the mount-flag policy (:mod:`csi_driver.system.mountflags`).
"""

from __future__ import annotations

import errno
import logging
import os

import grpc

from csi_driver import bounded, ids, model
from csi_driver.backends.base import Backend
from csi_driver.config import Config
from csi_driver.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
)
from csi_driver.failpoints import reach
from csi_driver.locks import KeyLocks
from csi_driver.proto import csi_pb2, csi_pb2_grpc
from csi_driver.services import convert
from csi_driver.services.block_volumes import BlockVolumes
from csi_driver.services.ephemeral import EphemeralVolumes, is_ephemeral
from csi_driver.services.node_io_limits import NodeIoLimits
from csi_driver.services.node_volumes import TARGET_DIR_MODE, NodeVolumes
from csi_driver.services.volume_stats import VolumeStats
from csi_driver.system import mountflags
from csi_driver.system.cgroup_io import CgroupIo
from csi_driver.system.confined import Confined, Jail, mount_id
from csi_driver.system.filesystem import Filesystems
from csi_driver.system.mounter import Key, Mounter, MountError, MountInfo
from csi_driver.system_errors import system_errors

log = logging.getLogger(__name__)

_Rpc = csi_pb2.NodeServiceCapability.RPC
_CAPABILITIES = (
    _Rpc.STAGE_UNSTAGE_VOLUME,
    _Rpc.GET_VOLUME_STATS,
    _Rpc.EXPAND_VOLUME,
    _Rpc.VOLUME_CONDITION,
    _Rpc.SINGLE_NODE_MULTI_WRITER,
)


def mount_flags(
    cap: model.Capability, field: str = "volume_capability.mount.mount_flags"
) -> list[str]:
    """The capability's mount flags, checked (INVALID_ARGUMENT naming the field otherwise)."""
    try:
        return mountflags.parse(cap.mount_flags)
    except ValueError as exc:
        raise InvalidArgument(f"{field}: {exc}") from exc


class NodeServicer(csi_pb2_grpc.NodeServicer):  # type: ignore[misc]
    def __init__(
        self,
        config: Config,
        backend: Backend,
        locks: KeyLocks,
        mounter: Mounter,
        filesystems: Filesystems,
        *,
        state_dir: str | None = None,
        cgroup: CgroupIo | None = None,
    ) -> None:
        self._config = config
        self._backend = backend
        self._locks = locks
        self._mounter = mounter
        self._fs = filesystems
        self._node = config.node_id
        self._volumes = NodeVolumes(config, backend, locks, mounter, filesystems)
        self.jail: Jail = self._volumes.jail
        self._block = BlockVolumes(self._volumes)
        self.ephemeral = EphemeralVolumes(self, config, backend, state_dir)
        self._stats = VolumeStats(self._volumes, self.ephemeral)
        self.io_limits = NodeIoLimits(
            self._volumes, backend, config.kubelet_dir, cgroup or CgroupIo()
        )

    # --- health ----------------------------------------------------------------------------

    def health(self) -> str | None:
        """Why this node cannot serve now (its mount table or kubelet directory unusable)."""
        try:
            self._mounter.mounts()
        except OSError as exc:
            return f"the mount table cannot be read: {exc.strerror}"
        problem = self.jail.base_problem()
        return f"the kubelet directory {problem}" if problem else None

    # --- the steps an inline ephemeral volume shares (see ephemeral.NodeSteps) -------------

    def volume(self, volume_id: str) -> model.Volume:
        """The volume, which must live on this node; NOT_FOUND otherwise."""
        return self._volumes.volume(volume_id)

    def lock_key(self, path: str) -> str:
        """The lock of a staging or target path (see :meth:`NodeVolumes.lock_key`)."""
        return self._volumes.lock_key(path)

    @property
    def locks(self) -> KeyLocks:
        return self._locks

    @property
    def mounter(self) -> Mounter:
        return self._mounter

    # --- staging ---------------------------------------------------------------------------

    def stage_mount(
        self,
        volume: model.Volume,
        cap: model.Capability,
        attachment: model.Attachment,
        staging: Confined,
    ) -> None:
        flags = mount_flags(cap)
        directory = attachment.kind is model.AttachmentKind.DIRECTORY
        if directory and mountflags.per_filesystem(flags):
            raise InvalidArgument(
                f"volume {volume.id!r} is a directory on the node's filesystem, so only"
                " per-mount flags apply; got"
                f" {bounded.listing(mountflags.per_filesystem(flags))}"
            )
        staging.make_dir(TARGET_DIR_MODE)
        reach("stage.dir")
        current = self._mounter.mount_at(staging.path)
        if current is not None:
            self._check_staged(volume, cap, attachment, flags, current, staging.path)
            return
        elsewhere = self._volumes.publications(self._volumes.source_key(attachment), [])
        if elsewhere:
            raise FailedPrecondition(
                f"volume {volume.id!r} is already staged or published at"
                f" {bounded.listing(elsewhere)};"
                " a volume is staged at one path on a node"
            )
        self._volumes.refuse_hiding(staging)
        if directory:
            # read-only applies per publication; the staging bind stays writable
            self._mounter.bind(attachment.path, staging, mountflags.without_access(flags))
            return
        device = attachment.path
        self._volumes.clear_stale_read_only(device)
        signature = self._fs.probe(device)
        if signature is None:
            fs_type = cap.fs_type or volume.fs_type or self._volumes.default_fs_type()
            if fs_type not in self._fs.formattable():
                raise InvalidArgument(
                    f"cannot create a {fs_type!r} filesystem; use one of"
                    f" {list(self._fs.formattable())}"
                )
            self._fs.format(device, fs_type)
            reach("stage.formatted")
        elif not signature.is_filesystem:
            raise FailedPrecondition(
                f"the device of volume {volume.id!r} holds {signature.type} ({signature.usage}),"
                " not a filesystem; it is left untouched"
            )
        elif cap.fs_type and signature.type != cap.fs_type:
            raise FailedPrecondition(
                f"volume {volume.id!r} holds a {signature.type} filesystem, not {cap.fs_type};"
                " it is never reformatted"
            )
        else:
            fs_type = signature.type
        try:
            self._mounter.mount(device, staging, fs_type, flags)
        except MountError as exc:
            if exc.errno == errno.EINVAL:
                raise InvalidArgument(
                    f"the filesystem of volume {volume.id!r} refused the mount flags"
                    f" {bounded.listing(flags)}: {exc}"
                ) from exc
            raise

    def _check_staged(
        self,
        volume: model.Volume,
        cap: model.Capability,
        attachment: model.Attachment,
        flags: list[str],
        current: MountInfo,
        where: str,
    ) -> None:
        """Something is mounted at the staging path already: OK if it is this volume as asked,
        ALREADY_EXISTS otherwise (and nothing is touched)."""
        if not current.shows(self._volumes.source_key(attachment)):
            raise AlreadyExists(
                f"staging_target_path {where} has something else mounted; unstage it first"
            )
        problems = []
        if (
            attachment.kind is model.AttachmentKind.BLOCK_DEVICE
            and cap.fs_type
            and current.fs_type != cap.fs_type
        ):
            problems.append(f"it holds {current.fs_type}, not {cap.fs_type}")
        applied = mountflags.per_mount(flags)
        if attachment.kind is model.AttachmentKind.DIRECTORY:
            applied = mountflags.without_access(applied)
        missing = mountflags.missing(applied, current.options)
        if missing:
            problems.append(f"it is mounted without {missing}")
        if problems:
            raise AlreadyExists(
                f"volume {volume.id!r} is already staged at {where} with another"
                f" capability: {'; '.join(problems)}"
            )

    def NodeStageVolume(
        self, request: csi_pb2.NodeStageVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeStageVolumeResponse:
        volume_id = convert.require(request.volume_id, "volume_id")
        path = convert.require_abs_path(request.staging_target_path, "staging_target_path")
        cap = convert.capability_from_pb(request.volume_capability)
        if cap.access_type is model.AccessType.MOUNT:
            mount_flags(cap)
        ids.require_volume_id(volume_id)
        with self._locks.hold(volume_id, self.lock_key(path)), system_errors(request_paths=True):
            volume = self.volume(volume_id)
            self._volumes.check_fits(volume, cap)
            with self.jail.resolve(path, create_parents=True) as staging:
                attachment = self._backend.attach(volume_id)
                if cap.access_type is model.AccessType.BLOCK:
                    self._block.stage(volume, attachment, staging)
                else:
                    self.stage_mount(volume, cap, attachment, staging)
            reach("stage.done")
        log.info("staged", extra={"volume_id": volume_id, "staging_target_path": path})
        return csi_pb2.NodeStageVolumeResponse()

    def NodeUnstageVolume(
        self, request: csi_pb2.NodeUnstageVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeUnstageVolumeResponse:
        volume_id = convert.require(request.volume_id, "volume_id")
        path = convert.require_abs_path(request.staging_target_path, "staging_target_path")
        ids.require_volume_id(volume_id)
        with self._locks.hold(volume_id, self.lock_key(path)), system_errors(request_paths=True):
            volume = self.volume(volume_id)
            attachment = self._backend.locate(volume_id)
            with self.jail.existing(path) as staging:
                if staging is not None:
                    self.unstage(volume, attachment, staging)
            self._check_unused(volume, attachment)
            self._backend.detach(volume_id)
            reach("unstage.done")
        log.info("unstaged", extra={"volume_id": volume_id, "staging_target_path": path})
        return csi_pb2.NodeUnstageVolumeResponse()

    def unstage(
        self, volume: model.Volume, attachment: model.Attachment | None, staging: Confined
    ) -> None:
        """Unmount this volume's staging mount at ``staging``; anything else there is left."""
        key = None
        if attachment is not None and volume.access_type is model.AccessType.MOUNT:
            key = self._volumes.source_key(attachment)
        current = self._mounter.mount_at(staging.path)
        if current is None:
            return
        if not current.shows(key):
            raise FailedPrecondition(
                f"staging_target_path {staging.path} holds a mount that is not volume"
                f" {volume.id!r}; it is left alone"
            )
        others = self._volumes.publications(key, [staging.path])
        if others:
            raise FailedPrecondition(
                f"volume {volume.id!r} is still published at {bounded.listing(others)};"
                " unpublish it first"
            )
        self._mounter.unmount(staging, lambda m: m.shows(key))
        reach("unstage.unmounted")

    def _check_unused(self, volume: model.Volume, attachment: model.Attachment | None) -> None:
        """Before a detach: the volume must be mounted nowhere (a loop device pulled from
        under a mount loses data). A read-only flag left on an unused device is cleared."""
        if attachment is None or attachment.kind is not model.AttachmentKind.BLOCK_DEVICE:
            return
        device = os.path.realpath(attachment.path)
        seen = self._volumes
        used = seen.publications(seen.device_node_key(device), [])
        used += seen.publications(seen.source_key(attachment), [])
        if used:
            raise FailedPrecondition(
                f"volume {volume.id!r} is still mounted at {bounded.listing(used)};"
                " unpublish and unstage it first"
            )
        if volume.access_type is model.AccessType.BLOCK and self._fs.is_read_only(device):
            self._fs.set_read_only(device, False)

    # --- publishing ------------------------------------------------------------------------

    def NodePublishVolume(
        self, request: csi_pb2.NodePublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodePublishVolumeResponse:
        volume_id = convert.require(request.volume_id, "volume_id")
        path = convert.require_abs_path(request.target_path, "target_path")
        cap = convert.capability_from_pb(request.volume_capability)
        flags = mount_flags(cap) if cap.access_type is model.AccessType.MOUNT else []
        read_only = request.readonly or cap.access_mode.read_only or "ro" in flags
        context_map = dict(request.volume_context)
        if is_ephemeral(context_map):
            self.ephemeral.publish(volume_id, path, cap, read_only, context_map)
            return csi_pb2.NodePublishVolumeResponse()
        if not request.staging_target_path:
            raise FailedPrecondition(
                "staging_target_path is required: this driver stages volumes"
                " (STAGE_UNSTAGE_VOLUME); call NodeStageVolume first"
            )
        staging_path = convert.require_abs_path(request.staging_target_path, "staging_target_path")
        ids.require_volume_id(volume_id)
        with self._locks.hold(volume_id, self.lock_key(path)), system_errors(request_paths=True):
            volume = self.volume(volume_id)
            self._volumes.check_fits(volume, cap)
            with (
                self.jail.existing(staging_path) as staging,
                self.jail.resolve(path, create_parents=True) as target,
            ):
                if staging is None:
                    raise FailedPrecondition(
                        f"volume {volume_id!r} is not staged at {staging_path}; call"
                        " NodeStageVolume first"
                    )
                attachment = self._backend.attach(volume_id)
                # refusals come before the mount, which the kubelet would never unpublish
                pod_cgroup = self.io_limits.check(volume, attachment, target.path, context_map)
                if cap.access_type is model.AccessType.BLOCK:
                    self._block.publish(volume, cap, attachment, staging, target, read_only)
                else:
                    self.publish_mount(volume, cap, attachment, staging, target, read_only)
                if pod_cgroup is not None:
                    # a kill here leaves the volume published without its limit: the kubelet
                    # retries (its publication never succeeded), finds the mount and writes it
                    reach("publish.mounted")
                    try:
                        self.io_limits.publish(volume, attachment, pod_cgroup)
                    except FailedPrecondition:
                        self.unpublish(volume, attachment, target)
                        raise
            reach("publish.done")
        log.info("published", extra={"volume_id": volume_id, "target_path": path})
        return csi_pb2.NodePublishVolumeResponse()

    def publish_mount(
        self,
        volume: model.Volume,
        cap: model.Capability,
        attachment: model.Attachment,
        staging: Confined,
        target: Confined,
        read_only: bool,
    ) -> None:
        if target.path == staging.path:
            raise InvalidArgument("target_path must differ from staging_target_path")
        staged = self._mounter.mount_at(staging.path)
        key = self._volumes.source_key(attachment)
        if staged is None or not staged.shows(key) or self._mounter.mounts_below(staging.path):
            raise FailedPrecondition(
                f"volume {volume.id!r} is not staged at {staging.path}; call NodeStageVolume first"
            )
        flags = mountflags.without_access(mountflags.per_mount(mount_flags(cap)))
        current = self._mounter.mount_at(target.path)
        if current is not None:
            if not current.shows(key):
                raise AlreadyExists(f"target_path {target.path} has another volume mounted")
            problems = []
            if current.read_only != read_only:
                problems.append("read-only" if current.read_only else "writable")
            missing = mountflags.missing(flags, current.options)
            if missing:
                problems.append(f"without {missing}")
            if problems:
                raise AlreadyExists(
                    f"volume {volume.id!r} is already published at {target.path} but"
                    f" {' and '.join(problems)}; unpublish it first"
                )
            return
        self._volumes.check_single_writer(volume, cap, key, [staging.path, target.path])
        self._volumes.refuse_hiding(target)
        if target.make_dir(TARGET_DIR_MODE):
            reach("publish.made")  # a kill here leaves a directory not marked as ours
            target.tag(volume.id)
        reach("publish.target")
        with staging.opened() as source:
            # the staging path, opened without a symlink anywhere, must still lead to the
            # staging mount checked above: that is what gets bound, never a name looked up again
            if mount_id(source) != staged.mount_id:
                raise FailedPrecondition(
                    f"staging_target_path {staging.path} no longer leads to the staging mount of"
                    f" volume {volume.id!r}"
                )
            self._mounter.bind_fd(
                source, staging.path, target, [*flags, mountflags.access(read_only)]
            )

    def NodeUnpublishVolume(
        self, request: csi_pb2.NodeUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeUnpublishVolumeResponse:
        volume_id = convert.require(request.volume_id, "volume_id")
        path = convert.require_abs_path(request.target_path, "target_path")
        if ids.parse(volume_id, "v") is None:
            self.ephemeral.check_id(volume_id)
            if self.ephemeral.owns(volume_id):
                self.ephemeral.unpublish(volume_id, path)
                return csi_pb2.NodeUnpublishVolumeResponse()
            if self.ephemeral.finished(volume_id, path, self._holds_nothing):
                return csi_pb2.NodeUnpublishVolumeResponse()
        ids.require_volume_id(volume_id)
        with self._locks.hold(volume_id, self.lock_key(path)), system_errors(request_paths=True):
            volume = self.volume(volume_id)
            attachment = self._backend.locate(volume_id)
            with self.jail.existing(path) as target:
                if target is not None:
                    self.unpublish(volume, attachment, target)
            # after the unmount, from the path alone: also the retry after a kill in between
            self.io_limits.unpublish(volume, attachment, path)
        log.info("unpublished", extra={"volume_id": volume_id, "target_path": path})
        return csi_pb2.NodeUnpublishVolumeResponse()

    def _holds_nothing(self, path: str) -> tuple[bool, bool]:
        """(absent, empty): whether ``path`` is absent; whether it is an empty directory or
        file that is no mount point."""
        with system_errors(request_paths=True), self.jail.existing(path) as where:
            if where is None or where.lstat() is None:
                return True, True
            return False, not self._mounter.is_mount_point(where.path) and where.is_empty()

    def unpublish(
        self, volume: model.Volume, attachment: model.Attachment | None, target: Confined
    ) -> None:
        """Unmount this volume's publication at ``target`` and remove the file or directory
        made for it. Whatever else is there (another mount, a non-empty directory, a file
        with data) is left alone."""
        key: Key | None = None
        if attachment is not None and volume.access_type is model.AccessType.BLOCK:
            key = self._volumes.device_node_key(attachment.path)
        elif attachment is not None:
            key = self._volumes.source_key(attachment)
        current = self._mounter.mount_at(target.path)
        if current is not None and not current.shows(key):
            raise FailedPrecondition(
                f"target_path {target.path} holds a mount that is not volume {volume.id!r};"
                " it is left alone"
            )
        if current is not None:
            self._mounter.unmount(target, lambda m: m.shows(key))
            reach("unpublish.unmounted")
        if not target.remove_empty(volume.id) and not target.is_empty():
            raise FailedPrecondition(
                f"target_path {target.path} is not an empty file or directory (a symbolic link,"
                " or data left there); it is left alone"
            )
        reach("unpublish.removed")
        if attachment is not None and volume.access_type is model.AccessType.BLOCK:
            # also on the retry after a kill between the unmount and here: the flag belongs
            # to the device and must not outlive its last read-only publication
            device = os.path.realpath(attachment.path)
            if not self._volumes.publications(key, []) and self._fs.is_read_only(device):
                self._fs.set_read_only(device, False)

    # --- stats and expansion (volume_stats.py) ---------------------------------------------

    def NodeGetVolumeStats(
        self, request: csi_pb2.NodeGetVolumeStatsRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetVolumeStatsResponse:
        return self._stats.stats(request)

    def NodeExpandVolume(
        self, request: csi_pb2.NodeExpandVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeExpandVolumeResponse:
        return self._stats.expand(request)

    # --- node information ------------------------------------------------------------------

    def NodeGetCapabilities(
        self, request: csi_pb2.NodeGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetCapabilitiesResponse:
        return csi_pb2.NodeGetCapabilitiesResponse(
            capabilities=[csi_pb2.NodeServiceCapability(rpc=_Rpc(type=t)) for t in _CAPABILITIES]
        )

    def NodeGetInfo(
        self, request: csi_pb2.NodeGetInfoRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetInfoResponse:
        return csi_pb2.NodeGetInfoResponse(
            node_id=self._node,
            max_volumes_per_node=self._config.max_volumes_per_node
            or self._backend.max_volumes_per_node,
            accessible_topology=convert.topology_for(self._config.topology_key, self._node),
        )


class NodeCapabilitiesServicer(csi_pb2_grpc.NodeServicer):  # type: ignore[misc]
    """The Node service of ``--mode controller``: capabilities only.

    csi-resizer asks NodeGetCapabilities to decide on node-only expansion (no controller
    EXPAND_VOLUME, node EXPAND_VOLUME present: it marks the PVC for kubelet's NodeExpandVolume).
    Every other Node RPC is UNIMPLEMENTED here: they run in the node plugin.
    """

    def NodeGetCapabilities(
        self, request: csi_pb2.NodeGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetCapabilitiesResponse:
        return NodeServicer.NodeGetCapabilities(self, request, context)


__all__ = ["NodeCapabilitiesServicer", "NodeServicer", "mount_flags"]
