"""The storage report of the lvm backend (the metrics): per device class, and per mounted volume.

Everything comes from one lvm2 report (:meth:`Inventory.report`, the same one every RPC reads,
shared with a health check run in the same call through the call memo) and is computed by the
rules GetCapacity and the allocation checks use (capacity.py), so that the dashboard and a
refusal agree. A thin class is measured at its pool: the pool's size, what its data does not
use yet, its data and metadata use from lvm2's ``data_percent`` and ``metadata_percent``. A
thick class is measured at its VG.

A volume's usage is read only where it costs a ``statvfs``: a volume whose filesystem is
mounted on this node (its staging mount), found in the mount table by its device number;
NodeGetVolumeStats reads the same ``statvfs`` of the same filesystem. Block volumes and
volumes mounted nowhere are left out.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from csi_driver.backends.lvm import capacity
from csi_driver.backends.lvm.inventory import Found, Inventory, device_node
from csi_driver.backends.lvm.lvm2 import VolumeGroup
from csi_driver.backends.lvm.parameters import normalise
from csi_driver.config.device_classes import DeviceClass
from csi_driver.errors import CsiError
from csi_driver.model import ClassCapacity, StorageReport, VolumeStat
from csi_driver.system import fsinfo
from csi_driver.system.mounter import Key, device_key, read_mountinfo

log = logging.getLogger(__name__)


def storage_report(inv: Inventory, max_volumes: int) -> StorageReport:
    groups = inv.report()
    volumes = [f for f in inv.ours(groups, "volume") if not f[1].unfinished(f[0].size_bytes)]
    snapshots = inv.ours(groups, "snapshot")
    classes = []
    for cls in inv.classes.values():
        vg = groups.get(cls.volume_group)
        if vg is None:
            continue  # the health check says why; the other classes are still reported
        mine = [f for f in volumes if _in_class(inv, f, cls)]
        snaps = sum(1 for f in snapshots if _in_class(inv, f, cls))
        report = _class_capacity(inv, vg, cls, mine, snaps)
        if report is not None:
            classes.append(report)
    stats, skipped = _volume_stats(inv, volumes, max_volumes)
    return StorageReport(tuple(classes), stats, skipped)


def _in_class(inv: Inventory, found: Found, cls: DeviceClass) -> bool:
    try:
        return inv.class_of(*found).name == cls.name
    except CsiError:
        return False  # an LV of no configured class belongs to none of them


def _class_capacity(
    inv: Inventory, vg: VolumeGroup, cls: DeviceClass, volumes: list[Found], snapshots: int
) -> ClassCapacity | None:
    parameters = normalise({}, cls)
    available = capacity.available(vg, cls, parameters, inv.extent(cls))
    if parameters["lvType"] != "thin":
        return ClassCapacity(
            device_class=cls.name,
            size_bytes=vg.size_bytes,
            free_bytes=vg.free_bytes,
            allocated_bytes=sum(lv.size_bytes for lv, _ in volumes),
            available_bytes=available,
            volumes=len(volumes),
            snapshots=snapshots,
        )
    pool = vg.lvs.get(cls.thin_pool)
    if pool is None or not pool.is_thin_pool:
        return None
    data = (pool.data_percent or 0.0) / 100
    return ClassCapacity(
        device_class=cls.name,
        size_bytes=pool.size_bytes,
        free_bytes=max(0, pool.size_bytes - round(pool.size_bytes * data)),
        allocated_bytes=capacity.promised(vg, cls),
        available_bytes=available,
        volumes=len(volumes),
        snapshots=snapshots,
        data_used_ratio=data,
        metadata_used_ratio=(pool.metadata_percent or 0.0) / 100,
    )


def _volume_stats(
    inv: Inventory, volumes: list[Found], max_volumes: int
) -> tuple[tuple[VolumeStat, ...], int]:
    """The usage of the mounted volumes, at most ``max_volumes`` of them, and how many more
    were mounted (or could not be read)."""
    try:
        mounted = _mount_points(inv.mountinfo)
    except OSError as exc:
        log.warning(f"cannot read the mount table for volume metrics: {exc}")
        return (), 0
    stats: list[VolumeStat] = []
    skipped = 0
    for lv, _ in volumes:
        if not lv.active:
            continue
        try:
            where = mounted.get(device_key(device_node(lv)))
        except OSError:
            continue  # no device node: not mounted here
        if where is None:
            continue
        if len(stats) >= max_volumes:
            skipped += 1
            continue
        try:
            stats.append(VolumeStat(inv.id_of(lv.name), fsinfo.usage(where)))
        except fsinfo.FsInfoError:
            skipped += 1
    return tuple(stats), skipped


def _mount_points(mountinfo: str) -> Mapping[Key, str]:
    """A mount point of each filesystem mounted whole (its root), by device."""
    out: dict[Key, str] = {}
    for m in read_mountinfo(mountinfo):
        if m.root == "/":
            out.setdefault(m.key, m.mount_point)
    return out


__all__ = ["storage_report"]
