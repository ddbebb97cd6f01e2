"""Volume conditions on real parts: a `python -m csi_driver` process (hostpath backend), real
bind mounts and loop devices broken behind the driver's back, and what NodeGetVolumeStats,
ControllerGetVolume and ListVolumes then say.

The storage rules (a directory or image gone) are the backend's, so the node and the
controller must give the same answer; what only the node can see (a detached loop device, a
read-only staging mount) is the node's alone, and the controller keeps calling the storage
healthy. Every test restores what it broke in a ``finally``, so that the ``vols`` teardown
through the driver works and the ``workdir`` fixture finds nothing leaked.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from csi_driver.backends.hostpath.layout import IMAGE_NAME
from csi_driver.proto import csi_pb2
from testkit.driver_process import DriverProcess
from tests.integration.test_node import Volumes, find_backing_directory, mount_entry
from tests.requests import block_cap, mount_cap

pytestmark = pytest.mark.root

MiB = 1 << 20


def controller_conditions(vols: Volumes, vid: str) -> list[csi_pb2.VolumeCondition]:
    """The volume's condition as ControllerGetVolume and as ListVolumes say it."""
    got = vols.csi.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=vid))
    listed = vols.csi.controller.ListVolumes(csi_pb2.ListVolumesRequest())
    entries = [e for e in listed.entries if e.volume.volume_id == vid]
    assert len(entries) == 1
    return [got.status.volume_condition, entries[0].status.volume_condition]


def stats(vols: Volumes, vid: str, path: str, staging: str = "") -> csi_pb2.VolumeCondition:
    reply = vols.csi.node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=vid, volume_path=path, staging_target_path=staging
        )
    )
    assert reply.usage, "a reply without usage is dropped by the kubelet, condition and all"
    condition: csi_pb2.VolumeCondition = reply.volume_condition
    return condition


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, timeout=60, capture_output=True)


def loop_of(image: Path) -> str:
    out = subprocess.run(
        ["losetup", "--noheadings", "--output", "NAME", "--associated", str(image)],
        check=True,
        timeout=30,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert len(out) == 1, f"{image} is attached to {out}"
    return out[0]


def test_healthy_volumes_are_normal_everywhere(vols: Volumes) -> None:
    mount_vid = vols.create("healthy-mount", 32 * MiB)
    staging = vols.stage(mount_vid, mount_cap())
    target = vols.publish(mount_vid, mount_cap(), vols.target_path("healthy-mount"))
    block_vid = vols.create("healthy-block", 16 * MiB, block=True)
    vols.stage(block_vid, block_cap())
    block_target = vols.publish(block_vid, block_cap(), vols.target_path("healthy-block"))
    for vid, path, staged in ((mount_vid, target, staging), (block_vid, block_target, "")):
        node = stats(vols, vid, path, staged)
        assert not node.abnormal and len(node.message) < 40, node
        for condition in controller_conditions(vols, vid):
            assert not condition.abnormal and condition.message == node.message


def test_a_removed_directory_is_abnormal_on_the_node_and_in_the_controller(
    vols: Volumes, driver: DriverProcess
) -> None:
    vid = vols.create("gone-dir", 32 * MiB)
    staging = vols.stage(vid, mount_cap())
    target = vols.publish(vid, mount_cap(), vols.target_path("gone-dir"))
    Path(target, "data").write_text("soon gone")
    backing = find_backing_directory(driver.root, staging)
    assert backing is not None
    (backing / "data").unlink()
    backing.rmdir()
    node = stats(vols, vid, target)
    assert node.abnormal, node
    assert f"backing directory {backing} is missing" in node.message
    assert "delete the volume" in node.message
    # one rule, two paths: the controller says exactly what the node says
    for condition in controller_conditions(vols, vid):
        assert (condition.abnormal, condition.message) == (True, node.message)


def test_a_detached_loop_device_is_abnormal_on_the_node(
    vols: Volumes, driver: DriverProcess
) -> None:
    vid = vols.create("gone-loop", 16 * MiB, block=True)
    vols.stage(vid, block_cap())
    target = vols.publish(vid, block_cap(), vols.target_path("gone-loop"))
    (image,) = driver.root.rglob(IMAGE_NAME)
    device = loop_of(image)
    assert not stats(vols, vid, target).abnormal
    run("losetup", "--detach", device)
    try:
        node = stats(vols, vid, target)
        assert node.abnormal, node
        assert f"published at {target} from {device}, which no longer holds" in node.message
        assert "detached outside the driver" in node.message
        # the storage itself is fine: the controller, which cannot see the node's devices,
        # keeps calling it healthy
        for condition in controller_conditions(vols, vid):
            assert not condition.abnormal
    finally:
        # the same device again, so that the publication is the volume's and the teardown
        # through the driver unpublishes and unstages it
        run("losetup", device, str(image))
    assert not stats(vols, vid, target).abnormal


def test_a_staging_mount_made_read_only_under_a_writable_publication_is_abnormal(
    vols: Volumes,
) -> None:
    vid = vols.create("ro-staging", 32 * MiB)
    staging = vols.stage(vid, mount_cap())
    target = vols.publish(vid, mount_cap(), vols.target_path("ro-staging"))
    reader = vols.publish(vid, mount_cap(), vols.target_path("ro-reader"), readonly=True)
    # a read-only publication next to a writable one is no fault
    assert not stats(vols, vid, target, staging).abnormal
    assert not stats(vols, vid, reader, staging).abnormal
    run("mount", "-o", "remount,bind,ro", staging)
    try:
        entry = mount_entry(staging)
        assert entry is not None and "ro" in entry[0].split(",")
        for path in (target, reader, staging):
            node = stats(vols, vid, path, staging)
            assert node.abnormal, (path, node)
            assert (
                f"the staging mount at {staging} is read-only although the volume is published"
                f" read-write at {target}"
            ) in node.message
        for condition in controller_conditions(vols, vid):
            assert not condition.abnormal
    finally:
        run("mount", "-o", "remount,bind,rw", staging)
    assert not stats(vols, vid, target, staging).abnormal
