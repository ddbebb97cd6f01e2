"""DeleteVolume never pulls storage from under this node: a volume still staged or published
here is FAILED_PRECONDITION, saying where, and nothing changes; unstaged, it is deleted.

Through the real driver, with real bind mounts and loop devices: a directory volume is staged
as a bind mount of its directory; a block volume is staged as an attached loop device (no
mount at all) and published as a bind mount of that device node.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from csi_driver.proto import csi_pb2
from testkit.driver_process import Csi, DriverProcess, loops_under, mounts_under

pytestmark = pytest.mark.root

MiB = 1 << 20
MODE = csi_pb2.VolumeCapability.AccessMode
MOUNT = csi_pb2.VolumeCapability(
    access_mode=MODE(mode=MODE.SINGLE_NODE_WRITER),
    mount=csi_pb2.VolumeCapability.MountVolume(),
)
BLOCK = csi_pb2.VolumeCapability(
    access_mode=MODE(mode=MODE.SINGLE_NODE_WRITER),
    block=csi_pb2.VolumeCapability.BlockVolume(),
)


def create(csi: Csi, name: str, cap: csi_pb2.VolumeCapability) -> str:
    reply = csi.controller.CreateVolume(
        csi_pb2.CreateVolumeRequest(
            name=name,
            capacity_range=csi_pb2.CapacityRange(required_bytes=32 * MiB),
            volume_capabilities=[cap],
        )
    )
    return str(reply.volume.volume_id)


def refused(csi: Csi, vid: str) -> str:
    """The details of a DeleteVolume that must be FAILED_PRECONDITION."""
    with pytest.raises(grpc.RpcError) as exc:
        csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid))
    assert exc.value.code() is grpc.StatusCode.FAILED_PRECONDITION, exc.value.details()
    details = str(exc.value.details())
    assert len(details) < 1024
    return details


def listed(csi: Csi) -> set[str]:
    reply = csi.controller.ListVolumes(csi_pb2.ListVolumesRequest())
    return {e.volume.volume_id for e in reply.entries}


def test_a_staged_or_published_volume_is_not_deleted(
    driver: DriverProcess, csi: Csi, workdir: Path
) -> None:
    kubelet = workdir / "kubelet"
    d = create(csi, "in-use-dir", MOUNT)
    b = create(csi, "in-use-block", BLOCK)
    staging = {vid: kubelet / "staging" / vid.partition("@")[0] for vid in (d, b)}
    target = kubelet / "pods" / "pod-b" / "dev"
    target.parent.mkdir(parents=True)
    for vid, cap in ((d, MOUNT), (b, BLOCK)):
        staging[vid].mkdir(parents=True)
        csi.node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=vid, staging_target_path=str(staging[vid]), volume_capability=cap
            )
        )
    published = False
    try:
        (staging[d] / "kept").write_bytes(b"still here")
        loops = loops_under(str(driver.root))
        assert len(loops) == 1
        device = loops[0][0]

        # staged only: the directory is bind-mounted, the block volume's loop device attached
        assert str(staging[d]) in refused(csi, d)
        assert device in refused(csi, b)
        # published too: the loop device node is bind-mounted at the pod's target
        csi.node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id=b,
                staging_target_path=str(staging[b]),
                target_path=str(target),
                volume_capability=BLOCK,
            )
        )
        published = True
        assert str(target) in refused(csi, b)

        # nothing changed
        assert listed(csi) == {d, b}
        assert (staging[d] / "kept").read_bytes() == b"still here"
        assert loops_under(str(driver.root)) == loops
        fd = os.open(target, os.O_RDWR)
        try:
            os.pwrite(fd, b"block bytes", 0)
            os.fsync(fd)
            assert os.pread(fd, 11, 0) == b"block bytes"
        finally:
            os.close(fd)
    finally:
        if published:
            csi.node.NodeUnpublishVolume(
                csi_pb2.NodeUnpublishVolumeRequest(volume_id=b, target_path=str(target))
            )
        for vid in (d, b):
            csi.node.NodeUnstageVolume(
                csi_pb2.NodeUnstageVolumeRequest(
                    volume_id=vid, staging_target_path=str(staging[vid])
                )
            )
    # unstaged: deleted, storage and loop device gone
    for vid in (d, b):
        csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid))
    assert listed(csi) == set()
    assert not loops_under(str(workdir)) and not mounts_under(str(workdir))
    assert os.listdir(driver.root / "volumes") == []
