"""Sizes: what a capacity range asks of a backend, decided in one place for every RPC.

A volume gets the smallest size the backend can allocate at or above what was asked
(``round_size``, applied here and nowhere else: backends make exactly the size they are
given); ``limit_bytes`` caps that, a volume is never smaller than its content source, and it
never shrinks. CreateVolume, inline ephemeral volumes, ControllerExpandVolume and
NodeExpandVolume all decide through here, so they cannot disagree.
"""

from __future__ import annotations

from csi_driver import model
from csi_driver.backends.base import Backend
from csi_driver.errors import OutOfRange
from csi_driver.units import GiB

#: the size of a volume whose request names no size (capped by ``limit_bytes``)
DEFAULT_VOLUME_SIZE = 1 * GiB


def create_size(
    backend: Backend,
    parameters: model.Parameters,
    required: int,
    limit: int = 0,
    source_bytes: int = 0,
) -> int:
    """The size of a new volume asked for ``[required, limit]`` (0: not set) whose content
    source, if any, holds ``source_bytes``. Without a required size it is the source's size,
    else DEFAULT_VOLUME_SIZE, never more than the limit. OUT_OF_RANGE when the range cannot
    be met."""
    wanted = required or source_bytes or DEFAULT_VOLUME_SIZE
    if limit and not required:
        wanted = min(wanted, limit)
    if wanted < source_bytes:
        raise OutOfRange(
            f"the requested size of {wanted} bytes is smaller than the content source's"
            f" {source_bytes} bytes; ask for at least that much"
        )
    return _allocatable(backend, wanted, parameters, limit)


def expansion_target(backend: Backend, volume: model.Volume, required: int, limit: int) -> int:
    """The size ``volume`` must have after an expansion to ``[required, limit]`` (0 when the
    range names no required size); OUT_OF_RANGE when the range cannot be met."""
    if limit and volume.capacity_bytes > limit:
        raise OutOfRange(
            f"volume {volume.id!r} already has {volume.capacity_bytes} bytes, more than"
            f" limit_bytes {limit}; volumes cannot shrink"
        )
    return _allocatable(backend, required, volume.parameters, limit) if required else 0


def _allocatable(backend: Backend, size: int, parameters: model.Parameters, limit: int) -> int:
    allocated = backend.round_size(size, parameters)
    if limit and allocated > limit:
        raise OutOfRange(
            f"the smallest size this backend can allocate for {size} bytes is"
            f" {allocated} bytes, above limit_bytes {limit}"
        )
    return allocated
