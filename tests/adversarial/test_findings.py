"""What the fuzzer found, pinned down: each a short deterministic sequence of requests.

The fuzzer reaches these at random; here each has one test that names the rule it checks, so
that a regression shows by name and is replayed in a second.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from csi_driver import ids
from csi_driver.proto import csi_pb2
from tests.adversarial.conftest import (
    EPHEMERAL_CONTEXT,
    NODE_ID,
    Driver,
    Sandbox,
    create_request,
    make_driver,
    new_sandbox,
)
from tests.requests import mount_cap

pytestmark = pytest.mark.root

TIMEOUT = 10.0


@pytest.fixture
def served() -> Iterator[tuple[Sandbox, Driver]]:
    with new_sandbox() as box:
        driver = make_driver(box)
        driver.start()
        try:
            yield box, driver
        finally:
            # whatever a failing test left: the sandbox must still end clean
            for m in sorted(box.ns_mounts_under(box.workdir), key=len, reverse=True):
                box.ns.run(["umount", "-l", m])
            driver.shutdown()


def code(call: Callable[[], Any]) -> str:
    try:
        call()
    except grpc.RpcError as exc:
        return f"{exc.code().name}: {exc.details()}"
    return "OK"


def stage(node: Any, vid: str, path: str) -> str:
    req = csi_pb2.NodeStageVolumeRequest(
        volume_id=vid, staging_target_path=path, volume_capability=mount_cap()
    )
    return code(lambda: node.NodeStageVolume(req, timeout=TIMEOUT))


def unstage(node: Any, vid: str, path: str) -> str:
    req = csi_pb2.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=path)
    return code(lambda: node.NodeUnstageVolume(req, timeout=TIMEOUT))


def publish(node: Any, vid: str, staging: str, target: str, **extra: Any) -> str:
    req = csi_pb2.NodePublishVolumeRequest(
        volume_id=vid,
        staging_target_path=staging,
        target_path=target,
        volume_capability=mount_cap(),
        **extra,
    )
    return code(lambda: node.NodePublishVolume(req, timeout=TIMEOUT))


def unpublish(node: Any, vid: str, target: str) -> str:
    req = csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target)
    return code(lambda: node.NodeUnpublishVolume(req, timeout=TIMEOUT))


def test_a_volume_staged_at_a_second_path_can_still_be_unstaged(
    served: tuple[Sandbox, Driver],
) -> None:
    """Staging one volume at a second path must be refused, or both stagings must come
    undone: a volume whose every unstage answers "still published at <the other staging
    path>" can never be unstaged or deleted."""
    box, driver = served
    ctl, node = driver.stub("Controller"), driver.stub("Node")
    vid = ctl.CreateVolume(create_request("twice", False), timeout=TIMEOUT).volume.volume_id
    first, second = str(box.workdir / "k" / "s1"), str(box.workdir / "k" / "s2")
    assert stage(node, vid, first) == "OK"
    again = stage(node, vid, second)
    if again == "OK":
        results = [unstage(node, vid, first), unstage(node, vid, second)]
        assert results == ["OK", "OK"], (
            f"NodeStage at a second path answered OK, then the unstages answered {results}"
        )
    else:
        assert again.startswith(("FAILED_PRECONDITION", "ALREADY_EXISTS")), again
        assert unstage(node, vid, first) == "OK"
    assert not box.ns_mounts_under(box.workdir)
    ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid), timeout=TIMEOUT)


