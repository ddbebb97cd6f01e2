"""The one sizing policy (services/sizing.py): CreateVolume, inline ephemeral volumes and both
expansions decide sizes through it, rounding once, with one backend's allocation unit."""

from __future__ import annotations

from typing import cast

import grpc
import pytest

from csi_driver import model
from csi_driver.backends.base import Backend
from csi_driver.errors import CsiError
from csi_driver.services import sizing
from csi_driver.units import GiB, MiB, round_up

UNIT = 4 * MiB


class Rounding:
    """round_size is all sizing asks of a backend; it counts how often it is asked."""

    def __init__(self) -> None:
        self.asked: list[int] = []

    def round_size(self, size_bytes: int, parameters: model.Parameters) -> int:
        self.asked.append(size_bytes)
        return max(UNIT, round_up(size_bytes, UNIT))


@pytest.fixture
def rounding() -> Rounding:
    return Rounding()


def create_size(rounding: Rounding, *args: int) -> int:
    return sizing.create_size(cast(Backend, rounding), model.Parameters(), *args)


def out_of_range(call: object) -> str:
    with pytest.raises(CsiError) as exc:
        call()  # type: ignore[operator]
    assert exc.value.code is grpc.StatusCode.OUT_OF_RANGE
    return exc.value.message


def volume(capacity: int) -> model.Volume:
    return model.Volume("v1@n", "pvc", capacity, model.AccessType.MOUNT, "ext4", "n")


def test_a_new_volume_gets_the_required_size_rounded_once(rounding: Rounding) -> None:
    assert create_size(rounding, 10 * MiB + 1) == 12 * MiB
    assert create_size(rounding, 10 * MiB + 1, 12 * MiB) == 12 * MiB
    assert rounding.asked == [10 * MiB + 1] * 2


def test_without_a_required_size_the_source_or_the_default_capped_by_the_limit(
    rounding: Rounding,
) -> None:
    assert create_size(rounding, 0) == sizing.DEFAULT_VOLUME_SIZE == GiB
    assert create_size(rounding, 0, 100 * MiB) == 100 * MiB
    assert create_size(rounding, 0, 0, 300 * MiB) == 300 * MiB  # the content source's size
    assert create_size(rounding, 0, 0, 0) == GiB


def test_a_range_that_cannot_be_met_is_out_of_range(rounding: Rounding) -> None:
    assert "above limit_bytes" in out_of_range(lambda: create_size(rounding, MiB, 2 * MiB))
    message = out_of_range(lambda: create_size(rounding, 0, 100 * MiB, 200 * MiB))
    assert "smaller than the content source's 209715200 bytes" in message
    assert out_of_range(lambda: create_size(rounding, 100 * MiB, 0, 200 * MiB))


def test_expansion_rounds_never_shrinks_and_keeps_below_the_limit(rounding: Rounding) -> None:
    backend = cast(Backend, rounding)
    assert sizing.expansion_target(backend, volume(8 * MiB), 10 * MiB, 0) == 12 * MiB
    assert sizing.expansion_target(backend, volume(8 * MiB), 0, 16 * MiB) == 0  # nothing asked
    message = out_of_range(lambda: sizing.expansion_target(backend, volume(20 * MiB), 0, 16 * MiB))
    assert "cannot shrink" in message
    assert out_of_range(
        lambda: sizing.expansion_target(backend, volume(8 * MiB), 9 * MiB, 10 * MiB)
    )
