"""Directory volumes whose size is enforced: the hostpath backend on XFS with project quotas.

Needs a kernel with XFS quota support, so it runs only inside the real-kernel VM lane
(scripts/test-vm.sh sets CSI_VM_LANE=1). There, an XFS filesystem is made on a sparse file,
mounted through a loop device with ``prjquota``, and a HostPathBackend rooted on it must
stop a 64 MiB volume at 64 MiB and let it grow after an expansion. If the mount with
``prjquota`` is impossible the test fails: that is exactly what this lane exists to have.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_driver.backends.hostpath.backend import SIZE_ENFORCED_KEY
from csi_driver.model import AccessType, ContentSource, SourceKind, VolumeSpec
from csi_driver.system.quota import ProjectQuota, QuotaError, project_of, quota_state
from csi_driver.units import MiB
from tests.vm.hostpath_roots import Backends, du, fill, loop_filesystem, sh

if os.environ.get("CSI_VM_LANE") != "1":
    pytest.skip("runs inside the real-kernel VM: scripts/test-vm.sh", allow_module_level=True)

pytestmark = pytest.mark.vm
#: what test_hostpath_metrics.py takes from here
__all__ = ["Backends", "backends", "fill", "xfs_mount"]


@pytest.fixture
def xfs_mount(tmp_path: Path) -> Iterator[Path]:
    """An XFS filesystem mounted with prjquota on a loop device; gone again afterwards."""
    mnt = tmp_path / "mnt"
    # sparse; mkfs.xfs wants at least 300 MB
    with loop_filesystem(
        tmp_path / "xfs.img", 512 * MiB, ("mkfs.xfs", "-q", "-f"), mnt, "prjquota"
    ):
        state = sh("xfs_quota", "-x", "-c", "state -p", str(mnt)).stdout
        assert "Enforcement: ON" in state, state
        yield mnt


@pytest.fixture
def backends(xfs_mount: Path) -> Iterator[Backends]:
    b = Backends(xfs_mount / "root")
    try:
        yield b
    finally:
        b.teardown()


def test_a_directory_volume_cannot_outgrow_its_size(backends: Backends) -> None:
    backend = backends.open()
    volume = backend.create_volume(VolumeSpec("quota-vol", 64 * MiB, AccessType.MOUNT, "xfs"))
    assert volume.context[SIZE_ENFORCED_KEY] == "true"
    assert backend.supported_fs_types() == ["xfs"]
    path = Path(backend.attach(volume.id).path)
    projid, inherit = project_of(path)
    assert projid > 0 and inherit

    st = os.statvfs(path)
    assert st.f_blocks * st.f_frsize == 64 * MiB, "df inside the volume shows its size"

    written, err = fill(path / "first", 200 * MiB)
    assert err in (errno.ENOSPC, errno.EDQUOT), f"wrote {written} bytes without a quota error"
    assert 48 * MiB <= written <= 64 * MiB, f"stopped after {written} bytes"
    assert not backend.volume_condition(volume.id).abnormal
    os.sync()
    usage = backend.volume_usage(volume.id)  # what NodeGetVolumeStats shows: the project's
    assert usage is not None and usage.total_bytes == 64 * MiB
    used, inodes = du(path)
    assert abs(usage.used_bytes - used) <= 4096, f"quota {usage.used_bytes}, du {used}"
    assert usage.used_inodes == inodes == 2

    grown = backend.expand_volume(volume.id, 128 * MiB)
    assert grown.capacity_bytes == 128 * MiB
    more, err = fill(path / "second", 200 * MiB)
    assert err in (errno.ENOSPC, errno.EDQUOT), f"wrote {more} more bytes without a quota error"
    assert 48 * MiB <= more <= 80 * MiB, f"after growing, {more} more bytes fitted"
    assert written + more <= 128 * MiB


def test_restored_and_restarted_volumes_keep_their_limits(backends: Backends) -> None:
    backend = backends.open()
    source = backend.create_volume(VolumeSpec("src", 32 * MiB, AccessType.MOUNT, ""))
    src_path = Path(backend.attach(source.id).path)
    (src_path / "data").write_bytes(os.urandom(8 * MiB))
    snap = backend.create_snapshot("snap", source.id, {})
    restored = backend.create_volume(
        VolumeSpec(
            "restored",
            32 * MiB,
            AccessType.MOUNT,
            "",
            content_source=ContentSource(SourceKind.SNAPSHOT, snap.id),
        )
    )
    path = Path(backend.attach(restored.id).path)
    assert (path / "data").read_bytes() == (src_path / "data").read_bytes()
    assert project_of(path)[0] not in (0, project_of(src_path)[0])
    assert project_of(path / "data") == (project_of(path)[0], False)

    backend = backends.open()  # a restart keeps the volume and its limit
    assert backend.get_volume(restored.id) == restored
    written, err = fill(path / "more", 100 * MiB)
    assert err in (errno.ENOSPC, errno.EDQUOT), f"wrote {written} bytes without a quota error"
    assert written <= 24 * MiB + MiB, f"{written} bytes beside 8 MiB in a 32 MiB volume"


def test_a_volume_over_its_limit_is_abnormal(backends: Backends, xfs_mount: Path) -> None:
    """Full is no fault (its usage says so); more than the limit is: a limit lowered below
    what the volume holds (here by hand, as a root remounted with prjquota after the volume
    outgrew its size would do) makes every write fail."""
    backend = backends.open()
    volume = backend.create_volume(VolumeSpec("over-vol", 32 * MiB, AccessType.MOUNT, "xfs"))
    path = Path(backend.attach(volume.id).path)
    projid, _ = project_of(path)
    (path / "data").write_bytes(os.urandom(20 * MiB))
    os.sync()
    assert not backend.volume_condition(volume.id).abnormal
    quota = ("xfs_quota", "-x", "-D", "/dev/null", "-P", "/dev/null", "-c")
    sh(*quota, f"limit -p bhard={8 * MiB} {projid}", str(xfs_mount))
    try:
        condition = backend.volume_condition(volume.id)
        assert condition.abnormal, condition
        assert f"volume directory {path} holds" in condition.message
        assert f"more than its size limit of {8 * MiB} bytes" in condition.message
        assert "delete data in it or expand the volume" in condition.message
    finally:
        sh(*quota, f"limit -p bhard={32 * MiB} {projid}", str(xfs_mount))
    assert not backend.volume_condition(volume.id).abnormal


def test_quotas_are_found_by_the_mount_point_without_the_device_node(xfs_mount: Path) -> None:
    """In a container the device's node (a udev link) may be missing: quotactl_fd(2) on the
    mount point needs none."""
    missing = "/dev/no-such-node"
    quota = ProjectQuota(str(xfs_mount), missing)
    directory = xfs_mount / "by-fd"
    directory.mkdir()
    try:
        assert quota_state(missing, str(xfs_mount)).enforcing
        quota.assign(directory, 4242)
        quota.set_limit(4242, 8 * MiB)
        assert project_of(directory) == (4242, True)
        assert quota.usage(4242).hard_bytes == 8 * MiB and quota.in_use(4242)
        with pytest.raises(QuotaError, match="No such file"):
            ProjectQuota("", missing).usage(4242)  # by the device path alone: no such node
    finally:
        quota.set_limit(4242, 0)
        shutil.rmtree(directory)


def test_a_restart_finishes_an_assignment_cut_short_and_sets_a_lost_limit(
    backends: Backends, xfs_mount: Path
) -> None:
    backend = backends.open()
    volume = backend.create_volume(VolumeSpec("cut-vol", 16 * MiB, AccessType.MOUNT, "xfs"))
    path = Path(backend.attach(volume.id).path)
    projid, _ = project_of(path)
    (path / "a" / "b").mkdir(parents=True)
    (path / "a" / "b" / "data").write_bytes(os.urandom(MiB))
    # what a kill inside an assignment leaves: the top with its project (given first, so
    # that what is created meanwhile inherits it), part of the tree without, no limit yet
    sh("xfs_io", "-c", "chproj 0", str(path / "a" / "b"))
    quota = ("xfs_quota", "-x", "-D", "/dev/null", "-P", "/dev/null", "-c")
    sh(*quota, f"limit -p bhard=0 {projid}", str(xfs_mount))
    condition = backend.volume_condition(volume.id)
    assert condition.abnormal and "is no bytes, not the volume's" in condition.message

    backend = backends.open()
    assert backend.wait_for_background(60)
    assert project_of(path) == (projid, True)
    assert project_of(path / "a" / "b") == (projid, True)
    assert project_of(path / "a" / "b" / "data") == (projid, False)
    assert not backend.volume_condition(volume.id).abnormal
    written, err = fill(path / "more", 64 * MiB)
    assert err == errno.ENOSPC, f"wrote {written} bytes, then {err}"  # XFS: ENOSPC
    assert written <= 15 * MiB, f"{written} bytes beside 1 MiB in a 16 MiB volume"


def test_two_roots_on_one_filesystem_get_distinct_project_ids(
    backends: Backends, xfs_mount: Path
) -> None:
    other = Backends(xfs_mount / "root2")
    try:
        first = backends.open().create_volume(VolumeSpec("r1", 8 * MiB, AccessType.MOUNT, ""))
        second = other.open().create_volume(VolumeSpec("r2", 8 * MiB, AccessType.MOUNT, ""))
        assert backends.current is not None and other.current is not None
        one = project_of(Path(backends.current.attach(first.id).path))[0]
        two = project_of(Path(other.current.attach(second.id).path))[0]
        assert one > 0 and two > 0 and one != two
    finally:
        other.teardown()
