"""The Node service for real: a `python -m csi_driver` process (hostpath backend) over a unix
socket, real bind mounts, real loop devices, real filesystems; and the system layer
(mounter, filesystems) on real loop devices.

Needs root. Every test leaves the host as it found it: the ``vols`` fixture unpublishes,
unstages and deletes through the driver, and the ``workdir`` fixture (conftest) then fails the
test if any mount or loop device under its directory is still there.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_driver import ids
from csi_driver.proto import csi_pb2
from csi_driver.system.confined import Jail
from csi_driver.system.filesystem import FilesystemError, Filesystems
from csi_driver.system.mounter import Mounter
from csi_driver.system.runner import SubprocessRunner
from testkit.driver_process import Csi, DriverProcess, loops_under, mounts_under, read_only_flag
from tests.integration.conftest import NODE_ID
from tests.requests import block_cap, mount_cap, rpc_code

pytestmark = pytest.mark.root

MiB = 1 << 20
MODE = csi_pb2.VolumeCapability.AccessMode
EPHEMERAL = {"csi.storage.k8s.io/ephemeral": "true", "csi.storage.k8s.io/pod.name": "pod-a"}


# --- helpers ------------------------------------------------------------------------------


def mount_entry(path: str) -> tuple[str, str, str] | None:
    """(per-mount options, fs type, mountinfo root) of the topmost mount at ``path``."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4].replace("\\040", " ") == path:
                sep = fields.index("-")
                found = (fields[5], fields[sep + 1], fields[3])
    return found


def is_mount_point(path: str) -> bool:
    return mount_entry(path) is not None


def device_size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


class Volumes:
    """Drives the node through the RPCs kubelet would use, and undoes it all at the end."""

    def __init__(self, csi: Csi, workdir: Path) -> None:
        self.csi = csi
        self.workdir = workdir
        self.created: list[str] = []
        self.staged: dict[str, str] = {}
        self.published: list[tuple[str, str]] = []

    def create(self, name: str, size: int = 64 * MiB, block: bool = False) -> str:
        cap = block_cap() if block else mount_cap()
        reply = self.csi.controller.CreateVolume(
            csi_pb2.CreateVolumeRequest(
                name=name,
                capacity_range=csi_pb2.CapacityRange(required_bytes=size),
                volume_capabilities=[cap],
            )
        )
        self.created.append(reply.volume.volume_id)
        return str(reply.volume.volume_id)

    def staging_path(self, vid: str) -> str:
        # kubelet creates the staging directory before NodeStageVolume
        path = self.workdir / "kubelet" / "staging" / vid.partition("@")[0]
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    def target_path(self, name: str) -> str:
        # kubelet creates the parent; the driver creates the target itself
        parent = self.workdir / "kubelet" / "pods" / name
        parent.mkdir(parents=True, exist_ok=True)
        return str(parent / "volume")

    def stage(self, vid: str, cap: csi_pb2.VolumeCapability) -> str:
        staging = self.staged.get(vid) or self.staging_path(vid)
        self.csi.node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=vid, staging_target_path=staging, volume_capability=cap
            )
        )
        self.staged[vid] = staging
        return staging

    def publish(
        self,
        vid: str,
        cap: csi_pb2.VolumeCapability,
        target: str,
        *,
        readonly: bool = False,
        context: dict[str, str] | None = None,
    ) -> str:
        if (vid, target) not in self.published:
            self.published.append((vid, target))
        self.csi.node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id=vid,
                staging_target_path=self.staged.get(vid, ""),
                target_path=target,
                volume_capability=cap,
                readonly=readonly,
                volume_context=context or {},
            )
        )
        return target

    def unpublish(self, vid: str, target: str) -> None:
        self.csi.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target)
        )
        if (vid, target) in self.published:
            self.published.remove((vid, target))

    def unstage(self, vid: str) -> None:
        self.csi.node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=self.staged[vid])
        )
        del self.staged[vid]

    def delete(self, vid: str) -> None:
        self.csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid))
        self.created.remove(vid)

    def expand(self, vid: str, path: str, size: int, cap: csi_pb2.VolumeCapability) -> int:
        reply = self.csi.node.NodeExpandVolume(
            csi_pb2.NodeExpandVolumeRequest(
                volume_id=vid,
                volume_path=path,
                staging_target_path=self.staged.get(vid, ""),
                capacity_range=csi_pb2.CapacityRange(required_bytes=size),
                volume_capability=cap,
            )
        )
        return int(reply.capacity_bytes)

    def stats(self, vid: str, path: str) -> csi_pb2.NodeGetVolumeStatsResponse:
        reply: csi_pb2.NodeGetVolumeStatsResponse = self.csi.node.NodeGetVolumeStats(
            csi_pb2.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=path)
        )
        return reply

    def volume_ids(self) -> set[str]:
        reply = self.csi.controller.ListVolumes(csi_pb2.ListVolumesRequest())
        return {e.volume.volume_id for e in reply.entries}

    def teardown(self) -> list[str]:
        errors = []
        for vid, target in list(reversed(self.published)):
            try:
                self.unpublish(vid, target)
            except grpc.RpcError as exc:
                errors.append(f"unpublish {target}: {exc.code().name} {exc.details()}")
        for vid in list(self.staged):
            try:
                self.unstage(vid)
            except grpc.RpcError as exc:
                errors.append(f"unstage {vid}: {exc.code().name} {exc.details()}")
        for vid in list(self.created):
            try:
                self.delete(vid)
            except grpc.RpcError as exc:
                errors.append(f"delete {vid}: {exc.code().name} {exc.details()}")
        return errors


