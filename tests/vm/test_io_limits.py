"""IO limits enforced by a real kernel: cgroup v2 ``io.max`` on an LV, through the driver
process over gRPC (lvm backend, thin LVs of the lane's volume group).

A cgroup shaped like a kubelet's Pod cgroup (systemd driver, BestEffort) stands in for the
Pod; a direct-IO writer runs in a child cgroup of it, as a container would. The test measures
the writer's throughput under the limit set at NodePublishVolume, then again after
ControllerModifyVolume changed it (same publication, no republish), and checks that
unpublishing removes the volume's line and only that one. A kill between the publication and
the writing of the line, and one between the unmount and the removal of the line, are each
finished by the kubelet's retry.

Runs only inside the real-kernel VM lane (scripts/test-vm.sh); about 12 s of writes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from csi_driver.failpoints import ENV as FAILPOINTS
from csi_driver.proto import csi_pb2
from testkit.driver_process import Csi, clean_up_host, csi_stubs, mounts_under
from tests.requests import block_cap, mount_cap

if os.environ.get("CSI_VM_LANE") != "1":
    pytest.skip("runs inside the real-kernel VM: scripts/test-vm.sh", allow_module_level=True)

from tests.vm.test_lvm_backend import LvmDriver, MiB, device_classes, running

pytestmark = pytest.mark.vm

CGROUP = Path("/sys/fs/cgroup")
SECONDS = 6.0
TOLERANCE = 0.20

#: writes 64 KiB blocks with O_DIRECT for a while, from inside the cgroup it is told to join
WRITER = r"""
import mmap, os, sys, time
procs, device, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
with open(procs, "w") as f:
    f.write(str(os.getpid()))
fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
size = os.lseek(fd, 0, os.SEEK_END)
block = mmap.mmap(-1, 1 << 16)
block.write(b"\xa5" * (1 << 16))
written = offset = 0
start = time.monotonic()
while time.monotonic() - start < seconds:
    if offset + len(block) > size:
        offset = 0
    written += os.pwrite(fd, block, offset)
    offset += len(block)
