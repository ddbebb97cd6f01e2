"""The node side under kills and hostile paths, on real mounts and loop devices.

Every driver here runs in a private mount namespace (:class:`MountNamespace`), so whatever it
mounts or unmounts, also by mistake, never reaches the host; the mount table checked is the
namespace's.

* A kill at every step boundary of NodeStage, NodePublish (mount, read-only, block, inline
  ephemeral), NodeUnpublish, NodeUnstage and NodeExpand, placed deterministically with the
  driver's failpoints (``CSI_DRIVER_FAILPOINTS``): the identical retry answers OK and the whole
  state is what the call promised (mounts, their flags, targets, loop devices, read-only
  flags), and tearing everything down through the API leaves nothing.
* Unpublish and unstage act only on this volume's own mounts: an unknown volume is NOT_FOUND
  and nothing is touched; a foreign mount or a file with data is left alone.
* Staging and target paths are confined below the kubelet directory without following a
  symlink anywhere on the way; bad paths are INVALID_ARGUMENT and change nothing.
* Probe answers not ready when the kubelet directory is unusable.
* Two volumes published to one target at the same moment never stack.
"""

from __future__ import annotations

import functools
import os
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from csi_driver.proto import csi_pb2
from testkit.driver_process import (
    Csi,
    DriverProcess,
    MountNamespace,
    csi_stubs,
    loops_under,
    read_only_flag,
    wait_for_exit,
)
from tests.requests import block_cap, mount_cap, rpc_code

pytestmark = pytest.mark.root

MiB = 1 << 20
SIZE = 32 * MiB
MODE = csi_pb2.VolumeCapability.AccessMode
EPHEMERAL = {"csi.storage.k8s.io/ephemeral": "true", "size": "16Mi"}


@dataclass
class Node:
    """One driver in a private mount namespace, and the paths the kubelet would use."""

    driver: DriverProcess
    ns: MountNamespace
    csi: Csi
    kubelet: Path
    volumes: list[str] = field(default_factory=list)

    def create(self, name: str, block: bool = False, size: int = SIZE) -> str:
        reply = self.csi.controller.CreateVolume(
            csi_pb2.CreateVolumeRequest(
                name=name,
                capacity_range=csi_pb2.CapacityRange(required_bytes=size),
                volume_capabilities=[block_cap() if block else mount_cap()],
            )
        )
        self.volumes.append(reply.volume.volume_id)
        return str(reply.volume.volume_id)

    def staging(self, vid: str) -> str:
        path = self.kubelet / "plugins" / "staging" / vid.partition("@")[0]
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    def target(self, name: str) -> str:
        parent = self.kubelet / "pods" / name
        parent.mkdir(parents=True, exist_ok=True)
        return str(parent / "volume")

    def stage(self, vid: str, block: bool = False) -> None:
        self.csi.node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=vid,
                staging_target_path=self.staging(vid),
                volume_capability=block_cap() if block else mount_cap(),
            ),
            timeout=30,
        )

    def unstage(self, vid: str) -> None:
        self.csi.node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=self.staging(vid)),
            timeout=30,
        )

    def publish(
        self,
        vid: str,
        target: str,
        *,
        block: bool = False,
        readonly: bool = False,
        context: dict[str, str] | None = None,
    ) -> None:
        self.csi.node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id=vid,
                staging_target_path="" if context else self.staging(vid),
                target_path=target,
                volume_capability=block_cap() if block else mount_cap(),
                readonly=readonly,
                volume_context=context or {},
            ),
            timeout=30,
        )

    def unpublish(self, vid: str, target: str) -> None:
        self.csi.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target), timeout=30
        )

    def mounts(self) -> list[str]:
        """Mount points in the namespace below the work dir, stacked ones repeated."""
        return self.ns.mounts_under(str(self.driver.workdir))

    def options(self, path: str) -> list[str]:
        """The per-mount options of the topmost mount at ``path``."""
        found = [opts for m, _, opts in self.ns.mounts() if m == path]
        assert found, f"nothing is mounted at {path}"
        return found[-1].split(",")

    def loops(self) -> list[str]:
        return [dev for dev, _ in loops_under(str(self.driver.root))]

    def restart(self, failpoint: str = "") -> None:
        self.driver.stop()
        self.driver.env = {"CSI_DRIVER_FAILPOINTS": failpoint} if failpoint else {}
        self.driver.start()