# --- mount volumes ------------------------------------------------------------------------


def test_mount_volume_stage_publish_write_read_only_unpublish_unstage(vols: Volumes) -> None:
    vid = vols.create("mount-life")
    cap = mount_cap()
    staging = vols.stage(vid, cap)
    assert is_mount_point(staging)
    vols.stage(vid, cap)  # idempotent

    target = vols.publish(vid, cap, vols.target_path("writer"))
    vols.publish(vid, cap, target)  # idempotent
    assert is_mount_point(target)
    Path(target, "hello.txt").write_text("written through the publication")
    assert Path(staging, "hello.txt").read_text() == "written through the publication"

    reader = vols.publish(vid, cap, vols.target_path("reader"), readonly=True)
    assert mount_entry(reader) is not None and "ro" in mount_entry(reader)[0].split(",")  # type: ignore[index]
    assert Path(reader, "hello.txt").read_text() == "written through the publication"
    with pytest.raises(OSError) as exc:
        Path(reader, "nope.txt").write_text("x")
    assert exc.value.errno == errno.EROFS
    assert not Path(target, "nope.txt").exists()

    # the same target with another readonly flag is a different publication
    assert rpc_code(lambda: vols.publish(vid, cap, reader, readonly=False)) == (
        grpc.StatusCode.ALREADY_EXISTS
    )
    # staging again with an incompatible capability
    assert rpc_code(lambda: vols.stage(vid, mount_cap(flags=("noexec",)))) == (
        grpc.StatusCode.ALREADY_EXISTS
    )
    # unstaging while still published is refused and leaves everything in place
    assert rpc_code(lambda: vols.unstage(vid)) == grpc.StatusCode.FAILED_PRECONDITION
    assert is_mount_point(staging) and is_mount_point(target)

    vols.unpublish(vid, reader)
    vols.unpublish(vid, target)
    vols.unpublish(vid, target)  # idempotent
    assert not os.path.lexists(target) and not os.path.lexists(reader)
    vols.unstage(vid)
    assert not is_mount_point(staging)
    assert os.path.isdir(staging)  # the CO's directory stays

    # the data outlives staging
    staging = vols.stage(vid, cap)
    assert Path(staging, "hello.txt").read_text() == "written through the publication"


def test_mount_flags_are_honoured(vols: Volumes) -> None:
    vid = vols.create("flags")
    cap = mount_cap(flags=("noexec", "nosuid"))
    staging = vols.stage(vid, cap)
    target = vols.publish(vid, cap, vols.target_path("flags"))
    for path in (staging, target):
        entry = mount_entry(path)
        assert entry is not None
        assert {"noexec", "nosuid"} <= set(entry[0].split(",")), entry
    script = Path(target, "run.sh")
    script.write_text("#!/bin/sh\necho ran\n")
    script.chmod(0o755)
    with pytest.raises(PermissionError):
        subprocess.run([str(script)], check=True, timeout=10)


