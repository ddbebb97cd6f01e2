"""The lvm backend on a real kernel: the driver process over gRPC, real lvm2, real mounts.

Runs only inside the real-kernel VM lane (scripts/test-vm.sh sets CSI_VM_LANE=1 and the
CSI_TEST_* variables: a volume group on two disks with a thin pool). The driver gets two device
classes: ``thin`` (default, the lane's thin pool) and ``thick`` (the same VG, thick LVs).

Every test checks what lvm2 itself says (``lvs``) and what a reader of the device or the
mounted filesystem sees, not only the driver's answers. Each test removes what it made; an LV
of the driver's left in the VG afterwards fails the test (a leak).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_driver.backends.lvm.tags import OWNER
from csi_driver.proto import csi_pb2
from testkit.driver_process import (
    Csi,
    DriverProcess,
    clean_up_host,
    csi_stubs,
    mounts_under,
)
from testkit.ports import free_port
from tests.requests import rpc_code

if os.environ.get("CSI_VM_LANE") != "1":
    pytest.skip("runs inside the real-kernel VM: scripts/test-vm.sh", allow_module_level=True)

pytestmark = pytest.mark.vm

VG = os.environ["CSI_TEST_VG"]
THINPOOL = os.environ["CSI_TEST_THINPOOL"]
UDEV = os.environ.get("CSI_TEST_LVM_UDEV", "1") == "1"
NODE = "vm-node"
MiB = 1 << 20
MODE = csi_pb2.VolumeCapability.AccessMode
LVM_PROGRAMS = ("lvm", "lvs", "vgs", "pvs", "lvcreate", "lvremove", "lvextend", "lvchange")


def sh(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr}"
    return proc.stdout


def lvs(*fields: str) -> dict[str, dict[str, str]]:
    out = sh(
        "lvs",
        "--reportformat",
        "json",
        "--units",
        "b",
        "--nosuffix",
        "-o",
        ",".join(("lv_name", "lv_tags", *fields)),
        VG,
    )
    return {lv["lv_name"]: lv for lv in json.loads(out)["report"][0]["lv"]}


def driver_lvs() -> list[str]:
    return sorted(n for n, lv in lvs().items() if OWNER in lv["lv_tags"].split(","))


def segtype(lv: str) -> tuple[str, int]:
    out = sh("lvs", "--reportformat", "json", "-o", "segtype,stripes", f"{VG}/{lv}")
    seg = json.loads(out)["report"][0]["lv"][0]
    return seg["segtype"], int(seg["stripes"])


@dataclass
class LvmDriver(DriverProcess):
    classes: Path = Path()

    def backend_args(self) -> list[str]:
        udev = "true" if UDEV else "false"
        return ["--backend", "lvm", "--lvm-config", str(self.classes), "--lvm-udev-sync", udev]

    def lvm_calls(self) -> int:
        """lvm2 commands run so far, from the driver's own /metrics."""
        counts = self.command_counts()
        return int(sum(n for (program, _), n in counts.items() if program in LVM_PROGRAMS))


@pytest.fixture
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Each test's own directory for staging and target paths; afterwards, a mount or an LV of
    the driver's that the test left behind fails it (and is removed)."""
    path = Path(os.path.realpath(tmp_path_factory.mktemp("lvm")))
    before = set(driver_lvs())
    yield path
    leaks = clean_up_host(str(path))
    leaked = sorted(set(driver_lvs()) - before)
    for name in leaked:
        subprocess.run(
            ["lvremove", "-f", "-y", f"{VG}/{name}"], capture_output=True, timeout=120, check=False
        )
    assert not leaks, f"mounts or loops left behind: {leaks}"
    assert not leaked, f"logical volumes left behind: {leaked}"


def device_classes(directory: Path) -> Path:
    """The lane's two device classes (thin, the default, and thick) in a file for
    ``--lvm-config``."""
    classes = directory / "classes.json"
    classes.write_text(
        json.dumps(
            {
                "deviceClasses": [
                    {"name": "thin", "volumeGroup": VG, "thinPool": THINPOOL, "default": True},
                    {"name": "thick", "volumeGroup": VG},
                ]
            }
        )
    )
    return classes


