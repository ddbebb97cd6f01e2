"""The CSI Controller service: validate, lock, delegate to the backend, translate back.

What is served depends on the mode:

* standalone: everything for this node's volumes, including ControllerPublish/Unpublish
  (recorded in the backend and shown by ListVolumes).
* node (the DaemonSet): everything for this node's volumes except ControllerPublish/Unpublish,
  which the controller Deployment answers. Nothing records publishes here, so
  LIST_VOLUMES_PUBLISHED_NODES is not offered either.
* controller (the Deployment, no storage): ControllerPublish/Unpublish, decided from the
  node part of the volume id; with the peer channel also ControllerModifyVolume, which it hands
  to the node plugin of that node (services/peer.py).

Every field is checked before any lock or backend call, so a rejected request changes nothing.
Secrets are accepted and ignored (the interceptor redacts them from logs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import grpc

from csi_driver import ids, model
from csi_driver.backends import mutable
from csi_driver.backends.base import Backend, listed_after
from csi_driver.config import Config, Mode
from csi_driver.errors import (
    AlreadyExists,
    CsiError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from csi_driver.locks import KeyLocks
from csi_driver.proto import csi_pb2, csi_pb2_grpc
from csi_driver.services import convert, fs_type, pagination, sizing

if TYPE_CHECKING:
    # a type only: the peer channel (and its Kubernetes API client) loads in controller mode
    # with --peer-* alone, off every other start (start-up time)
    from csi_driver.services.peer import Forwarder

log = logging.getLogger(__name__)

_Rpc = csi_pb2.ControllerServiceCapability.RPC


def _capabilities(mode: Mode, forwards: bool) -> list[csi_pb2.ControllerServiceCapability.RPC.Type]:
    if mode is Mode.CONTROLLER:
        caps = [_Rpc.PUBLISH_UNPUBLISH_VOLUME, _Rpc.SINGLE_NODE_MULTI_WRITER]
        return [*caps, _Rpc.MODIFY_VOLUME] if forwards else caps
    caps = [
        _Rpc.CREATE_DELETE_VOLUME,
        _Rpc.LIST_VOLUMES,
        _Rpc.GET_CAPACITY,
        _Rpc.CREATE_DELETE_SNAPSHOT,
        _Rpc.LIST_SNAPSHOTS,
        _Rpc.CLONE_VOLUME,
        _Rpc.EXPAND_VOLUME,
        _Rpc.VOLUME_CONDITION,
        _Rpc.GET_VOLUME,
        _Rpc.SINGLE_NODE_MULTI_WRITER,
        _Rpc.MODIFY_VOLUME,
    ]
    if mode is Mode.STANDALONE:
        caps += [_Rpc.PUBLISH_UNPUBLISH_VOLUME, _Rpc.LIST_VOLUMES_PUBLISHED_NODES]
    return caps


def _unimplemented(rpc: str, why: str) -> CsiError:
    return CsiError(f"{rpc} is not offered: {why}", grpc.StatusCode.UNIMPLEMENTED)


class ControllerServicer(csi_pb2_grpc.ControllerServicer):  # type: ignore[misc]
    def __init__(
        self,
        config: Config,
        backend: Backend | None,
        locks: KeyLocks,
        forwarder: Forwarder | None = None,
    ) -> None:
        self._config = config
        self._backend = backend
        #: controller mode with the peer channel: hands ControllerModifyVolume to the node
        self._forwarder = forwarder
        self._locks = locks
        self._node = config.node_id
        self._key = config.topology_key
        #: the node plugin's follow-up of a modification, under the volume's lock: it sets the
        #: new IO limits of the volume's publications (services/node_io_limits.py)
        self.after_modify: Callable[[model.Volume], None] | None = None

    # --- helpers ---------------------------------------------------------------------------

    def _storage(self, rpc: str) -> Backend:
        """The backend, or UNIMPLEMENTED in controller mode, which sees no storage."""
        if self._backend is None:
            raise _unimplemented(
                rpc,
                "this driver runs in controller mode, which only answers ControllerPublishVolume"
                " and ControllerUnpublishVolume; the node plugin serves it",
            )
        return self._backend

    def _local_volume_id(self, value: str, field: str = "volume_id") -> str:
        """A syntactically valid id of a volume on this node; anything else cannot exist here."""
        parsed = ids.require_volume_id(value, field)
        if parsed.node_id != self._node:
            raise NotFound(
                f"volume {value!r} lives on node {parsed.node_id!r}, not on {self._node!r}"
            )
        return value

    def _existing_volume(self, backend: Backend, volume_id: str) -> model.Volume:
        volume = backend.get_volume(volume_id)
        if volume is None:
            raise NotFound(f"volume {volume_id!r} does not exist")
        return volume

    def _parameters(
        self,
        backend: Backend,
        parameters: Mapping[str, str],
        mutable_parameters: Mapping[str, str] | None = None,
    ) -> model.Parameters:
        """The request's parameters, validated once by the backend's one validator."""
        merged = convert.strip_kubernetes_keys(parameters)
        if mutable_parameters:
            # A VolumeAttributesClass's values win over the StorageClass's for the same key.
            merged.update(backend.validate_mutable_parameters(dict(mutable_parameters)))
        return backend.validate_parameters(merged)

    def _is_this_node(self, topology: csi_pb2.Topology) -> bool:
        # Only this driver's key decides; other segments describe nothing this driver owns.
        return bool(topology.segments.get(self._key) == self._node)

    def _volume_shape(
        self, caps: list[model.Capability], backend: Backend, parameters: model.Parameters
    ) -> tuple[model.AccessType, str]:
        """The one access type and filesystem that satisfy every requested capability (with
        the ``fsType`` parameter when no capability names one: services/fs_type.py)."""
        for i, cap in enumerate(caps):
            if not cap.access_mode.single_node:
                raise InvalidArgument(
                    f"volume_capabilities[{i}]: access mode {cap.access_mode.name} is not"
                    " supported; node-local volumes are single-node only"
                )
        types = {cap.access_type for cap in caps}
        if len(types) > 1:
            raise InvalidArgument(
                "volume_capabilities ask for both block and mount access; a volume is one or"
                " the other"
            )
        access_type = types.pop()
        if access_type is model.AccessType.BLOCK:
            return access_type, ""
        asked = {cap.fs_type for cap in caps if cap.fs_type}
        if len(asked) > 1:
            raise InvalidArgument(
                f"volume_capabilities ask for different filesystems {sorted(asked)}"
            )
        return access_type, fs_type.choose(backend, asked.pop() if asked else "", parameters)

    def _source_bytes(self, backend: Backend, source: model.ContentSource | None) -> int:
        """The size of the content source (0 without one); NOT_FOUND when it is missing."""
        if source is None:
            return 0
        node = source.id.rpartition("@")[2]
        if source.kind is model.SourceKind.SNAPSHOT:
            snapshot = backend.get_snapshot(source.id) if node == self._node else None
            if snapshot is None:
                raise NotFound(f"source snapshot {source.id!r} does not exist on this node")
            return snapshot.size_bytes
        volume = backend.get_volume(source.id) if node == self._node else None
        if volume is None:
            raise NotFound(f"source volume {source.id!r} does not exist on this node")
        return volume.capacity_bytes

    def _status_entry(
        self, backend: Backend, volume: model.Volume
    ) -> tuple[list[str], csi_pb2.VolumeCondition]:
        return (
            sorted(volume.published_nodes),
            convert.condition_to_pb(backend.volume_condition(volume.id)),
        )

    # --- volumes ---------------------------------------------------------------------------

    def CreateVolume(
        self, request: csi_pb2.CreateVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.CreateVolumeResponse:
        backend = self._storage("CreateVolume")
        name = convert.require_name(request.name)
        caps = convert.capabilities_from_pb(request.volume_capabilities)
        parameters = self._parameters(backend, request.parameters, request.mutable_parameters)
        access_type, fs = self._volume_shape(caps, backend, parameters)
        if request.HasField("accessibility_requirements"):
            reqs = request.accessibility_requirements
            binding = list(reqs.requisite) or list(reqs.preferred)
            if binding and not any(self._is_this_node(t) for t in binding):
                raise ResourceExhausted(
                    f"this plugin can only provision on node {self._node!r}"
                    f" ({self._key}={self._node}), which the accessibility requirements exclude"
                )
        required, limit = convert.capacity_range(request.capacity_range)
        source = (
            convert.content_source_from_pb(request.volume_content_source)
            if request.HasField("volume_content_source")
            else None
        )

        volume_id = ids.volume_id_for(name, self._node)
        keys = [f"volume-name:{name}", volume_id] + ([source.id] if source else [])
        with self._locks.hold(*keys):
            # The source's size is read under its lock, so it cannot grow before it is copied.
            source_bytes = self._source_bytes(backend, source)
            spec = model.VolumeSpec(
                name=name,
                capacity_bytes=sizing.create_size(
                    backend, parameters, required, limit, source_bytes
                ),
                access_type=access_type,
                fs_type=fs,
                parameters=parameters,
                content_source=source,
                required_bytes=required,
                limit_bytes=limit,
            )
            volume = backend.get_volume(volume_id)
            if volume is not None:
                spec.check_existing(volume)
            else:
                volume = backend.create_volume(spec)
        out = convert.volume_to_pb(volume, self._key)
        if source is not None:
            out.content_source.CopyFrom(convert.content_source_to_pb(source))
        return csi_pb2.CreateVolumeResponse(volume=out)

    def DeleteVolume(
        self, request: csi_pb2.DeleteVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.DeleteVolumeResponse:
        backend = self._storage("DeleteVolume")
        volume_id = convert.require(request.volume_id, "volume_id")
        self._delete("volume", "v", volume_id, backend.delete_volume)
        return csi_pb2.DeleteVolumeResponse()

    def _delete(self, what: str, kind: str, object_id: str, delete: Callable[[str], None]) -> None:
        """DeleteVolume and DeleteSnapshot: an id this driver never issued names nothing, so
        it is deleted already; one of another node is refused, since answering OK would let
        the CO forget storage that still exists on that node."""
        parsed = ids.parse(object_id, kind)
        if parsed is None:
            return
        if parsed.node_id != self._node:
            raise FailedPrecondition(
                f"{what} {object_id!r} lives on node {parsed.node_id!r}; only that node's plugin"
                " can delete it"
            )
        with self._locks.hold(object_id):
            delete(object_id)

    def ControllerPublishVolume(
        self, request: csi_pb2.ControllerPublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerPublishVolumeResponse:
        if self._config.mode is Mode.NODE:
            raise _unimplemented(
                "ControllerPublishVolume", "in node mode the controller Deployment answers it"
            )
        volume_id = convert.require(request.volume_id, "volume_id")
        node_id = convert.require(request.node_id, "node_id")
        cap = convert.capability_from_pb(request.volume_capability)
        parsed = ids.require_volume_id(volume_id)
        if not cap.access_mode.single_node:
            raise InvalidArgument(
                f"access mode {cap.access_mode.name} is not supported; node-local volumes are"
                " single-node only"
            )
        if self._backend is None:
            if node_id != parsed.node_id:
                raise FailedPrecondition(
                    f"volume {volume_id!r} lives on node {parsed.node_id!r} and can only be"
                    f" published there, not on {node_id!r}"
                )
            return csi_pb2.ControllerPublishVolumeResponse()

        backend = self._backend
        self._local_volume_id(volume_id)
        volume = self._existing_volume(backend, volume_id)
        if node_id != self._node:
            raise NotFound(
                f"node {node_id!r} is not known to this plugin (it serves {self._node!r})"
            )
        if cap.access_type is not volume.access_type:
            raise InvalidArgument(
                f"volume {volume_id!r} is a {volume.access_type.value} volume; it cannot be"
                f" published for {cap.access_type.value} access"
            )
        with self._locks.hold(volume_id):
            volume = self._existing_volume(backend, volume_id)
            if node_id not in volume.published_nodes:
                self._check_attach_limit(backend)
                backend.set_published(volume_id, node_id, True)
        return csi_pb2.ControllerPublishVolumeResponse()

    def _check_attach_limit(self, backend: Backend) -> None:
        limit = self._config.max_volumes_per_node or backend.max_volumes_per_node
        if limit <= 0:
            return
        published = sum(1 for v in backend.list_volumes() if self._node in v.published_nodes)
        if published >= limit:
            raise ResourceExhausted(
                f"node {self._node!r} already has {published} published volumes, its limit"
            )

    def ControllerUnpublishVolume(
        self, request: csi_pb2.ControllerUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerUnpublishVolumeResponse:
        if self._config.mode is Mode.NODE:
            raise _unimplemented(
                "ControllerUnpublishVolume", "in node mode the controller Deployment answers it"
            )
        volume_id = convert.require(request.volume_id, "volume_id")
        parsed = ids.parse(volume_id, "v")
        backend = self._backend
        # A volume or node that is unknown here was never published by this plugin: done.
        if backend is None or parsed is None or parsed.node_id != self._node:
            return csi_pb2.ControllerUnpublishVolumeResponse()
        if request.node_id and request.node_id != self._node:
            return csi_pb2.ControllerUnpublishVolumeResponse()
        with self._locks.hold(volume_id):
            volume = backend.get_volume(volume_id)
            if volume is not None and self._node in volume.published_nodes:
                backend.set_published(volume_id, self._node, False)
        return csi_pb2.ControllerUnpublishVolumeResponse()

    def ValidateVolumeCapabilities(
        self, request: csi_pb2.ValidateVolumeCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        backend = self._storage("ValidateVolumeCapabilities")
        volume_id = convert.require(request.volume_id, "volume_id")
        caps = convert.capabilities_from_pb(request.volume_capabilities)
        self._local_volume_id(volume_id)
        volume = self._existing_volume(backend, volume_id)

        problem = self._capability_problem(volume, caps)
        if problem is None and request.parameters:
            try:
                asked = dict(self._parameters(backend, request.parameters))
            except InvalidArgument as exc:
                problem = f"parameters: {exc.message}"
            else:
                have = dict(volume.parameters)
                extra = {k: have[k] for k in set(have) - set(asked)}
                try:
                    # keys only a VolumeAttributesClass set (or changed) are not the SC's
                    backend.validate_mutable_parameters(extra)
                    have = {k: v for k, v in have.items() if k in asked}
                except InvalidArgument:
                    pass
                if asked != have:
                    problem = "parameters differ from the ones the volume was created with"
        if problem is None and request.mutable_parameters:
            try:
                mutable_asked = backend.validate_mutable_parameters(
                    dict(request.mutable_parameters)
                )
            except InvalidArgument as exc:
                problem = f"mutable_parameters: {exc.message}"
            else:
                if mutable.apply(volume.parameters, mutable_asked) != dict(volume.parameters):
                    problem = "mutable_parameters differ from the volume's"
        if problem is not None:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(message=problem)

        confirmed = csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=dict(request.volume_context),
            volume_capabilities=list(request.volume_capabilities),
            parameters=dict(request.parameters),
        )
        return csi_pb2.ValidateVolumeCapabilitiesResponse(confirmed=confirmed)

    @staticmethod
    def _capability_problem(volume: model.Volume, caps: Iterable[model.Capability]) -> str | None:
        for cap in caps:
            if not cap.access_mode.single_node:
                return f"access mode {cap.access_mode.name} is not supported (single-node only)"
            if cap.access_type is not volume.access_type:
                return f"the volume is a {volume.access_type.value} volume"
            if (
                cap.access_type is model.AccessType.MOUNT
                and cap.fs_type
                and cap.fs_type != volume.fs_type
            ):
                return f"the volume has filesystem {volume.fs_type!r}, not {cap.fs_type!r}"
        return None

    def ListVolumes(
        self, request: csi_pb2.ListVolumesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ListVolumesResponse:
        backend = self._storage("ListVolumes")

        def entry(volume: model.Volume) -> csi_pb2.ListVolumesResponse.Entry:
            published, condition = self._status_entry(backend, volume)
            return csi_pb2.ListVolumesResponse.Entry(
                volume=convert.volume_to_pb(volume, self._key),
                status=csi_pb2.ListVolumesResponse.VolumeStatus(
                    published_node_ids=published, volume_condition=condition
                ),
            )

        entries, next_token = pagination.page(
            backend.list_volumes,
            lambda v: v.id,
            "v",
            request.max_entries,
            request.starting_token,
            entry,
        )
        return csi_pb2.ListVolumesResponse(entries=entries, next_token=next_token)

    def ControllerGetVolume(
        self, request: csi_pb2.ControllerGetVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerGetVolumeResponse:
        backend = self._storage("ControllerGetVolume")
        volume_id = convert.require(request.volume_id, "volume_id")
        self._local_volume_id(volume_id)
        volume = self._existing_volume(backend, volume_id)
        published, condition = self._status_entry(backend, volume)
        return csi_pb2.ControllerGetVolumeResponse(
            volume=convert.volume_to_pb(volume, self._key),
            status=csi_pb2.ControllerGetVolumeResponse.VolumeStatus(
                published_node_ids=published, volume_condition=condition
            ),
        )

    def GetCapacity(
        self, request: csi_pb2.GetCapacityRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetCapacityResponse:
        backend = self._storage("GetCapacity")
        caps = [
            convert.capability_from_pb(c, f"volume_capabilities[{i}]")
            for i, c in enumerate(request.volume_capabilities)
        ]
        parameters = self._parameters(backend, request.parameters)
        response = csi_pb2.GetCapacityResponse(available_capacity=0)
        if request.HasField("accessible_topology") and not self._is_this_node(
            request.accessible_topology
        ):
            return response
        if caps:
            try:
                self._volume_shape(caps, backend, parameters)
            except InvalidArgument:
                return response  # no volume with these capabilities can be made here
        available = backend.capacity(parameters)
        response.available_capacity = available
        # A node-local volume cannot span more than the free space of this one node.
        response.maximum_volume_size.value = available
        return response

    def ControllerExpandVolume(
        self, request: csi_pb2.ControllerExpandVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerExpandVolumeResponse:
        backend = self._storage("ControllerExpandVolume")
        volume_id = convert.require(request.volume_id, "volume_id")
        if not request.HasField("capacity_range"):
            raise InvalidArgument("capacity_range is required")
        required, limit = convert.capacity_range(request.capacity_range)
        if not required and not limit:
            raise InvalidArgument("capacity_range needs required_bytes or limit_bytes")
        cap = (
            convert.capability_from_pb(request.volume_capability)
            if request.HasField("volume_capability")
            else None
        )
        self._local_volume_id(volume_id)
        with self._locks.hold(volume_id):
            volume = self._existing_volume(backend, volume_id)
            if cap is not None and cap.access_type is not volume.access_type:
                raise InvalidArgument(
                    f"volume {volume_id!r} is a {volume.access_type.value} volume, not"
                    f" {cap.access_type.value}"
                )
            target = sizing.expansion_target(backend, volume, required, limit)
            if target > volume.capacity_bytes:
                volume = backend.expand_volume(volume_id, target)
        # Always true, also when nothing grew: a retried call after a crash must still reach
        # the node, where the filesystem grows (mount) or the loop device learns its new size
        # (block); both are no-ops there when there is nothing to do.
        return csi_pb2.ControllerExpandVolumeResponse(
            capacity_bytes=volume.capacity_bytes, node_expansion_required=True
        )

    def ControllerModifyVolume(
        self, request: csi_pb2.ControllerModifyVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerModifyVolumeResponse:
        volume_id = convert.require(request.volume_id, "volume_id")
        # csi-resizer's --extra-modify-metadata adds csi.storage.k8s.io/* keys: not parameters
        wanted = convert.strip_kubernetes_keys(request.mutable_parameters)
        if self._backend is None and self._forwarder is not None:
            return self._forward_modify(volume_id, wanted, context)
        backend = self._storage("ControllerModifyVolume")
        self._local_volume_id(volume_id)
        changes = backend.validate_mutable_parameters(wanted)
        with self._locks.hold(volume_id):
            self._existing_volume(backend, volume_id)
            volume = backend.modify_volume(volume_id, changes)
            if self.after_modify is not None:
                self.after_modify(volume)
        return csi_pb2.ControllerModifyVolumeResponse()

    def _forward_modify(
        self, volume_id: str, wanted: Mapping[str, str], context: grpc.ServicerContext
    ) -> csi_pb2.ControllerModifyVolumeResponse:
        """Controller mode: the node plugin of the volume's node answers. What can be decided
        here is, so a bad request is final (INVALID_ARGUMENT) even while that node is down.
        The node gets the request as checked here (secrets are never passed on)."""
        assert self._forwarder is not None
        node = ids.require_volume_id(volume_id, "volume_id").node_id
        mutable.validate_mutable(wanted, "node plugin's")
        request = csi_pb2.ControllerModifyVolumeRequest(
            volume_id=volume_id, mutable_parameters=dict(wanted)
        )
        with self._locks.hold(volume_id):
            return self._forwarder.modify_volume(node, request, context.time_remaining())

    # --- snapshots -------------------------------------------------------------------------

    def CreateSnapshot(
        self, request: csi_pb2.CreateSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.CreateSnapshotResponse:
        backend = self._storage("CreateSnapshot")
        name = convert.require_name(request.name)
        source_id = convert.require(request.source_volume_id, "source_volume_id")
        self._local_volume_id(source_id, "source_volume_id")
        parameters = convert.strip_kubernetes_keys(request.parameters)
        snapshot_id = ids.snapshot_id_for(name, self._node)
        with self._locks.hold(f"snapshot-name:{name}", snapshot_id, source_id):
            existing = backend.get_snapshot(snapshot_id)
            if existing is not None and existing.source_volume_id != source_id:
                raise AlreadyExists(
                    f"snapshot {name!r} already exists for volume {existing.source_volume_id!r}"
                )
            if existing is None:
                self._existing_volume(backend, source_id)
            snapshot = backend.create_snapshot(name, source_id, parameters)
        return csi_pb2.CreateSnapshotResponse(snapshot=convert.snapshot_to_pb(snapshot))

    def DeleteSnapshot(
        self, request: csi_pb2.DeleteSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.DeleteSnapshotResponse:
        backend = self._storage("DeleteSnapshot")
        snapshot_id = convert.require(request.snapshot_id, "snapshot_id")
        self._delete("snapshot", "s", snapshot_id, backend.delete_snapshot)
        return csi_pb2.DeleteSnapshotResponse()

    def ListSnapshots(
        self, request: csi_pb2.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ListSnapshotsResponse:
        backend = self._storage("ListSnapshots")
        entries, next_token = pagination.page(
            lambda after, limit: self._snapshots_after(backend, request, after, limit),
            lambda s: s.id,
            "s",
            request.max_entries,
            request.starting_token,
            lambda s: csi_pb2.ListSnapshotsResponse.Entry(snapshot=convert.snapshot_to_pb(s)),
        )
        return csi_pb2.ListSnapshotsResponse(entries=entries, next_token=next_token)

    def _snapshots_after(
        self, backend: Backend, request: csi_pb2.ListSnapshotsRequest, after: str, limit: int
    ) -> Sequence[model.Snapshot]:
        """ListSnapshots' entries after ``after``, filtered as the request asks.

        Unfiltered, the backend cuts the page. A ``snapshot_id`` is looked up on its own; a
        ``source_volume_id`` reads every snapshot after ``after`` and keeps that volume's, as
        the backend lists by id alone. Either way the page follows the backends' rule.
        """
        source = request.source_volume_id
        if not request.snapshot_id and not source:
            return backend.list_snapshots(after, limit)
        if request.snapshot_id:
            # An id that is malformed or not of this node names nothing here: empty, not error.
            parsed = ids.parse(request.snapshot_id, "s")
            found = (
                backend.get_snapshot(request.snapshot_id)
                if parsed is not None and parsed.node_id == self._node
                else None
            )
            candidates: Sequence[model.Snapshot] = [found] if found is not None else []
        else:
            candidates = backend.list_snapshots(after)
        kept = [s for s in candidates if not source or s.source_volume_id == source]
        return listed_after(kept, lambda s: s.id, after, limit)

    def GetSnapshot(
        self, request: csi_pb2.GetSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetSnapshotResponse:
        raise _unimplemented("GetSnapshot", "the GET_SNAPSHOT capability is not offered")

    # --- capabilities ----------------------------------------------------------------------

    def ControllerGetCapabilities(
        self, request: csi_pb2.ControllerGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerGetCapabilitiesResponse:
        return csi_pb2.ControllerGetCapabilitiesResponse(
            capabilities=[
                csi_pb2.ControllerServiceCapability(rpc=_Rpc(type=t))
                for t in _capabilities(self._config.mode, self._forwarder is not None)
            ]
        )
