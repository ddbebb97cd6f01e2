"""Volumes as LVM logical volumes, carved from the volume groups of the device classes.

This module is the facade that wires the parts, each in its own module: the lvm2 commands and
their reports (lvm2.py), the metadata in LV tags (tags.py), the StorageClass parameters
(parameters.py), the report read as this driver's volumes and snapshots and what the parts
share (inventory.py: locks, device classes, ids), the room a class has (capacity.py), the
volumes (volumes.py), the snapshots (snapshots.py), the node side (attachments.py) and the
storage report of the metrics (report.py).

The volume group is the only record: an LV named after the volume's local id (``v`` and 32 hex
digits, from the CSI name) carries its metadata in tags (tags.py), written by the same lvcreate
that makes it. Nothing else is stored, so nothing can drift, and a driver killed at any point
finds on restart exactly the volumes lvm2 has: lvm2 commits a new LV with its tags atomically,
and a retried CreateVolume or DeleteVolume finds the LV (or its absence) and finishes.

Per operation the backend reads the volume groups once (``lvm fullreport``: every LV and tag of
every class's VG in one call) and then runs only the commands that change something:

==========================  =========================================================
CreateVolume                report, lvcreate (+ lvextend when a clone must grow)
DeleteVolume                report, lvremove (+ blkdiscard with ``wipeOnDelete``)
ControllerExpandVolume      report, lvextend
CreateSnapshot              report, lvcreate --snapshot
NodeStageVolume (attach)    report (+ lvchange -ay when the LV is inactive)
==========================  =========================================================

Thin volumes are snapshotted and cloned as thin snapshots (no copy, no space reserved). A
thick LV (linear, striped, raid1) cannot be snapshotted without reserving space up front and
copying on every write, so that is refused with FAILED_PRECONDITION.

New volumes never show an earlier tenant's data: thick LVs are created with their signatures
wiped and first 4 KiB zeroed (``lvcreate -W y -Z y``); thin LVs read zeros where nothing was
written. ``wipeOnDelete: "true"`` also discards (thin) or zeroes (thick) an LV before removal.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence

from csi_driver.backends import mutable
from csi_driver.backends.base import listed_after
from csi_driver.backends.lvm import capacity
from csi_driver.backends.lvm.attachments import Attachments
from csi_driver.backends.lvm.inventory import Inventory
from csi_driver.backends.lvm.lvm2 import Lvm2
from csi_driver.backends.lvm.parameters import FS_TYPES, PARAMETERS, check_known, normalise
from csi_driver.backends.lvm.report import storage_report
from csi_driver.backends.lvm.snapshots import Snapshots
from csi_driver.backends.lvm.volumes import Volumes
from csi_driver.config import DEFAULT_THIN_POOL_THRESHOLD
from csi_driver.config.device_classes import DeviceClass
from csi_driver.errors import CsiError, InvalidArgument
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
from csi_driver.system.cgroup_io import CgroupIo
from csi_driver.system.mounter import MOUNTINFO
from csi_driver.system.runner import Runner
from csi_driver.units import round_up

log = logging.getLogger(__name__)

__all__ = ["FS_TYPES", "PARAMETERS", "LvmBackend"]

#: how long Probe trusts its last look at the volume groups
HEALTH_TTL = 30.0


class LvmBackend:
    """The :class:`~csi_driver.backends.base.Backend` for LVM logical volumes."""

    max_volumes_per_node = 0

    def __init__(
        self,
        classes: Sequence[DeviceClass],
        node_id: str,
        runner: Runner,
        *,
        udev_sync: bool = True,
        mountinfo: str = MOUNTINFO,
        thin_pool_threshold: float = DEFAULT_THIN_POOL_THRESHOLD,
        cgroup: CgroupIo | None = None,
    ) -> None:
        #: where IO limits would be enforced; a volume with limits needs it (mutable.py)
        self._cgroup = cgroup or CgroupIo()
        self._inv = inv = Inventory(
            classes, node_id, runner, Lvm2(runner, udev_sync=udev_sync), mountinfo
        )
        self._volumes = Volumes(inv, thin_pool_threshold)
        self._snapshots = Snapshots(inv)
        self._attachments = Attachments(inv)
        self._health: tuple[float, str | None] = (0.0, None)
        self._health_lock = threading.Lock()
        try:
            problems = inv.class_problems(inv.report())
        except CsiError as exc:
            problems = [str(exc)]
        for problem in problems:
            log.error(f"lvm backend not ready: {problem}")
        if not problems:
            log.info(
                "lvm backend ready",
                extra={"classes": sorted(inv.classes), "volume_groups": inv.vgs},
            )

    # --- simple answers ----------------------------------------------------------------------

    def health(self) -> str | None:
        with self._health_lock:
            checked, reason = self._health
            if time.monotonic() - checked < HEALTH_TTL and checked:
                return reason
            try:
                problems = self._inv.class_problems(self._inv.report())
                reason = "; ".join(problems) or None
            except CsiError as exc:
                reason = str(exc)
            self._health = (time.monotonic(), reason)
            return reason

    def validate_parameters(self, parameters: Mapping[str, str]) -> Parameters:
        check_known(parameters)
        return normalise(parameters, self._inv.class_for(parameters, InvalidArgument))

    def validate_mutable_parameters(self, parameters: Mapping[str, str]) -> Mapping[str, str]:
        return mutable.validate_mutable(parameters, "lvm")

    def supported_fs_types(self) -> Sequence[str]:
        return FS_TYPES

    def round_size(self, size_bytes: int, parameters: Parameters) -> int:
        cls = self._inv.class_for(parameters)
        unit = capacity.unit(self._inv.extent(cls), parameters)
        return max(unit, round_up(size_bytes, unit))

    def capacity(self, parameters: Parameters) -> int:
        cls = self._inv.class_for(parameters)
        vg = self._inv.report().get(cls.volume_group)
        return 0 if vg is None else capacity.available(vg, cls, parameters, self._inv.extent(cls))

    def storage_report(self, max_volumes: int) -> StorageReport:
        return storage_report(self._inv, max_volumes)

    # --- volumes -----------------------------------------------------------------------------

    def get_volume(self, volume_id: str) -> Volume | None:
        return self._volumes.get(volume_id)

    def list_volumes(self, after: str = "", limit: int = 0) -> Sequence[Volume]:
        """One lvm2 report lists every LV, so each page costs as much as the whole listing;
        the page is cut from it here, by the same rule the other backends follow."""
        return listed_after(self._volumes.all_ready(), lambda v: v.id, after, limit)

    def create_volume(self, spec: VolumeSpec) -> Volume:
        mutable.check_io_limits(spec.parameters, self._cgroup.problem())
        return self._volumes.create(spec)

    def delete_volume(self, volume_id: str) -> None:
        self._volumes.delete(volume_id)

    def expand_volume(self, volume_id: str, size_bytes: int) -> Volume:
        return self._volumes.expand(volume_id, size_bytes)

    def modify_volume(self, volume_id: str, changes: Mapping[str, str]) -> Volume:
        mutable.check_io_limits(changes, self._cgroup.problem())
        return self._volumes.modify(volume_id, changes)

    def set_published(self, volume_id: str, node_id: str, published: bool) -> None:
        self._volumes.set_published(volume_id, node_id, published)

    def volume_condition(self, volume_id: str) -> VolumeCondition:
        return self._volumes.condition(volume_id)

    def volume_usage(self, volume_id: str) -> Usage | None:
        return None  # an LV's filesystem is the volume's own

    # --- snapshots ---------------------------------------------------------------------------

    def get_snapshot(self, snapshot_id: str) -> Snapshot | None:
        return self._snapshots.get(snapshot_id)

    def list_snapshots(self, after: str = "", limit: int = 0) -> Sequence[Snapshot]:
        """Cut from one report of every LV, as :meth:`list_volumes` is."""
        return listed_after(self._snapshots.all(), lambda s: s.id, after, limit)

    def create_snapshot(
        self, name: str, source_volume_id: str, parameters: Mapping[str, str]
    ) -> Snapshot:
        return self._snapshots.create(name, source_volume_id, parameters)

    def delete_snapshot(self, snapshot_id: str) -> None:
        self._snapshots.delete(snapshot_id)

    # --- node side ---------------------------------------------------------------------------

    def attach(self, volume_id: str) -> Attachment:
        return self._attachments.attach(volume_id)

    def locate(self, volume_id: str) -> Attachment | None:
        return self._attachments.locate(volume_id)

    def detach(self, volume_id: str) -> None:
        """LVs stay active between stages (activation is cheap to keep, slow to repeat)."""

    def refresh_attachment(self, volume_id: str) -> None:
        """lvextend resizes the device-mapper device itself; nothing to refresh."""