@contextlib.contextmanager
def running(d: LvmDriver) -> Iterator[LvmDriver]:
    """The driver started, stopped at the end, and failing the test unless it exited 0."""
    try:
        d.start()
        yield d
    finally:
        d.stop()
    assert all(code == 0 for code in d.exits), d.log_tail()


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LvmDriver]:
    """One driver for the module (starting Python in the emulated VM takes ~10 s); tests that
    restart or kill it leave it running again."""
    workdir = Path(os.path.realpath(tmp_path_factory.mktemp("lvm-driver")))
    # staging and target paths live in each test's own directory beside this one
    kubelet_dir = os.path.realpath(tmp_path_factory.getbasetemp())
    d = LvmDriver(
        workdir,
        node_id=NODE,
        classes=device_classes(workdir),
        metrics_port=free_port(),
        extra_args=["--kubelet-dir", kubelet_dir],
    )
    with running(d):
        yield d


@pytest.fixture(scope="module")
def csi(driver: LvmDriver) -> Iterator[Csi]:
    with csi_stubs(driver.target) as stubs:
        yield stubs


def cap(fs: str = "ext4", block: bool = False) -> csi_pb2.VolumeCapability:
    mode = MODE(mode=MODE.SINGLE_NODE_WRITER)
    if block:
        return csi_pb2.VolumeCapability(
            access_mode=mode, block=csi_pb2.VolumeCapability.BlockVolume()
        )
    return csi_pb2.VolumeCapability(
        access_mode=mode, mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs)
    )


@dataclass
class Node:
    """Drives the volumes through the RPCs the CO would use; undoes everything at the end."""

    csi: Csi
    workdir: Path
    volumes: list[str] = field(default_factory=list)
    snapshots: list[str] = field(default_factory=list)
    staged: dict[str, str] = field(default_factory=dict)
    published: dict[str, str] = field(default_factory=dict)
    caps: dict[str, csi_pb2.VolumeCapability] = field(default_factory=dict)

    def create(
        self,
        name: str,
        size: int,
        *,
        fs: str = "ext4",
        block: bool = False,
        params: dict[str, str] | None = None,
        source: csi_pb2.VolumeContentSource | None = None,
    ) -> csi_pb2.Volume:
        c = cap(fs, block)
        request = csi_pb2.CreateVolumeRequest(
            name=name,
            capacity_range=csi_pb2.CapacityRange(required_bytes=size),
            volume_capabilities=[c],
            parameters=params or {},
        )
        if source is not None:
            request.volume_content_source.CopyFrom(source)
        volume: csi_pb2.Volume = self.csi.controller.CreateVolume(request).volume
        if volume.volume_id not in self.volumes:
            self.volumes.append(volume.volume_id)
        self.caps[volume.volume_id] = c
        return volume

    def snapshot(self, name: str, volume_id: str) -> csi_pb2.Snapshot:
        snap: csi_pb2.Snapshot = self.csi.controller.CreateSnapshot(
            csi_pb2.CreateSnapshotRequest(name=name, source_volume_id=volume_id)
        ).snapshot
        self.snapshots.append(snap.snapshot_id)
        return snap

    def stage(self, vid: str) -> str:
        path = self.workdir / "staging" / vid.partition("@")[0]
        path.mkdir(parents=True, exist_ok=True)
        self.csi.node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=vid, staging_target_path=str(path), volume_capability=self.caps[vid]
            )
        )
        self.staged[vid] = str(path)
        return str(path)

    def publish(self, vid: str, pod: str) -> str:
        parent = self.workdir / "pods" / pod
        parent.mkdir(parents=True, exist_ok=True)
        target = str(parent / "vol")
        self.csi.node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id=vid,
                staging_target_path=self.staged[vid],
                target_path=target,
                volume_capability=self.caps[vid],
            )
        )
        self.published[target] = vid
        return target

    def use(self, vid: str, pod: str) -> str:
        self.stage(vid)
        return self.publish(vid, pod)

    def release(self, vid: str) -> None:
        for target, v in list(self.published.items()):
            if v == vid:
                self.csi.node.NodeUnpublishVolume(
                    csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target)
                )
                del self.published[target]
        if vid in self.staged:
            self.csi.node.NodeUnstageVolume(
                csi_pb2.NodeUnstageVolumeRequest(
                    volume_id=vid, staging_target_path=self.staged.pop(vid)
                )
            )

    def delete(self, vid: str) -> None:
        self.release(vid)
        self.csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid))
        self.volumes.remove(vid)

    def cleanup(self) -> None:
        for vid in list(self.volumes):
            self.delete(vid)
        for sid in self.snapshots:
            self.csi.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=sid))


