"""CSI inline ephemeral volumes: a volume made at NodePublishVolume, gone at NodeUnpublishVolume.

The kubelet marks them with ``csi.storage.k8s.io/ephemeral: "true"`` in the volume context and
names them with an id of its own. Each gets a backend volume named after that id (so a retry
lands on the same storage), staged in a private directory ``<state dir>/ephemeral/<local id>``
and published like any other. The state dir defaults to the directory of the driver's unix
socket (on Kubernetes the kubelet plugin directory on the host, so a restarted driver
container still finds it), else ``/run/<driver name>``.

Each step of publish and unpublish is one the node service also uses, and each is idempotent,
so a kill anywhere is finished by the kubelet's retry; a publish that fails before it is
complete rolls back what it created.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Protocol

from csi_driver import ids, model
from csi_driver.backends import mutable
from csi_driver.backends.base import Backend
from csi_driver.config import Config
from csi_driver.errors import CsiError, InvalidArgument, NotFound
from csi_driver.failpoints import reach
from csi_driver.locks import KeyLocks
from csi_driver.services import convert, fs_type, sizing
from csi_driver.system.confined import Confined, Jail
from csi_driver.system.failure import SystemFailure
from csi_driver.system_errors import system_errors
from csi_driver.units import parse_bytes

log = logging.getLogger(__name__)

EPHEMERAL_KEY = "csi.storage.k8s.io/ephemeral"
EPHEMERAL_SIZE_KEY = "size"


class NodeSteps(Protocol):
    """The steps of the Node service an inline volume goes through (NodeServicer has them)."""

    @property
    def locks(self) -> KeyLocks: ...

    @property
    def jail(self) -> Jail: ...

    def volume(self, volume_id: str) -> model.Volume: ...

    def lock_key(self, path: str) -> str: ...

    def stage_mount(
        self,
        volume: model.Volume,
        cap: model.Capability,
        attachment: model.Attachment,
        staging: Confined,
    ) -> None: ...

    def publish_mount(
        self,
        volume: model.Volume,
        cap: model.Capability,
        attachment: model.Attachment,
        staging: Confined,
        target: Confined,
        read_only: bool,
    ) -> None: ...

    def unstage(
        self, volume: model.Volume, attachment: model.Attachment | None, staging: Confined
    ) -> None: ...

    def unpublish(
        self, volume: model.Volume, attachment: model.Attachment | None, target: Confined
    ) -> None: ...


def is_ephemeral(volume_context: Mapping[str, str]) -> bool:
    return volume_context.get(EPHEMERAL_KEY, "").lower() == "true"


def _default_state_dir(config: Config) -> str:
    if config.endpoint.scheme == "unix":
        return os.path.dirname(config.endpoint.address) or "/"
    return os.path.join("/run", config.driver_name)


class EphemeralVolumes:
    def __init__(
        self, node: NodeSteps, config: Config, backend: Backend, state_dir: str | None
    ) -> None:
        self._node = node
        self._backend = backend
        self._node_id = config.node_id
        self.state_dir = state_dir or _default_state_dir(config)
        self.ephemeral_dir = os.path.join(self.state_dir, "ephemeral")
        self._jail = Jail(self.state_dir)

    def _ids(self, kubelet_id: str) -> tuple[str, str]:
        """(our volume id, private staging path) for kubelet's volume id."""
        convert.require_name(kubelet_id, "volume_id")
        if "/" in kubelet_id or ".." in kubelet_id or len(kubelet_id) > ids.MAX_ID_LENGTH:
            raise InvalidArgument("volume_id must not contain '/' or '..' and must be short")
        if ids.parse(kubelet_id, "v") is not None or ids.parse(kubelet_id, "s") is not None:
            # it could never be unpublished: NodeUnpublishVolume takes it for a volume id
            raise InvalidArgument(
                "the volume_id of an inline ephemeral volume must not have the form of this"
                " driver's volume ids"
            )
        volume_id = ids.volume_id_for(kubelet_id, self._node_id)
        parsed = ids.parse(volume_id, "v")
        assert parsed is not None
        return volume_id, os.path.join(self.ephemeral_dir, parsed.local)

    def check_id(self, kubelet_id: str) -> None:
        """INVALID_ARGUMENT unless ``kubelet_id`` could name an ephemeral volume."""
        self._ids(kubelet_id)

    def owns(self, kubelet_id: str) -> bool:
        """True when ``kubelet_id`` names an ephemeral volume that exists on this node."""
        try:
            volume_id, _ = self._ids(kubelet_id)
        except CsiError:
            return False
        return self._backend.get_volume(volume_id) is not None

    def finished(
        self, kubelet_id: str, path: str, holds_nothing: Callable[[str], tuple[bool, bool]]
    ) -> bool:
        """Whether NodeUnpublishVolume of an inline volume that does not exist (``owns`` is
        False) has nothing left to do: the retry of an unpublish that finished. True when the
        target is absent; also when it is an empty directory or file that is no mount (a kill
        between making it and marking it ours leaves one; the kubelet removes it once the
        call succeeds), but then only if the private staging directory is gone too and the
        backend sees all its storage: at boot a volume group not yet found hides volumes, and
        a volume hidden is not a volume gone."""
        volume_id, staging_path = self._ids(kubelet_id)
        with self._node.locks.hold(volume_id, self._node.lock_key(path)):
            absent, empty = holds_nothing(path)
            if absent:
                return True
            if not empty or self._backend.health() is not None:
                return False
            with system_errors(), self._jail.existing(staging_path) as staging:
                return staging is None or staging.lstat() is None

    def volume_or_ephemeral(self, volume_id: str) -> model.Volume:
        """The volume of one of our ids, or of kubelet's id of an ephemeral inline volume
        (kubelet asks for the stats of those under its own id)."""
        try:
            return self._node.volume(volume_id)
        except NotFound:
            if ids.parse(volume_id, "v") is not None or not self.owns(volume_id):
                raise
            volume = self._backend.get_volume(self._ids(volume_id)[0])
            if volume is None:
                raise
            return volume

    def spec(
        self, kubelet_id: str, cap: model.Capability, context_map: dict[str, str]
    ) -> model.VolumeSpec:
        """The volume an inline volume asks for: its attributes are its StorageClass
        parameters (``size`` aside), validated by the backend as CreateVolume's are."""
        if cap.access_type is not model.AccessType.MOUNT:
            raise InvalidArgument("ephemeral inline volumes are filesystem (mount) volumes only")
        if not cap.access_mode.single_node:
            raise InvalidArgument(
                f"access mode {cap.access_mode.name} is not supported for node-local volumes"
            )
        size = 0  # not given: sizing's default
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
        if mutable.io_limits(parameters).any:
            raise InvalidArgument(
                "IO limits are not supported on inline ephemeral volumes; use a generic"
                " ephemeral volume (a PVC template) with a StorageClass that sets them"
            )
        return model.VolumeSpec(
            name=kubelet_id,
            capacity_bytes=sizing.create_size(self._backend, parameters, size),
            access_type=model.AccessType.MOUNT,
            fs_type=fs_type.choose(self._backend, cap.fs_type, parameters),
            parameters=parameters,
            required_bytes=size,
        )

    def publish(
        self,
        kubelet_id: str,
        path: str,
        cap: model.Capability,
        read_only: bool,
        context_map: dict[str, str],
    ) -> None:
        volume_id, staging_path = self._ids(kubelet_id)
        spec = self.spec(kubelet_id, cap, context_map)
        with (
            self._node.locks.hold(volume_id, self._node.lock_key(path)),
            system_errors(request_paths=True),
            self._node.jail.resolve(path, create_parents=True) as target,
        ):
            existing = self._backend.get_volume(volume_id)
            if existing is not None:
                spec.check_existing(existing)
            created = existing is None
            volume = existing or self._backend.create_volume(spec)
            reach("ephemeral.created")
            try:
                with self._jail.resolve(staging_path, create_parents=True) as staging:
                    if staging.make_dir(0o750):
                        staging.tag(volume.id)
                    attachment = self._backend.attach(volume.id)
                    self._node.stage_mount(volume, cap, attachment, staging)
                    reach("ephemeral.staged")
                    self._node.publish_mount(volume, cap, attachment, staging, target, read_only)
                    reach("ephemeral.published")
            except BaseException:
                if created:
                    self._remove(volume.id, staging_path, target, quiet=True)
                raise
        log.info(
            "published ephemeral volume",
            extra={"volume_id": volume_id, "kubelet_volume_id": kubelet_id, "target_path": path},
        )

    def unpublish(self, kubelet_id: str, path: str) -> None:
        volume_id, staging_path = self._ids(kubelet_id)
        with (
            self._node.locks.hold(volume_id, self._node.lock_key(path)),
            system_errors(request_paths=True),
            self._node.jail.existing(path) as target,
        ):
            self._remove(volume_id, staging_path, target, quiet=False)
        log.info("unpublished", extra={"kubelet_volume_id": kubelet_id, "target_path": path})

    def _remove(
        self, volume_id: str, staging_path: str, target: Confined | None, *, quiet: bool
    ) -> None:
        """Unpublish, unstage, detach and delete; each step is a no-op when already done. With
        ``quiet`` (rolling back a failed publish) errors are logged, not raised, so the
        original error reaches the CO."""
        volume = self._backend.get_volume(volume_id)
        if volume is None:
            return
        attachment = self._backend.locate(volume_id)

        def unstage() -> None:
            with self._jail.existing(staging_path) as staging:
                if staging is not None:
                    self._node.unstage(volume, attachment, staging)
                    staging.remove_empty(volume.id)

        steps: list[Callable[[], object]] = []
        if target is not None:
            steps.append(lambda: self._node.unpublish(volume, attachment, target))
        steps += [
            unstage,
            lambda: reach("ephemeral.unstaged"),
            lambda: self._backend.detach(volume_id),
            lambda: self._backend.delete_volume(volume_id),
            lambda: reach("ephemeral.deleted"),
        ]
        for step in steps:
            try:
                step()
            except (CsiError, SystemFailure, OSError):
                if not quiet:
                    raise
                log.exception(
                    "rolling back an ephemeral volume failed", extra={"volume_id": volume_id}
                )
