"""The project's own value types. Servicers translate protobuf to and from these."""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from csi_driver.errors import AlreadyExists

#: the StorageClass parameter a VolumeAttributesClass may also set, and ControllerModifyVolume
#: change later (backends/mutable.py checks its values)
WIPE_ON_DELETE = "wipeOnDelete"
#: IO limits, applied to the device of a published volume in the Pod's cgroup (io.max)
READ_BYTES_PER_SECOND = "readBytesPerSecond"
WRITE_BYTES_PER_SECOND = "writeBytesPerSecond"
READ_IO_PER_SECOND = "readIOPerSecond"
WRITE_IO_PER_SECOND = "writeIOPerSecond"
IO_LIMIT_PARAMETERS = (
    READ_BYTES_PER_SECOND,
    WRITE_BYTES_PER_SECOND,
    READ_IO_PER_SECOND,
    WRITE_IO_PER_SECOND,
)
#: parameters that may change over a volume's life, so they do not tell volumes apart
MUTABLE_PARAMETERS = (WIPE_ON_DELETE, *IO_LIMIT_PARAMETERS)


def frozen_map(data: Mapping[str, str] | None = None) -> Mapping[str, str]:
    return MappingProxyType(dict(data or {}))


class Parameters(Mapping[str, str]):
    """StorageClass parameters as the backend's ``validate_parameters`` returned them: checked,
    normalised (defaults filled in), immutable. The one validation happens at the service edge;
    whatever takes Parameters (sizing, capacity, creation) trusts them and checks nothing again.
    A backend reading back the parameters it stored with a volume also holds Parameters."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, str] | None = None) -> None:
        self._items: Mapping[str, str] = MappingProxyType(dict(items or {}))

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __repr__(self) -> str:
        return f"Parameters({dict(self._items)!r})"


class AccessType(enum.Enum):
    MOUNT = "mount"
    BLOCK = "block"


class AccessMode(enum.IntEnum):
    """Numbers are the CSI spec's VolumeCapability.AccessMode.Mode values."""

    UNKNOWN = 0
    SINGLE_NODE_WRITER = 1
    SINGLE_NODE_READER_ONLY = 2
    MULTI_NODE_READER_ONLY = 3
    MULTI_NODE_SINGLE_WRITER = 4
    MULTI_NODE_MULTI_WRITER = 5
    SINGLE_NODE_SINGLE_WRITER = 6
    SINGLE_NODE_MULTI_WRITER = 7

    @property
    def single_node(self) -> bool:
        return self in (
            AccessMode.SINGLE_NODE_WRITER,
            AccessMode.SINGLE_NODE_READER_ONLY,
            AccessMode.SINGLE_NODE_SINGLE_WRITER,
            AccessMode.SINGLE_NODE_MULTI_WRITER,
        )

    @property
    def read_only(self) -> bool:
        return self in (AccessMode.SINGLE_NODE_READER_ONLY, AccessMode.MULTI_NODE_READER_ONLY)


@dataclass(frozen=True)
class Capability:
    access_type: AccessType
    access_mode: AccessMode
    fs_type: str = ""
    mount_flags: tuple[str, ...] = ()


class SourceKind(enum.Enum):
    SNAPSHOT = "snapshot"
    VOLUME = "volume"


@dataclass(frozen=True)
class ContentSource:
    kind: SourceKind
    id: str