@pytest.fixture
def node(csi: Csi, workdir: Path) -> Iterator[Node]:
    n = Node(csi, workdir)
    try:
        yield n
    finally:
        n.cleanup()
    assert not mounts_under(str(workdir))


def lv_of(vid: str) -> str:
    return vid.partition("@")[0]


def write_random(path: Path, size: int, seed: str) -> str:
    data = hashlib.shake_256(seed.encode()).digest(size)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def digest(path: Path | str, length: int | None = None) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read() if length is None else f.read(length)).hexdigest()


# --- volume types --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "segment", "stripes"),
    [
        ({"deviceClass": "thick", "lvType": "linear"}, "linear", 1),
        (
            {"deviceClass": "thick", "lvType": "striped", "stripes": "2", "stripeSize": "64Ki"},
            "striped",
            2,
        ),
        ({"deviceClass": "thick", "lvType": "raid1", "mirrors": "1"}, "raid1", 2),
        ({}, "thin", 0),
    ],
    ids=["linear", "striped", "raid1", "thin"],
)
def test_each_lv_type_is_really_made_mounted_and_removed(
    node: Node, driver: LvmDriver, params: dict[str, str], segment: str, stripes: int
) -> None:
    before = driver.lvm_calls()
    volume = node.create(f"type-{segment}", 40 * MiB, params=params)
    create_calls = driver.lvm_calls() - before
    lv = lv_of(volume.volume_id)
    assert segtype(lv) == (segment, stripes)
    size = int(lvs("lv_size")[lv]["lv_size"])
    assert size == volume.capacity_bytes >= 40 * MiB
    assert volume.accessible_topology[0].segments["topology.nodelocal.csi.dev/node"] == NODE
    target = Path(node.use(volume.volume_id, "pod-a"))
    expected = write_random(target / "data", 4 * MiB, segment)
    node.release(volume.volume_id)
    target = Path(node.use(volume.volume_id, "pod-b"))
    assert digest(target / "data") == expected
    node.release(volume.volume_id)
    before = driver.lvm_calls()
    node.delete(volume.volume_id)
    delete_calls = driver.lvm_calls() - before
    assert lv not in lvs()
    # one report of the VGs (the controller's lookup and the backend share it: callmemo) and
    # one lvcreate; a report and lvremove
    print(f"lvm2 calls: CreateVolume {create_calls}, DeleteVolume {delete_calls} ({segment})")
    assert create_calls <= 2
    assert delete_calls <= 2


def test_thick_volume_cannot_be_snapshotted(node: Node, csi: Csi) -> None:
    volume = node.create("thick-snap", 16 * MiB, block=True, params={"deviceClass": "thick"})
    with pytest.raises(grpc.RpcError) as exc:
        node.snapshot("thick-snap-1", volume.volume_id)
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "thin" in (exc.value.details() or "")
    assert not [n for n in driver_lvs() if n.startswith("s")]


# --- snapshots and clones ----------------------------------------------------------------


