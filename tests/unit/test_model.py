"""The value types' own rules: validated parameters are frozen, and VolumeSpec.check_existing is
the one idempotency comparison of volume creation (every servicer path asks it, no backend)."""

from __future__ import annotations

import dataclasses

import grpc
import pytest

from csi_driver.errors import CsiError
from csi_driver.model import (
    AccessType,
    ContentSource,
    Parameters,
    SourceKind,
    Volume,
    VolumeSpec,
)
from csi_driver.units import MiB

SOURCE = ContentSource(SourceKind.SNAPSHOT, "s" + "1" * 32 + "@n")
SPEC = VolumeSpec(
    name="pvc-1",
    capacity_bytes=64 * MiB,
    access_type=AccessType.MOUNT,
    fs_type="ext4",
    parameters=Parameters({"lvType": "thin", "wipeOnDelete": "true"}),
    content_source=SOURCE,
    required_bytes=60 * MiB,
    limit_bytes=100 * MiB,
)
VOLUME = Volume(
    id="v" + "2" * 32 + "@n",
    name="pvc-1",
    capacity_bytes=64 * MiB,
    access_type=AccessType.MOUNT,
    fs_type="ext4",
    node_id="n",
    parameters=Parameters({"lvType": "thin", "wipeOnDelete": "true"}),
    content_source=SOURCE,
)


def test_parameters_are_a_frozen_mapping() -> None:
    p = Parameters({"a": "1"})
    assert p == {"a": "1"} and dict(p) == {"a": "1"} and p.get("b") is None
    assert hash(p) == hash(Parameters({"a": "1"}))
    with pytest.raises(TypeError):
        p["a"] = "2"  # type: ignore[index]
    with pytest.raises(AttributeError):
        p.extra = 1  # type: ignore[attr-defined]
    source = {"a": "1"}
    copied = Parameters(source)
    source["a"] = "changed"
    assert copied["a"] == "1"


@pytest.mark.parametrize(
    "volume",
    [
        VOLUME,
        dataclasses.replace(VOLUME, capacity_bytes=100 * MiB),  # expanded since: still fits
        # mutable parameters (ControllerModifyVolume) do not tell volumes apart
        dataclasses.replace(VOLUME, parameters=Parameters({"lvType": "thin"})),
    ],
)
def test_a_volume_that_answers_the_request(volume: Volume) -> None:
    SPEC.check_existing(volume)


@pytest.mark.parametrize(
    ("volume", "difference"),
    [
        (dataclasses.replace(VOLUME, name="pvc-2"), "its id belongs to volume 'pvc-2'"),
        (
            dataclasses.replace(VOLUME, access_type=AccessType.BLOCK, fs_type=""),
            "access type is block, not mount",
        ),
        (dataclasses.replace(VOLUME, fs_type="xfs"), "fs_type is 'xfs', not 'ext4'"),
        (
            dataclasses.replace(VOLUME, parameters=Parameters({"lvType": "linear"})),
            "parameters are {'lvType': 'linear'}, not {'lvType': 'thin'}",
        ),
        (dataclasses.replace(VOLUME, content_source=None), "content source is none, not snapshot"),
        (
            dataclasses.replace(VOLUME, capacity_bytes=32 * MiB),
            "capacity is 33554432 bytes, outside the requested [62914560, 104857600]",
        ),
        (
            dataclasses.replace(VOLUME, capacity_bytes=128 * MiB),
            "capacity is 134217728 bytes, outside",
        ),
    ],
)
def test_a_volume_that_does_not_is_already_exists_naming_the_field(
    volume: Volume, difference: str
) -> None:
    with pytest.raises(CsiError) as exc:
        SPEC.check_existing(volume)
    assert exc.value.code is grpc.StatusCode.ALREADY_EXISTS
    assert exc.value.message.startswith("volume 'pvc-1' already exists and does not match")
    assert difference in exc.value.message
    assert exc.value.message.count(";") == 0  # only that field


def test_every_difference_is_named_and_a_block_volume_has_no_filesystem_to_compare() -> None:
    other = dataclasses.replace(VOLUME, fs_type="xfs", capacity_bytes=MiB, content_source=None)
    with pytest.raises(CsiError) as exc:
        SPEC.check_existing(other)
    assert exc.value.message.count(";") == 2
    block = dataclasses.replace(SPEC, access_type=AccessType.BLOCK, fs_type="")
    block.check_existing(dataclasses.replace(VOLUME, access_type=AccessType.BLOCK, fs_type=""))
    unbounded = dataclasses.replace(SPEC, required_bytes=0, limit_bytes=0)
    unbounded.check_existing(dataclasses.replace(VOLUME, capacity_bytes=MiB))
