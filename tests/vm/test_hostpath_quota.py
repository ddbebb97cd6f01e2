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
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_driver.backends.hostpath.backend import SIZE_ENFORCED_KEY, HostPathBackend
from csi_driver.model import AccessType, ContentSource, SourceKind, VolumeSpec
from csi_driver.system.quota import project_of
from csi_driver.system.runner import SubprocessRunner
from csi_driver.units import MiB

if os.environ.get("CSI_VM_LANE") != "1":
    pytest.skip("runs inside the real-kernel VM: scripts/test-vm.sh", allow_module_level=True)

pytestmark = pytest.mark.vm

NODE = "vm-node"
CHUNK = MiB


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


@pytest.fixture
def xfs_mount(tmp_path: Path) -> Iterator[Path]:
    """An XFS filesystem mounted with prjquota on a loop device; gone again afterwards."""
    image = tmp_path / "xfs.img"
    with image.open("wb") as f:
        f.truncate(512 * MiB)  # sparse; mkfs.xfs wants at least 300 MB
    sh("mkfs.xfs", "-q", "-f", str(image))
    device = sh("losetup", "--find", "--show", str(image)).stdout.strip()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        mounted = sh("mount", "-o", "prjquota", device, str(mnt), check=False)
        if mounted.returncode != 0:
            pytest.fail(
                f"cannot mount XFS with prjquota ({mounted.stderr.strip()}): this kernel does"
                " not give the quota support the VM lane exists for"
            )
        try:
            state = sh("xfs_quota", "-x", "-c", "state -p", str(mnt)).stdout
            assert "Enforcement: ON" in state, state
            yield mnt
        finally:
            if sh("umount", str(mnt), check=False).returncode != 0:
                sh("umount", "--lazy", str(mnt), check=False)
    finally:
        sh("losetup", "--detach", device, check=False)
    leftover = sh("losetup", "--list", "--noheadings", "--associated", str(image)).stdout
    assert not leftover.strip(), f"loop device left behind: {leftover}"


class Backends:
    """Backends on the XFS root; opening a new one is a restart."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.current: HostPathBackend | None = None

    def open(self) -> HostPathBackend:
        if self.current is not None:
            self.current.close()
        self.current = HostPathBackend(self.root, None, NODE, SubprocessRunner())
        return self.current

    def teardown(self) -> None:
        b = self.current or self.open()
        try:
            for volume in b.list_volumes():
                b.delete_volume(volume.id)
            for snapshot in b.list_snapshots():
                b.delete_snapshot(snapshot.id)
        finally:
            b.close()
            self.current = None


@pytest.fixture
def backends(xfs_mount: Path) -> Iterator[Backends]:
    b = Backends(xfs_mount / "root")
    try:
        yield b
    finally:
        b.teardown()


def fill(path: Path, limit: int) -> tuple[int, int | None]:
    """Write 1 MiB chunks (flushed, so blocks are really allocated) until ``limit`` bytes or
    an error; (bytes written, errno or None)."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        chunk = os.urandom(CHUNK)
        while written < limit:
            try:
                n = os.write(fd, chunk)
                os.fsync(fd)
            except OSError as exc:
                return written, exc.errno
            written += n
            if n < len(chunk):
                return written, None
    finally:
        os.close(fd)
    return written, None


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