def test_single_node_single_writer_allows_one_publication(vols: Volumes) -> None:
    vid = vols.create("sn-sw")
    cap = mount_cap(MODE.SINGLE_NODE_SINGLE_WRITER)
    vols.stage(vid, cap)
    vols.publish(vid, cap, vols.target_path("first"))
    second = vols.target_path("second")
    assert rpc_code(lambda: vols.publish(vid, cap, second)) == grpc.StatusCode.FAILED_PRECONDITION
    assert not os.path.lexists(second)
    # SINGLE_NODE_MULTI_WRITER may be published twice
    vid2 = vols.create("sn-mw")
    cap2 = mount_cap(MODE.SINGLE_NODE_MULTI_WRITER)
    vols.stage(vid2, cap2)
    a = vols.publish(vid2, cap2, vols.target_path("mw-a"))
    b = vols.publish(vid2, cap2, vols.target_path("mw-b"))
    Path(a, "f").write_text("shared")
    assert Path(b, "f").read_text() == "shared"


def test_publish_refuses_a_symlinked_target(vols: Volumes, workdir: Path) -> None:
    vid = vols.create("symlink")
    cap = mount_cap()
    vols.stage(vid, cap)
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir()
    target = vols.target_path("symlinked")
    os.symlink(elsewhere, target)
    assert rpc_code(lambda: vols.publish(vid, cap, target)) == grpc.StatusCode.INVALID_ARGUMENT
    vols.published.clear()
    assert not is_mount_point(str(elsewhere)) and os.path.islink(target)
    os.unlink(target)


# --- block volumes ------------------------------------------------------------------------


def test_block_volume_bytes_round_trip(vols: Volumes, workdir: Path) -> None:
    vid = vols.create("block-life", 32 * MiB, block=True)
    cap = block_cap()
    staging = vols.stage(vid, cap)
    assert not is_mount_point(staging)
    target = vols.publish(vid, cap, vols.target_path("blk"))
    vols.publish(vid, cap, target)  # idempotent
    assert stat.S_ISBLK(os.stat(target).st_mode)
    assert device_size(target) == 32 * MiB
    payload = os.urandom(4096)
    fd = os.open(target, os.O_RDWR)
    try:
        os.pwrite(fd, payload, 5 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    vols.unpublish(vid, target)
    assert not os.path.lexists(target)
    vols.unstage(vid)
    assert loops_under(str(workdir)) == []  # detached

    vols.stage(vid, cap)
    target = vols.publish(vid, cap, vols.target_path("blk-again"))
    fd = os.open(target, os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 5 * MiB) == payload
    finally:
        os.close(fd)


def test_block_read_only_publication_refuses_writes(vols: Volumes) -> None:
    vid = vols.create("block-ro", 16 * MiB, block=True)
    cap = block_cap()
    vols.stage(vid, cap)
    target = vols.publish(vid, cap, vols.target_path("blk-ro"), readonly=True)
    fd = os.open(target, os.O_RDWR)
    try:
        with pytest.raises(OSError) as exc:
            os.pwrite(fd, b"x" * 4096, 0)
        assert exc.value.errno in (errno.EPERM, errno.EROFS, errno.EACCES)
    finally:
        os.close(fd)
    # a writable publication beside a read-only one cannot exist for one device
    assert rpc_code(lambda: vols.publish(vid, cap, vols.target_path("blk-rw"))) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    vols.published.remove((vid, vols.target_path("blk-rw")))
    vols.unpublish(vid, target)
    # once unpublished, the device is writable again
    target = vols.publish(vid, cap, vols.target_path("blk-rw"))
    fd = os.open(target, os.O_RDWR)
    try:
        assert os.pwrite(fd, b"y" * 4096, 0) == 4096
    finally:
        os.close(fd)


# --- expansion ----------------------------------------------------------------------------


def test_expand_block_volume_on_the_node(vols: Volumes) -> None:
    vid = vols.create("grow-block", 16 * MiB, block=True)
    cap = block_cap()
    vols.stage(vid, cap)
    target = vols.publish(vid, cap, vols.target_path("grow-blk"))
    assert device_size(target) == 16 * MiB
    capacity = vols.expand(vid, target, 48 * MiB, cap)
    assert capacity >= 48 * MiB
    assert device_size(target) >= 48 * MiB
    assert vols.expand(vid, target, 48 * MiB, cap) == capacity  # idempotent
    assert vols.expand(vid, target, 8 * MiB, cap) == capacity  # never shrinks


def test_expand_mount_volume_reports_capacity(vols: Volumes) -> None:
    vid = vols.create("grow-mount", 32 * MiB)
    cap = mount_cap()
    vols.stage(vid, cap)
    target = vols.publish(vid, cap, vols.target_path("grow-mnt"))
    Path(target, "keep").write_text("still here")
    capacity = vols.expand(vid, target, 96 * MiB, cap)
    assert capacity >= 96 * MiB
    got = vols.csi.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=vid))
    assert got.volume.capacity_bytes == capacity
    assert Path(target, "keep").read_text() == "still here"
    assert rpc_code(lambda: vols.expand(vid, target, 96 * MiB, block_cap())) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )


# --- stats and condition ------------------------------------------------------------------


def test_stats_of_a_mount_volume_and_condition_after_its_directory_is_removed(
    vols: Volumes, driver: DriverProcess
) -> None:
    vid = vols.create("stats", 64 * MiB)
    cap = mount_cap()
    staging = vols.stage(vid, cap)
    target = vols.publish(vid, cap, vols.target_path("stats"))
    Path(target, "blob").write_bytes(os.urandom(1 * MiB))
    reply = vols.stats(vid, target)
    by_unit = {u.unit: u for u in reply.usage}
    bytes_ = by_unit[csi_pb2.VolumeUsage.BYTES]
    assert bytes_.total > 0 and 0 <= bytes_.used <= bytes_.total
    assert 0 <= bytes_.available <= bytes_.total
    inodes = by_unit[csi_pb2.VolumeUsage.INODES]
    assert inodes.total > 0 and inodes.used >= 1
    assert not reply.volume_condition.abnormal
    assert vols.stats(vid, staging).usage  # the staging path counts too

    # the kubelet directory itself and relative paths are no volume paths at all
    assert rpc_code(lambda: vols.stats(vid, str(driver.workdir))) == grpc.StatusCode.NOT_FOUND
    assert rpc_code(lambda: vols.stats(vid, "relative/path")) == grpc.StatusCode.NOT_FOUND
    assert (
        rpc_code(lambda: vols.stats(vid, str(driver.workdir / "nothing")))
        == grpc.StatusCode.NOT_FOUND
    )

    # remove the hostpath directory behind the volume: the condition turns abnormal
    backing = find_backing_directory(driver.root, staging)
    assert backing is not None, f"no directory under {driver.root} is mounted at {staging}"
    for child in backing.iterdir():
        child.unlink()
    backing.rmdir()
    reply = vols.stats(vid, target)
    assert reply.volume_condition.abnormal, reply
    assert reply.volume_condition.message


def find_backing_directory(root: Path, staging: str) -> Path | None:
    st = os.stat(staging)
    for dirpath, _dirs, _files in os.walk(root):
        s = os.stat(dirpath)
        if (s.st_dev, s.st_ino) == (st.st_dev, st.st_ino):
            return Path(dirpath)
    return None


def test_stats_of_a_block_volume(vols: Volumes) -> None:
    vid = vols.create("stats-block", 24 * MiB, block=True)
    cap = block_cap()
    vols.stage(vid, cap)
    target = vols.publish(vid, cap, vols.target_path("stats-blk"))
    reply = vols.stats(vid, target)
    assert [(u.unit, u.total) for u in reply.usage] == [(csi_pb2.VolumeUsage.BYTES, 24 * MiB)]
    assert not reply.volume_condition.abnormal


# --- ephemeral inline volumes -------------------------------------------------------------