def test_an_inline_volume_named_like_a_driver_volume_id_can_be_unpublished(
    served: tuple[Sandbox, Driver],
) -> None:
    """The kubelet names inline volumes; a name shaped like this driver's own ids
    (``v<32 hex>@<node>``) must be refused at publish, or be unpublished by the same id: an
    OK publish followed by NOT_FOUND for every unpublish strands the mount and the volume."""
    box, driver = served
    node = driver.stub("Node")
    kubelet_id = ids.volume_id_for("no-such-volume", NODE_ID)
    target = str(box.workdir / "k" / "pods" / "p1" / "inline")
    published = publish(node, kubelet_id, "", target, volume_context=EPHEMERAL_CONTEXT)
    if published == "OK":
        undone = unpublish(node, kubelet_id, target)
        assert undone == "OK", f"inline publish answered OK, its unpublish {undone}"
    else:
        assert published.startswith("INVALID_ARGUMENT"), published
    assert not box.ns_mounts_under(box.workdir)
    listed = driver.stub("Controller").ListVolumes(csi_pb2.ListVolumesRequest(), timeout=TIMEOUT)
    assert not listed.entries, [e.volume.volume_id for e in listed.entries]


@pytest.mark.parametrize("rpc", ["NodeStageVolume", "NodePublishVolume"])
def test_no_mount_over_a_directory_that_holds_other_mounts(
    served: tuple[Sandbox, Driver], rpc: str
) -> None:
    """A staging or target path that has mounts below it (``<kubelet dir>/pods`` say) is no
    place for a volume: a mount there hides every one of them from the kubelet."""
    box, driver = served
    ctl, node = driver.stub("Controller"), driver.stub("Node")
    holder = box.workdir / "k" / "pods"
    (holder / "other").mkdir(parents=True)
    box.ns_run("mount", "-t", "tmpfs", "-o", "size=1m", "adv-other", str(holder / "other"))
    vid = ctl.CreateVolume(create_request("hider", False), timeout=TIMEOUT).volume.volume_id
    staging = str(box.workdir / "k" / "staging" / "hider")
    try:
        if rpc == "NodeStageVolume":
            result = stage(node, vid, str(holder))
        else:
            assert stage(node, vid, staging) == "OK"
            result = publish(node, vid, staging, str(holder))
        mounted = [m for m, _, _ in box.ns.mounts() if m == str(holder)]
        assert result != "OK" and not mounted, (
            f"{rpc} onto {holder}, which holds {holder / 'other'}, answered {result}"
        )
    finally:
        if rpc == "NodeStageVolume":
            unstage(node, vid, str(holder))
        else:
            unpublish(node, vid, str(holder))
            unstage(node, vid, staging)
        box.ns.run(["umount", "-l", str(holder / "other")])


def test_a_shadowed_path_is_not_an_internal_error(served: tuple[Sandbox, Driver]) -> None:
    """When a later mount on a parent directory hides a volume's staging mount, unpublish
    and unstage at that path meet something else: that is the caller's state, not a fault
    of the driver (FAILED_PRECONDITION or NOT_FOUND, never INTERNAL), and nothing is
    unmounted."""
    box, driver = served
    ctl, node = driver.stub("Controller"), driver.stub("Node")
    vid = ctl.CreateVolume(create_request("hidden", False), timeout=TIMEOUT).volume.volume_id
    parent = box.workdir / "k" / "pod"
    staging = str(parent / "stage")
    assert stage(node, vid, staging) == "OK"
    # another mount over the parent, in which the same name exists
    cover = box.workdir / "cover"
    (cover / "stage").mkdir(parents=True)
    box.ns_run("mount", "--bind", str(cover), str(parent))
    try:
        results = {
            "NodeUnpublishVolume": unpublish(node, vid, staging),
            "NodeUnstageVolume": unstage(node, vid, staging),
        }
        internal = {k: v for k, v in results.items() if v.startswith(("INTERNAL", "UNKNOWN"))}
        assert not internal, f"a shadowed staging path: {internal}"
        assert staging in box.ns_mounts_under(staging), "the hidden staging mount was removed"
    finally:
        box.ns.run(["umount", "-l", str(parent)])
        assert unstage(node, vid, staging) == "OK"
        ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid), timeout=TIMEOUT)
    assert os.path.isdir(cover / "stage")