print(written, time.monotonic() - start)
"""


@dataclass
class Pod:
    uid: str
    cgroup: Path
    writer: Path

    def io_max(self) -> str:
        return (self.cgroup / "io.max").read_text()


def _enable_io(cgroup: Path) -> None:
    (cgroup / "cgroup.subtree_control").write_text("+io")


@pytest.fixture
def pod() -> Iterator[Pod]:
    """A kubelet-shaped Pod cgroup with the io controller, and a child cgroup for the writer;
    the directories made here are removed again (the writer has exited by then)."""
    controllers = (CGROUP / "cgroup.controllers").read_text().split()
    assert "io" in controllers, f"the VM kernel has no cgroup v2 io controller: {controllers}"
    uid = str(uuid.uuid4())
    qos = CGROUP / "kubepods.slice" / "kubepods-besteffort.slice"
    cgroup = qos / f"kubepods-besteffort-pod{uid.replace('-', '_')}.slice"
    made: list[Path] = []
    try:
        _enable_io(CGROUP)
        for path in (qos.parent, qos, cgroup, cgroup / "writer"):
            if not path.exists():
                path.mkdir()
                made.append(path)
            if path != cgroup / "writer":
                _enable_io(path)
        yield Pod(uid, cgroup, cgroup / "writer")
    finally:
        for path in reversed(made):
            with contextlib.suppress(OSError):
                path.rmdir()


@pytest.fixture
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = Path(os.path.realpath(tmp_path_factory.mktemp("io-limits")))
    yield path
    leaks = clean_up_host(str(path))
    assert not leaks, f"mounts or loops left behind: {leaks}"


@pytest.fixture
def armed_driver(workdir: Path) -> Iterator[LvmDriver]:
    """The driver, armed to be killed at its first publication with IO limits (each start in
    the emulated guest takes seconds: the test arms the next failpoint at each restart)."""
    driver = LvmDriver(
        workdir / "driver",
        node_id="vm-io-node",
        classes=device_classes(workdir),
        extra_args=["--kubelet-dir", str(workdir)],
        env={FAILPOINTS: "publish.mounted"},
    )
    driver.workdir.mkdir()
    with running(driver):
        yield driver


@pytest.fixture
def csi(armed_driver: LvmDriver) -> Iterator[Csi]:
    with csi_stubs(armed_driver.target) as stubs:
        yield stubs


def write_rate(pod: Pod, device: str) -> float:
    """Bytes per second a direct-IO writer in the Pod reaches on ``device``."""
    proc = subprocess.run(
        [sys.executable, "-c", WRITER, str(pod.writer / "cgroup.procs"), device, str(SECONDS)],
        capture_output=True,
        text=True,
        timeout=SECONDS * 10 + 60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    written, elapsed = proc.stdout.split()
    return int(written) / float(elapsed)


def device_of(path: str) -> str:
    st = os.stat(path)
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def line_of(io_max: str, device: str) -> str | None:
    return next((line for line in io_max.splitlines() if line.split()[0] == device), None)


def within(rate: float, limit: int) -> bool:
    return abs(rate - limit) <= TOLERANCE * limit


def test_a_write_limit_holds_follows_a_modification_and_goes_at_unpublish(
    csi: Csi, armed_driver: LvmDriver, pod: Pod, workdir: Path
) -> None:
    driver = armed_driver
    context = {"csi.storage.k8s.io/pod.uid": pod.uid}
    plugins = workdir / "plugins" / "kubernetes.io" / "csi"
    made: list[str] = []
    published: list[tuple[str, str]] = []
    staged: list[tuple[str, str]] = []

    def create(name: str, cap: csi_pb2.VolumeCapability, limit: str) -> str:
        volume = csi.controller.CreateVolume(
            csi_pb2.CreateVolumeRequest(
                name=name,
                capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB),
                volume_capabilities=[cap],
                mutable_parameters={"writeBytesPerSecond": limit},
            )
        ).volume
        made.append(volume.volume_id)
        return str(volume.volume_id)

    def use(vid: str, cap: csi_pb2.VolumeCapability, staging: Path, target: Path) -> None:
        staging.mkdir(parents=True)
        csi.node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=vid, staging_target_path=str(staging), volume_capability=cap
            )
        )
        staged.append((vid, str(staging)))
        publish(vid, cap, staging, target)

    def publish(vid: str, cap: csi_pb2.VolumeCapability, staging: Path, target: Path) -> None:
        csi.node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id=vid,
                staging_target_path=str(staging),
                target_path=str(target),
                volume_capability=cap,
                volume_context=context,
            )
        )
        if (vid, str(target)) not in published:
            published.append((vid, str(target)))

    def modify(vid: str, limit: str) -> None:
        csi.controller.ControllerModifyVolume(
            csi_pb2.ControllerModifyVolumeRequest(
                volume_id=vid, mutable_parameters={"writeBytesPerSecond": limit}
            )
        )

    try:
        block = create("pvc-io-block", block_cap(), "2Mi")
        target = plugins / "volumeDevices" / "publish" / "pvc-io-block" / pod.uid
        block_staging = plugins / "volumeDevices" / "staging" / "pvc-io-block"
        # killed between the publication and the cgroup step: the kubelet's retry finishes it
        with pytest.raises(grpc.RpcError):
            use(block, block_cap(), block_staging, target)
        assert driver.process is not None and driver.process.wait(timeout=60) == -signal.SIGKILL
        published.append((block, str(target)))
        dev = device_of(str(target))  # published, but without its limit
        assert line_of(pod.io_max(), dev) is None
        driver.env = {FAILPOINTS: "unpublish.removed"}  # for the unpublication below
        driver.start()
        publish(block, block_cap(), block_staging, target)
        assert line_of(pod.io_max(), dev) == f"{dev} rbps=max wbps={2 * MiB} riops=max wiops=max"

        # a second volume, mount access, in the same Pod: its own line
        mounted = create("pvc-io-mount", mount_cap(fs_type="ext4"), "3Mi")
        mount_target = workdir / "pods" / pod.uid / "volumes" / "kubernetes.io~csi" / "m" / "mount"
        use(
            mounted,
            mount_cap(fs_type="ext4"),
            plugins / "pv" / "pvc-io-mount" / "globalmount",
            mount_target,
        )
        lines = [line for line in pod.io_max().splitlines() if line.split()[0] != dev]
        assert len(lines) == 1 and f"wbps={3 * MiB} " in lines[0], pod.io_max()

        first = write_rate(pod, str(target))
        assert within(first, 2 * MiB), f"{first / MiB:.2f} MiB/s under a 2 MiB/s limit"

        modify(block, "4Mi")  # same publication, no republish
        assert f"wbps={4 * MiB} " in (line_of(pod.io_max(), dev) or "")
        second = write_rate(pod, str(target))
        assert within(second, 4 * MiB), f"{second / MiB:.2f} MiB/s under a 4 MiB/s limit"
        print(f"measured: {first / MiB:.2f} MiB/s (limit 2), {second / MiB:.2f} MiB/s (limit 4)")

        modify(block, "max")
        assert line_of(pod.io_max(), dev) is None
        modify(block, "3Mi")
        assert f"wbps={3 * MiB} " in (line_of(pod.io_max(), dev) or "")

        # killed between the unmount and the cgroup step: the retry finishes the job
        unpublish = csi_pb2.NodeUnpublishVolumeRequest(volume_id=block, target_path=str(target))
        with pytest.raises(grpc.RpcError):
            csi.node.NodeUnpublishVolume(unpublish)
        assert driver.process is not None and driver.process.wait(timeout=60) == -signal.SIGKILL
        assert not target.exists()
        assert f"wbps={3 * MiB} " in (line_of(pod.io_max(), dev) or "")
        driver.env = {}
        driver.start()
        csi.node.NodeUnpublishVolume(unpublish)
        published.remove((block, str(target)))
        assert line_of(pod.io_max(), dev) is None
        assert lines == pod.io_max().splitlines(), "the other volume's line must stay"
    finally:
        # a failure left it armed, or dead: clean up with a driver that is neither
        if driver.env or driver.process is None or driver.process.poll() is not None:
            driver.env = {}
            driver.restart()
        for vid, path in reversed(published):
            csi.node.NodeUnpublishVolume(
                csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=path)
            )
        for vid, path in reversed(staged):
            csi.node.NodeUnstageVolume(
                csi_pb2.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=path)
            )
        for vid in made:
            csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid))
    assert pod.io_max().strip() == "", pod.io_max()
    assert not mounts_under(str(workdir))
