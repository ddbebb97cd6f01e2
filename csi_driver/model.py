"""The project's own value types. Servicers translate protobuf to and from these."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


def frozen_map(data: Mapping[str, str] | None = None) -> Mapping[str, str]:
    return MappingProxyType(dict(data or {}))


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
    """A validated CreateVolume request, as the backend sees it."""

    name: str
    capacity_bytes: int
    access_type: AccessType
    fs_type: str
    parameters: Mapping[str, str] = field(default_factory=frozen_map)
    content_source: ContentSource | None = None


@dataclass(frozen=True)
class Volume:
    id: str
    name: str
    capacity_bytes: int
    access_type: AccessType
    fs_type: str
    node_id: str
    parameters: Mapping[str, str] = field(default_factory=frozen_map)
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