def test_ephemeral_volume_lives_from_publish_to_unpublish(vols: Volumes, workdir: Path) -> None:
    kubelet_id = "csi-8a3f5e0c0ffee0123456789abcdef0123456789abcdef0123456789abcdef01"
    our_id = ids.volume_id_for(kubelet_id, NODE_ID)
    target = vols.target_path("ephemeral")
    cap = mount_cap()
    vols.publish(kubelet_id, cap, target, context={**EPHEMERAL, "size": "32Mi"})
    vols.publish(kubelet_id, cap, target, context={**EPHEMERAL, "size": "32Mi"})  # idempotent
    assert is_mount_point(target)
    assert our_id in vols.volume_ids()
    Path(target, "scratch").write_text("ephemeral data")
    reply = vols.stats(kubelet_id, target)  # kubelet asks under its own id
    assert reply.usage and not reply.volume_condition.abnormal

    vols.unpublish(kubelet_id, target)
    assert not os.path.lexists(target)
    assert our_id not in vols.volume_ids()
    assert mounts_under(str(workdir)) == []
    vols.unpublish(kubelet_id, target)  # idempotent


def test_ephemeral_volume_with_bad_context_creates_nothing(vols: Volumes) -> None:
    target = vols.target_path("ephemeral-bad")
    before = vols.volume_ids()
    contexts: list[dict[str, str]] = [{"size": "huge"}, {"colour": "blue"}]
    for context in contexts:

        def publish(c: dict[str, str] = context) -> None:
            vols.publish("csi-bad", mount_cap(), target, context={**EPHEMERAL, **c})

        assert rpc_code(publish) == grpc.StatusCode.INVALID_ARGUMENT
    vols.published.clear()
    assert vols.volume_ids() == before
    assert not os.path.lexists(target)


# --- restarts -----------------------------------------------------------------------------


def test_driver_restarts_between_stage_publish_and_unpublish(
    vols: Volumes, driver: DriverProcess
) -> None:
    mount_vid = vols.create("restart-mount")
    block_vid = vols.create("restart-block", 16 * MiB, block=True)
    mcap, bcap = mount_cap(), block_cap()
    staging = vols.stage(mount_vid, mcap)
    vols.stage(block_vid, bcap)

    driver.restart()
    vols.stage(mount_vid, mcap)  # still staged: idempotent, not ALREADY_EXISTS
    target = vols.publish(mount_vid, mcap, vols.target_path("restart-m"))
    btarget = vols.publish(block_vid, bcap, vols.target_path("restart-b"))
    Path(target, "before-restart").write_text("kept")
    fd = os.open(btarget, os.O_RDWR)
    try:
        os.pwrite(fd, b"z" * 512, 0)
    finally:
        os.close(fd)

    driver.restart()
    vols.publish(mount_vid, mcap, target)  # still published: idempotent
    assert Path(target, "before-restart").read_text() == "kept"
    assert vols.stats(mount_vid, target).usage
    vols.unpublish(mount_vid, target)
    vols.unpublish(block_vid, btarget)
    vols.unstage(mount_vid)
    vols.unstage(block_vid)
    assert not is_mount_point(staging)

    staging = vols.stage(mount_vid, mcap)
    assert Path(staging, "before-restart").read_text() == "kept"


def test_ephemeral_volume_survives_a_restart(vols: Volumes, driver: DriverProcess) -> None:
    kubelet_id = "csi-restart-0123456789abcdef"
    target = vols.target_path("ephemeral-restart")
    vols.publish(kubelet_id, mount_cap(), target, context=dict(EPHEMERAL))
    Path(target, "x").write_text("y")
    driver.restart()
    assert Path(target, "x").read_text() == "y"
    vols.unpublish(kubelet_id, target)
    assert ids.volume_id_for(kubelet_id, NODE_ID) not in vols.volume_ids()
    assert mounts_under(str(driver.workdir)) == []


# --- the system layer on real devices -----------------------------------------------------


