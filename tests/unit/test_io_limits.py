"""IO limits: the parameters (parsing, bounds, refusals), io.max lines, finding a Pod's cgroup
in a fake cgroup tree, and the node's refusals before it touches any cgroup.

The real io.max of a real kernel is in tests/vm/test_io_limits.py; this host has no cgroup v2.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, cast

import pytest

from csi_driver import ids, model
from csi_driver.backends import mutable
from csi_driver.config import cgroup_path
from csi_driver.errors import FailedPrecondition, InvalidArgument
from csi_driver.services.node_io_limits import POD_UID_KEY, NodeIoLimits, pod_of_target
from csi_driver.system.cgroup_io import (
    IOPS_MAX,
    LIMIT_MAX,
    CgroupError,
    CgroupIo,
    IoLimits,
    is_pod_uid,
    parse_io_max,
)

UID = "0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9"
UNDER = UID.replace("-", "_")
KUBELET = Path("/var/lib/kubelet")
MOUNT_TARGET = f"{KUBELET}/pods/{UID}/volumes/kubernetes.io~csi/pvc-1/mount"
BLOCK_TARGET = f"{KUBELET}/plugins/kubernetes.io/csi/volumeDevices/publish/pvc-1/{UID}"


# --- the parameters --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "stored"),
    [
        ("writeBytesPerSecond", "4Mi", str(4 << 20)),
        ("readBytesPerSecond", "10M", "10000000"),
        ("readBytesPerSecond", "1048576", "1048576"),
        ("writeIOPerSecond", "250", "250"),
        ("readIOPerSecond", " 7 ", "7"),
        ("writeBytesPerSecond", "max", "max"),
        ("readIOPerSecond", "MAX", "max"),
        ("writeBytesPerSecond", str(LIMIT_MAX), str(LIMIT_MAX)),
        ("writeIOPerSecond", str(IOPS_MAX), str(IOPS_MAX)),
    ],
)
def test_limits_are_normalised(key: str, value: str, stored: str) -> None:
    assert mutable.validate_mutable({key: value}, "lvm")[key] == stored


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("writeBytesPerSecond", "-1", "is not a byte quantity"),
        ("writeBytesPerSecond", "1.5Mi", "is not a byte quantity"),
        ("writeBytesPerSecond", "4MiB", "is not a byte quantity"),
        ("writeBytesPerSecond", "", "is not a byte quantity"),
        ("writeIOPerSecond", "1k", "is not an integer"),
        ("writeIOPerSecond", "-5", "is not an integer"),
        ("readIOPerSecond", "\u0661\u0662", "is not an integer"),  # Arabic-Indic digits
        ("writeIOPerSecond", "0", "is out of range"),
        ("writeIOPerSecond", "1", "is out of range"),
        ("readBytesPerSecond", "16Ei", "is not a byte quantity"),  # no such suffix
        ("readBytesPerSecond", "99999999999999999999", "is out of range"),
        ("readBytesPerSecond", "20000Pi", "is out of range"),
        ("readIOPerSecond", str(IOPS_MAX + 1), "is out of range"),  # the kernel clamps to 32 bits
        ("readBytesPerSecond", str(LIMIT_MAX + 1), "is out of range"),
    ],
)
def test_bad_limits_are_refused_with_a_clear_message(key: str, value: str, says: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        mutable.validate_mutable({key: value}, "lvm")
    assert key in err.value.message and says in err.value.message


def test_a_huge_value_is_refused_without_being_echoed() -> None:
    with pytest.raises(InvalidArgument) as err:
        mutable.validate_mutable({"writeBytesPerSecond": "9" * 100_000}, "lvm")
    assert len(err.value.message) < 200
    assert "100000 bytes long" in err.value.message


def test_max_is_stored_as_the_absence_of_a_limit() -> None:
    stored = {"writeBytesPerSecond": "4194304", "readIOPerSecond": "100"}
    changes = mutable.validate_mutable({"writeBytesPerSecond": "max", "readIOPerSecond": "50"}, "x")
    assert mutable.apply(stored, changes) == {"readIOPerSecond": "50"}
    assert mutable.io_limits(mutable.apply(stored, changes)) == IoLimits(riops=50)


def test_io_limits_of_parameters() -> None:
    params = {
        "readBytesPerSecond": "1000",
        "writeBytesPerSecond": "2000",
        "readIOPerSecond": "30",
        "writeIOPerSecond": "40",
        "wipeOnDelete": "true",
    }
    assert mutable.io_limits(params) == IoLimits(1000, 2000, 30, 40)
    assert not mutable.io_limits({"wipeOnDelete": "true"}).any


def test_limits_are_refused_where_they_cannot_be_enforced() -> None:
    with_limit = {"writeBytesPerSecond": "4194304"}
    mutable.check_io_limits(with_limit, None)
    mutable.check_io_limits({}, "no io controller", directory=True)
    mutable.check_io_limits({"writeBytesPerSecond": "max"}, "no io controller")
    with pytest.raises(InvalidArgument) as err:
        mutable.check_io_limits(with_limit, "this node has no cgroup v2 hierarchy")
    assert err.value.message == (
        "IO limits (writeBytesPerSecond) cannot be enforced: this node has no cgroup v2"
        " hierarchy; use a node with cgroup v2 and the io controller, or drop the IO limits"
    )
    with pytest.raises(InvalidArgument, match="hostpath mount volume is a directory"):
        mutable.check_io_limits(with_limit, None, directory=True)


# --- io.max lines ----------------------------------------------------------------------------


def test_io_max_lines_round_trip() -> None:
    limits = IoLimits(wbps=2 << 20, riops=100)
    line = limits.line((253, 4))
    assert line == "253:4 rbps=max wbps=2097152 riops=100 wiops=max"
    text = f"8:0 rbps=1000 wbps=max riops=max wiops=max\n{line}\nnonsense\n7:x rbps=1\n"
    assert parse_io_max(text) == {(8, 0): IoLimits(rbps=1000), (253, 4): limits}
    assert not IoLimits().any
    with pytest.raises(ValueError):
        IoLimits(wbps=1)


# --- finding a Pod's cgroup ------------------------------------------------------------------


def tree(root: Path, *relative: str) -> Path:
    path = root.joinpath(*relative)
    path.mkdir(parents=True)
    (path / "io.max").write_text("")
    return path


@pytest.mark.parametrize(
    "relative",
    [
        ("kubepods.slice", "kubepods-besteffort.slice", f"kubepods-besteffort-pod{UNDER}.slice"),
        ("kubepods.slice", "kubepods-burstable.slice", f"kubepods-burstable-pod{UNDER}.slice"),
        ("kubepods.slice", f"kubepods-pod{UNDER}.slice"),
        ("kubepods", "besteffort", f"pod{UID}"),
        ("kubepods", "burstable", f"pod{UID}"),
        ("kubepods", f"pod{UID}"),
        # a kubelet --cgroup-root: found by the bounded walk
        (
            "kubelet.slice",
            "kubelet-kubepods.slice",
            "kubelet-kubepods-besteffort.slice",
            f"kubelet-kubepods-besteffort-pod{UNDER}.slice",
        ),
    ],
)
def test_the_pod_cgroup_is_found_for_both_drivers(
    tmp_path: Path, relative: tuple[str, ...]
) -> None:
    tree(
        tmp_path,
        "kubepods.slice",
        "kubepods-besteffort.slice",
        "kubepods-besteffort-podother.slice",
    )
    want = tree(tmp_path, *relative)
    assert CgroupIo(str(tmp_path)).pod_cgroup(UID) == str(want)


@pytest.mark.parametrize(
    ("kubelet_root", "relative"),
    [
        # cgroupfs driver, cgroupRoot /nodelocal-e2e (the e2e lane's lvm node)
        (("nodelocal-e2e",), ("nodelocal-e2e", "kubepods", "besteffort", f"pod{UID}")),
        (("a", "b"), ("a", "b", "kubepods", f"pod{UID}")),
        # systemd driver, cgroupRoot /edge: the kubelet makes it edge.slice, and /a/b-c
        # a.slice/a-b_c.slice; the children carry the slice's prefix
        (
            ("edge",),
            (
                "edge.slice",
                "edge-kubepods.slice",
                "edge-kubepods-besteffort.slice",
                f"edge-kubepods-besteffort-pod{UNDER}.slice",
            ),
        ),
        (
            ("a", "b-c"),
            (
                "a.slice",
                "a-b_c.slice",
                "a-b_c-kubepods.slice",
                f"a-b_c-kubepods-pod{UNDER}.slice",
            ),
        ),
        # systemd driver, cgroupRoot given as the slice it is
        (
            ("edge.slice",),
            (
                "edge.slice",
                "edge-kubepods.slice",
                "edge-kubepods-burstable.slice",
                f"edge-kubepods-burstable-pod{UNDER}.slice",
            ),
        ),
    ],
)
def test_the_pod_cgroup_is_found_below_the_kubelets_cgroup_root(
    tmp_path: Path, kubelet_root: tuple[str, ...], relative: tuple[str, ...]
) -> None:
    want = tree(tmp_path, *relative)
    assert CgroupIo(str(tmp_path), kubelet_root).pod_cgroup(UID) == str(want)
    # not found without it where the kubelet's root has a name of its own
    if not kubelet_root[0].startswith("kube"):
        assert CgroupIo(str(tmp_path)).pod_cgroup(UID) is None


def test_a_kubelet_cgroup_root_that_is_a_symlink_is_not_followed(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    root.mkdir()
    elsewhere = tree(tmp_path, "elsewhere", "kubepods", "besteffort", f"pod{UID}")
    (root / "edge").symlink_to(elsewhere.parents[2])
    (root / "edge.slice").symlink_to(elsewhere.parents[2])
    assert CgroupIo(str(root), ("edge",)).pod_cgroup(UID) is None


@pytest.mark.parametrize("value", ["/", "", "x/../y", "a/./b", "/".join("a" * 9), "x\ny"])
def test_the_kubelet_cgroup_root_is_checked(value: str) -> None:
    if value in ("/", ""):
        assert cgroup_path(value) == ()
        return
    with pytest.raises(ValueError, match="--kubelet-cgroup-root must be a path of at most 8"):
        cgroup_path(value)


def test_a_missing_pod_has_no_cgroup(tmp_path: Path) -> None:
    tree(tmp_path, "kubepods", "besteffort", "pod" + "1" * 8 + UID[8:])
    assert CgroupIo(str(tmp_path)).pod_cgroup(UID) is None


def test_the_walk_follows_no_symlink_and_is_bounded(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    root.mkdir()
    elsewhere = tree(tmp_path, "elsewhere", f"pod{UID}")
    (root / "kubepods").symlink_to(elsewhere.parent)
    (root / "kubepods.slice").symlink_to(elsewhere.parent)
    assert CgroupIo(str(root)).pod_cgroup(UID) is None
    # deeper than the walk looks
    tree(root, "kubelet.a", "kubelet.b", "kubelet.c", "kubelet.d", f"pod{UID}")
    assert CgroupIo(str(root)).pod_cgroup(UID) is None


@pytest.mark.parametrize("uid", ["../../etc", UID.upper(), UID + "x", "", "a" * 10_000])
def test_a_pod_uid_that_is_no_uuid_is_never_used(tmp_path: Path, uid: str) -> None:
    assert not is_pod_uid(uid)
    with pytest.raises(CgroupError, match="is not a UUID"):
        CgroupIo(str(tmp_path)).pod_cgroup(uid)


def test_limits_are_written_read_back_and_cleared(tmp_path: Path) -> None:
    cg = CgroupIo(str(tmp_path))
    pod = str(tree(tmp_path, "kubepods", f"pod{UID}"))
    limits = IoLimits(wbps=4 << 20)
    cg.set_limits(pod, (253, 4), limits)
    assert Path(pod, "io.max").read_text() == limits.line((253, 4))
    assert cg.limits(pod, (253, 4)) == limits
    assert cg.limits(pod, (8, 0)) is None
    assert cg.clear(pod, (253, 4))
    assert Path(pod, "io.max").read_text() == "253:4 rbps=max wbps=max riops=max wiops=max"
    # the kernel would now have no line; the fake file keeps the all-max one, read as none
    assert cg.limits(pod, (253, 4)) is None
    assert not cg.clear(pod, (253, 4))


def test_a_line_that_is_already_there_is_not_written_again(tmp_path: Path) -> None:
    cg = CgroupIo(str(tmp_path))
    pod = tree(tmp_path, "kubepods", f"pod{UID}")
    (pod / "io.max").write_text("253:4 rbps=max wbps=4194304 riops=max wiops=max\n")
    os.utime(pod / "io.max", ns=(0, 0))  # a write would make it now
    cg.set_limits(str(pod), (253, 4), IoLimits(wbps=4 << 20))
    assert (pod / "io.max").stat().st_mtime_ns == 0
    cg.set_limits(str(pod), (253, 4), IoLimits(wbps=2 << 20))
    assert (pod / "io.max").stat().st_mtime_ns > 0


def test_nothing_outside_the_root_is_written(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    tree(root, "kubepods")
    outside = tree(tmp_path, "outside")
    cg = CgroupIo(str(root))
    with pytest.raises(CgroupError, match="not below the cgroup root"):
        cg.set_limits(str(outside), (8, 0), IoLimits(rbps=10))
    with pytest.raises(CgroupError, match="not below the cgroup root"):
        cg.set_limits(str(root / "kubepods" / ".." / ".." / "outside"), (8, 0), IoLimits(rbps=10))
    (root / "link").symlink_to(outside)
    with pytest.raises(OSError):
        cg.set_limits(str(root / "link"), (8, 0), IoLimits(rbps=10))
    assert (outside / "io.max").read_text() == ""


def test_a_pod_cgroup_without_the_io_controller_says_so(tmp_path: Path) -> None:
    pod = tmp_path / "kubepods" / f"pod{UID}"
    pod.mkdir(parents=True)
    with pytest.raises(CgroupError, match="the io controller is not enabled"):
        CgroupIo(str(tmp_path)).set_limits(str(pod), (8, 0), IoLimits(rbps=10))


def test_the_host_problem_is_stated(tmp_path: Path) -> None:
    cg = CgroupIo(str(tmp_path))
    assert "no cgroup v2 hierarchy" in (cg.problem() or "")
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu memory pids\n")
    assert "io controller is not available" in (cg.problem() or "")
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    assert cg.problem() is None


# --- the Pod of a target path, and the node's refusals ------------------------------------------


def test_the_pod_is_read_from_the_kubelet_target_path() -> None:
    assert pod_of_target(KUBELET, MOUNT_TARGET) == UID
    assert pod_of_target(KUBELET, BLOCK_TARGET) == UID
    for other in (
        f"{KUBELET}/pods/{UID}/volumes/kubernetes.io~csi/pvc-1/other",
        f"{KUBELET}/pods/{UID}/volumes/kubernetes.io~empty-dir/pvc-1/mount",
        f"{KUBELET}/pods/not-a-uid/volumes/kubernetes.io~csi/pvc-1/mount",
        f"/elsewhere/pods/{UID}/volumes/kubernetes.io~csi/pvc-1/mount",
        f"{KUBELET}/plugins/kubernetes.io/csi/volumeDevices/staging/pvc-1/{UID}",
        f"{KUBELET}/pods/{UID}/volumes/kubernetes.io~csi/../../{UID}/x/mount",
        "relative/path",
    ):
        assert pod_of_target(KUBELET, other) is None, other


def _volume(params: dict[str, str]) -> model.Volume:
    vid = ids.volume_id_for("pvc-1", "node-1")
    return model.Volume(
        vid,
        "pvc-1",
        1 << 30,
        model.AccessType.BLOCK,
        "",
        "node-1",
        parameters=model.Parameters(params),
    )


def _node(cgroup_root: Path) -> NodeIoLimits:
    nothing = cast(Any, None)  # refusals come before the mount table or the backend is asked
    return NodeIoLimits(nothing, nothing, KUBELET, CgroupIo(str(cgroup_root)))


ATTACHMENT = model.Attachment(model.AttachmentKind.BLOCK_DEVICE, "/dev/null")
#: a block device every host with loop devices has (its node, not a device in use)
LOOP = model.Attachment(model.AttachmentKind.BLOCK_DEVICE, "/dev/loop0")
LOOP_DEVICE = (7, 0)


def test_publish_without_limits_touches_nothing(tmp_path: Path) -> None:
    assert _node(tmp_path / "absent").check(_volume({}), ATTACHMENT, "/anywhere", {}) is None


@pytest.mark.parametrize(
    ("context", "target", "error", "says"),
    [
        ({}, BLOCK_TARGET, FailedPrecondition, "podInfoOnMount: true"),
        ({POD_UID_KEY: "../x"}, BLOCK_TARGET, InvalidArgument, "is not a UUID"),
        ({POD_UID_KEY: UID}, "/var/lib/kubelet/other/t", InvalidArgument, "not the kubelet's path"),
        ({POD_UID_KEY: UID.replace("0f", "1f")}, BLOCK_TARGET, InvalidArgument, "not the kubelet"),
        ({POD_UID_KEY: UID}, BLOCK_TARGET, FailedPrecondition, "no cgroup v2 hierarchy"),
    ],
)
def test_publish_refuses_what_it_cannot_enforce(
    tmp_path: Path, context: dict[str, str], target: str, error: type[Exception], says: str
) -> None:
    volume = _volume({"writeBytesPerSecond": "4194304"})
    with pytest.raises(error, match=says):
        _node(tmp_path).check(volume, ATTACHMENT, target, context)


def test_publish_refuses_a_pod_without_a_cgroup_here(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("io memory\n")
    volume = _volume({"writeBytesPerSecond": "4194304"})
    with pytest.raises(FailedPrecondition, match=f"no cgroup of pod {UID}"):
        _node(tmp_path).check(volume, LOOP, BLOCK_TARGET, {POD_UID_KEY: UID})


def test_publish_refuses_a_device_that_is_no_block_device_before_any_mount(
    tmp_path: Path,
) -> None:
    (tmp_path / "cgroup.controllers").write_text("io memory\n")
    tree(tmp_path, "kubepods", f"pod{UID}")
    volume = _volume({"writeBytesPerSecond": "4194304"})
    with pytest.raises(FailedPrecondition, match="/dev/null is not a block device"):
        _node(tmp_path).check(volume, ATTACHMENT, BLOCK_TARGET, {POD_UID_KEY: UID})
    assert (tmp_path / "kubepods" / f"pod{UID}" / "io.max").read_text() == ""


def test_the_pod_cgroup_checked_before_the_mount_is_where_the_line_goes(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("io memory\n")
    tree(tmp_path, "kubepods", f"pod{UID}")
    volume = _volume({"writeBytesPerSecond": "4194304"})
    cgroup = _node(tmp_path).check(volume, LOOP, BLOCK_TARGET, {POD_UID_KEY: UID})
    assert cgroup == str(tmp_path / "kubepods" / f"pod{UID}")


def test_unpublish_without_a_cgroup_or_a_pod_path_is_a_quiet_no_op(tmp_path: Path) -> None:
    node = _node(tmp_path)
    limited = _volume({"writeBytesPerSecond": "4194304"})
    node.unpublish(limited, ATTACHMENT, BLOCK_TARGET)  # no cgroup v2 here
    (tmp_path / "cgroup.controllers").write_text("io\n")
    node.unpublish(limited, ATTACHMENT, BLOCK_TARGET)  # no cgroup of the pod
    node.unpublish(limited, ATTACHMENT, "/var/lib/kubelet/other")  # no pod in the path
    node.unpublish(limited, None, BLOCK_TARGET)
    pod = tree(tmp_path, "kubepods", f"pod{UID}")
    node.unpublish(limited, ATTACHMENT, BLOCK_TARGET)  # /dev/null: logged, left alone
    assert (pod / "io.max").read_text() == ""


def test_unpublish_leaves_the_line_of_a_volume_without_limits_alone(tmp_path: Path) -> None:
    """A line on the device of a volume without limits is not this driver's (an operator's,
    or another tool's): unpublishing such a volume leaves it."""
    (tmp_path / "cgroup.controllers").write_text("io\n")
    pod = str(tree(tmp_path, "kubepods", f"pod{UID}"))
    cg = CgroupIo(str(tmp_path))
    cg.set_limits(pod, LOOP_DEVICE, IoLimits(wbps=1 << 20))
    _node(tmp_path).unpublish(_volume({}), LOOP, BLOCK_TARGET)
    assert cg.limits(pod, LOOP_DEVICE) == IoLimits(wbps=1 << 20)
    _node(tmp_path).unpublish(_volume({"writeBytesPerSecond": "1048576"}), LOOP, BLOCK_TARGET)
    assert cg.limits(pod, LOOP_DEVICE) is None
