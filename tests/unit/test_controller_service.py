"""Controller and Identity servicers against an in-memory backend: codes for bad input, sizes,
modes. The real backends are exercised by the integration and sanity lanes."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from csi_driver import ids, model
from csi_driver.backends import mutable
from csi_driver.backends.base import listed_after
from csi_driver.config import Config, Endpoint, Mode, topology_key
from csi_driver.errors import AlreadyExists, CsiError, InvalidArgument
from csi_driver.locks import KeyLocks
from csi_driver.proto import csi_pb2
from csi_driver.services import pagination
from csi_driver.services.controller import ControllerServicer
from csi_driver.services.identity import IdentityServicer
from csi_driver.services.sizing import DEFAULT_VOLUME_SIZE
from csi_driver.units import GiB, MiB, round_up

NODE = "node-1"
KEY = topology_key("nodelocal.csi.dev")
VC = csi_pb2.VolumeCapability
Rpc = csi_pb2.ControllerServiceCapability.RPC
#: the servicers never use their context; the interceptor owns statuses
CTX = cast(grpc.ServicerContext, None)


class FakeBackend:
    """Volumes and snapshots in dicts; records every mutating call."""

    max_volumes_per_node = 0

    def __init__(self) -> None:
        self.volumes: dict[str, model.Volume] = {}
        self.snapshots: dict[str, model.Snapshot] = {}
        self.calls: list[tuple[str, str]] = []
        #: how often validate_parameters ran (once per request is the rule)
        self.validations = 0
        self.free = 10 * GiB
        self.unhealthy: str | None = None
        self.clock = 1_000

    def health(self) -> str | None:
        return self.unhealthy

    def validate_parameters(self, parameters: Mapping[str, str]) -> model.Parameters:
        self.validations += 1
        for key, value in parameters.items():
            if key == mutable.WIPE_ON_DELETE:
                continue
            if key != "kind" or value not in ("fast", "slow"):
                raise InvalidArgument(f"unknown parameter {key}={value}")
        changes = mutable.validate_mutable(
            {k: v for k, v in parameters.items() if k == mutable.WIPE_ON_DELETE}, "fake"
        )
        return model.Parameters(mutable.apply({"kind": parameters.get("kind", "fast")}, changes))

    def validate_mutable_parameters(self, parameters: Mapping[str, str]) -> Mapping[str, str]:
        return mutable.validate_mutable(parameters, "fake")

    def modify_volume(self, volume_id: str, changes: Mapping[str, str]) -> model.Volume:
        self.calls.append(("modify_volume", volume_id))
        volume = self.volumes[volume_id]
        volume = dataclasses.replace(
            volume, parameters=model.Parameters(mutable.apply(volume.parameters, changes))
        )
        self.volumes[volume_id] = volume
        return volume

    def supported_fs_types(self) -> Sequence[str]:
        return ["ext4", "xfs"]

    def round_size(self, size_bytes: int, parameters: model.Parameters) -> int:
        return round_up(max(size_bytes, 1), MiB)

    def create_volume(self, spec: model.VolumeSpec) -> model.Volume:
        self.calls.append(("create_volume", spec.name))
        vid = ids.volume_id_for(spec.name, NODE)
        if vid in self.volumes:
            return self.volumes[vid]
        vol = model.Volume(
            id=vid,
            name=spec.name,
            capacity_bytes=spec.capacity_bytes,
            access_type=spec.access_type,
            fs_type=spec.fs_type,
            node_id=NODE,
            parameters=spec.parameters,
            content_source=spec.content_source,
            context=model.frozen_map({"kind": spec.parameters.get("kind", "")}),
        )
        self.volumes[vid] = vol
        return vol

    def delete_volume(self, volume_id: str) -> None:
        self.calls.append(("delete_volume", volume_id))
        self.volumes.pop(volume_id, CTX)

    def get_volume(self, volume_id: str) -> model.Volume | None:
        return self.volumes.get(volume_id)

    def list_volumes(self, after: str = "", limit: int = 0) -> Sequence[model.Volume]:
        return listed_after(self.volumes.values(), lambda v: v.id, after, limit)

    def capacity(self, parameters: model.Parameters) -> int:
        return self.free

    def storage_report(self, max_volumes: int) -> model.StorageReport:
        return model.StorageReport()

    def expand_volume(self, volume_id: str, size_bytes: int) -> model.Volume:
        self.calls.append(("expand_volume", volume_id))
        vol = dataclasses.replace(self.volumes[volume_id], capacity_bytes=size_bytes)
        self.volumes[volume_id] = vol
        return vol

    def set_published(self, volume_id: str, node_id: str, published: bool) -> None:
        self.calls.append(("set_published", f"{volume_id}:{node_id}:{published}"))
        vol = self.volumes[volume_id]
        nodes = vol.published_nodes | {node_id} if published else vol.published_nodes - {node_id}
        self.volumes[volume_id] = dataclasses.replace(vol, published_nodes=frozenset(nodes))

    def create_snapshot(
        self, name: str, source_volume_id: str, parameters: Mapping[str, str]
    ) -> model.Snapshot:
        self.calls.append(("create_snapshot", name))
        sid = ids.snapshot_id_for(name, NODE)
        if sid in self.snapshots:
            if self.snapshots[sid].source_volume_id != source_volume_id:
                raise AlreadyExists("taken")
            return self.snapshots[sid]
        self.clock += 1
        src = self.volumes[source_volume_id]
        snap = model.Snapshot(sid, name, source_volume_id, src.capacity_bytes, self.clock)
        self.snapshots[sid] = snap
        return snap

    def delete_snapshot(self, snapshot_id: str) -> None:
        self.calls.append(("delete_snapshot", snapshot_id))
        self.snapshots.pop(snapshot_id, CTX)

    def get_snapshot(self, snapshot_id: str) -> model.Snapshot | None:
        return self.snapshots.get(snapshot_id)

    def list_snapshots(self, after: str = "", limit: int = 0) -> Sequence[model.Snapshot]:
        return listed_after(self.snapshots.values(), lambda s: s.id, after, limit)

    def volume_condition(self, volume_id: str) -> model.VolumeCondition:
        return model.VolumeCondition.healthy()

    def volume_usage(self, volume_id: str) -> model.Usage | None:
        return None

    def attach(self, volume_id: str) -> model.Attachment:
        raise AssertionError("the controller never attaches")

    def locate(self, volume_id: str) -> model.Attachment | None:
        raise AssertionError("the controller never looks for attachments")

    def detach(self, volume_id: str) -> None:
        raise AssertionError("the controller never detaches")

    def refresh_attachment(self, volume_id: str) -> None:
        raise AssertionError("the controller never refreshes attachments")


def make_config(mode: Mode = Mode.STANDALONE, **kw: Any) -> Config:
    return Config(endpoint=Endpoint("unix", "/tmp/x.sock"), node_id=NODE, mode=mode, **kw)


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def ctl(backend: FakeBackend) -> ControllerServicer:
    return ControllerServicer(make_config(), backend, KeyLocks())


def mount(mode: Any = 1, fs_type: str = "") -> Any:
    return VC(mount=VC.MountVolume(fs_type=fs_type), access_mode=VC.AccessMode(mode=mode))


def block(mode: Any = 1) -> Any:
    return VC(block=VC.BlockVolume(), access_mode=VC.AccessMode(mode=mode))


def create_req(name: str = "pvc-1", **kw: Any) -> csi_pb2.CreateVolumeRequest:
    kw.setdefault("volume_capabilities", [mount()])
    return csi_pb2.CreateVolumeRequest(name=name, **kw)


def size(required: int = 0, limit: int = 0) -> csi_pb2.CapacityRange:
    return csi_pb2.CapacityRange(required_bytes=required, limit_bytes=limit)


def code_of(fn: object, *args: object) -> grpc.StatusCode:
    with pytest.raises(CsiError) as exc:
        fn(*args, CTX)  # type: ignore[operator]
    assert exc.value.message  # every rejection says why
    return exc.value.code


def create(ctl: ControllerServicer, name: str = "pvc-1", **kw: Any) -> csi_pb2.Volume:
    return ctl.CreateVolume(create_req(name, **kw), CTX).volume


# --- CreateVolume ---------------------------------------------------------------------------


def test_create_volume_reply(ctl: ControllerServicer, backend: FakeBackend) -> None:
    vol = create(
        ctl,
        capacity_range=size(64 * MiB),
        parameters={"kind": "slow", "csi.storage.k8s.io/pvc/name": "claim"},
    )
    assert vol.volume_id == ids.volume_id_for("pvc-1", NODE)
    assert vol.capacity_bytes == 64 * MiB
    assert [dict(t.segments) for t in vol.accessible_topology] == [{KEY: NODE}]
    assert dict(vol.volume_context) == {"kind": "slow"}
    stored = backend.volumes[vol.volume_id]
    assert dict(stored.parameters) == {"kind": "slow"}  # the k8s key never reached the backend
    assert stored.fs_type == "ext4"  # the backend's default


@pytest.mark.parametrize(
    ("request_kw", "expected"),
    [
        ({"name": ""}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"volume_capabilities": []}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"volume_capabilities": [VC()]}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"volume_capabilities": [mount(5)]}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"volume_capabilities": [mount(3)]}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"volume_capabilities": [mount(), block()]}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"volume_capabilities": [mount(1, "zfs")]}, grpc.StatusCode.INVALID_ARGUMENT),
        (
            {"volume_capabilities": [mount(1, "ext4"), mount(2, "xfs")]},
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        ({"parameters": {"bogus": "1"}}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"mutable_parameters": {"iops": "1"}}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"capacity_range": size(2 * MiB, MiB)}, grpc.StatusCode.OUT_OF_RANGE),
        ({"capacity_range": size(-1)}, grpc.StatusCode.OUT_OF_RANGE),
        # rounding to whole MiB would exceed the limit
        ({"capacity_range": size(1000, 1000)}, grpc.StatusCode.OUT_OF_RANGE),
        (
            {
                "accessibility_requirements": csi_pb2.TopologyRequirement(
                    requisite=[csi_pb2.Topology(segments={KEY: "other-node"})]
                )
            },
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
        (
            {
                "accessibility_requirements": csi_pb2.TopologyRequirement(
                    preferred=[csi_pb2.Topology(segments={KEY: "other-node"})]
                )
            },
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
        (
            {
                "volume_content_source": csi_pb2.VolumeContentSource(
                    snapshot=csi_pb2.VolumeContentSource.SnapshotSource(
                        snapshot_id="non-existing-snapshot-id"
                    )
                )
            },
            grpc.StatusCode.NOT_FOUND,
        ),
        (
            {
                "volume_content_source": csi_pb2.VolumeContentSource(
                    volume=csi_pb2.VolumeContentSource.VolumeSource(
                        volume_id=ids.volume_id_for("missing", NODE)
                    )
                )
            },
            grpc.StatusCode.NOT_FOUND,
        ),
    ],
)
def test_create_volume_rejects_bad_requests_without_touching_storage(
    ctl: ControllerServicer,
    backend: FakeBackend,
    request_kw: dict[str, object],
    expected: grpc.StatusCode,
) -> None:
    name = str(request_kw.pop("name", "pvc-bad"))
    assert code_of(ctl.CreateVolume, create_req(name, **request_kw)) is expected
    assert backend.calls == [] and backend.volumes == {}


def test_topology_of_this_node_is_accepted(ctl: ControllerServicer) -> None:
    reqs = csi_pb2.TopologyRequirement(
        requisite=[
            csi_pb2.Topology(segments={KEY: "other"}),
            csi_pb2.Topology(segments={KEY: NODE}),
        ],
        preferred=[csi_pb2.Topology(segments={KEY: "other"})],
    )
    assert create(ctl, accessibility_requirements=reqs).volume_id


def test_default_size_is_one_gib_capped_by_limit(ctl: ControllerServicer) -> None:
    assert create(ctl, "a").capacity_bytes == DEFAULT_VOLUME_SIZE == GiB
    assert create(ctl, "b", capacity_range=size(0, 100 * MiB)).capacity_bytes == 100 * MiB


def test_size_is_rounded_by_the_backend(ctl: ControllerServicer) -> None:
    assert create(ctl, capacity_range=size(MiB + 1)).capacity_bytes == 2 * MiB


def test_same_name_is_idempotent_but_incompatible_requests_are_already_exists(
    ctl: ControllerServicer, backend: FakeBackend
) -> None:
    first = create(ctl, capacity_range=size(64 * MiB, 64 * MiB))
    again = create(ctl, capacity_range=size(64 * MiB, 64 * MiB))
    assert again == first
    bigger = create_req(capacity_range=size(128 * MiB, 128 * MiB))
    assert code_of(ctl.CreateVolume, bigger) is grpc.StatusCode.ALREADY_EXISTS
    as_block = create_req(capacity_range=size(64 * MiB), volume_capabilities=[block()])
    assert code_of(ctl.CreateVolume, as_block) is grpc.StatusCode.ALREADY_EXISTS
    other_fs = create_req(capacity_range=size(64 * MiB), volume_capabilities=[mount(1, "xfs")])
    assert code_of(ctl.CreateVolume, other_fs) is grpc.StatusCode.ALREADY_EXISTS
    assert backend.volumes[first.volume_id].capacity_bytes == 64 * MiB


def test_an_existing_volume_is_checked_once_and_not_made_again(
    ctl: ControllerServicer, backend: FakeBackend
) -> None:
    first = create(ctl, capacity_range=size(64 * MiB), parameters={"kind": "slow"})
    again = create(ctl, capacity_range=size(64 * MiB), parameters={"kind": "slow"})
    assert again == first
    assert [c for c in backend.calls if c[0] == "create_volume"] == [("create_volume", "pvc-1")]
    # a request without a size is answered by any size within its limit
    assert create(ctl, capacity_range=size(0, 64 * MiB), parameters={"kind": "slow"}) == first
    other = create_req(capacity_range=size(64 * MiB), parameters={"kind": "fast"})
    with pytest.raises(CsiError) as exc:
        ctl.CreateVolume(other, CTX)
    assert "parameters are {'kind': 'slow'}, not {'kind': 'fast'}" in exc.value.message
    clone = create_req(
        capacity_range=size(64 * MiB),
        parameters={"kind": "slow"},
        volume_content_source=csi_pb2.VolumeContentSource(
            volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=first.volume_id)
        ),
    )
    assert code_of(ctl.CreateVolume, clone) is grpc.StatusCode.ALREADY_EXISTS


def test_parameters_are_validated_once_per_create(
    ctl: ControllerServicer, backend: FakeBackend
) -> None:
    vol = create(
        ctl,
        parameters={"kind": "slow", "wipeOnDelete": "false"},
        mutable_parameters={"wipeOnDelete": "True"},
    )
    assert backend.validations == 1
    assert dict(backend.volumes[vol.volume_id].parameters) == {
        "kind": "slow",
        "wipeOnDelete": "true",  # the VolumeAttributesClass's value won
    }
    assert isinstance(backend.volumes[vol.volume_id].parameters, model.Parameters)


def test_clone_and_restore_take_the_source_size(
    ctl: ControllerServicer, backend: FakeBackend
) -> None:
    src = create(ctl, "src", capacity_range=size(300 * MiB))
    clone = create(
        ctl,
        "clone",
        volume_content_source=csi_pb2.VolumeContentSource(
            volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=src.volume_id)
        ),
    )
    assert clone.capacity_bytes == 300 * MiB
    assert clone.content_source.volume.volume_id == src.volume_id
    snap = ctl.CreateSnapshot(
        csi_pb2.CreateSnapshotRequest(name="snap", source_volume_id=src.volume_id), CTX
    ).snapshot
    restore_src = csi_pb2.VolumeContentSource(
        snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id)
    )
    small = create_req("restore", volume_content_source=restore_src, capacity_range=size(MiB))
    assert code_of(ctl.CreateVolume, small) is grpc.StatusCode.OUT_OF_RANGE
    restored = create(ctl, "restore", volume_content_source=restore_src)
    assert restored.content_source.snapshot.snapshot_id == snap.snapshot_id
    assert backend.volumes[restored.volume_id].content_source == model.ContentSource(
        model.SourceKind.SNAPSHOT, snap.snapshot_id
    )


def test_source_on_another_node_is_not_found(ctl: ControllerServicer) -> None:
    elsewhere = csi_pb2.VolumeContentSource(
        volume=csi_pb2.VolumeContentSource.VolumeSource(
            volume_id=ids.volume_id_for("x", "other-node")
        )
    )
    req = create_req(volume_content_source=elsewhere)
    assert code_of(ctl.CreateVolume, req) is grpc.StatusCode.NOT_FOUND


def test_busy_name_is_aborted(ctl: ControllerServicer) -> None:
    locks = ctl._locks
    with locks.hold(ids.volume_id_for("pvc-1", NODE)):
        assert code_of(ctl.CreateVolume, create_req()) is grpc.StatusCode.ABORTED


# --- DeleteVolume ---------------------------------------------------------------------------


def test_delete_volume(ctl: ControllerServicer, backend: FakeBackend) -> None:
    assert code_of(ctl.DeleteVolume, csi_pb2.DeleteVolumeRequest()) is (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    vid = create(ctl).volume_id
    ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid), CTX)
    assert vid not in backend.volumes
    ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid), CTX)  # idempotent
    for foreign in ("fake-vol-id", "../../etc", "a/b"):
        ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=foreign), CTX)
    assert [c for c in backend.calls if c[0] == "delete_volume"] == [("delete_volume", vid)] * 2


def test_delete_volume_of_another_node_is_refused(
    ctl: ControllerServicer, backend: FakeBackend
) -> None:
    req = csi_pb2.DeleteVolumeRequest(volume_id=ids.volume_id_for("x", "node-2"))
    assert code_of(ctl.DeleteVolume, req) is grpc.StatusCode.FAILED_PRECONDITION
    assert backend.calls == []


# --- ControllerPublish / Unpublish ----------------------------------------------------------


def publish_req(
    volume_id: str, node_id: str = NODE, cap: Any = None
) -> csi_pb2.ControllerPublishVolumeRequest:
    return csi_pb2.ControllerPublishVolumeRequest(
        volume_id=volume_id, node_id=node_id, volume_capability=cap or mount()
    )


def test_publish_records_and_is_idempotent(ctl: ControllerServicer, backend: FakeBackend) -> None:
    vid = create(ctl).volume_id
    for _ in range(2):
        reply = ctl.ControllerPublishVolume(publish_req(vid), CTX)
        assert dict(reply.publish_context) == {}
    assert backend.volumes[vid].published_nodes == {NODE}
    assert [c for c in backend.calls if c[0] == "set_published"] == [
        ("set_published", f"{vid}:{NODE}:True")
    ]
    ctl.ControllerUnpublishVolume(
        csi_pb2.ControllerUnpublishVolumeRequest(volume_id=vid, node_id=NODE), CTX
    )
    assert backend.volumes[vid].published_nodes == frozenset()


def test_publish_errors(ctl: ControllerServicer, backend: FakeBackend) -> None:
    vid = create(ctl).volume_id
    calls_before = list(backend.calls)
    cases = [
        (csi_pb2.ControllerPublishVolumeRequest(), grpc.StatusCode.INVALID_ARGUMENT),
        (
            csi_pb2.ControllerPublishVolumeRequest(volume_id=vid, volume_capability=mount()),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            csi_pb2.ControllerPublishVolumeRequest(volume_id=vid, node_id=NODE),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (publish_req("fake-vol-id-123", "fake-node"), grpc.StatusCode.NOT_FOUND),
        (publish_req(ids.volume_id_for("gone", NODE)), grpc.StatusCode.NOT_FOUND),
        (publish_req(vid, "fake-node-id-1"), grpc.StatusCode.NOT_FOUND),
        (publish_req(vid, NODE, block()), grpc.StatusCode.INVALID_ARGUMENT),
        (publish_req(vid, NODE, mount(5)), grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for req, expected in cases:
        assert code_of(ctl.ControllerPublishVolume, req) is expected, req
    assert backend.calls == calls_before


def test_publish_respects_the_attach_limit(backend: FakeBackend) -> None:
    ctl = ControllerServicer(make_config(max_volumes_per_node=1), backend, KeyLocks())
    a, b = create(ctl, "a").volume_id, create(ctl, "b").volume_id
    ctl.ControllerPublishVolume(publish_req(a), CTX)
    ctl.ControllerPublishVolume(publish_req(a), CTX)  # already there: still fine
    assert code_of(ctl.ControllerPublishVolume, publish_req(b)) is (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )


def test_unpublish_is_lenient_about_unknown_things(
    ctl: ControllerServicer, backend: FakeBackend
) -> None:
    assert code_of(ctl.ControllerUnpublishVolume, csi_pb2.ControllerUnpublishVolumeRequest()) is (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    vid = create(ctl).volume_id
    for volume_id, node_id in [
        ("fake-vol-id", NODE),
        (ids.volume_id_for("gone", NODE), NODE),
        (vid, "some-other-node"),
        (vid, ""),
    ]:
        ctl.ControllerUnpublishVolume(
            csi_pb2.ControllerUnpublishVolumeRequest(volume_id=volume_id, node_id=node_id), CTX
        )
    assert not any(c[0] == "set_published" for c in backend.calls)


# --- modes ----------------------------------------------------------------------------------


def capability_types(ctl: ControllerServicer) -> set[int]:
    reply = ctl.ControllerGetCapabilities(csi_pb2.ControllerGetCapabilitiesRequest(), CTX)
    return {c.rpc.type for c in reply.capabilities}


def test_controller_mode_serves_publish_from_the_id_alone() -> None:
    ctl = ControllerServicer(make_config(Mode.CONTROLLER), None, KeyLocks())
    assert capability_types(ctl) == {Rpc.PUBLISH_UNPUBLISH_VOLUME, Rpc.SINGLE_NODE_MULTI_WRITER}
    vid = ids.volume_id_for("pvc", NODE)
    ctl.ControllerPublishVolume(publish_req(vid), CTX)
    assert code_of(ctl.ControllerPublishVolume, publish_req(vid, "node-2")) is (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    assert code_of(ctl.ControllerPublishVolume, publish_req("not-ours")) is (
        grpc.StatusCode.NOT_FOUND
    )
    ctl.ControllerUnpublishVolume(
        csi_pb2.ControllerUnpublishVolumeRequest(volume_id=vid, node_id=NODE), CTX
    )
    unimplemented = [
        (ctl.CreateVolume, create_req()),
        (ctl.DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id=vid)),
        (ctl.ListVolumes, csi_pb2.ListVolumesRequest()),
        (ctl.GetCapacity, csi_pb2.GetCapacityRequest()),
        (ctl.CreateSnapshot, csi_pb2.CreateSnapshotRequest(name="s", source_volume_id=vid)),
        (ctl.ListSnapshots, csi_pb2.ListSnapshotsRequest()),
        (ctl.ValidateVolumeCapabilities, csi_pb2.ValidateVolumeCapabilitiesRequest()),
        (ctl.ControllerExpandVolume, csi_pb2.ControllerExpandVolumeRequest()),
        (ctl.ControllerGetVolume, csi_pb2.ControllerGetVolumeRequest(volume_id=vid)),
    ]
    for method, req in unimplemented:
        assert code_of(method, req) is grpc.StatusCode.UNIMPLEMENTED


def test_node_mode_leaves_publish_to_the_controller(backend: FakeBackend) -> None:
    ctl = ControllerServicer(make_config(Mode.NODE), backend, KeyLocks())
    types = capability_types(ctl)
    assert Rpc.PUBLISH_UNPUBLISH_VOLUME not in types
    assert Rpc.LIST_VOLUMES_PUBLISHED_NODES not in types
    assert {Rpc.CREATE_DELETE_VOLUME, Rpc.EXPAND_VOLUME, Rpc.CLONE_VOLUME} <= types
    vid = create(ctl).volume_id
    assert code_of(ctl.ControllerPublishVolume, publish_req(vid)) is grpc.StatusCode.UNIMPLEMENTED
    assert (
        code_of(
            ctl.ControllerUnpublishVolume, csi_pb2.ControllerUnpublishVolumeRequest(volume_id=vid)
        )
        is grpc.StatusCode.UNIMPLEMENTED
    )


def test_standalone_capabilities(ctl: ControllerServicer) -> None:
    assert capability_types(ctl) == {
        Rpc.CREATE_DELETE_VOLUME,
        Rpc.PUBLISH_UNPUBLISH_VOLUME,
        Rpc.LIST_VOLUMES,
        Rpc.GET_CAPACITY,
        Rpc.CREATE_DELETE_SNAPSHOT,
        Rpc.LIST_SNAPSHOTS,
        Rpc.CLONE_VOLUME,
        Rpc.EXPAND_VOLUME,
        Rpc.LIST_VOLUMES_PUBLISHED_NODES,
        Rpc.VOLUME_CONDITION,
        Rpc.GET_VOLUME,
        Rpc.SINGLE_NODE_MULTI_WRITER,
        Rpc.MODIFY_VOLUME,
    }


def test_unoffered_rpcs_are_unimplemented(ctl: ControllerServicer) -> None:
    assert code_of(ctl.GetSnapshot, csi_pb2.GetSnapshotRequest()) is grpc.StatusCode.UNIMPLEMENTED


# --- ValidateVolumeCapabilities -------------------------------------------------------------


def validate(ctl: ControllerServicer, vid: str, *caps: Any, **kw: Any) -> object:
    req = csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=vid, volume_capabilities=list(caps), **kw
    )
    return ctl.ValidateVolumeCapabilities(req, CTX)


def test_validate_volume_capabilities(ctl: ControllerServicer) -> None:
    vid = create(ctl, parameters={"kind": "slow"}).volume_id
    ok = validate(ctl, vid, mount(1), mount(7, "ext4"), parameters={"kind": "slow"})
    assert ok.HasField("confirmed")  # type: ignore[attr-defined]
    assert list(ok.confirmed.volume_capabilities) == [mount(1), mount(7, "ext4")]  # type: ignore[attr-defined]
    assert dict(ok.confirmed.parameters) == {"kind": "slow"}  # type: ignore[attr-defined]
    for caps, kw in [
        ((block(),), {}),
        ((mount(1, "xfs"),), {}),
        ((mount(5),), {}),
        ((mount(1),), {"parameters": {"kind": "fast"}}),
        ((mount(1),), {"parameters": {"bogus": "x"}}),
    ]:
        reply = validate(ctl, vid, *caps, **kw)
        assert not reply.HasField("confirmed") and reply.message  # type: ignore[attr-defined]


def test_validate_volume_capabilities_errors(ctl: ControllerServicer) -> None:
    vid = create(ctl).volume_id
    v = ctl.ValidateVolumeCapabilities
    req = csi_pb2.ValidateVolumeCapabilitiesRequest
    assert code_of(v, req(volume_capabilities=[mount()])) is grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(v, req(volume_id=vid)) is grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(v, req(volume_id=vid, volume_capabilities=[VC()])) is (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    for missing in ("fake-vol-id-abc", ids.volume_id_for("gone", NODE)):
        assert code_of(v, req(volume_id=missing, volume_capabilities=[mount()])) is (
            grpc.StatusCode.NOT_FOUND
        )


# --- ListVolumes / ControllerGetVolume ------------------------------------------------------


def test_list_volumes_pages_and_status(ctl: ControllerServicer) -> None:
    vids = sorted(create(ctl, f"pvc-{i}").volume_id for i in range(5))
    ctl.ControllerPublishVolume(publish_req(vids[0]), CTX)
    seen: list[str] = []
    token = ""
    while True:
        reply = ctl.ListVolumes(
            csi_pb2.ListVolumesRequest(max_entries=2, starting_token=token), CTX
        )
        assert len(reply.entries) <= 2
        seen += [e.volume.volume_id for e in reply.entries]
        for e in reply.entries:
            assert not e.status.volume_condition.abnormal
            expected = [NODE] if e.volume.volume_id == vids[0] else []
            assert list(e.status.published_node_ids) == expected
        token = reply.next_token
        if not token:
            break
    assert seen == vids
    assert code_of(ctl.ListVolumes, csi_pb2.ListVolumesRequest(starting_token="invalid-token")) is (
        grpc.StatusCode.ABORTED
    )
    assert code_of(ctl.ListVolumes, csi_pb2.ListVolumesRequest(max_entries=-1)) is (
        grpc.StatusCode.INVALID_ARGUMENT
    )


def test_controller_get_volume(ctl: ControllerServicer) -> None:
    vid = create(ctl).volume_id
    ctl.ControllerPublishVolume(publish_req(vid), CTX)
    reply = ctl.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=vid), CTX)
    assert reply.volume.volume_id == vid
    assert list(reply.status.published_node_ids) == [NODE]
    assert reply.status.volume_condition.message
    req = csi_pb2.ControllerGetVolumeRequest
    assert code_of(ctl.ControllerGetVolume, req()) is grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(ctl.ControllerGetVolume, req(volume_id=ids.volume_id_for("x", NODE))) is (
        grpc.StatusCode.NOT_FOUND
    )


# --- GetCapacity ----------------------------------------------------------------------------


def test_get_capacity(ctl: ControllerServicer, backend: FakeBackend) -> None:
    reply = ctl.GetCapacity(csi_pb2.GetCapacityRequest(), CTX)
    assert reply.available_capacity == backend.free
    assert reply.maximum_volume_size.value == backend.free
    here = csi_pb2.Topology(segments={KEY: NODE})
    there = csi_pb2.Topology(segments={KEY: "node-2"})
    req = csi_pb2.GetCapacityRequest
    assert ctl.GetCapacity(req(accessible_topology=here), CTX).available_capacity == backend.free
    assert ctl.GetCapacity(req(accessible_topology=there), CTX).available_capacity == 0
    assert ctl.GetCapacity(req(volume_capabilities=[mount(5)]), CTX).available_capacity == 0
    assert ctl.GetCapacity(req(volume_capabilities=[block()]), CTX).available_capacity > 0
    assert code_of(ctl.GetCapacity, req(parameters={"bogus": "1"})) is (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert code_of(ctl.GetCapacity, req(volume_capabilities=[VC()])) is (
        grpc.StatusCode.INVALID_ARGUMENT
    )


# --- ControllerExpandVolume -----------------------------------------------------------------


def expand(ctl: ControllerServicer, vid: str, cr: csi_pb2.CapacityRange, **kw: Any) -> object:
    return ctl.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(volume_id=vid, capacity_range=cr, **kw), CTX
    )


def test_expand_volume(ctl: ControllerServicer, backend: FakeBackend) -> None:
    vid = create(ctl, capacity_range=size(64 * MiB)).volume_id
    grown = expand(ctl, vid, size(100 * MiB + 1))
    assert grown.capacity_bytes == 101 * MiB  # type: ignore[attr-defined]
    assert grown.node_expansion_required  # type: ignore[attr-defined]
    assert backend.volumes[vid].capacity_bytes == 101 * MiB
    shrink = expand(ctl, vid, size(10 * MiB))
    assert shrink.capacity_bytes == 101 * MiB  # type: ignore[attr-defined]
    assert [c for c in backend.calls if c[0] == "expand_volume"] == [("expand_volume", vid)]


def test_expand_volume_errors(ctl: ControllerServicer, backend: FakeBackend) -> None:
    vid = create(ctl, capacity_range=size(64 * MiB)).volume_id
    req = csi_pb2.ControllerExpandVolumeRequest
    e = ctl.ControllerExpandVolume
    assert code_of(e, req(capacity_range=size(GiB))) is grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(e, req(volume_id=vid)) is grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(e, req(volume_id=vid, capacity_range=size())) is (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    gone = ids.volume_id_for("gone", NODE)
    assert code_of(e, req(volume_id=gone, capacity_range=size(GiB))) is grpc.StatusCode.NOT_FOUND
    assert code_of(e, req(volume_id=vid, capacity_range=size(GiB, MiB))) is (
        grpc.StatusCode.OUT_OF_RANGE
    )
    assert code_of(e, req(volume_id=vid, capacity_range=size(0, 32 * MiB))) is (
        grpc.StatusCode.OUT_OF_RANGE
    )
    assert code_of(e, req(volume_id=vid, capacity_range=size(GiB), volume_capability=block())) is (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert backend.volumes[vid].capacity_bytes == 64 * MiB


# --- snapshots ------------------------------------------------------------------------------


def snap(ctl: ControllerServicer, name: str, source: str) -> csi_pb2.Snapshot:
    return ctl.CreateSnapshot(
        csi_pb2.CreateSnapshotRequest(
            name=name, source_volume_id=source, parameters={"csi.storage.k8s.io/x": "y"}
        ),
        CTX,
    ).snapshot


def test_create_snapshot(ctl: ControllerServicer, backend: FakeBackend) -> None:
    vid = create(ctl, "a").volume_id
    other = create(ctl, "b").volume_id
    first = snap(ctl, "s1", vid)
    assert first.ready_to_use and first.source_volume_id == vid
    assert first.creation_time.ToNanoseconds() > 0
    assert snap(ctl, "s1", vid) == first
    req = csi_pb2.CreateSnapshotRequest
    c = ctl.CreateSnapshot
    assert code_of(c, req(name="s1", source_volume_id=other)) is grpc.StatusCode.ALREADY_EXISTS
    assert code_of(c, req(source_volume_id="testId")) is grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(c, req(name="s2")) is grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(c, req(name="s2", source_volume_id=ids.volume_id_for("gone", NODE))) is (
        grpc.StatusCode.NOT_FOUND
    )
    assert code_of(c, req(name="s2", source_volume_id="fake-vol")) is grpc.StatusCode.NOT_FOUND
    assert list(backend.snapshots) == [first.snapshot_id]


def test_delete_snapshot(ctl: ControllerServicer, backend: FakeBackend) -> None:
    vid = create(ctl).volume_id
    sid = snap(ctl, "s", vid).snapshot_id
    d = ctl.DeleteSnapshot
    assert code_of(d, csi_pb2.DeleteSnapshotRequest()) is grpc.StatusCode.INVALID_ARGUMENT
    d(csi_pb2.DeleteSnapshotRequest(snapshot_id="reallyfakesnapshotid"), CTX)
    d(csi_pb2.DeleteSnapshotRequest(snapshot_id=sid), CTX)
    d(csi_pb2.DeleteSnapshotRequest(snapshot_id=sid), CTX)
    assert backend.snapshots == {}
    other = csi_pb2.DeleteSnapshotRequest(snapshot_id=ids.snapshot_id_for("s", "node-2"))
    assert code_of(d, other) is grpc.StatusCode.FAILED_PRECONDITION


def test_list_snapshots(ctl: ControllerServicer) -> None:
    vols = [create(ctl, f"v{i}").volume_id for i in range(3)]
    sids = sorted(snap(ctl, f"s{i}", v).snapshot_id for i, v in enumerate(vols))
    target = snap(ctl, "s0", vols[0])

    def listed(**kw: Any) -> tuple[list[str], str]:
        reply = ctl.ListSnapshots(csi_pb2.ListSnapshotsRequest(**kw), CTX)
        return [e.snapshot.snapshot_id for e in reply.entries], reply.next_token

    assert listed() == (sids, "")
    assert listed(snapshot_id=target.snapshot_id) == ([target.snapshot_id], "")
    assert listed(snapshot_id="none-exist-id") == ([], "")
    assert listed(snapshot_id=ids.snapshot_id_for("s0", "node-2")) == ([], "")
    assert listed(source_volume_id=vols[0]) == ([target.snapshot_id], "")
    assert listed(source_volume_id="fake-vol-id-1") == ([], "")
    page, token = listed(max_entries=2)
    assert page == sids[:2] and token
    assert listed(starting_token=token) == (sids[2:], "")
    volume_token = pagination.encode_token("v", vols[0])
    for bad in ("invalid-token", volume_token):
        assert code_of(ctl.ListSnapshots, csi_pb2.ListSnapshotsRequest(starting_token=bad)) is (
            grpc.StatusCode.ABORTED
        )
    assert code_of(ctl.ListSnapshots, csi_pb2.ListSnapshotsRequest(max_entries=-2)) is (
        grpc.StatusCode.INVALID_ARGUMENT
    )


# --- Identity -------------------------------------------------------------------------------


def test_identity(backend: FakeBackend) -> None:
    ident = IdentityServicer(make_config(), backend.health)
    info = ident.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), CTX)
    assert info.name == "nodelocal.csi.dev" and info.vendor_version
    caps = ident.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest(), CTX)
    services = {c.service.type for c in caps.capabilities if c.HasField("service")}
    assert services == {
        csi_pb2.PluginCapability.Service.CONTROLLER_SERVICE,
        csi_pb2.PluginCapability.Service.VOLUME_ACCESSIBILITY_CONSTRAINTS,
    }
    expansion = [
        c.volume_expansion.type for c in caps.capabilities if c.HasField("volume_expansion")
    ]
    assert expansion == [csi_pb2.PluginCapability.VolumeExpansion.ONLINE]

    assert ident.Probe(csi_pb2.ProbeRequest(), CTX).ready.value is True
    backend.unhealthy = "state database is not writable"
    assert ident.Probe(csi_pb2.ProbeRequest(), CTX).ready.value is False
    controller = IdentityServicer(make_config(Mode.CONTROLLER), lambda: None)
    assert controller.Probe(csi_pb2.ProbeRequest(), CTX).ready.value is True


def test_custom_driver_name(backend: FakeBackend, tmp_path: Path) -> None:
    ident = IdentityServicer(make_config(driver_name="local.example.com"), backend.health)
    assert ident.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), CTX).name == "local.example.com"
    ctl = ControllerServicer(make_config(driver_name="local.example.com"), backend, KeyLocks())
    vol = create(ctl)
    assert dict(vol.accessible_topology[0].segments) == {"topology.local.example.com/node": NODE}


@pytest.fixture(autouse=True)
def _no_leaked_locks(ctl: ControllerServicer) -> Iterator[None]:
    yield
    assert ctl._locks._held == set()


def test_mutable_parameters_at_create_and_modify(
    ctl: ControllerServicer, backend: FakeBackend
) -> None:
    assert csi_pb2.ControllerServiceCapability.RPC.MODIFY_VOLUME in capability_types(ctl)
    vol = create(ctl, mutable_parameters={"wipeOnDelete": "TRUE"})
    assert backend.volumes[vol.volume_id].parameters["wipeOnDelete"] == "true"
    modify = csi_pb2.ControllerModifyVolumeRequest
    ctl.ControllerModifyVolume(
        modify(volume_id=vol.volume_id, mutable_parameters={"wipeOnDelete": "false"}), CTX
    )
    assert "wipeOnDelete" not in backend.volumes[vol.volume_id].parameters
    # the same CreateVolume again still finds the volume: mutable values do not identify it
    assert create(ctl, mutable_parameters={"wipeOnDelete": "true"}).volume_id == vol.volume_id
    calls = list(backend.calls)
    assert code_of(ctl.ControllerModifyVolume, modify()) == grpc.StatusCode.INVALID_ARGUMENT
    bad = modify(volume_id=vol.volume_id, mutable_parameters={"iops": "1"})
    assert code_of(ctl.ControllerModifyVolume, bad) == grpc.StatusCode.INVALID_ARGUMENT
    bad = modify(volume_id=vol.volume_id, mutable_parameters={"wipeOnDelete": "maybe"})
    assert code_of(ctl.ControllerModifyVolume, bad) == grpc.StatusCode.INVALID_ARGUMENT
    missing = modify(volume_id=ids.volume_id_for("nope", NODE))
    assert code_of(ctl.ControllerModifyVolume, missing) == grpc.StatusCode.NOT_FOUND
    assert backend.calls == calls  # nothing was changed by the rejected requests