@pytest.fixture
def node(workdir: Path) -> Iterator[Node]:
    ns = MountNamespace()
    kubelet = workdir / "kubelet"
    kubelet.mkdir()
    driver = DriverProcess(workdir, prefix=ns.enter(), extra_args=["--kubelet-dir", str(kubelet)])
    try:
        driver.start()
        with csi_stubs(driver.target) as stubs:
            yield Node(driver, ns, stubs, kubelet)
    finally:
        driver.stop()
        ns.close()


def killed_at(node: Node, failpoint: str, call: Callable[[], object]) -> None:
    """Run ``call`` on a driver armed with ``failpoint``: it must die there (SIGKILL), and a
    fresh unarmed driver takes over."""
    node.restart(failpoint)
    assert rpc_code(call) == grpc.StatusCode.UNAVAILABLE
    assert node.driver.process is not None
    status = wait_for_exit(node.driver.process)
    assert status == -9, f"the driver did not die at {failpoint} (exit {status})"
    node.restart()


def device_of(target: str, ns: MountNamespace) -> os.stat_result:
    return os.stat(ns.path(target))


def teardown_all(node: Node, published: list[tuple[str, str]], staged: list[str]) -> None:
    for vid, target in published:
        node.unpublish(vid, target)
    for vid in staged:
        node.unstage(vid)
    for vid in node.volumes:
        node.csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid))
    assert node.mounts() == [], node.mounts()
    assert node.loops() == []


# --- a kill at every step boundary, then the retry -------------------------------------------

STAGE_POINTS = ["stage.dir", "stage.done"]
PUBLISH_POINTS = ["publish.target", "publish.done"]


@pytest.mark.parametrize("failpoint", STAGE_POINTS)
@pytest.mark.parametrize("block", [False, True], ids=["mount", "block"])
def test_stage_killed_then_retried(node: Node, failpoint: str, block: bool) -> None:
    vid = node.create("stage", block=block)
    killed_at(node, failpoint, lambda: node.stage(vid, block=block))
    node.stage(vid, block=block)
    staging = node.staging(vid)
    if block:
        assert staging not in node.mounts()
        assert len(node.loops()) == 1
    else:
        assert staging in node.mounts()
    node.stage(vid, block=block)  # and again: idempotent
    teardown_all(node, [], [vid])


@pytest.mark.parametrize("failpoint", PUBLISH_POINTS)
@pytest.mark.parametrize("readonly", [False, True], ids=["rw", "ro"])
def test_mount_publish_killed_then_retried(node: Node, failpoint: str, readonly: bool) -> None:
    vid = node.create("pub")
    node.stage(vid)
    target = node.target("pod")
    killed_at(node, failpoint, lambda: node.publish(vid, target, readonly=readonly))
    node.publish(vid, target, readonly=readonly)
    options = node.options(target)
    assert ("ro" in options) is readonly, options
    if not readonly:
        (node.ns.path(target) / "data").write_text("written")
        assert (node.ns.path(node.staging(vid)) / "data").read_text() == "written"
    else:
        with pytest.raises(OSError):
            (node.ns.path(target) / "data").write_text("x")
    node.publish(vid, target, readonly=readonly)
    assert node.mounts().count(target) == 1
    teardown_all(node, [(vid, target)], [vid])


