"""An id is exactly the canonical one or it names nothing: ``"<id>\\n"`` is not an alias.

``$`` in a pattern also matches before a final newline; with it, ``"<id>\\n"`` passed the
grammar, reached storage and the per-volume lock under a second name (a publish storm stacked
two mounts) and was stored as a snapshot's source. Each RPC that takes an id gets the
newline variant here, next to a real volume: NOT_FOUND (or INVALID_ARGUMENT), the real volume
untouched, nothing created, staged or mounted.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_driver.proto import csi_pb2
from testkit.driver_process import REPO, Csi, DriverProcess, csi_stubs, mounts_under

pytestmark = pytest.mark.root

MODE = csi_pb2.VolumeCapability.AccessMode
MOUNT = csi_pb2.VolumeCapability(
    access_mode=MODE(mode=MODE.SINGLE_NODE_WRITER), mount=csi_pb2.VolumeCapability.MountVolume()
)


def _supports_kubelet_dir() -> bool:
    out = subprocess.run(
        [sys.executable, "-m", "csi_driver", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
    ).stdout
    return "--kubelet-dir" in out


@pytest.fixture
def served(workdir: Path) -> Iterator[tuple[DriverProcess, Csi, Path]]:
    kubelet = workdir / "kubelet"
    kubelet.mkdir()
    extra = ["--kubelet-dir", str(kubelet)] if _supports_kubelet_dir() else []
    d = DriverProcess(workdir, extra_args=extra)
    try:
        d.start()
        with csi_stubs(d.target) as csi:
            yield d, csi, kubelet
    finally:
        d.stop()


def code_of(call: Callable[[], Any]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        return code
    return grpc.StatusCode.OK


def test_an_id_with_a_trailing_newline_names_nothing(served) -> None:  # type: ignore[no-untyped-def]
    driver, csi, kubelet = served
    c, n = csi.controller, csi.node
    volume = c.CreateVolume(
        csi_pb2.CreateVolumeRequest(
            name="real",
            capacity_range=csi_pb2.CapacityRange(required_bytes=1 << 20),
            volume_capabilities=[MOUNT],
        ),
        timeout=10,
    ).volume
    real = volume.volume_id
    alias = real + "\n"
    staging = kubelet / "plugins" / "staging"
    target = kubelet / "pods" / "p" / "mount"
    staging.mkdir(parents=True)
    target.parent.mkdir(parents=True)
    not_found = grpc.StatusCode.NOT_FOUND
    try:
        assert (
            code_of(
                lambda: c.ControllerGetVolume(
                    csi_pb2.ControllerGetVolumeRequest(volume_id=alias), timeout=10
                )
            )
            is not_found
        )
        assert (
            code_of(
                lambda: c.CreateSnapshot(
                    csi_pb2.CreateSnapshotRequest(name="snap", source_volume_id=alias), timeout=10
                )
            )
            is not_found
        )
        assert not c.ListSnapshots(csi_pb2.ListSnapshotsRequest(), timeout=10).entries
        assert (
            code_of(
                lambda: c.ControllerExpandVolume(
                    csi_pb2.ControllerExpandVolumeRequest(
                        volume_id=alias,
                        capacity_range=csi_pb2.CapacityRange(required_bytes=2 << 20),
                    ),
                    timeout=10,
                )
            )
            is not_found
        )
        node_calls: dict[str, Callable[[], Any]] = {
            "NodeStageVolume": lambda: n.NodeStageVolume(
                csi_pb2.NodeStageVolumeRequest(
                    volume_id=alias, staging_target_path=str(staging), volume_capability=MOUNT
                ),
                timeout=10,
            ),
            "NodePublishVolume": lambda: n.NodePublishVolume(
                csi_pb2.NodePublishVolumeRequest(
                    volume_id=alias,
                    staging_target_path=str(staging),
                    target_path=str(target),
                    volume_capability=MOUNT,
                ),
                timeout=10,
            ),
            "NodeGetVolumeStats": lambda: n.NodeGetVolumeStats(
                csi_pb2.NodeGetVolumeStatsRequest(volume_id=alias, volume_path=str(target)),
                timeout=10,
            ),
            "NodeExpandVolume": lambda: n.NodeExpandVolume(
                csi_pb2.NodeExpandVolumeRequest(
                    volume_id=alias,
                    volume_path=str(target),
                    capacity_range=csi_pb2.CapacityRange(required_bytes=2 << 20),
                ),
                timeout=10,
            ),
        }
        codes = {name: code_of(call) for name, call in node_calls.items()}
        assert all(
            code in (not_found, grpc.StatusCode.INVALID_ARGUMENT) for code in codes.values()
        ), codes
        assert not mounts_under(str(driver.workdir)), "nothing staged or published"
        # DeleteVolume of an id that names nothing answers OK (the spec's idempotency) and
        # must not delete the real volume behind the alias.
        assert code_of(
            lambda: c.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=alias), timeout=10)
        ) in (grpc.StatusCode.OK, not_found)
        got = c.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=real), timeout=10)
        assert got.volume.volume_id == real, "the real volume survived its alias's deletion"
        assert got.volume.capacity_bytes == volume.capacity_bytes
    finally:
        c.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=real), timeout=10)
