"""IO limits through the real driver process (hostpath backend) on a node that cannot enforce
them: a volume asking for them is refused with INVALID_ARGUMENT and a message saying why, and
nothing is made or changed. The node is told so by ``--cgroup-root``: a cgroup v2 root whose
controllers lack io, whatever the host has. The enforcement itself is in the VM lane
(tests/vm/test_io_limits.py), whose kernel has cgroup v2 with the io controller.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_driver.proto import csi_pb2
from csi_driver.system.cgroup_io import CgroupIo
from testkit.driver_process import Csi, DriverProcess
from tests.requests import block_cap, create_request

pytestmark = pytest.mark.root

LIMIT = {"writeBytesPerSecond": "4Mi"}


@pytest.fixture
def driver(workdir: Path) -> Iterator[DriverProcess]:
    d = DriverProcess(workdir, extra_args=["--cgroup-root", str(_no_io_root(workdir))])
    try:
        d.start()
        yield d
    finally:
        d.stop()
    assert all(code == 0 for code in d.exits), d.log_tail()


def _no_io_root(workdir: Path) -> Path:
    root = workdir / "cgroup"
    root.mkdir(exist_ok=True)
    (root / "cgroup.controllers").write_text("cpuset cpu memory pids\n")
    return root


def _problem(driver: DriverProcess) -> str:
    problem = CgroupIo(str(_no_io_root(driver.workdir))).problem()
    assert problem is not None and "io controller is not available" in problem
    return problem


def _refusal(call: object) -> tuple[grpc.StatusCode, str]:
    assert callable(call)
    with pytest.raises(grpc.RpcError) as exc:
        call()
    return exc.value.code(), exc.value.details() or ""


def _block_request(name: str, **fields: dict[str, str]) -> csi_pb2.CreateVolumeRequest:
    request = create_request(name, size=4 << 20)
    del request.volume_capabilities[:]
    request.volume_capabilities.append(block_cap())
    for key, value in fields.items():
        getattr(request, key).update(value)
    return request


def _stored(driver: DriverProcess) -> list[str]:
    """What the hostpath root holds for volumes: directories and images."""
    root = driver.root / "volumes"
    return sorted(os.listdir(root)) if root.exists() else []


def _parameters(driver: DriverProcess) -> list[str]:
    """The stored parameters of every volume, as the driver's database holds them."""
    with contextlib.closing(
        sqlite3.connect(f"file:{driver.root}/state.db?mode=ro", uri=True)
    ) as db:
        return [row[0] for row in db.execute("SELECT parameters FROM volumes")]


@pytest.mark.parametrize("where", ["parameters", "mutable_parameters"])
def test_a_block_volume_with_limits_is_refused_and_nothing_is_made(
    driver: DriverProcess, csi: Csi, where: str
) -> None:
    before = _stored(driver)
    request = _block_request("io-limited", **{where: LIMIT})
    code, message = _refusal(lambda: csi.controller.CreateVolume(request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message == (
        f"IO limits (writeBytesPerSecond) cannot be enforced: {_problem(driver)}; use a node with"
        " cgroup v2 and the io controller, or drop the IO limits"
    )
    assert _stored(driver) == before
    listed = csi.controller.ListVolumes(csi_pb2.ListVolumesRequest())
    assert [e.volume.volume_id for e in listed.entries] == []


def test_a_directory_volume_with_limits_is_refused_for_having_no_device(csi: Csi) -> None:
    request = create_request("io-dir", {"readIOPerSecond": "100"})
    code, message = _refusal(lambda: csi.controller.CreateVolume(request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith(
        "IO limits (readIOPerSecond) need a block device of the volume's own, and a hostpath"
        " mount volume is a directory"
    )


def test_a_bad_limit_is_refused_before_the_host_is_asked(csi: Csi) -> None:
    request = _block_request("io-bad", parameters={"writeBytesPerSecond": "-4Mi"})
    code, message = _refusal(lambda: csi.controller.CreateVolume(request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith("writeBytesPerSecond '-4Mi' is not a byte quantity")


def test_a_modification_adding_limits_is_refused_and_changes_nothing(
    driver: DriverProcess, csi: Csi
) -> None:
    volume = csi.controller.CreateVolume(_block_request("io-later")).volume
    try:
        modify = csi_pb2.ControllerModifyVolumeRequest(
            volume_id=volume.volume_id,
            mutable_parameters={"wipeOnDelete": "true", "writeIOPerSecond": "50"},
        )
        code, message = _refusal(lambda: csi.controller.ControllerModifyVolume(modify))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert message == (
            f"IO limits (writeIOPerSecond) cannot be enforced: {_problem(driver)}; use a node with"
            " cgroup v2 and the io controller, or drop the IO limits"
        )
        assert _parameters(driver) == ["{}"]  # wipeOnDelete was not stored either
        # removing a limit ("max") needs no io controller
        csi.controller.ControllerModifyVolume(
            csi_pb2.ControllerModifyVolumeRequest(
                volume_id=volume.volume_id,
                mutable_parameters={"wipeOnDelete": "true", "writeIOPerSecond": "max"},
            )
        )
        assert _parameters(driver) == ['{"wipeOnDelete": "true"}']
    finally:
        csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))
    assert _stored(driver) == []