@pytest.mark.parametrize("failpoint", ["publish.device-flag", *PUBLISH_POINTS])
def test_read_only_block_publish_killed_then_retried(node: Node, failpoint: str) -> None:
    vid = node.create("blk", block=True)
    node.stage(vid, block=True)
    target = node.target("pod")
    killed_at(node, failpoint, lambda: node.publish(vid, target, block=True, readonly=True))
    node.publish(vid, target, block=True, readonly=True)
    assert target in node.mounts()
    st = device_of(target, node.ns)
    assert stat.S_ISBLK(st.st_mode)
    [loop] = node.loops()
    assert os.stat(loop).st_rdev == st.st_rdev and read_only_flag(loop)
    node.unpublish(vid, target)
    assert not read_only_flag(loop), "the device stayed read-only after its last unpublish"
    teardown_all(node, [], [vid])


@pytest.mark.parametrize(
    "failpoint",
    ["ephemeral.created", "stage.dir", "ephemeral.staged", "publish.target", "ephemeral.published"],
)
def test_ephemeral_publish_killed_then_retried(node: Node, failpoint: str) -> None:
    target = node.target("inline")
    kubelet_id = "csi-inline-0001"
    killed_at(node, failpoint, lambda: node.publish(kubelet_id, target, context=EPHEMERAL))
    node.publish(kubelet_id, target, context=EPHEMERAL)
    assert target in node.mounts()
    (node.ns.path(target) / "data").write_text("inline")
    node.unpublish(kubelet_id, target)
    node.unpublish(kubelet_id, target)  # the retry of a finished unpublish
    assert node.mounts() == []
    assert not os.path.lexists(target)
    reply = node.csi.controller.ListVolumes(csi_pb2.ListVolumesRequest())
    assert list(reply.entries) == []


@pytest.mark.parametrize(
    "failpoint", ["unpublish.unmounted", "unstage.unmounted", "ephemeral.unstaged"]
)
def test_ephemeral_unpublish_killed_then_retried(node: Node, failpoint: str) -> None:
    target = node.target("inline")
    kubelet_id = "csi-inline-0002"
    node.publish(kubelet_id, target, context=EPHEMERAL)
    killed_at(node, failpoint, lambda: node.unpublish(kubelet_id, target))
    node.unpublish(kubelet_id, target)
    assert node.mounts() == []
    assert not os.path.lexists(target)
    reply = node.csi.controller.ListVolumes(csi_pb2.ListVolumesRequest())
    assert list(reply.entries) == []
    assert node.loops() == []


def test_ephemeral_target_made_but_not_marked_then_unpublish_killed_after_delete(
    node: Node,
) -> None:
    """A kill between making the target directory and marking it ours leaves a directory the
    driver will not remove; a later unpublish killed once the volume is deleted must still
    finish on its retry (the kubelet removes the empty directory), not answer NOT_FOUND."""
    target = node.target("inline")
    kubelet_id = "csi-inline-0003"
    killed_at(node, "publish.made", lambda: node.publish(kubelet_id, target, context=EPHEMERAL))
    node.publish(kubelet_id, target, context=EPHEMERAL)
    assert target in node.mounts()
    killed_at(node, "ephemeral.deleted", lambda: node.unpublish(kubelet_id, target))
    node.unpublish(kubelet_id, target)
    node.unpublish(kubelet_id, target)
    assert node.mounts() == []
    assert os.listdir(target) == []  # left for the kubelet: the driver never marked it
    reply = node.csi.controller.ListVolumes(csi_pb2.ListVolumesRequest())
    assert list(reply.entries) == []
    (Path(target) / "data").write_text("someone's")  # no longer empty: not ours to pass over
    assert rpc_code(lambda: node.unpublish(kubelet_id, target)) == grpc.StatusCode.NOT_FOUND
    assert (Path(target) / "data").read_text() == "someone's"


