"""The CSI Node service: validate, lock the volume, let the backend attach it, mount, reply.

The node keeps no state of its own: what is staged or published is read back from the kernel's
mount table and compared with what the backend says the volume is (the same directory inode,
or the same device number). A restarted driver therefore picks up exactly where the old one
stopped, and a retried call finds its earlier work done.

Staging (``NodeStageVolume``):

* mount access, directory attachment (hostpath): the directory is bind-mounted at the staging
  path; only per-mount flags (``noexec``, ``nosuid``, ...) can apply to a bind.
* mount access, block device attachment: the device is probed; a blank one is formatted with the
  requested filesystem (else the volume's, else the backend's default), one holding anything
  else is never touched (FAILED_PRECONDITION); then it is mounted with the mount flags.
* block access: the device is attached and nothing is mounted; publishing binds the device
  node onto a file at the target.

Ephemeral inline volumes (``csi.storage.k8s.io/ephemeral: "true"`` in the volume context of
NodePublishVolume) get a backend volume named after kubelet's volume id, staged in a private
directory ``<state dir>/ephemeral/<volume id>``. The state dir defaults to the directory of the
driver's unix socket (on Kubernetes the kubelet plugin directory on the host, so a restarted
driver container still finds it), else ``/run/<driver name>``.

Read-only block publications: a read-only bind mount does not stop writes to a device node,
so the device itself is made read-only (``blockdev --setro``); since that flag belongs to the
device, one volume cannot be published read-only and writable at the same time on one node.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Callable, Iterator, Sequence

import grpc

from csi_driver import ids, model
from csi_driver.backends.base import Backend
from csi_driver.config import Config
from csi_driver.errors import (
    AlreadyExists,
    CsiError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
)
from csi_driver.locks import KeyLocks
from csi_driver.proto import csi_pb2, csi_pb2_grpc
from csi_driver.services import convert
from csi_driver.system.filesystem import FilesystemError, Filesystems
from csi_driver.system.mounter import Mounter, MountError, UnsafePathError, canonical
from csi_driver.units import GiB, parse_bytes

log = logging.getLogger(__name__)

EPHEMERAL_KEY = "csi.storage.k8s.io/ephemeral"
EPHEMERAL_SIZE_KEY = "size"
DEFAULT_EPHEMERAL_SIZE = 1 * GiB

_Rpc = csi_pb2.NodeServiceCapability.RPC
_CAPABILITIES = (
    _Rpc.STAGE_UNSTAGE_VOLUME,
    _Rpc.GET_VOLUME_STATS,
    _Rpc.EXPAND_VOLUME,
    _Rpc.VOLUME_CONDITION,
    _Rpc.SINGLE_NODE_MULTI_WRITER,
)

#: flags that belong to a mount, not to a filesystem: the only ones a bind mount can carry
BIND_FLAGS = frozenset(
    {
        "ro",
        "rw",
        "nosuid",
        "suid",
        "nodev",
        "dev",
        "noexec",
        "exec",
        "noatime",
        "atime",
        "nodiratime",
        "diratime",
        "relatime",
        "norelatime",
        "strictatime",
        "nostrictatime",
        "nosymfollow",
    }
)
#: mount(8) options that are operations or helpers, not flags: never from a request
_FORBIDDEN_FLAGS = frozenset(
    {
        "bind",
        "rbind",
        "move",
        "remount",
        "loop",
        "owner",
        "group",
        "user",
        "users",
        "shared",
        "rshared",
        "slave",
        "rslave",
        "private",
        "rprivate",
        "unbindable",
        "runbindable",
    }
)
_FORBIDDEN_PREFIXES = (
    "loop=",
    "offset=",
    "sizelimit=",
    "encryption=",
    "helper=",
    "make-",
    "x-",
    "X-",
)


def _flags(cap: model.Capability, field: str = "volume_capability.mount.mount_flags") -> list[str]:
    """The mount flags as single options (a flag ``"a,b"`` counts as two), each checked."""
    out: list[str] = []
    for flag in cap.mount_flags:
        for opt in flag.split(","):
            opt = opt.strip()
            if not opt:
                raise InvalidArgument(f"{field}: {flag!r} holds an empty option")
            if opt in _FORBIDDEN_FLAGS or opt.startswith(_FORBIDDEN_PREFIXES):
                raise InvalidArgument(
                    f"{field}: {opt!r} is a mount operation, not a mount flag; it is not allowed"
                )
            if any(c.isspace() for c in opt):
                raise InvalidArgument(f"{field}: {opt!r} contains white space")
            if opt not in out:
                out.append(opt)
    return out


#: flags mountinfo shows when set, and the flags whose setting shows as the absence of another
_SHOWN_FLAGS = frozenset(
    {"ro", "rw", "nosuid", "nodev", "noexec", "noatime", "nodiratime", "relatime", "nosymfollow"}
)
_NEGATIONS = {
    "suid": "nosuid",
    "dev": "nodev",
    "exec": "noexec",
    "diratime": "nodiratime",
    "symfollow": "nosymfollow",
}


def _missing_flags(flags: Sequence[str], options: Sequence[str]) -> list[str]:
    """The per-mount flags asked for that an existing mount (its mountinfo options) lacks."""
    missing = []
    for f in flags:
        if (f in _SHOWN_FLAGS and f not in options) or (
            f in _NEGATIONS and _NEGATIONS[f] in options
        ):
            missing.append(f)
    return missing


def _bind_flags(flags: Sequence[str]) -> list[str]:
    return [f for f in flags if f in BIND_FLAGS and f not in ("ro", "rw")]


def _default_state_dir(config: Config) -> str:
    if config.endpoint.scheme == "unix":
        return os.path.dirname(config.endpoint.address) or "/"
    return os.path.join("/run", config.driver_name)


@contextlib.contextmanager
def _system_errors() -> Iterator[None]:
    """The system layer knows nothing of gRPC codes: give its errors theirs here."""
    try:
        yield
    except UnsafePathError as exc:
        raise FailedPrecondition(str(exc)) from exc
    except (MountError, FilesystemError) as exc:
        raise Internal(str(exc)) from exc


def _same_file(a: str, b: str) -> bool:
    """True when ``a`` and ``b`` are the same directory (inode) or device (for a device node at
    ``b``: the filesystem at ``a`` lives on it, or ``a`` is that device node, bind-mounted)."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    if stat.S_ISBLK(sb.st_mode):
        if stat.S_ISBLK(sa.st_mode):
            return sa.st_rdev == sb.st_rdev
        return sa.st_dev == sb.st_rdev
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


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
    ) -> None:
        self._config = config
        self._backend = backend
        self._locks = locks
        self._mounter = mounter
        self._fs = filesystems
        self._node = config.node_id
        self.ephemeral_dir = os.path.join(state_dir or _default_state_dir(config), "ephemeral")

    # --- helpers ---------------------------------------------------------------------------

    def _volume(self, volume_id: str) -> model.Volume:
        """The volume, which must live on this node; NOT_FOUND otherwise."""
        parsed = ids.require_volume_id(volume_id)
        if parsed.node_id != self._node:
            raise NotFound(
                f"volume {volume_id!r} lives on node {parsed.node_id!r}, not on {self._node!r}"
            )
        volume = self._backend.get_volume(volume_id)
        if volume is None:
            raise NotFound(f"volume {volume_id!r} does not exist")
        return volume

    def _volume_or_ephemeral(self, volume_id: str) -> model.Volume:
        """Like :meth:`_volume`, but also accepts kubelet's id of an ephemeral inline volume
        (kubelet asks for the stats of those under its own id)."""
        try:
            return self._volume(volume_id)
        except NotFound:
            if ids.parse(volume_id, "v") is not None:
                raise
            ephemeral = self._backend.get_volume(self._ephemeral_volume_id(volume_id)[0])
            if ephemeral is None:
                raise
            return ephemeral

    def _check_fits(self, volume: model.Volume, cap: model.Capability) -> None:
        """The capability must describe the volume as it was created (FAILED_PRECONDITION,
        "exceeds capabilities", otherwise)."""
        if cap.access_type is not volume.access_type:
            raise FailedPrecondition(
                f"volume {volume.id!r} is a {volume.access_type.value} volume and cannot be"
                f" used with {cap.access_type.value} access"
            )
        if not cap.access_mode.single_node:
            raise FailedPrecondition(
                f"volume {volume.id!r} is local to node {self._node!r}; access mode"
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

    def _publications(self, path: str, exclude: Sequence[str]) -> list[str]:
        """Other mount points showing the same thing as ``path`` (a staging mount, a device)."""
        key = self._mounter.key_of(path)
        if key is None:
            return []
        skip = {canonical(p) for p in exclude}
        return [
            m.mount_point for m in self._mounter.mounts_with_key(key) if m.mount_point not in skip
        ]

    # --- staging ---------------------------------------------------------------------------

    def _stage_mount(
        self,
        volume: model.Volume,
        cap: model.Capability,
        attachment: model.Attachment,
        staging: str,
    ) -> None:
        flags = _flags(cap)
        if attachment.kind is model.AttachmentKind.DIRECTORY:
            fs_flags = [f for f in flags if f not in BIND_FLAGS]
            if fs_flags:
                raise InvalidArgument(
                    f"volume {volume.id!r} is a directory on the node's filesystem, so only"
                    f" per-mount flags ({', '.join(sorted(BIND_FLAGS))}) apply; got {fs_flags}"
                )
        self._mounter.make_dir_target(staging)
        current = self._mounter.mount_at(staging)
        if current is not None:
            if not _same_file(staging, attachment.path):
                raise AlreadyExists(
                    f"staging_target_path {staging} has something else mounted; unstage it first"
                )
            problems = []
            if (
                attachment.kind is model.AttachmentKind.BLOCK_DEVICE
                and cap.fs_type
                and current.fs_type != cap.fs_type
            ):
                problems.append(f"it holds {current.fs_type}, not {cap.fs_type}")
            applied = (
                _bind_flags(flags) if attachment.kind is model.AttachmentKind.DIRECTORY else flags
            )
            missing = _missing_flags(applied, current.options)
            if missing:
                problems.append(f"it is mounted without {missing}")
            if problems:
                raise AlreadyExists(
                    f"volume {volume.id!r} is already staged at {staging} with another"
                    f" capability: {'; '.join(problems)}"
                )
            return
        if attachment.kind is model.AttachmentKind.DIRECTORY:
            self._mounter.bind(attachment.path, staging, options=_bind_flags(flags))
            return
        device = attachment.path
        self._clear_stale_read_only(device)
        signature = self._fs.probe(device)
        if signature is None:
            fs_type = cap.fs_type or volume.fs_type or self._default_fs_type()
            if fs_type not in self._fs.formattable():
                raise InvalidArgument(
                    f"cannot create a {fs_type!r} filesystem; use one of"
                    f" {list(self._fs.formattable())}"
                )
            self._fs.format(device, fs_type)
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
        self._mounter.mount(device, staging, fs_type, flags)

    def _default_fs_type(self) -> str:
        supported = list(self._backend.supported_fs_types())
        return supported[0] if supported and supported[0] else "ext4"

    def _stage_block(
        self, volume: model.Volume, attachment: model.Attachment, staging: str
    ) -> None:
        if attachment.kind is not model.AttachmentKind.BLOCK_DEVICE:
            raise FailedPrecondition(
                f"volume {volume.id!r} is not backed by a block device and cannot be used with"
                " block access"
            )
        self._mounter.make_dir_target(staging)
        if self._mounter.is_mount_point(staging):
            raise AlreadyExists(
                f"staging_target_path {staging} has something mounted, but block volume"
                f" {volume.id!r} is staged without a mount; unstage it first"
            )
        self._clear_stale_read_only(attachment.path)

    def _clear_stale_read_only(self, device: str) -> None:
        """A device's read-only flag outlives its user: the kernel keeps it on a loop device
        number across detach and reuse. An unused device being staged must start writable
        (publishing makes it read-only again where asked)."""
        real = os.path.realpath(device)
        if self._fs.is_read_only(real) and not self._publications(real, []):
            log.info("clearing a stale read-only flag", extra={"device": real})
            self._fs.set_read_only(real, False)

    def NodeStageVolume(
        self, request: csi_pb2.NodeStageVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeStageVolumeResponse:
        volume_id = convert.require(request.volume_id, "volume_id")
        staging = convert.require_abs_path(request.staging_target_path, "staging_target_path")
        cap = convert.capability_from_pb(request.volume_capability)
        if cap.access_type is model.AccessType.MOUNT:
            _flags(cap)
        ids.require_volume_id(volume_id)
        with self._locks.hold(volume_id), _system_errors():
            volume = self._volume(volume_id)
            self._check_fits(volume, cap)
            self._mounter.refuse_symlink(staging)
            attachment = self._backend.attach(volume_id)
            if cap.access_type is model.AccessType.BLOCK:
                self._stage_block(volume, attachment, staging)
            else:
                self._stage_mount(volume, cap, attachment, staging)
        log.info("staged", extra={"volume_id": volume_id, "staging_target_path": staging})
        return csi_pb2.NodeStageVolumeResponse()

    def NodeUnstageVolume(
        self, request: csi_pb2.NodeUnstageVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeUnstageVolumeResponse:
        volume_id = convert.require(request.volume_id, "volume_id")
        staging = convert.require_abs_path(request.staging_target_path, "staging_target_path")
        ids.require_volume_id(volume_id)
        with self._locks.hold(volume_id), _system_errors():
            self._mounter.refuse_symlink(staging)
            volume = self._backend.get_volume(volume_id)
            mounted = self._mounter.is_mount_point(staging)
            if volume is None and not mounted:
                raise NotFound(f"volume {volume_id!r} does not exist and nothing is staged")
            self._unstage(volume_id, volume, staging)
        log.info("unstaged", extra={"volume_id": volume_id, "staging_target_path": staging})
        return csi_pb2.NodeUnstageVolumeResponse()

    def _unstage(self, volume_id: str, volume: model.Volume | None, staging: str) -> None:
        if self._mounter.is_mount_point(staging):
            others = self._publications(staging, [staging])
            if others:
                raise FailedPrecondition(
                    f"volume {volume_id!r} is still published at {others}; unpublish it first"
                )
            self._mounter.unmount(staging)
        if volume is None:
            return
        if volume.access_type is model.AccessType.BLOCK and self._release_read_only(volume_id):
            raise FailedPrecondition(
                f"block volume {volume_id!r} is still published; unpublish it first"
            )
        self._backend.detach(volume_id)

    def _release_read_only(self, volume_id: str) -> bool:
        """Make an unpublished block device writable again: the read-only flag belongs to the
        device (a loop device number is reused by the next volume) and must not outlive the
        read-only publication. True when the device is still published somewhere."""
        try:
            attachment = self._backend.attach(volume_id)
        except CsiError as exc:
            log.warning(
                "cannot look at the device of a volume being released",
                extra={"volume_id": volume_id, "error": str(exc)},
            )
            return False
        if attachment.kind is not model.AttachmentKind.BLOCK_DEVICE:
            return False
        device = os.path.realpath(attachment.path)
        if self._publications(device, []):
            return True
        if self._fs.is_read_only(device):
            self._fs.set_read_only(device, False)
        return False

    # --- publishing ------------------------------------------------------------------------

    def NodePublishVolume(
        self, request: csi_pb2.NodePublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodePublishVolumeResponse:
        volume_id = convert.require(request.volume_id, "volume_id")
        target = convert.require_abs_path(request.target_path, "target_path")
        cap = convert.capability_from_pb(request.volume_capability)
        if cap.access_type is model.AccessType.MOUNT:
            _flags(cap)
        read_only = (
            request.readonly
            or cap.access_mode.read_only
            or (cap.access_type is model.AccessType.MOUNT and "ro" in _flags(cap))
        )
        context_map = dict(request.volume_context)
        if context_map.get(EPHEMERAL_KEY, "").lower() == "true":
            self._publish_ephemeral(volume_id, target, cap, read_only, context_map)
            return csi_pb2.NodePublishVolumeResponse()
        if not request.staging_target_path:
            raise FailedPrecondition(
                "staging_target_path is required: this driver stages volumes"
                " (STAGE_UNSTAGE_VOLUME); call NodeStageVolume first"
            )
        staging = convert.require_abs_path(request.staging_target_path, "staging_target_path")
        ids.require_volume_id(volume_id)
        with self._locks.hold(volume_id), _system_errors():
            volume = self._volume(volume_id)
            self._check_fits(volume, cap)
            self._mounter.refuse_symlink(staging)
            self._mounter.refuse_symlink(target)
            attachment = self._backend.attach(volume_id)
            if cap.access_type is model.AccessType.BLOCK:
                self._publish_block(volume, cap, attachment, staging, target, read_only)
            else:
                self._publish_mount(volume, cap, attachment, staging, target, read_only)
        log.info("published", extra={"volume_id": volume_id, "target_path": target})
        return csi_pb2.NodePublishVolumeResponse()

    def _publish_mount(
        self,
        volume: model.Volume,
        cap: model.Capability,
        attachment: model.Attachment,
        staging: str,
        target: str,
        read_only: bool,
    ) -> None:
        if not self._mounter.is_mount_point(staging) or not _same_file(staging, attachment.path):
            raise FailedPrecondition(
                f"volume {volume.id!r} is not staged at {staging}; call NodeStageVolume first"
            )
        flags = _bind_flags(_flags(cap))
        current = self._mounter.mount_at(target)
        if current is not None:
            if not _same_file(target, staging):
                raise AlreadyExists(f"target_path {target} has another volume mounted")
            problems = []
            if current.read_only != read_only:
                problems.append("read-only" if current.read_only else "writable")
            missing = _missing_flags(flags, current.options)
            if missing:
                problems.append(f"without {missing}")
            if problems:
                raise AlreadyExists(
                    f"volume {volume.id!r} is already published at {target} but"
                    f" {' and '.join(problems)}; unpublish it first"
                )
            return
        self._check_single_writer(volume, cap, staging, [staging, target])
        self._mounter.make_dir_target(target)
        self._mounter.bind(staging, target, read_only=read_only, options=flags)

    def _check_single_writer(
        self, volume: model.Volume, cap: model.Capability, path: str, exclude: Sequence[str]
    ) -> None:
        """SINGLE_NODE_SINGLE_WRITER allows one publication. SINGLE_NODE_WRITER is let through,
        as the spec asks, so that older COs can still publish a volume for several pods."""
        if cap.access_mode is not model.AccessMode.SINGLE_NODE_SINGLE_WRITER:
            return
        others = self._publications(path, exclude)
        if others:
            raise FailedPrecondition(
                f"volume {volume.id!r} has access mode SINGLE_NODE_SINGLE_WRITER and is already"
                f" published at {others}"
            )

    def _publish_block(
        self,
        volume: model.Volume,
        cap: model.Capability,
        attachment: model.Attachment,
        staging: str,
        target: str,
        read_only: bool,
    ) -> None:
        if attachment.kind is not model.AttachmentKind.BLOCK_DEVICE:
            raise FailedPrecondition(
                f"volume {volume.id!r} is not backed by a block device and cannot be used with"
                " block access"
            )
        if not os.path.isdir(staging):
            raise FailedPrecondition(
                f"volume {volume.id!r} is not staged at {staging}; call NodeStageVolume first"
            )
        device = os.path.realpath(attachment.path)
        current = self._mounter.mount_at(target)
        if current is not None:
            if not _same_file(target, device):
                raise AlreadyExists(f"target_path {target} has another device mounted")
            if self._fs.is_read_only(device) != read_only:
                raise AlreadyExists(
                    f"volume {volume.id!r} is already published at {target} but"
                    f" {'read-only' if not read_only else 'writable'}; unpublish it first"
                )
            return
        others = self._publications(device, [target])
        self._check_single_writer(volume, cap, device, [target])
        if self._fs.is_read_only(device) != read_only:
            if others:
                raise FailedPrecondition(
                    f"block volume {volume.id!r} is published"
                    f" {'writable' if read_only else 'read-only'} at {others}; a device cannot"
                    " be read-only for one publication and writable for another"
                )
            self._fs.set_read_only(device, read_only)
        self._mounter.make_file_target(target)
        self._mounter.bind(device, target, read_only=read_only)

    def NodeUnpublishVolume(
        self, request: csi_pb2.NodeUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeUnpublishVolumeResponse:
        volume_id = convert.require(request.volume_id, "volume_id")
        target = convert.require_abs_path(request.target_path, "target_path")
        try:
            ids.require_volume_id(volume_id)
        except NotFound:
            # Not one of our ids: kubelet's id of an ephemeral inline volume (or nothing at all).
            self._unpublish_ephemeral(volume_id, target)
            return csi_pb2.NodeUnpublishVolumeResponse()
        with self._locks.hold(volume_id), _system_errors():
            self._mounter.refuse_symlink(target)
            volume = self._backend.get_volume(volume_id)
            if volume is None and not os.path.lexists(target):
                raise NotFound(f"volume {volume_id!r} does not exist and nothing is at {target}")
            unmounted = self._mounter.unmount(target)
            self._mounter.remove_target(target)
            if unmounted and volume is not None and volume.access_type is model.AccessType.BLOCK:
                self._release_read_only(volume_id)
        log.info("unpublished", extra={"volume_id": volume_id, "target_path": target})
        return csi_pb2.NodeUnpublishVolumeResponse()

    # --- ephemeral inline volumes ----------------------------------------------------------

    def _ephemeral_volume_id(self, kubelet_id: str) -> tuple[str, str]:
        """(our volume id, private staging dir) for kubelet's volume id."""
        volume_id = ids.volume_id_for(kubelet_id, self._node)
        parsed = ids.parse(volume_id, "v")
        assert parsed is not None
        return volume_id, os.path.join(self.ephemeral_dir, parsed.local)

    def _publish_ephemeral(
        self,
        kubelet_id: str,
        target: str,
        cap: model.Capability,
        read_only: bool,
        context_map: dict[str, str],
    ) -> None:
        if cap.access_type is not model.AccessType.MOUNT:
            raise InvalidArgument("ephemeral inline volumes are filesystem (mount) volumes only")
        if not cap.access_mode.single_node:
            raise InvalidArgument(
                f"access mode {cap.access_mode.name} is not supported for node-local volumes"
            )
        convert.require_name(kubelet_id, "volume_id")
        if "/" in kubelet_id or ".." in kubelet_id or len(kubelet_id) > ids.MAX_ID_LENGTH:
            raise InvalidArgument("volume_id must not contain '/' or '..' and must be short")
        size = DEFAULT_EPHEMERAL_SIZE
        if EPHEMERAL_SIZE_KEY in context_map:
            try:
                size = parse_bytes(context_map[EPHEMERAL_SIZE_KEY])
            except ValueError as exc:
                raise InvalidArgument(f"volume_context size: {exc}") from exc
            if size <= 0:
                raise InvalidArgument("volume_context size must be more than 0 bytes")
        parameters = self._backend.validate_parameters(
            {
                k: v
                for k, v in convert.strip_kubernetes_keys(context_map).items()
                if k != EPHEMERAL_SIZE_KEY
            }
        )
        supported = list(self._backend.supported_fs_types())
        fs_type = cap.fs_type or self._default_fs_type()
        if cap.fs_type and supported and cap.fs_type not in supported:
            raise InvalidArgument(
                f"fs_type {cap.fs_type!r} is not supported; use one of {supported}"
            )
        volume_id, staging = self._ephemeral_volume_id(kubelet_id)
        with self._locks.hold(volume_id), _system_errors():
            self._mounter.refuse_symlink(target)
            created = self._backend.get_volume(volume_id) is None
            spec = model.VolumeSpec(
                name=kubelet_id,
                capacity_bytes=self._backend.round_size(size, parameters),
                access_type=model.AccessType.MOUNT,
                fs_type=fs_type,
                parameters=model.frozen_map(parameters),
            )
            volume = self._backend.create_volume(spec)
            try:
                attachment = self._backend.attach(volume.id)
                self._stage_mount(volume, cap, attachment, staging)
                self._publish_mount(volume, cap, attachment, staging, target, read_only)
            except BaseException:
                if created:
                    self._remove_ephemeral(volume.id, staging, target, quiet=True)
                raise
        log.info(
            "published ephemeral volume",
            extra={"volume_id": volume_id, "kubelet_volume_id": kubelet_id, "target_path": target},
        )

    def _unpublish_ephemeral(self, kubelet_id: str, target: str) -> None:
        volume_id, staging = self._ephemeral_volume_id(kubelet_id)
        with self._locks.hold(volume_id), _system_errors():
            self._mounter.refuse_symlink(target)
            self._remove_ephemeral(volume_id, staging, target, quiet=False)
        log.info("unpublished", extra={"kubelet_volume_id": kubelet_id, "target_path": target})

    def _remove_ephemeral(self, volume_id: str, staging: str, target: str, *, quiet: bool) -> None:
        """Unpublish, unstage, detach and delete; each step is a no-op when already done. With
        ``quiet`` (rolling back a failed publish) errors are logged, not raised, so the
        original error reaches the CO."""
        steps: list[Callable[[], object]] = [
            lambda: self._mounter.unmount(target),
            lambda: self._mounter.remove_target(target),
            lambda: self._mounter.unmount(staging),
            lambda: self._mounter.remove_target(staging),
        ]
        if self._backend.get_volume(volume_id) is not None:
            steps.append(lambda: self._backend.detach(volume_id))
            steps.append(lambda: self._backend.delete_volume(volume_id))
        for step in steps:
            try:
                step()
            except (CsiError, MountError, FilesystemError):
                if not quiet:
                    raise
                log.exception(
                    "rolling back an ephemeral volume failed", extra={"volume_id": volume_id}
                )

    # --- stats and expansion ---------------------------------------------------------------

    def _check_path_is_volume(
        self, volume: model.Volume, path: str, attachment: model.Attachment
    ) -> None:
        if volume.access_type is model.AccessType.BLOCK:
            same = _same_file(path, os.path.realpath(attachment.path))
        else:
            same = _same_file(path, attachment.path)
        if not same:
            raise NotFound(f"volume {volume.id!r} is not staged or published at {path}")

    def NodeGetVolumeStats(
        self, request: csi_pb2.NodeGetVolumeStatsRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetVolumeStatsResponse:
        volume_id = convert.require(request.volume_id, "volume_id")
        path = convert.require(request.volume_path, "volume_path")
        with _system_errors():
            volume = self._volume_or_ephemeral(volume_id)
            volume_id = volume.id
            if "\x00" in path or not path.startswith("/") or os.path.normpath(path) != path:
                raise NotFound(f"volume {volume_id!r} is not staged or published at {path!r}")
            mount = self._mounter.mount_at(path)
            if mount is None:
                raise NotFound(f"volume {volume_id!r} is not staged or published at {path}")
            condition = self._backend.volume_condition(volume_id)
            if not condition.abnormal:
                self._check_path_is_volume(volume, path, self._backend.attach(volume_id))
            usage: list[csi_pb2.VolumeUsage] = []
            problem = None
            if mount.root.endswith("//deleted"):
                problem = f"what is mounted at {path} was deleted from the node"
            try:
                if volume.access_type is model.AccessType.BLOCK:
                    size = self._fs.block_device_size(path)
                    usage = [csi_pb2.VolumeUsage(unit=csi_pb2.VolumeUsage.BYTES, total=size)]
                else:
                    usage = convert.usage_to_pb(self._fs.usage(path))
            except FilesystemError as exc:
                problem = problem or f"the volume at {path} cannot be read: {exc}"
        if problem and not condition.abnormal:
            condition = model.VolumeCondition(True, problem)
        return csi_pb2.NodeGetVolumeStatsResponse(
            usage=usage, volume_condition=convert.condition_to_pb(condition)
        )

    def NodeExpandVolume(
        self, request: csi_pb2.NodeExpandVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeExpandVolumeResponse:
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
        with self._locks.hold(volume_id), _system_errors():
            volume = self._volume(volume_id)
            convert.require_abs_path(path, "volume_path")
            if cap is not None and cap.access_type is not volume.access_type:
                raise InvalidArgument(
                    f"volume {volume_id!r} is a {volume.access_type.value} volume, not"
                    f" {cap.access_type.value}"
                )
            mount = self._mounter.mount_at(path)
            if mount is None:
                raise NotFound(f"volume {volume_id!r} is not staged or published at {path}")
            self._check_path_is_volume(volume, path, self._backend.attach(volume_id))
            if limit and volume.capacity_bytes > limit:
                raise OutOfRange(
                    f"volume {volume_id!r} already has {volume.capacity_bytes} bytes, more than"
                    f" limit_bytes {limit}; volumes cannot shrink"
                )
            wanted = self._backend.round_size(required, volume.parameters) if required else 0
            if limit and wanted > limit:
                raise OutOfRange(
                    f"the smallest size this backend can allocate for {required} bytes is"
                    f" {wanted} bytes, above limit_bytes {limit}"
                )
            if wanted > volume.capacity_bytes:
                volume = self._backend.expand_volume(volume_id, wanted)
            self._backend.refresh_attachment(volume_id)
            attachment = self._backend.attach(volume_id)
            if (
                volume.access_type is model.AccessType.MOUNT
                and attachment.kind is model.AttachmentKind.BLOCK_DEVICE
            ):
                where = self._writable_mount_of(attachment.path) or path
                self._fs.resize(attachment.path, where, mount.fs_type)
        log.info(
            "expanded on node",
            extra={"volume_id": volume_id, "capacity_bytes": volume.capacity_bytes},
        )
        return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=volume.capacity_bytes)

    def _writable_mount_of(self, device: str) -> str | None:
        """A writable mount point of the filesystem on ``device``: growing a filesystem through
        a read-only publication fails (EROFS), and the staging mount is writable."""
        rdev = os.stat(device).st_rdev
        for m in self._mounter.mounts():
            if (m.major, m.minor) == (os.major(rdev), os.minor(rdev)) and not m.read_only:
                return m.mount_point
        return None

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
