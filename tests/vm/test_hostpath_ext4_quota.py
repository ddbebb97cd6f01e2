"""Directory volumes whose size is enforced on ext4: the hostpath backend on an ext4
filesystem with the ``project`` and ``quota`` features, mounted with ``prjquota``.

Runs only inside the real-kernel VM lane (scripts/test-vm.sh sets CSI_VM_LANE=1): the host's
kernel may have no quotas. The filesystem is made on a sparse file behind a loop device
(tests/vm/hostpath_roots.py). The first test drives the real driver over gRPC as the kubelet
would: a write past the size fails with EDQUOT, ControllerExpandVolume and NodeExpandVolume
raise the limit, and NodeGetVolumeStats shows the volume's own bytes (as du counts them,
within a block) and inodes. The second shows that the same filesystem mounted without
``prjquota`` is not taken for an enforcing one (usage then comes from a walk), and that a
restart after a remount with ``prjquota`` gives the existing volume its project and limit.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_driver.backends.hostpath.backend import SIZE_ENFORCED_KEY
from csi_driver.model import AccessType, VolumeSpec
from csi_driver.proto import csi_pb2
from csi_driver.system.quota import project_of
from csi_driver.units import MiB
from testkit.driver_process import DriverProcess, clean_up_host, csi_stubs
from tests.integration.test_node import Volumes
from tests.requests import mount_cap
from tests.vm.hostpath_roots import Backends, du, fill, formatted_loop, mounted, sh

if os.environ.get("CSI_VM_LANE") != "1":
    pytest.skip("runs inside the real-kernel VM: scripts/test-vm.sh", allow_module_level=True)

pytestmark = pytest.mark.vm

#: ext4 with project quotas kept in hidden quota inodes; 4 KiB blocks
MKFS = ("mkfs.ext4", "-q", "-F", "-b", "4096", "-O", "quota,project", "-E", "quotatype=prjquota")
BLOCK = 4096


@pytest.fixture
def ext4_image(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(loop device, mount point) of a fresh ext4 with project quotas, not mounted: each test
    mounts it as it needs. Gone again afterwards."""
    for module in ("ext4", "quota_v2"):
        sh("modprobe", module, check=False)  # built in, or loaded here
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with formatted_loop(tmp_path / "ext4.img", 128 * MiB, MKFS) as device:
        yield device, mnt


def usage_of(reply: csi_pb2.NodeGetVolumeStatsResponse) -> dict[int, csi_pb2.VolumeUsage]:
    return {u.unit: u for u in reply.usage}


def test_ext4_project_quota_through_the_driver(ext4_image: tuple[str, Path]) -> None:
    device, mnt = ext4_image
    with mounted(device, mnt, "prjquota"):
        driver = DriverProcess(mnt, node_id="vm-node")
        leaks: list[str] = []
        try:
            driver.start()
            with csi_stubs(driver.target) as csi:
                vols = Volumes(csi, mnt)
                try:
                    drive_one_volume(vols)
                finally:
                    errors = vols.teardown()
                assert not errors, "\n".join(errors)
        finally:
            driver.stop()
            leaks = clean_up_host(str(mnt / "kubelet"))
        assert not leaks, f"left behind: {leaks}"
        assert driver.exits == [0], driver.log_tail()


def drive_one_volume(vols: Volumes) -> None:
    vid = vols.create("ext4-vol", 16 * MiB)
    cap = mount_cap()
    vols.stage(vid, cap)
    target = Path(vols.publish(vid, cap, vols.target_path("ext4-vol")))

    written, err = fill(target / "first", 64 * MiB)
    assert err in (errno.EDQUOT, errno.ENOSPC), f"wrote {written} bytes without a quota error"
    assert 12 * MiB <= written <= 16 * MiB, f"stopped after {written} bytes"
    os.sync()
    stats = usage_of(vols.stats(vid, str(target)))
    used, inodes = du(target)
    by_bytes = stats[csi_pb2.VolumeUsage.BYTES]
    assert by_bytes.total == 16 * MiB
    assert abs(by_bytes.used - used) <= BLOCK, f"stats say {by_bytes.used}, du {used}"
    assert by_bytes.available <= 16 * MiB - by_bytes.used + BLOCK
    assert stats[csi_pb2.VolumeUsage.INODES].used == inodes == 2

    grown = vols.csi.controller.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=vid, capacity_range=csi_pb2.CapacityRange(required_bytes=32 * MiB)
        )
    )
    assert grown.capacity_bytes == 32 * MiB
    assert vols.expand(vid, str(target), 32 * MiB, cap) == 32 * MiB
    more, err = fill(target / "second", 64 * MiB)
    assert err in (errno.EDQUOT, errno.ENOSPC), f"wrote {more} more bytes without a quota error"
    assert 12 * MiB <= more and written + more <= 32 * MiB, f"{more} more bytes after growing"
    os.sync()
    stats = usage_of(vols.stats(vid, str(target)))
    used, inodes = du(target)
    assert stats[csi_pb2.VolumeUsage.BYTES].total == 32 * MiB
    assert abs(stats[csi_pb2.VolumeUsage.BYTES].used - used) <= BLOCK
    assert stats[csi_pb2.VolumeUsage.INODES].used == inodes == 3


def test_ext4_without_prjquota_enforces_nothing_until_remounted(
    ext4_image: tuple[str, Path],
) -> None:
    device, mnt = ext4_image
    backends = Backends(mnt / "root")
    try:
        with mounted(device, mnt):  # the features, but not the mount option
            backend = backends.open()
            volume = backend.create_volume(VolumeSpec("v", 16 * MiB, AccessType.MOUNT, "ext4"))
            assert volume.context[SIZE_ENFORCED_KEY] == "false"
            path = Path(backend.attach(volume.id).path)
            assert project_of(path) == (0, False)
            (path / "a" / "b").mkdir(parents=True)
            (path / "a" / "b" / "data").write_bytes(os.urandom(3 * MiB))
            (path / "a" / "small").write_bytes(b"x" * 100)
            os.sync()
            usage = backend.volume_usage(volume.id)  # walked: no quota counts it
            assert usage is not None and usage.total_bytes == 16 * MiB
            assert (usage.used_bytes, usage.used_inodes) == du(path)
            backends.close()

        with mounted(device, mnt, "prjquota"):
            backend = backends.open()  # a restart gives the volume its project and limit
            assert backend.wait_for_background(60)  # applied in the background
            assert not backend.volume_condition(volume.id).abnormal
            again = backend.get_volume(volume.id)
            assert again is not None and again.context[SIZE_ENFORCED_KEY] == "true"
            projid, inherit = project_of(path)
            assert projid > 0 and inherit
            assert project_of(path / "a") == (projid, True)
            assert project_of(path / "a" / "b" / "data") == (projid, False)
            st = os.statvfs(path)
            assert st.f_blocks * st.f_frsize == 16 * MiB, "df inside the volume shows its size"
            usage = backend.volume_usage(volume.id)  # from the quota now
            assert usage is not None
            used, inodes = du(path)
            assert abs(usage.used_bytes - used) <= BLOCK and usage.used_inodes == inodes
            written, err = fill(path / "more", 64 * MiB)
            assert err in (errno.EDQUOT, errno.ENOSPC), f"wrote {written} without a quota error"
            assert written <= 13 * MiB, f"{written} bytes beside 3 MiB in a 16 MiB volume"
            backends.teardown()
    finally:
        backends.close()