@pytest.mark.parametrize(
    ("failpoint", "block"),
    [("unpublish.unmounted", False), ("unpublish.unmounted", True), ("unpublish.removed", True)],
    ids=["mount-unmounted", "block-unmounted", "block-removed"],
)
def test_unpublish_killed_then_retried(node: Node, failpoint: str, block: bool) -> None:
    vid = node.create("unpub", block=block)
    node.stage(vid, block=block)
    target = node.target("pod")
    node.publish(vid, target, block=block, readonly=True)
    killed_at(node, failpoint, lambda: node.unpublish(vid, target))
    node.unpublish(vid, target)
    assert target not in node.mounts()
    assert not os.path.lexists(target)
    if block:
        [loop] = node.loops()
        assert not read_only_flag(loop), "the device stayed read-only after its last unpublish"
    teardown_all(node, [], [vid])


@pytest.mark.parametrize(
    ("failpoint", "block"),
    [("unstage.unmounted", False), ("unstage.done", False), ("unstage.done", True)],
    ids=["mount-unmounted", "mount-done", "block-done"],
)
def test_unstage_killed_then_retried(node: Node, failpoint: str, block: bool) -> None:
    vid = node.create("unstage", block=block)
    node.stage(vid, block=block)
    killed_at(node, failpoint, lambda: node.unstage(vid))
    node.unstage(vid)
    assert node.mounts() == []
    assert node.loops() == []
    teardown_all(node, [], [])


@pytest.mark.parametrize("failpoint", ["expand.grown", "expand.refreshed"])
def test_node_expand_killed_then_retried(node: Node, failpoint: str) -> None:
    vid = node.create("grow", block=True)
    node.stage(vid, block=True)
    target = node.target("pod")
    node.publish(vid, target, block=True)
    request = csi_pb2.NodeExpandVolumeRequest(
        volume_id=vid,
        volume_path=target,
        capacity_range=csi_pb2.CapacityRange(required_bytes=2 * SIZE),
        volume_capability=block_cap(),
    )
    killed_at(node, failpoint, lambda: node.csi.node.NodeExpandVolume(request, timeout=30))
    reply = node.csi.node.NodeExpandVolume(request, timeout=30)
    assert reply.capacity_bytes >= 2 * SIZE
    [loop] = node.loops()
    with open(loop, "rb") as dev:
        assert dev.seek(0, os.SEEK_END) == reply.capacity_bytes
    teardown_all(node, [(vid, target)], [vid])


# --- only one's own mounts are touched -------------------------------------------------------


def test_unknown_volume_touches_nothing(node: Node) -> None:
    unknown = "v" + "0" * 32 + "@it-node"
    target = node.target("victim")
    Path(target).write_bytes(b"")  # an empty file someone else made
    assert rpc_code(lambda: node.unpublish(unknown, target)) == grpc.StatusCode.NOT_FOUND
    assert Path(target).exists()
    os.unlink(target)
    os.mkdir(target)
    assert node.ns.run(["mount", "-t", "tmpfs", "other", target]).returncode == 0
    assert rpc_code(lambda: node.unpublish(unknown, target)) == grpc.StatusCode.NOT_FOUND
    assert rpc_code(lambda: node.unstage(unknown)) == grpc.StatusCode.NOT_FOUND
    assert target in node.mounts()
    assert node.ns.run(["umount", target]).returncode == 0


def test_a_foreign_mount_at_the_target_is_left_alone(node: Node) -> None:
    vid = node.create("mine")
    other = node.create("other")
    node.stage(vid)
    node.stage(other)
    target = node.target("pod")
    node.publish(other, target)
    # the CO asks to unpublish "mine" where "other" is: not this volume's mount
    assert rpc_code(lambda: node.unpublish(vid, target)) == grpc.StatusCode.FAILED_PRECONDITION
    assert target in node.mounts()
    tmpfs = node.target("tmpfs")
    os.mkdir(tmpfs)
    assert node.ns.run(["mount", "-t", "tmpfs", "plugin", tmpfs]).returncode == 0
    assert rpc_code(lambda: node.unpublish(vid, tmpfs)) == grpc.StatusCode.FAILED_PRECONDITION
    assert tmpfs in node.mounts()
    assert node.ns.run(["umount", tmpfs]).returncode == 0
    os.rmdir(tmpfs)
    teardown_all(node, [(other, target)], [vid, other])