def test_snapshot_restore_and_clone_keep_the_bytes(node: Node, csi: Csi) -> None:
    origin = node.create("snap-origin", 64 * MiB)
    target = Path(node.use(origin.volume_id, "writer"))
    before = write_random(target / "data", 16 * MiB, "before")
    snap = node.snapshot("snap-1", origin.volume_id)
    assert snap.ready_to_use and snap.size_bytes == origin.capacity_bytes
    assert snap.source_volume_id == origin.volume_id
    lv = lvs("lv_attr", "origin", "lv_size")[lv_of(snap.snapshot_id)]
    assert lv["origin"] == lv_of(origin.volume_id)
    assert lv["lv_attr"][0] == "V"  # a thin volume, no space reserved
    after = write_random(target / "data", 16 * MiB, "after")
    assert after != before

    source = csi_pb2.VolumeContentSource(
        snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id)
    )
    restored = node.create("snap-restored", 96 * MiB, source=source)  # bigger than its source
    assert restored.capacity_bytes == int(lvs("lv_size")[lv_of(restored.volume_id)]["lv_size"])
    assert restored.capacity_bytes >= 96 * MiB
    assert restored.content_source.snapshot.snapshot_id == snap.snapshot_id
    seen = Path(node.use(restored.volume_id, "reader"))
    assert digest(seen / "data") == before

    clone_source = csi_pb2.VolumeContentSource(
        volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=origin.volume_id)
    )
    clone = node.create("snap-clone", 64 * MiB, source=clone_source)
    seen = Path(node.use(clone.volume_id, "clone-reader"))
    assert digest(seen / "data") == after
    # the copies are independent: writing one changes neither the origin nor the snapshot
    write_random(seen / "data", 1 * MiB, "clone-only")
    assert digest(target / "data") == after

    # the origin can go while its snapshot stays, and the snapshot still restores
    node.delete(origin.volume_id)
    again = node.create("snap-restored-2", 64 * MiB, source=source)
    assert digest(Path(node.use(again.volume_id, "reader-2")) / "data") == before


def test_block_snapshot_restores_the_device_bytes(node: Node) -> None:
    volume = node.create("blk-origin", 32 * MiB, block=True)
    device = node.use(volume.volume_id, "blk-writer")
    data = hashlib.shake_256(b"block").digest(8 * MiB)
    fd = os.open(device, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 3 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    snap = node.snapshot("blk-snap", volume.volume_id)
    restored = node.create(
        "blk-restored",
        32 * MiB,
        block=True,
        source=csi_pb2.VolumeContentSource(
            snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id)
        ),
    )
    seen = node.use(restored.volume_id, "blk-reader")
    with open(seen, "rb") as f:
        f.seek(3 * MiB)
        assert f.read(8 * MiB) == data
        f.seek(0)
        assert f.read(3 * MiB) == bytes(3 * MiB)  # a new thin volume reads zeros elsewhere


# --- expansion -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fs", "size", "grown"), [("ext4", 64 * MiB, 160 * MiB), ("xfs", 320 * MiB, 480 * MiB)]
)
def test_online_expansion_grows_the_mounted_filesystem(
    node: Node, csi: Csi, driver: LvmDriver, fs: str, size: int, grown: int
) -> None:
    volume = node.create(f"grow-{fs}", size, fs=fs)
    target = Path(node.use(volume.volume_id, "pod"))
    expected = write_random(target / "data", 8 * MiB, fs)
    total_before = os.statvfs(target).f_blocks * os.statvfs(target).f_frsize
    before = driver.lvm_calls()
    reply = csi.controller.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=volume.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=grown)
        )
    )
    expand_calls = driver.lvm_calls() - before
    assert reply.capacity_bytes >= grown and reply.node_expansion_required
    assert int(lvs("lv_size")[lv_of(volume.volume_id)]["lv_size"]) == reply.capacity_bytes
    node_reply = csi.node.NodeExpandVolume(
        csi_pb2.NodeExpandVolumeRequest(
            volume_id=volume.volume_id,
            volume_path=str(target),
            staging_target_path=node.staged[volume.volume_id],
            capacity_range=csi_pb2.CapacityRange(required_bytes=grown),
        )
    )
    assert node_reply.capacity_bytes >= grown
    st = os.statvfs(target)
    total_after = st.f_blocks * st.f_frsize
    # the filesystem the pod sees grew by (nearly) what the LV grew, while mounted
    assert total_after - total_before >= (reply.capacity_bytes - size) * 0.9
    assert digest(target / "data") == expected
    print(f"lvm2 calls: ControllerExpandVolume {expand_calls} ({fs})")
    assert expand_calls <= 2  # one report, shared by the lookup and the backend; lvextend


# --- block volumes -------------------------------------------------------------------------


