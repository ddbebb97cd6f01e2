"""Device classes: which volume group (and thin pool) a volume is carved from.

The file given with ``--lvm-config`` is JSON (or YAML when PyYAML is installed)::

    {"deviceClasses": [
        {"name": "fast", "volumeGroup": "nvme", "thinPool": "pool0", "default": true,
         "overprovisionRatio": 4.0, "reservedBytes": 10737418240},
        {"name": "bulk", "volumeGroup": "hdd", "lvType": "raid1", "mirrors": 1}
    ]}

``--lvm-volume-group VG`` alone is the same as one default class ``default`` on VG, thick.
The file is read once at start; a mistake in it stops the driver with a message naming it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from csi_driver.units import KiB, parse_bytes

#: lvType values: what lvcreate makes of them
LV_TYPES = ("linear", "striped", "raid1", "thin")
MIN_STRIPE_BYTES = 4 * KiB
MAX_STRIPES = 128
MAX_MIRRORS = 4
_CLASS_NAME = re.compile(r"\A[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?\Z")
_KEYS = {
    "name",
    "volumeGroup",
    "thinPool",
    "default",
    "overprovisionRatio",
    "reservedBytes",
    "lvType",
    "stripes",
    "stripeSize",
    "mirrors",
}


#: volume group, thin pool and LV names: lvm2's rule (lvm(8), "Valid names")
_LVM_NAME = re.compile(r"\A[A-Za-z0-9+_][A-Za-z0-9+_.-]{0,126}\Z")


def check_name(value: str, what: str) -> str:
    """``value`` if lvm2 accepts it as a VG, pool or LV name; else ValueError naming ``what``."""
    if not _LVM_NAME.match(value) or value in (".", ".."):
        raise ValueError(f"{what} {value!r} is not a valid lvm2 name")
    return value


class DeviceClassError(ValueError):
    """The device class configuration is wrong; the message says where and why."""


@dataclass(frozen=True)
class DeviceClass:
    name: str
    volume_group: str
    thin_pool: str = ""
    default: bool = False
    overprovision_ratio: float = 1.0  # thin pools: how often the pool may be promised
    reserved_bytes: int = 0  # never handed out (VG free space, or thin pool size)
    lv_type: str = ""  # default lvType of this class ("" = thin with a pool, else linear)
    stripes: int = 0
    stripe_bytes: int = 0
    mirrors: int = 0

    @property
    def default_lv_type(self) -> str:
        return self.lv_type or ("thin" if self.thin_pool else "linear")


def parse_stripe_size(value: object, where: str) -> int:
    try:
        size = parse_bytes(str(value))
    except ValueError as exc:
        raise DeviceClassError(f"{where}: {exc}") from exc
    if size < MIN_STRIPE_BYTES or size & (size - 1):
        raise DeviceClassError(
            f"{where}: stripe size {value!r} must be a power of two of at least 4Ki"
        )
    return size


def _int_in(value: object, low: int, high: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DeviceClassError(f"{where} must be an integer from {low} to {high}")
    try:
        number = int(value)
    except ValueError as exc:
        raise DeviceClassError(f"{where} must be an integer from {low} to {high}") from exc
    if not low <= number <= high:
        raise DeviceClassError(f"{where} must be an integer from {low} to {high}, not {number}")
    return number


def _one(entry: Mapping[str, Any], index: int) -> DeviceClass:
    where = f"deviceClasses[{index}]"
    if not isinstance(entry, Mapping):
        raise DeviceClassError(f"{where} must be an object")
    unknown = sorted(set(entry) - _KEYS)
    if unknown:
        raise DeviceClassError(f"{where}: unknown keys {unknown}; known: {sorted(_KEYS)}")
    name = entry.get("name")
    if not isinstance(name, str) or not _CLASS_NAME.match(name):
        raise DeviceClassError(
            f"{where}.name must be a lower-case DNS label like 'fast' or 'nvme-thin'"
        )
    where = f"device class {name!r}"
    try:
        vg = check_name(str(entry.get("volumeGroup") or ""), "volume group")
        pool = entry.get("thinPool") or ""
        if pool:
            check_name(str(pool), "thin pool")
    except ValueError as exc:
        raise DeviceClassError(f"{where}: {exc}") from exc
    ratio = entry.get("overprovisionRatio", 1.0)
    if ratio is None:
        ratio = 1.0
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 1.0 <= ratio <= 100:
        raise DeviceClassError(f"{where}: overprovisionRatio must be a number from 1 to 100")
    if ratio != 1.0 and not pool:
        raise DeviceClassError(f"{where}: overprovisionRatio needs a thinPool")
    reserved = entry.get("reservedBytes") or 0
    try:
        reserved_bytes = parse_bytes(str(reserved))
    except ValueError as exc:
        raise DeviceClassError(f"{where}: reservedBytes: {exc}") from exc
    lv_type = entry.get("lvType") or ""
    if lv_type and lv_type not in LV_TYPES:
        raise DeviceClassError(f"{where}: lvType must be one of {list(LV_TYPES)}")
    if lv_type == "thin" and not pool:
        raise DeviceClassError(f"{where}: lvType thin needs a thinPool")
    default = entry.get("default", False)
    if not isinstance(default, bool):
        raise DeviceClassError(f"{where}: default must be true or false")
    stripes = entry.get("stripes")
    stripe = entry.get("stripeSize")
    mirrors = entry.get("mirrors")
    return DeviceClass(
        name=name,
        volume_group=vg,
        thin_pool=str(pool),
        default=default,
        overprovision_ratio=float(ratio),
        reserved_bytes=reserved_bytes,
        lv_type=lv_type,
        stripes=_int_in(stripes, 2, MAX_STRIPES, f"{where}: stripes") if stripes else 0,
        stripe_bytes=parse_stripe_size(stripe, f"{where}: stripeSize") if stripe else 0,
        mirrors=_int_in(mirrors, 1, MAX_MIRRORS, f"{where}: mirrors") if mirrors else 0,
    )


def parse_device_classes(doc: object) -> list[DeviceClass]:
    if not isinstance(doc, Mapping) or not isinstance(doc.get("deviceClasses"), list):
        raise DeviceClassError('the lvm config must be an object with a "deviceClasses" list')
    classes = [_one(entry, i) for i, entry in enumerate(doc["deviceClasses"])]
    if not classes:
        raise DeviceClassError("deviceClasses is empty: name at least one volume group")
    names = [c.name for c in classes]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DeviceClassError(f"device class names must be unique; repeated: {dupes}")
    defaults = [c.name for c in classes if c.default]
    if len(classes) == 1 and not defaults:
        classes[0] = DeviceClass(**{**classes[0].__dict__, "default": True})
    elif len(defaults) != 1:
        raise DeviceClassError(
            f"exactly one device class must be the default (default: true); found {defaults}"
        )
    return classes


def load_device_classes(
    config_file: Path | None, volume_group: str | None
) -> tuple[DeviceClass, ...]:
    """The device classes of the lvm backend: from its file, or one on a single volume group.
    Read once at start; the result always has exactly one default class."""
    if config_file is None:
        if not volume_group:
            raise DeviceClassError("the lvm backend needs --lvm-config or --lvm-volume-group")
        try:
            vg = check_name(volume_group, "volume group")
        except ValueError as exc:
            raise DeviceClassError(str(exc)) from exc
        return (DeviceClass(name="default", volume_group=vg, default=True),)
    path = config_file
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DeviceClassError(f"cannot read the lvm config {path}: {exc}") from exc
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as json_error:
        try:
            import yaml
        except ImportError:
            raise DeviceClassError(
                f"{path} is not valid JSON ({json_error}); YAML needs PyYAML installed"
            ) from json_error
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise DeviceClassError(f"{path} is neither JSON nor YAML: {exc}") from exc
    try:
        return tuple(parse_device_classes(doc))
    except DeviceClassError as exc:
        raise DeviceClassError(f"{path}: {exc}") from exc
