"""Sizes: what a capacity range asks of a backend, decided in one place for every RPC.

A volume gets the smallest size the backend can allocate at or above ``required_bytes``;
``limit_bytes`` caps that, and a volume never shrinks. CreateVolume, ControllerExpandVolume
and NodeExpandVolume all decide through here, so they cannot disagree.
"""

from __future__ import annotations

from csi_driver import model
from csi_driver.backends.base import Backend
from csi_driver.errors import OutOfRange


def expansion_target(backend: Backend, volume: model.Volume, required: int, limit: int) -> int:
    """The size ``volume`` must have after an expansion to ``[required, limit]`` (0 when the
    range names no required size); OUT_OF_RANGE when the range cannot be met."""
    if limit and volume.capacity_bytes > limit:
        raise OutOfRange(
            f"volume {volume.id!r} already has {volume.capacity_bytes} bytes, more than"
            f" limit_bytes {limit}; volumes cannot shrink"
        )
    target = backend.round_size(required, volume.parameters) if required else 0
    if limit and target > limit:
        raise OutOfRange(
            f"the smallest size this backend can allocate for {required} bytes is"
            f" {target} bytes, above limit_bytes {limit}"
        )
    return target
