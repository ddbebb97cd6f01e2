"""CSI request pieces every lane builds alike: capabilities, and the code of a failed call."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc
import pytest

from csi_driver.proto import csi_pb2

MODE = csi_pb2.VolumeCapability.AccessMode


def mount_cap(
    mode: csi_pb2.VolumeCapability.AccessMode.Mode = MODE.SINGLE_NODE_WRITER,
    fs_type: str = "",
    flags: Sequence[str] = (),
) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        access_mode=MODE(mode=mode),
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type, mount_flags=list(flags)),
    )


def block_cap(
    mode: csi_pb2.VolumeCapability.AccessMode.Mode = MODE.SINGLE_NODE_WRITER,
) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        access_mode=MODE(mode=mode), block=csi_pb2.VolumeCapability.BlockVolume()
    )


def rpc_code(call: Callable[[], Any]) -> grpc.StatusCode:
    """The status code ``call`` fails with (the test fails if it succeeds)."""
    with pytest.raises(grpc.RpcError) as exc:
        call()
    code: grpc.StatusCode = exc.value.code()
    return code


def create_request(
    name: str, parameters: dict[str, str] | None = None, size: int = 1 << 20
) -> csi_pb2.CreateVolumeRequest:
    """A CreateVolume of a mount volume of ``size`` bytes."""
    return csi_pb2.CreateVolumeRequest(
        name=name,
        capacity_range=csi_pb2.CapacityRange(required_bytes=size),
        volume_capabilities=[mount_cap()],
        parameters=parameters or {},
    )
