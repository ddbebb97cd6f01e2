"""The one interface every storage backend implements. Servicers never ask which one they hold."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from csi_driver.model import (
    Attachment,
    Parameters,
    Snapshot,
    Volume,
    VolumeCondition,
    VolumeSpec,
)


class Backend(Protocol):
    """Node-local volumes and snapshots.

    Methods raise :class:`csi_driver.errors.CsiError` subclasses with the CSI code to return.
    Volume and snapshot ids passed in have already been checked for syntax by the servicer,
    but the backend still owns the mapping from id to storage and must not trust it further.

    What the servicers decided, the backend trusts and does not decide again: parameters are
    what :meth:`validate_parameters` returned (validated once, at the service edge); sizes
    given to :meth:`create_volume` and :meth:`expand_volume` are what :meth:`round_size` made
    of the request and are allocated as they are (services/sizing.py also checks them against
    the limit and the content source); whether an existing volume answers a CreateVolume is
    :meth:`csi_driver.model.VolumeSpec.check_existing`'s to say, before the backend is asked.
    """

    #: the value of ``max_volumes_per_node`` in NodeGetInfo (0 = no limit)
    max_volumes_per_node: int

    def health(self) -> str | None:
        """None when ready, else a short reason (Probe answers not ready with it)."""

    def validate_parameters(self, parameters: Mapping[str, str]) -> Parameters:
        """Check StorageClass parameters (a closed set) and return them normalised: the one
        validator, and the only maker of the Parameters the other methods take.

        ``csi.storage.k8s.io/*`` keys are already removed. Unknown keys or bad values raise
        InvalidArgument.
        """

    def validate_mutable_parameters(self, parameters: Mapping[str, str]) -> Mapping[str, str]:
        """Check mutable parameters (a VolumeAttributesClass's; a closed set that may change
        over a volume's life) and return them normalised; anything else is InvalidArgument."""

    def modify_volume(self, volume_id: str, mutable: Mapping[str, str]) -> Volume:
        """Apply validated mutable parameters to an existing volume (NotFound if missing)."""

    def supported_fs_types(self) -> Sequence[str]:
        """Filesystems a mount volume may ask for; the first one is the default."""

    def round_size(self, size_bytes: int, parameters: Parameters) -> int:
        """The size the backend would really allocate for a request of ``size_bytes``, for a
        new volume with ``parameters`` or an existing one with those (its own)."""

    def create_volume(self, spec: VolumeSpec) -> Volume:
        """Create the volume ``spec`` describes: exactly ``spec.capacity_bytes`` bytes, with
        ``spec.parameters``. A ready volume of the same name is returned as it is (the caller
        has checked it answers the request); what an unfinished creation left is finished or
        cleared away.

        NotFound for a missing content source; ResourceExhausted when there is no room.
        """

    def delete_volume(self, volume_id: str) -> None:
        """Delete; succeed when the volume does not exist. FailedPrecondition if it has snapshots
        that depend on it and the backend cannot delete it yet."""

    def get_volume(self, volume_id: str) -> Volume | None: ...

    def list_volumes(self) -> Sequence[Volume]:
        """All volumes, sorted by id (pagination is the servicer's)."""

    def capacity(self, parameters: Parameters) -> int:
        """Bytes available for new volumes with these parameters."""

    def expand_volume(self, volume_id: str, size_bytes: int) -> Volume:
        """Grow the volume to ``size_bytes`` (a size :meth:`round_size` gave); a no-op when it
        is already that big."""

    def set_published(self, volume_id: str, node_id: str, published: bool) -> None:
        """Record ControllerPublish state (shown by ListVolumes)."""

    def create_snapshot(
        self, name: str, source_volume_id: str, parameters: Mapping[str, str]
    ) -> Snapshot:
        """Create, or return the same-named snapshot of the same source; AlreadyExists when
        the name is taken by a snapshot of another volume."""

    def delete_snapshot(self, snapshot_id: str) -> None: ...

    def get_snapshot(self, snapshot_id: str) -> Snapshot | None: ...

    def list_snapshots(self) -> Sequence[Snapshot]:
        """All snapshots, sorted by id."""

    def volume_condition(self, volume_id: str) -> VolumeCondition: ...

    # --- node side -------------------------------------------------------------

    def attach(self, volume_id: str) -> Attachment:
        """Make the volume usable on this node (activate an LV, attach a loop device) and say
        what to mount or bind. Idempotent."""

    def locate(self, volume_id: str) -> Attachment | None:
        """Where the volume is on this node now, attaching nothing: its directory (present or
        not), or the device it is attached as; None when it is not attached. The node uses
        it to recognise the volume's own mounts before it unmounts anything."""

    def detach(self, volume_id: str) -> None:
        """Undo :meth:`attach`; succeed when not attached or the volume is gone."""

    def refresh_attachment(self, volume_id: str) -> None:
        """After a resize: make the attached device show the new size (e.g. ``losetup -c``)."""
