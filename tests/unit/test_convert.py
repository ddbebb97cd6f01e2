from typing import Any

import grpc
import pytest

from csi_driver import ids, model
from csi_driver.errors import CsiError, InvalidArgument, NotFound, OutOfRange
from csi_driver.proto import csi_pb2
from csi_driver.services import convert

VC = csi_pb2.VolumeCapability


def mount_cap(mode: Any = 1, fs_type: str = "", flags: tuple[str, ...] = ()) -> Any:
    return VC(
        mount=VC.MountVolume(fs_type=fs_type, mount_flags=list(flags)),
        access_mode=VC.AccessMode(mode=mode),
    )


def block_cap(mode: Any = 1) -> Any:
    return VC(block=VC.BlockVolume(), access_mode=VC.AccessMode(mode=mode))


def test_mount_capability_converts_with_fs_type_and_flags() -> None:
    cap = convert.capability_from_pb(mount_cap(7, "xfs", ("noatime", "nodev")))
    assert cap == model.Capability(
        model.AccessType.MOUNT,
        model.AccessMode.SINGLE_NODE_MULTI_WRITER,
        fs_type="xfs",
        mount_flags=("noatime", "nodev"),
    )


def test_block_capability_converts() -> None:
    cap = convert.capability_from_pb(block_cap(2))
    assert cap.access_type is model.AccessType.BLOCK
    assert cap.access_mode is model.AccessMode.SINGLE_NODE_READER_ONLY
    assert cap.access_mode.read_only


@pytest.mark.parametrize(
    ("cap", "fragment"),
    [
        (VC(), "is required"),
        (VC(access_mode=VC.AccessMode(mode="SINGLE_NODE_WRITER")), "access_type"),
        (VC(block=VC.BlockVolume()), "access_mode is required"),
        (block_cap(0), "unset or unknown"),
        (block_cap(99), "unset or unknown"),
        (mount_cap(1, "ext4,ro"), "fs_type"),
        (mount_cap(1, "../x"), "fs_type"),
        (mount_cap(1, "ext4", ("",)), "mount_flags"),
    ],
)
def test_bad_capabilities_are_invalid_argument(cap: Any, fragment: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        convert.capability_from_pb(cap, "volume_capability")
    assert fragment in exc.value.message
    assert exc.value.code is grpc.StatusCode.INVALID_ARGUMENT


def test_capability_list_needs_one_and_names_the_bad_index() -> None:
    with pytest.raises(InvalidArgument, match="at least one"):
        convert.capabilities_from_pb([])
    with pytest.raises(InvalidArgument, match=r"volume_capabilities\[1\]"):
        convert.capabilities_from_pb([mount_cap(), block_cap(0)])


def test_capability_round_trips() -> None:
    for pb in (mount_cap(1, "ext4", ("noatime",)), block_cap(6)):
        assert convert.capability_to_pb(convert.capability_from_pb(pb)) == pb


@pytest.mark.parametrize("path", ["/", "/var/lib/kubelet/pods/x/volumes", "/a b/c"])
def test_normal_absolute_paths_pass(path: str) -> None:
    assert convert.require_abs_path(path, "target_path") == path


@pytest.mark.parametrize(
    "path",
    [
        "",
        "relative/path",
        "/a/../b",
        "/a/./b",
        "/a/",
        "//a",
        "/a//b",
        "/a\x00b",
        "/" + "x" * 4096,
    ],
)
def test_bad_paths_are_invalid_argument(path: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        convert.require_abs_path(path, "target_path")
    assert "target_path" in exc.value.message


def test_path_limit_counts_bytes_not_characters() -> None:
    path = "/" + "é" * 2048  # 4097 bytes
    with pytest.raises(InvalidArgument, match="4096"):
        convert.require_abs_path(path, "p")


def test_required_and_name() -> None:
    with pytest.raises(InvalidArgument, match="name is required"):
        convert.require_name("")
    with pytest.raises(InvalidArgument, match="NUL"):
        convert.require_name("a\x00b")
    assert convert.require_name("n" * 128) == "n" * 128
    with pytest.raises(InvalidArgument, match="node_id is required"):
        convert.require("", "node_id")


def test_kubernetes_keys_are_stripped() -> None:
    params = {
        "csi.storage.k8s.io/pvc/name": "p",
        "csi.storage.k8s.io/fstype": "xfs",
        "kind": "fast",
    }
    assert convert.strip_kubernetes_keys(params) == {"kind": "fast"}


def test_capacity_range() -> None:
    cr = csi_pb2.CapacityRange
    assert convert.capacity_range(cr()) == (0, 0)
    assert convert.capacity_range(cr(required_bytes=5, limit_bytes=5)) == (5, 5)
    assert convert.capacity_range(cr(limit_bytes=7)) == (0, 7)
    for bad in (cr(required_bytes=-1), cr(limit_bytes=-1), cr(required_bytes=9, limit_bytes=8)):
        with pytest.raises(OutOfRange):
            convert.capacity_range(bad)


def test_content_sources() -> None:
    snap_id = ids.snapshot_id_for("s", "n1")
    vol_id = ids.volume_id_for("v", "n1")
    src = csi_pb2.VolumeContentSource(
        snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snap_id)
    )
    assert convert.content_source_from_pb(src) == model.ContentSource(
        model.SourceKind.SNAPSHOT, snap_id
    )
    assert convert.content_source_to_pb(convert.content_source_from_pb(src)) == src
    vsrc = csi_pb2.VolumeContentSource(
        volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=vol_id)
    )
    assert convert.content_source_from_pb(vsrc).kind is model.SourceKind.VOLUME

    missing = csi_pb2.VolumeContentSource(
        snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id="non-existing-id")
    )
    with pytest.raises(NotFound):
        convert.content_source_from_pb(missing)
    empty_id = csi_pb2.VolumeContentSource(snapshot=csi_pb2.VolumeContentSource.SnapshotSource())
    with pytest.raises(InvalidArgument, match="snapshot_id is required"):
        convert.content_source_from_pb(empty_id)
    with pytest.raises(InvalidArgument):
        convert.content_source_from_pb(csi_pb2.VolumeContentSource())
    # a volume id where a snapshot id belongs names no snapshot
    wrong_kind = csi_pb2.VolumeContentSource(
        snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=vol_id)
    )
    with pytest.raises(NotFound):
        convert.content_source_from_pb(wrong_kind)


