"""A restart serves at once, however much data an interrupted ``wipeOnDelete`` has left to
overwrite: the wipe goes on in the background, its DeleteVolume retries answer ABORTED
("being deleted") until the storage is really gone and OK after, its capacity stays counted
until then, and a kill in the middle of the background wipe is finished by the next start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_driver.proto import csi_pb2
from testkit.driver_process import Csi, DriverProcess, csi_stubs

pytestmark = pytest.mark.root

MiB = 1 << 20
GiB = 1 << 30
CAPACITY = 8 * GiB
WRITTEN = 768 * MiB  # data extents, one MiB every other MiB: the image stays sparse
MODE = csi_pb2.VolumeCapability.AccessMode


def row_state(root: Path, local: str) -> str | None:
    db = sqlite3.connect(root / "state.db", timeout=10)
    try:
        row = db.execute("SELECT state FROM volumes WHERE local_id = ?", (local,)).fetchone()
    finally:
        db.close()
    return None if row is None else str(row[0])


def write_sparse(path: Path, written: int) -> None:
    chunk = b"\xa5" * MiB
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for i in range(written // MiB):
            os.pwrite(fd, chunk, 2 * i * MiB)
        os.ftruncate(fd, 2 * written)
        os.fsync(fd)
    finally:
        os.close(fd)


def kill(driver: DriverProcess) -> None:
    """SIGKILL the driver and its process group, as a DaemonSet upgrade does."""
    assert driver.process is not None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(driver.process.pid, signal.SIGKILL)
    driver.process.wait(timeout=30)


def capacity(csi: Csi) -> int:
    return int(csi.controller.GetCapacity(csi_pb2.GetCapacityRequest()).available_capacity)


def delete_code(csi: Csi, vid: str) -> tuple[grpc.StatusCode, str]:
    try:
        csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid), timeout=30)
    except grpc.RpcError as exc:
        return exc.code(), str(exc.details())
    return grpc.StatusCode.OK, ""


@pytest.fixture
def driver(workdir: Path) -> Iterator[DriverProcess]:
    d = DriverProcess(workdir, extra_args=["--hostpath-capacity", str(CAPACITY)], log_level="info")
    try:
        d.start()
        yield d
    finally:
        d.stop()


def test_an_interrupted_wipe_finishes_in_the_background_after_a_restart(
    driver: DriverProcess,
) -> None:
    with csi_stubs(driver.target) as csi:
        reply = csi.controller.CreateVolume(
            csi_pb2.CreateVolumeRequest(
                name="wiped",
                capacity_range=csi_pb2.CapacityRange(required_bytes=2 * WRITTEN),
                volume_capabilities=[
                    csi_pb2.VolumeCapability(
                        access_mode=MODE(mode=MODE.SINGLE_NODE_WRITER),
                        mount=csi_pb2.VolumeCapability.MountVolume(),
                    )
                ],
                parameters={"wipeOnDelete": "true"},
            )
        )
        vid = str(reply.volume.volume_id)
        local = vid.partition("@")[0]
        data = driver.root / "volumes" / local / "data"
        write_sparse(data, WRITTEN)
        held = capacity(csi)
        assert held == CAPACITY - 2 * WRITTEN

        # killed inside DeleteVolume's wipe
        call = csi.controller.DeleteVolume.future(csi_pb2.DeleteVolumeRequest(volume_id=vid))
        deadline = time.monotonic() + 10
        while row_state(driver.root, local) != "deleting":
            assert time.monotonic() < deadline, "DeleteVolume never began"
            time.sleep(0.002)
        kill(driver)
        with contextlib.suppress(grpc.RpcError):
            call.result()
    assert data.exists() and row_state(driver.root, local) == "deleting"

    # the restart serves before the wipe is done
    start = time.monotonic()
    driver.start()
    ready = time.monotonic() - start
    assert data.exists(), f"the restart waited for the wipe (ready after {ready:.2f}s)"
    with csi_stubs(driver.target) as csi:
        assert csi.identity.Probe(csi_pb2.ProbeRequest()).ready.value
        assert capacity(csi) == held  # still counted: the storage is not gone yet
        code, details = delete_code(csi, vid)
        assert code is grpc.StatusCode.ABORTED and "being deleted" in details, details
        assert data.exists()
        # killed again, in the middle of the background wipe
        kill(driver)
    assert data.exists() and row_state(driver.root, local) == "deleting"

    start = time.monotonic()
    driver.start()
    ready_again = time.monotonic() - start
    with csi_stubs(driver.target) as csi:
        codes = []
        deadline = time.monotonic() + 60
        while True:
            code, details = delete_code(csi, vid)
            codes.append(code)
            if code is grpc.StatusCode.OK:
                break
            assert code is grpc.StatusCode.ABORTED and "being deleted" in details, details
            # the capacity comes back only once the storage is really gone
            if capacity(csi) != held:
                assert not data.parent.exists() and capacity(csi) == CAPACITY
            assert time.monotonic() < deadline, "the background wipe never finished"
            time.sleep(0.05)
        finished = time.monotonic() - start
        assert not data.parent.exists() and row_state(driver.root, local) is None
        assert capacity(csi) == CAPACITY
        assert delete_code(csi, vid) == (grpc.StatusCode.OK, "")  # and again: idempotent
    print(
        f"\nready after {ready:.2f}s and {ready_again:.2f}s; wipe done {finished:.2f}s after the"
        f" second start; DeleteVolume answered ABORTED {len(codes) - 1} times, then OK"
    )