@pytest.fixture
def loop_device(workdir: Path) -> Iterator[tuple[str, Path]]:
    """A loop device over a sparse 320 MiB file (xfs needs 300 MiB); detached afterwards."""
    backing = workdir / "disk.img"
    with open(backing, "wb") as f:
        f.truncate(320 * MiB)
    device = subprocess.run(
        ["losetup", "--find", "--show", str(backing)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()
    try:
        yield device, backing
    finally:
        for mountpoint in sorted(mounts_under(str(workdir)), key=len, reverse=True):
            subprocess.run(["umount", mountpoint], check=False, timeout=60)
        subprocess.run(["blockdev", "--setrw", device], check=False, timeout=30)
        subprocess.run(["losetup", "--detach", device], check=False, timeout=30)


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_format_mount_bind_grow_on_a_real_device(
    loop_device: tuple[str, Path], workdir: Path, fstype: str
) -> None:
    device, backing = loop_device
    runner = SubprocessRunner()
    fs, mounter = Filesystems(runner), Mounter()
    assert fs.probe(device) is None
    fs.format(device, fstype)
    sig = fs.probe(device)
    assert sig is not None and sig.type == fstype and sig.is_filesystem
    with pytest.raises(FilesystemError, match="refusing to format"):
        fs.format(device, "ext4")

    jail = Jail(str(workdir))
    mnt = str(workdir / "mnt")
    ro = str(workdir / "ro")

    def mount_fs() -> None:
        with jail.resolve(mnt) as where:
            where.make_dir(0o750)
            mounter.mount(device, where, fstype, ["noatime"])

    def bind(src: str, dst: str, flags: list[str]) -> None:
        with jail.resolve(dst) as where:
            where.make_dir(0o750)
            mounter.bind(src, where, flags)

    def unmount(path: str) -> bool:
        with jail.resolve(path) as where:
            done = mounter.unmount(where, lambda m: True)
            os.rmdir(path)
            return done

    mount_fs()
    entry = mounter.mount_at(mnt)
    assert entry is not None and entry.fs_type == fstype and "noatime" in entry.options
    bind(mnt, ro, ["ro", "nodev"])
    entry = mounter.mount_at(ro)
    assert entry is not None and entry.read_only and "nodev" in entry.options
    assert entry.key == mounter.mount_at(mnt).key  # type: ignore[union-attr]
    Path(mnt, "data").write_text("survives growth")
    with pytest.raises(OSError) as exc:
        Path(ro, "nope").write_text("x")
    assert exc.value.errno == errno.EROFS
    before = fs.usage(mnt).total_bytes

    with open(backing, "r+b") as f:
        f.truncate(640 * MiB)
    runner.run(["losetup", "--set-capacity", device])
    assert fs.block_device_size(device) == 640 * MiB
    if fstype == "xfs":
        # xfs grows only while mounted, here through a writable bind mount of it
        rw = str(workdir / "rw")
        bind(mnt, rw, [])
        fs.resize(device, rw, fstype)
        fs.resize(device, rw, fstype)  # again: a no-op
        assert unmount(rw)
    else:
        # Online ext4 growth needs CAP_SYS_RESOURCE, which this host's root lacks (EPERM);
        # resize2fs on the unmounted device exercises the same command.
        assert unmount(ro) and unmount(mnt)
        runner.run(["e2fsck", "-f", "-p", device], timeout=120)
        fs.resize(device, mnt, fstype)
        fs.resize(device, mnt, fstype)  # again: a no-op
        mount_fs()
        bind(mnt, ro, ["ro"])
    after = fs.usage(mnt).total_bytes
    assert after > before + 250 * MiB
    assert Path(ro, "data").read_text() == "survives growth"

    assert unmount(ro) is True
    assert unmount(mnt) is True
    assert not os.path.exists(mnt) and not os.path.exists(ro)


def test_device_read_only_flag_and_file_target(
    loop_device: tuple[str, Path], workdir: Path
) -> None:
    device, _ = loop_device
    runner = SubprocessRunner()
    fs, mounter = Filesystems(runner), Mounter()
    jail = Jail(str(workdir))
    target = str(workdir / "pub" / "dev")
    with jail.resolve(target, create_parents=True) as where:
        where.make_file(0o640)
        mounter.bind(device, where, [])
    assert stat.S_ISBLK(os.stat(target).st_mode)
    assert mounter.key_of(os.path.realpath(device)) == mounter.mount_at(target).key  # type: ignore[union-attr]
    fs.set_read_only(device, True)
    assert fs.is_read_only(device)
    assert read_only_flag(device)  # the kernel's flag, as util-linux reads it
    fd = os.open(target, os.O_WRONLY)
    try:
        with pytest.raises(OSError):
            os.write(fd, b"\0" * 512)
    finally:
        os.close(fd)
    fs.set_read_only(device, False)
    assert not fs.is_read_only(device)
    assert not read_only_flag(device)
    with jail.resolve(target) as where:
        assert mounter.unmount(where, lambda m: True)
    os.unlink(target)
