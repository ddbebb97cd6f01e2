"""Protobuf <-> the project's own types, and the checks every request field goes through.

Everything here is pure: a request that fails a check raises the CSI code the spec asks for
before any servicer touches storage, so a rejected request changes nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from csi_driver import ids, model
from csi_driver.bounded import cap_message, echo
from csi_driver.errors import InvalidArgument, OutOfRange
from csi_driver.proto import csi_pb2

MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 128 * 1024  # the spec caps no name; this only keeps absurd requests out
KUBERNETES_PREFIX = "csi.storage.k8s.io/"

_MODES = {int(m): m for m in model.AccessMode}


# --- plain fields -----------------------------------------------------------------------------


def require(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(f"{field} is required")
    return value


def require_name(value: str, field: str = "name") -> str:
    """A CSI object name: required, no NUL (it becomes part of metadata stores)."""
    if not value:
        raise InvalidArgument(f"{field} is required")
    if "\x00" in value or len(value.encode("utf-8")) > MAX_NAME_BYTES:
        raise InvalidArgument(f"{field} must not contain NUL and must be at most 128 KiB")
    return value


def require_abs_path(value: str, field: str) -> str:
    """A path from the CO: absolute and already normal, so no ``..`` or ``//`` can steer a
    mount or an unmount to somewhere the CO did not mean."""
    if not value:
        raise InvalidArgument(f"{field} is required")
    if "\x00" in value:
        raise InvalidArgument(f"{field} must not contain NUL")
    if len(value.encode("utf-8")) > MAX_PATH_BYTES:
        raise InvalidArgument(f"{field} is longer than {MAX_PATH_BYTES} bytes")
    if not value.startswith("/"):
        raise InvalidArgument(f"{field} must be an absolute path, got {echo(value)}")
    # normpath keeps a leading "//" (POSIX allows it a special meaning): reject it too.
    if os.path.normpath(value) != value or value.startswith("//"):
        raise InvalidArgument(
            f"{field} must be a normalised path (no '..', '.', '//' or trailing '/'),"
            f" got {echo(value)}"
        )
    return value


def strip_kubernetes_keys(parameters: Mapping[str, str]) -> dict[str, str]:
    """The external-provisioner adds ``csi.storage.k8s.io/*`` keys (PVC name, namespace...);
    they describe the request, not the storage, so backends never see them."""
    return {k: v for k, v in parameters.items() if not k.startswith(KUBERNETES_PREFIX)}


# --- capabilities -----------------------------------------------------------------------------


def capability_from_pb(
    cap: csi_pb2.VolumeCapability, field: str = "volume_capability"
) -> model.Capability:
    if cap is None or cap.ByteSize() == 0:
        raise InvalidArgument(f"{field} is required")
    kind = cap.WhichOneof("access_type")
    if kind is None:
        raise InvalidArgument(f"{field}.access_type is required: set either block or mount")
    if not cap.HasField("access_mode"):
        raise InvalidArgument(f"{field}.access_mode is required")
    mode = _MODES.get(cap.access_mode.mode, model.AccessMode.UNKNOWN)
    if mode is model.AccessMode.UNKNOWN:
        raise InvalidArgument(
            f"{field}.access_mode.mode {cap.access_mode.mode} is unset or unknown"
        )
    if kind == "block":
        return model.Capability(model.AccessType.BLOCK, mode)
    fs_type = cap.mount.fs_type
    if "\x00" in fs_type or "," in fs_type or "/" in fs_type or len(fs_type) > 64:
        raise InvalidArgument(f"{field}.mount.fs_type {echo(fs_type)} is not a filesystem name")
    for flag in cap.mount.mount_flags:
        if not flag or "\x00" in flag or len(flag) > MAX_PATH_BYTES:
            raise InvalidArgument(f"{field}.mount.mount_flags has an empty or malformed flag")
    return model.Capability(
        model.AccessType.MOUNT, mode, fs_type=fs_type, mount_flags=tuple(cap.mount.mount_flags)
    )


def capabilities_from_pb(
    caps: Iterable[csi_pb2.VolumeCapability], field: str = "volume_capabilities"
) -> list[model.Capability]:
    items = list(caps)
    if not items:
        raise InvalidArgument(f"{field} is required: give at least one capability")
    return [capability_from_pb(c, f"{field}[{i}]") for i, c in enumerate(items)]


def capability_to_pb(cap: model.Capability) -> csi_pb2.VolumeCapability:
    out = csi_pb2.VolumeCapability(
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=cap.access_mode.name)
    )
    if cap.access_type is model.AccessType.BLOCK:
        out.block.SetInParent()
    else:
        out.mount.fs_type = cap.fs_type
        out.mount.mount_flags.extend(cap.mount_flags)
    return out


# --- capacity ---------------------------------------------------------------------------------


def capacity_range(cr: csi_pb2.CapacityRange) -> tuple[int, int]:
    """(required, limit) with 0 meaning "not set". Negative values are nonsense and a limit
    below the requirement cannot be satisfied: both OUT_OF_RANGE, the code the spec gives for
    a capacity the plugin cannot provide."""
    required, limit = cr.required_bytes, cr.limit_bytes
    if required < 0 or limit < 0:
        raise OutOfRange("capacity_range: required_bytes and limit_bytes must not be negative")
    if limit and required > limit:
        raise OutOfRange(
            f"capacity_range: required_bytes {required} is larger than limit_bytes {limit}"
        )
    return required, limit


# --- content sources --------------------------------------------------------------------------


def content_source_from_pb(
    src: csi_pb2.VolumeContentSource, field: str = "volume_content_source"
) -> model.ContentSource:
    kind = src.WhichOneof("type")
    if kind == "snapshot":
        parsed = ids.require_snapshot_id(src.snapshot.snapshot_id, f"{field}.snapshot.snapshot_id")
        return model.ContentSource(model.SourceKind.SNAPSHOT, str(parsed))
    if kind == "volume":
        parsed = ids.require_volume_id(src.volume.volume_id, f"{field}.volume.volume_id")
        return model.ContentSource(model.SourceKind.VOLUME, str(parsed))
    raise InvalidArgument(f"{field} must name a snapshot or a volume")


def content_source_to_pb(src: model.ContentSource) -> csi_pb2.VolumeContentSource:
    out = csi_pb2.VolumeContentSource()
    if src.kind is model.SourceKind.SNAPSHOT:
        out.snapshot.snapshot_id = src.id
    else:
        out.volume.volume_id = src.id
    return out


# --- replies ----------------------------------------------------------------------------------


def topology_for(key: str, node_id: str) -> csi_pb2.Topology:
    return csi_pb2.Topology(segments={key: node_id})


def volume_to_pb(volume: model.Volume, topology_key: str) -> csi_pb2.Volume:
    out = csi_pb2.Volume(
        capacity_bytes=volume.capacity_bytes,
        volume_id=volume.id,
        volume_context=dict(volume.context),
        accessible_topology=[topology_for(topology_key, volume.node_id)],
    )
    if volume.content_source is not None:
        out.content_source.CopyFrom(content_source_to_pb(volume.content_source))
    return out


def snapshot_to_pb(snapshot: model.Snapshot) -> csi_pb2.Snapshot:
    out = csi_pb2.Snapshot(
        size_bytes=snapshot.size_bytes,
        snapshot_id=snapshot.id,
        source_volume_id=snapshot.source_volume_id,
        ready_to_use=snapshot.ready,
    )
    out.creation_time.FromNanoseconds(snapshot.creation_time_ns)
    return out


#: a condition's message ends up in Events and on PVCs: it says what is wrong and what to do
CONDITION_MESSAGE_BYTES = 1024


def condition_to_pb(condition: model.VolumeCondition) -> csi_pb2.VolumeCondition:
    return csi_pb2.VolumeCondition(
        abnormal=condition.abnormal,
        message=cap_message(condition.message, CONDITION_MESSAGE_BYTES),
    )


def usage_to_pb(usage: model.Usage) -> list[csi_pb2.VolumeUsage]:
    """Bytes always; inodes only when the filesystem reports them (block volumes do not)."""
    out = [
        csi_pb2.VolumeUsage(
            unit=csi_pb2.VolumeUsage.BYTES,
            total=usage.total_bytes,
            used=usage.used_bytes,
            available=usage.available_bytes,
        )
    ]
    if usage.total_inodes:
        out.append(
            csi_pb2.VolumeUsage(
                unit=csi_pb2.VolumeUsage.INODES,
                total=usage.total_inodes,
                used=usage.used_inodes,
                available=usage.available_inodes,
            )
        )
    return out