def test_block_volume_is_written_and_read_back(node: Node) -> None:
    volume = node.create("blk-rw", 24 * MiB, block=True, params={"deviceClass": "thick"})
    device = node.use(volume.volume_id, "blk-pod")
    assert Path(device).is_block_device()
    with open(device, "rb") as f:
        f.seek(0, os.SEEK_END)
        assert f.tell() == volume.capacity_bytes
    data = hashlib.shake_256(b"rw").digest(5 * MiB)
    with open(device, "r+b") as f:
        f.seek(volume.capacity_bytes - len(data))
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    node.release(volume.volume_id)
    device = node.use(volume.volume_id, "blk-pod-2")
    with open(device, "rb") as f:
        f.seek(volume.capacity_bytes - len(data))
        assert f.read() == data


def test_stage_never_reformats_a_volume_holding_another_filesystem(node: Node, csi: Csi) -> None:
    volume = node.create("fs-xfs", 320 * MiB, fs="xfs")
    target = Path(node.use(volume.volume_id, "xfs-pod"))
    expected = write_random(target / "keep", 1 * MiB, "keep")
    node.release(volume.volume_id)
    node.caps[volume.volume_id] = cap("ext4")
    staging = node.workdir / "staging-wrong"
    staging.mkdir()
    code = rpc_code(
        lambda: csi.node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=volume.volume_id,
                staging_target_path=str(staging),
                volume_capability=cap("ext4"),
            )
        )
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    node.caps[volume.volume_id] = cap("xfs")
    assert digest(Path(node.use(volume.volume_id, "xfs-pod-2")) / "keep") == expected


# --- idempotency, capacity, restart ---------------------------------------------------------


def test_create_and_delete_are_idempotent(node: Node, csi: Csi) -> None:
    first = node.create("idem", 32 * MiB)
    again = node.create("idem", 32 * MiB)
    assert again.volume_id == first.volume_id and again.capacity_bytes == first.capacity_bytes
    assert rpc_code(lambda: node.create("idem", 128 * MiB)) == grpc.StatusCode.ALREADY_EXISTS
    assert (
        rpc_code(lambda: node.create("idem", 32 * MiB, block=True))
        == grpc.StatusCode.ALREADY_EXISTS
    )
    assert [n for n in driver_lvs() if n == lv_of(first.volume_id)]
    node.delete(first.volume_id)
    csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=first.volume_id))
    assert lv_of(first.volume_id) not in lvs()


def test_capacity_follows_the_pool_and_refuses_too_much(node: Node, csi: Csi) -> None:
    def capacity(params: dict[str, str]) -> int:
        return int(
            csi.controller.GetCapacity(
                csi_pb2.GetCapacityRequest(parameters=params)
            ).available_capacity
        )

    thin_before = capacity({})
    thick_before = capacity({"deviceClass": "thick"})
    assert 0 < thin_before <= 1536 * MiB
    assert thick_before > 0
    node.create("cap-thin", 256 * MiB)
    assert capacity({}) == thin_before - 256 * MiB  # thin: promised, not written
    assert capacity({"deviceClass": "thick"}) == thick_before
    too_big = thin_before  # what is left is now less than this
    assert rpc_code(lambda: node.create("cap-huge", too_big)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not [n for n, lv in lvs().items() if "nlc.name=cap-huge" in lv["lv_tags"]]
    assert rpc_code(lambda: capacity({"deviceClass": "nope"})) == grpc.StatusCode.INVALID_ARGUMENT


def test_restart_loses_nothing(node: Node, csi: Csi, driver: LvmDriver) -> None:
    volume = node.create("restart-vol", 32 * MiB)
    target = Path(node.use(volume.volume_id, "pod"))
    expected = write_random(target / "data", 2 * MiB, "restart")
    snap = node.snapshot("restart-snap", volume.volume_id)
    driver.restart()
    listed = csi.controller.ListVolumes(csi_pb2.ListVolumesRequest())
    ids = {e.volume.volume_id: e.volume for e in listed.entries}
    assert ids[volume.volume_id].capacity_bytes == volume.capacity_bytes
    snaps = csi.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(snapshot_id=snap.snapshot_id))
    assert [s.snapshot.source_volume_id for s in snaps.entries] == [volume.volume_id]
    assert digest(target / "data") == expected
    stats = csi.node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume.volume_id, volume_path=str(target))
    )
    assert not stats.volume_condition.abnormal