@pytest.mark.parametrize(
    ("rpc", "path"),
    [
        ("unpublish", "/proc"),
        ("unpublish", "/"),
        ("unstage", "/"),
        ("unstage", "/etc"),
        ("stage", "/etc"),
        ("publish", "/root"),
    ],
)
def test_paths_outside_the_kubelet_dir_are_refused(node: Node, rpc: str, path: str) -> None:
    vid = node.create("confined")
    before = sorted(m for m, _, _ in node.ns.mounts())
    req: Callable[[], object]
    if rpc == "unpublish":
        req = lambda: node.csi.node.NodeUnpublishVolume(  # noqa: E731
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=path)
        )
    elif rpc == "unstage":
        req = lambda: node.csi.node.NodeUnstageVolume(  # noqa: E731
            csi_pb2.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=path)
        )
    elif rpc == "stage":
        req = lambda: node.csi.node.NodeStageVolume(  # noqa: E731
            csi_pb2.NodeStageVolumeRequest(
                volume_id=vid, staging_target_path=path, volume_capability=mount_cap()
            )
        )
    else:
        node.stage(vid)
        before = sorted(m for m, _, _ in node.ns.mounts())
        req = lambda: node.csi.node.NodePublishVolume(  # noqa: E731
            csi_pb2.NodePublishVolumeRequest(
                volume_id=vid,
                staging_target_path=node.staging(vid),
                target_path=path,
                volume_capability=mount_cap(),
            )
        )
    assert rpc_code(req) == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(m for m, _, _ in node.ns.mounts()) == before
    assert node.csi.identity.Probe(csi_pb2.ProbeRequest()).ready.value
    teardown_all(node, [], [vid] if rpc == "publish" else [])


def test_symlinks_files_and_long_names_on_the_way_are_refused(node: Node, workdir: Path) -> None:
    vid = node.create("walk")
    decoy = workdir / "decoy"
    decoy.mkdir()
    (node.kubelet / "pods").mkdir(exist_ok=True)
    (node.kubelet / "pods" / "link").symlink_to(decoy)
    (node.kubelet / "pods" / "file").write_text("x")
    bad = [
        node.kubelet / "pods" / "link" / "volume",  # a symlinked parent
        node.kubelet / "pods" / "link" / "deeper" / "volume",
        node.kubelet / "pods" / "file" / "volume",  # a parent that is a file
        node.kubelet / "pods" / ("n" * 256) / "volume",  # a component over 255 bytes
    ]
    for path in bad:
        stage = csi_pb2.NodeStageVolumeRequest(
            volume_id=vid, staging_target_path=str(path), volume_capability=mount_cap()
        )
        assert rpc_code(functools.partial(node.csi.node.NodeStageVolume, stage)) == (
            grpc.StatusCode.INVALID_ARGUMENT
        ), path
    node.stage(vid)
    for path in bad:
        publish = csi_pb2.NodePublishVolumeRequest(
            volume_id=vid,
            staging_target_path=node.staging(vid),
            target_path=str(path),
            volume_capability=mount_cap(),
        )
        assert rpc_code(functools.partial(node.csi.node.NodePublishVolume, publish)) == (
            grpc.StatusCode.INVALID_ARGUMENT
        ), path
    assert list(decoy.iterdir()) == []
    assert [m for m in node.mounts() if "/link" in m or "/file" in m] == []
    teardown_all(node, [], [vid])


def test_probe_is_not_ready_while_the_kubelet_dir_is_unusable(node: Node) -> None:
    assert node.csi.identity.Probe(csi_pb2.ProbeRequest()).ready.value
    moved = node.kubelet.with_name("kubelet-away")
    node.kubelet.rename(moved)
    try:
        assert not node.csi.identity.Probe(csi_pb2.ProbeRequest()).ready.value
    finally:
        moved.rename(node.kubelet)
    assert node.csi.identity.Probe(csi_pb2.ProbeRequest()).ready.value