@dataclass(frozen=True)
class VolumeSpec:
    """A validated CreateVolume request: what a new volume gets (the backend makes exactly
    this), and what an existing volume of the same name must be to answer the request
    (:meth:`check_existing`)."""

    name: str
    #: the size a new volume gets, already rounded by the backend (services/sizing.py)
    capacity_bytes: int
    access_type: AccessType
    fs_type: str
    parameters: Parameters = field(default_factory=Parameters)
    content_source: ContentSource | None = None
    #: the request's capacity range (0: no bound); an existing volume must lie in it
    required_bytes: int = 0
    limit_bytes: int = 0

    def check_existing(self, volume: Volume) -> None:
        """ALREADY_EXISTS, naming every field that differs, unless ``volume`` (the one this
        request's name maps to) answers the request as it is. The only idempotency rule of
        volume creation. A volume expanded since still answers its original request (within
        limit_bytes), and mutable parameters, which ControllerModifyVolume changes, do not
        count."""
        differences = []
        if volume.name != self.name:
            differences.append(f"its id belongs to volume {volume.name!r}")
        if volume.access_type is not self.access_type:
            differences.append(
                f"access type is {volume.access_type.value}, not {self.access_type.value}"
            )
        elif self.access_type is AccessType.MOUNT and volume.fs_type != self.fs_type:
            differences.append(f"fs_type is {volume.fs_type!r}, not {self.fs_type!r}")
        if _identifying(volume.parameters) != _identifying(self.parameters):
            differences.append(
                f"parameters are {_identifying(volume.parameters)},"
                f" not {_identifying(self.parameters)}"
            )
        if volume.content_source != self.content_source:
            differences.append(
                f"content source is {_source_text(volume.content_source)},"
                f" not {_source_text(self.content_source)}"
            )
        size = volume.capacity_bytes
        if size < self.required_bytes or (self.limit_bytes and size > self.limit_bytes):
            differences.append(
                f"capacity is {size} bytes, outside the requested"
                f" [{self.required_bytes}, {self.limit_bytes or 'no limit'}]"
            )
        if differences:
            raise AlreadyExists(
                f"volume {self.name!r} already exists and does not match this request: "
                + "; ".join(differences)
            )


def _identifying(parameters: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in sorted(parameters.items()) if k not in MUTABLE_PARAMETERS}


def _source_text(source: ContentSource | None) -> str:
    return f"{source.kind.value} {source.id!r}" if source is not None else "none"


@dataclass(frozen=True)
class Volume:
    id: str
    name: str
    capacity_bytes: int
    access_type: AccessType
    fs_type: str
    node_id: str
    parameters: Parameters = field(default_factory=Parameters)
    content_source: ContentSource | None = None
    context: Mapping[str, str] = field(default_factory=frozen_map)
    published_nodes: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Snapshot:
    id: str
    name: str
    source_volume_id: str
    size_bytes: int
    creation_time_ns: int
    ready: bool = True


@dataclass(frozen=True)
class VolumeCondition:
    abnormal: bool
    message: str

    @classmethod
    def healthy(cls) -> VolumeCondition:
        return cls(False, "volume is healthy")


class AttachmentKind(enum.Enum):
    DIRECTORY = "directory"
    BLOCK_DEVICE = "block_device"


@dataclass(frozen=True)
class Attachment:
    """What the node side mounts or binds: a directory, or a block device node."""

    kind: AttachmentKind
    path: str


@dataclass(frozen=True)
class Usage:
    total_bytes: int
    used_bytes: int
    available_bytes: int
    total_inodes: int = 0
    used_inodes: int = 0
    available_inodes: int = 0


@dataclass(frozen=True)
class ClassCapacity:
    """One device class (lvm) or root (hostpath) at one moment, as the metrics show it: read
    from the same report and by the same rules as GetCapacity and the allocation checks, so
    that a dashboard and a refusal tell the same story."""

    device_class: str
    #: the class's budget: the VG (thick), the thin pool, the hostpath root's capacity
    size_bytes: int
    #: unused on the storage itself: VG free, pool size minus data used, filesystem free
    free_bytes: int
    #: bytes promised to volumes (and to snapshots where they take space)
    allocated_bytes: int
    #: what GetCapacity answers for the class's default parameters
    available_bytes: int
    volumes: int
    snapshots: int
    #: thin classes only: the pool's data and metadata use, 0..1
    data_used_ratio: float | None = None
    metadata_used_ratio: float | None = None


@dataclass(frozen=True)
class VolumeStat:
    """One volume's usage, measured as NodeGetVolumeStats measures it."""

    volume_id: str
    usage: Usage


@dataclass(frozen=True)
class StorageReport:
    """What a backend can tell cheaply about its storage: per class, and per volume where it
    can measure the volume without touching its data."""

    classes: tuple[ClassCapacity, ...] = ()
    volumes: tuple[VolumeStat, ...] = ()
    #: volumes that could have been measured but were not: past the bound, or unreadable
    volumes_skipped: int = 0