def test_volume_and_snapshot_replies() -> None:
    vol = model.Volume(
        id=ids.volume_id_for("v", "n1"),
        name="v",
        capacity_bytes=1 << 20,
        access_type=model.AccessType.MOUNT,
        fs_type="ext4",
        node_id="n1",
        context=model.frozen_map({"k": "v"}),
    )
    pb = convert.volume_to_pb(vol, "topology.x/node")
    assert pb.volume_id == vol.id and pb.capacity_bytes == 1 << 20
    assert dict(pb.volume_context) == {"k": "v"}
    assert [dict(t.segments) for t in pb.accessible_topology] == [{"topology.x/node": "n1"}]
    assert not pb.HasField("content_source")

    snap = model.Snapshot("s1", "n", vol.id, 4096, 1_700_000_000_123_456_789)
    spb = convert.snapshot_to_pb(snap)
    assert spb.creation_time.ToNanoseconds() == 1_700_000_000_123_456_789
    assert spb.ready_to_use and spb.source_volume_id == vol.id and spb.size_bytes == 4096


def test_usage_and_condition() -> None:
    only_bytes = convert.usage_to_pb(model.Usage(100, 40, 60))
    assert [(u.unit, u.total, u.used, u.available) for u in only_bytes] == [
        (csi_pb2.VolumeUsage.BYTES, 100, 40, 60)
    ]
    both = convert.usage_to_pb(model.Usage(100, 40, 60, 10, 3, 7))
    assert [(u.unit, u.total, u.used, u.available) for u in both][1] == (
        csi_pb2.VolumeUsage.INODES,
        10,
        3,
        7,
    )
    cond = convert.condition_to_pb(model.VolumeCondition(True, "gone"))
    assert cond.abnormal and cond.message == "gone"


def test_errors_are_csi_errors() -> None:
    with pytest.raises(CsiError):
        convert.require_abs_path("x", "p")
