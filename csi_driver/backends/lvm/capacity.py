"""How much room a device class has, in whole allocation units, and the refusal when a volume
does not fit.

Pure arithmetic on one report (lvm2.py) and one class (config/device_classes.py): a thin
volume is promised against its pool's size times the class's over-provisioning ratio, a thick
one takes the VG's free extents (every raid1 leg a copy of its own, plus a metadata extent).
"""

from __future__ import annotations

from collections.abc import Mapping

from csi_driver.backends.lvm.lvm2 import VolumeGroup
from csi_driver.config.device_classes import DeviceClass
from csi_driver.errors import ResourceExhausted
from csi_driver.units import MiB

#: lvm2's default extent size, used only until a report says what the VG really has
DEFAULT_EXTENT = 4 * MiB


def unit(extent: int, parameters: Mapping[str, str]) -> int:
    """The allocation unit of a volume with these parameters in a VG of ``extent`` bytes: an
    extent, times the stripes of a striped volume."""
    if parameters.get("lvType") == "striped":
        return extent * int(parameters.get("stripes", "2"))
    return extent


def _legs(parameters: Mapping[str, str]) -> int:
    return int(parameters.get("mirrors", "0")) + 1 if parameters["lvType"] == "raid1" else 1


def promised(vg: VolumeGroup, cls: DeviceClass) -> int:
    """Bytes the thin volumes of the class's pool (snapshots, and LVs not this driver's, too)
    may come to take: what over-provisioning is counted against."""
    return sum(lv.size_bytes for lv in vg.lvs.values() if lv.is_thin and lv.pool == cls.thin_pool)


def available(vg: VolumeGroup, cls: DeviceClass, p: Mapping[str, str], extent: int) -> int:
    """Bytes a new volume with parameters ``p`` may still get in this class."""
    if p["lvType"] == "thin":
        pool = vg.lvs.get(cls.thin_pool)
        if pool is None or not pool.is_thin_pool:
            return 0
        budget = int((pool.size_bytes - cls.reserved_bytes) * cls.overprovision_ratio)
        return max(0, budget - promised(vg, cls))
    free = vg.free_bytes - cls.reserved_bytes
    legs = _legs(p)
    if legs > 1:
        # every leg also needs a metadata extent
        free = free // legs - vg.extent_bytes
    step = unit(extent, p)
    return max(0, free // step * step)


def check_room(
    vg: VolumeGroup, cls: DeviceClass, p: Mapping[str, str], size: int, what: str, extent: int
) -> None:
    """RESOURCE_EXHAUSTED unless ``size`` more bytes fit; called under the allocation lock."""
    room = available(vg, cls, p, extent)
    if size > room:
        where = f"thin pool {vg.name}/{cls.thin_pool}" if p["lvType"] == "thin" else f"VG {vg.name}"
        raise ResourceExhausted(
            f"not enough room for {what} of {size} bytes in device class {cls.name!r}:"
            f" {room} bytes available in {where}"
        )