def test_deactivated_volume_is_reported_abnormal(node: Node, csi: Csi) -> None:
    volume = node.create("cond", 16 * MiB, block=True)
    lv = lv_of(volume.volume_id)
    sh("lvchange", "-an", *([] if UDEV else ["--noudevsync"]), f"{VG}/{lv}")
    reply = csi.controller.ControllerGetVolume(
        csi_pb2.ControllerGetVolumeRequest(volume_id=volume.volume_id)
    )
    assert reply.status.volume_condition.abnormal
    assert "is inactive" in reply.status.volume_condition.message
    # staging activates it again
    node.use(volume.volume_id, "cond-pod")
    reply = csi.controller.ControllerGetVolume(
        csi_pb2.ControllerGetVolumeRequest(volume_id=volume.volume_id)
    )
    assert not reply.status.volume_condition.abnormal


def test_wipe_on_delete_discards_the_data(node: Node) -> None:
    volume = node.create(
        "wipe", 16 * MiB, block=True, params={"deviceClass": "thick", "wipeOnDelete": "true"}
    )
    device = node.use(volume.volume_id, "wipe-pod")
    marker = b"SECRET-" * 1000
    with open(device, "r+b") as f:
        f.write(marker)
        f.flush()
        os.fsync(f.fileno())
    segments = sh("lvs", "--noheadings", "-o", "seg_pe_ranges", f"{VG}/{lv_of(volume.volume_id)}")
    pv, _, extents = segments.split()[0].partition(":")
    first_extent = int(extents.split("-")[0])
    pe_start = int(
        sh("pvs", "--noheadings", "--units", "b", "--nosuffix", "-o", "pe_start", pv).strip()
    )
    extent = int(
        sh("vgs", "--noheadings", "--units", "b", "--nosuffix", "-o", "vg_extent_size", VG).strip()
    )
    offset = pe_start + first_extent * extent
    node.delete(volume.volume_id)
    with open(pv, "rb") as f:
        f.seek(offset)
        assert f.read(len(marker)) == bytes(len(marker))


def _each(calls: list[Callable[[], Any]]) -> list[BaseException | None]:
    """Run the calls concurrently; the exception each raised, or None."""
    import threading

    results: list[BaseException | None] = [None] * len(calls)

    def one(i: int) -> None:
        try:
            calls[i]()
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results


def test_kill_during_creates_and_deletes_loses_and_leaks_nothing(
    csi: Csi, driver: LvmDriver, workdir: Path
) -> None:
    """SIGKILL the driver while CreateVolume and DeleteVolume calls are in flight; after a
    restart the CO's retries must land on exactly the volumes asked for, and then on none."""
    import random
    import time

    rng = random.Random(7)
    names = [f"kill-{i}" for i in range(6)]
    params = [{} if i % 2 else {"deviceClass": "thick"} for i in range(len(names))]

    def create(i: int) -> csi_pb2.Volume:
        reply = csi.controller.CreateVolume(
            csi_pb2.CreateVolumeRequest(
                name=names[i],
                capacity_range=csi_pb2.CapacityRange(required_bytes=8 * MiB),
                volume_capabilities=[cap(block=True)],
                parameters=params[i],
            ),
            timeout=120,
        )
        volume: csi_pb2.Volume = reply.volume
        return volume

    def delete(vid: str) -> None:
        csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid), timeout=120)

    def kill_soon() -> None:
        time.sleep(rng.uniform(0.3, 2.0))
        assert driver.process is not None
        driver.process.kill()
        driver.process.wait(timeout=30)

    for round_ in range(2):
        _each([*(lambda i=i: create(i) for i in range(len(names))), kill_soon])
        driver.start()
        volumes = [create(i) for i in range(len(names))]  # the CO's retries
        ours = driver_lvs()
        assert sorted(lv_of(v.volume_id) for v in volumes) == sorted(
            n for n in ours if n.startswith("v")
        ), f"round {round_}: volumes asked for and LVs present differ"
        for v in volumes:
            assert int(lvs("lv_size")[lv_of(v.volume_id)]["lv_size"]) == v.capacity_bytes
        _each([*(lambda v=v: delete(v.volume_id) for v in volumes), kill_soon])
        driver.start()
        for v in volumes:
            delete(v.volume_id)
        assert not [n for n in driver_lvs() if n.startswith("v")], f"round {round_}: leaked"
