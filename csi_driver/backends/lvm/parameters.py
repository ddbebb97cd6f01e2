"""The StorageClass parameters of the lvm backend, and the filesystem a new volume gets.

Validated once, at the service edge (``validate_parameters``), into the class's defaults made
explicit: a volume's tags record what it was made with, so a later change of the class's
defaults changes no existing volume. Everything after the edge trusts these parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from csi_driver import bounded
from csi_driver.backends import mutable
from csi_driver.config.device_classes import (
    LV_TYPES,
    MAX_MIRRORS,
    MAX_STRIPES,
    DeviceClass,
    DeviceClassError,
    parse_stripe_size,
)
from csi_driver.errors import InvalidArgument
from csi_driver.model import AccessType, Parameters, VolumeSpec

#: StorageClass parameters this backend accepts (a closed set; see docs/lvm.md)
PARAMETERS: Mapping[str, str] = MappingProxyType(
    {
        "deviceClass": "device class to allocate from (default: the class marked default)",
        "fsType": "filesystem of a mount volume: ext4 or xfs (same as csi.storage.k8s.io/fstype)",
        "lvType": "linear, striped, raid1 or thin (default: thin with a thin pool, else linear)",
        "stripes": "striped: number of stripes, 2 or more (default 2)",
        "stripeSize": "striped: stripe size, a power of two of at least 4Ki (default lvm2's)",
        "mirrors": "raid1: number of extra copies, 1 to 4 (default 1)",
        "wipeOnDelete": "true: discard (thin) or zero (thick) the LV before removing it",
        **{
            key: "an IO limit of the LV in the Pod's cgroup (docs/io-limits.md)"
            for key in mutable.IO_LIMIT_PARAMETERS
        },
    }
)
FS_TYPES = ("ext4", "xfs")


def check_known(parameters: Mapping[str, str]) -> None:
    unknown = sorted(set(parameters) - set(PARAMETERS))
    if unknown:
        raise InvalidArgument(
            f"unknown parameters {unknown} for the lvm backend; it accepts {sorted(PARAMETERS)}"
        )


def normalise(parameters: Mapping[str, str], cls: DeviceClass) -> Parameters:
    """Known ``parameters`` checked and completed with the defaults of ``cls``, the class
    they name."""
    lv_type = parameters.get("lvType", cls.default_lv_type)
    if lv_type not in LV_TYPES:
        raise InvalidArgument(f"lvType {lv_type!r} is not one of {list(LV_TYPES)}")
    if lv_type == "thin" and not cls.thin_pool:
        raise InvalidArgument(f"lvType thin needs a device class with a thinPool, not {cls.name!r}")
    out = {"deviceClass": cls.name, "lvType": lv_type}
    if lv_type == "striped":
        stripes = parameters.get("stripes", str(cls.stripes or 2))
        if not stripes.isdigit() or not 2 <= int(stripes) <= MAX_STRIPES:
            raise InvalidArgument(f"stripes must be an integer from 2 to {MAX_STRIPES}")
        out["stripes"] = str(int(stripes))
        stripe = parameters.get("stripeSize") or (str(cls.stripe_bytes) if cls.stripe_bytes else "")
        if stripe:
            try:
                out["stripeSize"] = str(parse_stripe_size(stripe, "stripeSize"))
            except DeviceClassError as exc:
                raise InvalidArgument(str(exc)) from exc
    elif "stripes" in parameters or "stripeSize" in parameters:
        raise InvalidArgument("stripes and stripeSize apply only to lvType striped")
    if lv_type == "raid1":
        mirrors = parameters.get("mirrors", str(cls.mirrors or 1))
        if not mirrors.isdigit() or not 1 <= int(mirrors) <= MAX_MIRRORS:
            raise InvalidArgument(f"mirrors must be an integer from 1 to {MAX_MIRRORS}")
        out["mirrors"] = str(int(mirrors))
    elif "mirrors" in parameters:
        raise InvalidArgument("mirrors applies only to lvType raid1")
    if "fsType" in parameters:
        if parameters["fsType"] not in FS_TYPES:
            raise InvalidArgument(
                f"fsType {bounded.echo(parameters['fsType'])} is not supported; use one of"
                f" {list(FS_TYPES)}"
            )
        out["fsType"] = parameters["fsType"]
    changes = mutable.validate_mutable(
        {k: v for k, v in parameters.items() if k in mutable.MUTABLE_PARAMETERS}, "lvm"
    )
    return Parameters(mutable.apply(out, changes))


def fs_type_for(spec: VolumeSpec, p: Mapping[str, str]) -> str:
    """The filesystem of a new volume: none for a block volume, else the capability's, the
    ``fsType`` parameter's or the first supported, which must all agree."""
    if spec.access_type is AccessType.BLOCK:
        if spec.fs_type:
            raise InvalidArgument(
                f"fs_type {spec.fs_type!r} makes no sense for a block volume; leave it empty"
            )
        return ""
    fs = spec.fs_type or p.get("fsType") or FS_TYPES[0]
    if fs not in FS_TYPES:
        raise InvalidArgument(f"fs_type {fs!r} is not supported; use one of {list(FS_TYPES)}")
    if p.get("fsType", fs) != fs:
        raise InvalidArgument(
            f"the capability asks for fs_type {fs!r} but the parameter fsType says {p['fsType']!r}"
        )
    return fs