def test_two_volumes_published_to_one_target_never_stack(node: Node) -> None:
    a, b = node.create("a"), node.create("b")
    node.stage(a)
    node.stage(b)
    target = node.target("race")
    for _ in range(10):
        results: dict[str, grpc.StatusCode] = {}

        def publish(vid: str, results: dict[str, grpc.StatusCode] = results) -> None:
            try:
                node.publish(vid, target)
                results[vid] = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                results[vid] = exc.code()

        threads = [threading.Thread(target=publish, args=(v,)) for v in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert node.mounts().count(target) == 1
        winners = [v for v, c in results.items() if c is grpc.StatusCode.OK]
        assert len(winners) == 1, results
        losers = set(results.values()) - {grpc.StatusCode.OK}
        assert losers <= {
            grpc.StatusCode.ABORTED,
            grpc.StatusCode.ALREADY_EXISTS,
            grpc.StatusCode.FAILED_PRECONDITION,
        }, results
        node.unpublish(winners[0], target)
    teardown_all(node, [], [a, b])


def test_unpublish_removes_only_what_the_driver_made(node: Node) -> None:
    vid = node.create("own")
    node.stage(vid)
    theirs_dir = node.target("kubelet-made")
    os.mkdir(theirs_dir)  # an empty directory the driver did not make
    theirs_file = node.kubelet / "pods" / "termination-log"
    theirs_file.write_bytes(b"")  # an empty file the driver did not make
    for path in (theirs_dir, str(theirs_file)):
        node.unpublish(vid, path)  # nothing of this volume is there: OK, and nothing touched
    assert os.path.isdir(theirs_dir) and theirs_file.exists()
    os.rmdir(theirs_dir)
    target = node.target("pod")
    node.publish(vid, target)
    node.unpublish(vid, target)
    assert not os.path.lexists(target), "the target the driver made was left behind"
    teardown_all(node, [], [vid])


def test_nothing_is_mounted_over_a_directory_that_holds_files(node: Node) -> None:
    vid = node.create("hide")
    staging = Path(node.staging(vid))
    (staging / "certificate").write_text("kubelet's")
    assert rpc_code(lambda: node.stage(vid)) == grpc.StatusCode.FAILED_PRECONDITION
    assert (node.ns.path(staging) / "certificate").read_text() == "kubelet's"
    (staging / "certificate").unlink()
    node.stage(vid)
    target = node.target("pod")
    os.mkdir(target)
    (Path(target) / "registration.sock").write_text("x")
    assert rpc_code(lambda: node.publish(vid, target)) == grpc.StatusCode.FAILED_PRECONDITION
    assert node.mounts().count(target) == 0
    (Path(target) / "registration.sock").unlink()
    os.rmdir(target)
    teardown_all(node, [], [vid])


def test_the_walk_does_not_enter_a_mount_inside_the_kubelet_dir(node: Node, workdir: Path) -> None:
    vid = node.create("cross")
    outside = workdir / "outside"
    outside.mkdir()
    evil = node.kubelet / "pods" / "evil"
    evil.mkdir(parents=True)
    assert node.ns.run(["mount", "--bind", str(outside), str(evil)]).returncode == 0
    try:
        request = csi_pb2.NodeStageVolumeRequest(
            volume_id=vid, staging_target_path=str(evil / "stage"), volume_capability=mount_cap()
        )
        assert rpc_code(lambda: node.csi.node.NodeStageVolume(request)) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        assert list(outside.iterdir()) == []
    finally:
        node.ns.run(["umount", str(evil)])
    teardown_all(node, [], [])


def test_the_staging_path_is_no_target(node: Node) -> None:
    vid = node.create("self")
    node.stage(vid)
    staging = node.staging(vid)
    assert rpc_code(lambda: node.publish(vid, staging)) == grpc.StatusCode.INVALID_ARGUMENT
    assert node.mounts().count(staging) == 1
    teardown_all(node, [], [vid])
