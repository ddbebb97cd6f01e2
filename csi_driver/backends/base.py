"""The one interface every storage backend implements. Servicers never ask which one they hold."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol, TypeVar

from csi_driver import ids
from csi_driver.model import (
    Attachment,
    Parameters,
    Snapshot,
    StorageReport,
    Usage,
    Volume,
    VolumeCondition,
    VolumeSpec,
)

T = TypeVar("T")


def listed_after(entries: Iterable[T], key: Callable[[T], str], after: str, limit: int) -> list[T]:
    """The one rule of every listing: the entries whose id (``key``) sorts after ``after``, in
    id order, at most ``limit`` of them (0 = no limit).

    List tokens name the last id of a page (services/pagination.py), so a listing that starts
    strictly after it neither repeats an entry nor skips one that existed throughout, however
    many are created or deleted between pages.
    """
    ordered = sorted((e for e in entries if key(e) > after), key=key)
    return ordered[:limit] if limit > 0 else ordered


def local_range(after: str, kind: str, limit: int) -> tuple[str, int]:
    """Where to read, in local-part order, for :func:`listed_after` ``(after, limit)`` over ids
    of ``kind`` ("" or an id of ``kind``, of any node, for ``after``): from the local part
    ``start`` (inclusive), at most ``count`` rows (0 = no limit).

    An id is its local part, the same length for every id of a kind, then ``@<node>``: so ids
    sort by their local parts first, and only the one whose local part equals ``after``'s can
    be read from ``start`` without sorting after ``after``. One row more is read for it, and
    :func:`listed_after`, applied to what was read, drops it.
    """
    if not after:
        return "", limit
    parsed = ids.parse(after, kind)
    if parsed is None:
        raise ValueError(f"cannot list after {after!r}: it is not an id of kind {kind!r}")
    return parsed.local, limit + 1 if limit > 0 else 0


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

    def list_volumes(self, after: str = "", limit: int = 0) -> Sequence[Volume]:
        """The volumes :func:`listed_after` selects: ids after ``after`` ("" or a volume id of
        any node; exclusive), in id order, at most ``limit`` (0 = no limit). ListVolumes asks
        for one page at a time, so a backend that can should answer without reading every
        volume."""

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

    def list_snapshots(self, after: str = "", limit: int = 0) -> Sequence[Snapshot]:
        """The snapshots :func:`listed_after` selects, as :meth:`list_volumes` does."""

    def volume_condition(self, volume_id: str) -> VolumeCondition: ...

    def volume_usage(self, volume_id: str) -> Usage | None:
        """The volume's own usage where the filesystem it is mounted from cannot tell it (a
        directory sharing its filesystem with others); None where that filesystem's
        ``statvfs`` is the volume's (an LV, an image). NotFound when the volume is gone."""

    def storage_report(self, max_volumes: int) -> StorageReport:
        """The storage as the metrics show it (storage_metrics.py): per class, the numbers
        GetCapacity works from, and the usage of at most ``max_volumes`` volumes, measured as
        NodeGetVolumeStats measures them, where that costs no more than a ``statvfs``.
        Cheap enough to answer every few seconds: at most one lvm2 report."""

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
