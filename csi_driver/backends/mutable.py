"""Mutable parameters: the ones a VolumeAttributesClass may set at creation and change later
(ControllerModifyVolume). The same closed set for every backend, checked here once. The
names live in model.py, because they also decide which parameters tell volumes apart.

``wipeOnDelete``  ``"true"``: overwrite the volume's data before its storage is released on
                  DeleteVolume (see each backend for how); ``"false"`` (the default): do not.

``readBytesPerSecond``, ``writeBytesPerSecond``  a byte quantity (``4Mi``, ``10M``,
                  ``1048576``); ``readIOPerSecond``, ``writeIOPerSecond``  an integer; each
                  ``"max"`` (or absent): no limit. Enforced through the cgroup v2 ``io.max`` of
                  the Pod the volume is published to, on the volume's own block device (see
                  docs/io-limits.md). Stored normalised: a decimal integer, no limit as absence.

A host without the cgroup v2 io controller cannot enforce IO limits, and a hostpath directory
volume has no device of its own: both refuse a volume with IO limits (:func:`check_io_limits`,
called by each backend where a volume is created or modified) rather than ignore them.
"""

from __future__ import annotations

from collections.abc import Mapping

from csi_driver import bounded, units
from csi_driver.errors import InvalidArgument
from csi_driver.model import IO_LIMIT_PARAMETERS as IO_LIMIT_PARAMETERS
from csi_driver.model import MUTABLE_PARAMETERS as MUTABLE_PARAMETERS
from csi_driver.model import (
    READ_BYTES_PER_SECOND,
    READ_IO_PER_SECOND,
    WRITE_BYTES_PER_SECOND,
    WRITE_IO_PER_SECOND,
    frozen_map,
)
from csi_driver.model import WIPE_ON_DELETE as WIPE_ON_DELETE
from csi_driver.system.cgroup_io import IOPS_MAX, LIMIT_MAX, LIMIT_MIN, IoLimits

#: no limit, as io.max writes it
UNLIMITED = "max"
#: the longest value read at all: a 20-digit number and a suffix, with room to spare
_VALUE_CHARS = 32
_BYTES_KEYS = (READ_BYTES_PER_SECOND, WRITE_BYTES_PER_SECOND)
_IO_MAX_KEY = {
    READ_BYTES_PER_SECOND: "rbps",
    WRITE_BYTES_PER_SECOND: "wbps",
    READ_IO_PER_SECOND: "riops",
    WRITE_IO_PER_SECOND: "wiops",
}


def wipe_value(value: str) -> str:
    """``"true"`` or ``"false"``, whatever the case; anything else is INVALID_ARGUMENT."""
    lowered = value.lower()
    if lowered not in ("true", "false"):
        raise InvalidArgument(f'{WIPE_ON_DELETE} must be "true" or "false", not {value!r}')
    return lowered


def validate_mutable(parameters: Mapping[str, str], backend: str) -> Mapping[str, str]:
    unknown = sorted(set(parameters) - set(MUTABLE_PARAMETERS))
    if unknown:
        raise InvalidArgument(
            f"unknown mutable parameters {unknown} for the {backend} backend; it accepts"
            f" {list(MUTABLE_PARAMETERS)}"
        )
    return frozen_map(
        {k: io_value(k, v) if k in _IO_MAX_KEY else wipe_value(v) for k, v in parameters.items()}
    )


def io_value(key: str, value: str) -> str:
    """An IO limit as a decimal integer, or ``"max"``; anything else is INVALID_ARGUMENT."""
    unit = "a byte quantity such as 4Mi or 10M" if key in _BYTES_KEYS else "an integer"
    if len(value) > _VALUE_CHARS:
        raise InvalidArgument(
            f"{key} is {bounded.size_of(value)} bytes long; it must be {unit} or {UNLIMITED!r}"
        )
    if value.strip().lower() == UNLIMITED:
        return UNLIMITED
    try:
        if key in _BYTES_KEYS:
            number = units.parse_bytes(value)
        elif value.strip().isdecimal() and value.strip().isascii():
            number = int(value.strip())
        else:
            raise ValueError(value)
    except ValueError:
        raise InvalidArgument(
            f"{key} {bounded.echo(value)} is not {unit} (or {UNLIMITED!r} for no limit)"
        ) from None
    highest = LIMIT_MAX if key in _BYTES_KEYS else IOPS_MAX
    if not LIMIT_MIN <= number <= highest:
        raise InvalidArgument(
            f"{key} {bounded.echo(value)} is out of range: the kernel's io.max takes"
            f" {LIMIT_MIN} to {highest}, or {UNLIMITED!r} for no limit"
        )
    return str(number)


def io_limits(parameters: Mapping[str, str]) -> IoLimits:
    """The IO limits of a volume's normalised parameters (all None: no limit)."""
    values = {
        _IO_MAX_KEY[k]: int(v) for k, v in parameters.items() if k in _IO_MAX_KEY and v.isdigit()
    }
    return IoLimits(**values)


def check_io_limits(
    parameters: Mapping[str, str], host_problem: str | None, *, directory: bool = False
) -> None:
    """Refuse a volume whose normalised ``parameters`` set IO limits that cannot be enforced:
    ``host_problem`` says why this host cannot (None: it can); a ``directory`` volume has no
    block device of its own."""
    if not io_limits(parameters).any:
        return
    keys = sorted(k for k in parameters if k in _IO_MAX_KEY)
    if directory:
        raise InvalidArgument(
            f"IO limits ({', '.join(keys)}) need a block device of the volume's own, and a"
            " hostpath mount volume is a directory on the node's filesystem; use a block"
            " volume (volumeMode: Block) or the lvm backend, or drop the IO limits"
        )
    if host_problem is not None:
        raise InvalidArgument(
            f"IO limits ({', '.join(keys)}) cannot be enforced: {host_problem}; use a node with"
            " cgroup v2 and the io controller, or drop the IO limits"
        )


def apply(parameters: Mapping[str, str], mutable: Mapping[str, str]) -> dict[str, str]:
    """A volume's normalised parameters after ``mutable`` (validated) changed them: a false
    flag or an IO limit of ``max`` is stored as its absence, as the normalised StorageClass
    parameters have it."""
    out = dict(parameters)
    for key, value in mutable.items():
        if value in ("false", UNLIMITED):
            out.pop(key, None)
        else:
            out[key] = value
    return out
