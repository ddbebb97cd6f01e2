"""Configuration, parsed and validated once at start into a typed object."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from pathlib import Path

from csi_driver import DEFAULT_DRIVER_NAME


class Mode(enum.Enum):
    STANDALONE = "standalone"  # Identity, Controller and Node for this node in one process
    NODE = "node"  # Identity, Controller (this node's volumes) and Node: the DaemonSet
    CONTROLLER = "controller"  # Identity and ControllerPublish/Unpublish only: the Deployment

    @property
    def serves_node(self) -> bool:
        return self is not Mode.CONTROLLER

    @property
    def owns_volumes(self) -> bool:
        """True when this process holds a backend (it runs on the node the volumes live on)."""
        return self is not Mode.CONTROLLER


class BackendKind(enum.Enum):
    HOSTPATH = "hostpath"
    LVM = "lvm"


class LogFormat(enum.Enum):
    TEXT = "text"
    JSON = "json"


_DRIVER_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?\Z")


def topology_key(driver_name: str) -> str:
    """The node topology key, derived from the driver name (one place, so it agrees everywhere)."""
    return f"topology.{driver_name}/node"


@dataclass(frozen=True)
class Endpoint:
    scheme: str  # "unix" or "tcp"
    address: str  # socket path, or host:port

    @property
    def grpc_target(self) -> str:
        return f"unix://{self.address}" if self.scheme == "unix" else self.address

    def __str__(self) -> str:
        return f"{self.scheme}://{self.address}"


def parse_endpoint(value: str) -> Endpoint:
    if value.startswith("unix://"):
        path = value[len("unix://") :]
        if not path.startswith("/"):
            raise ValueError(f"unix endpoint needs an absolute path, got {value!r}")
        return Endpoint("unix", path)
    if value.startswith("tcp://"):
        hostport = value[len("tcp://") :]
        host, _, port = hostport.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"tcp endpoint must be tcp://HOST:PORT, got {value!r}")
        return Endpoint("tcp", hostport)
    if value.startswith("/"):
        return Endpoint("unix", value)
    raise ValueError(f"endpoint must start with unix:// or tcp://, got {value!r}")


@dataclass(frozen=True)
class HostPathConfig:
    root: Path
    capacity_bytes: int | None  # None: the free space of the root's filesystem


@dataclass(frozen=True)
class LvmConfig:
    config_file: Path | None  # device classes from a YAML/JSON file
    volume_group: str | None  # or a single default device class on this VG
    use_nsenter: bool = False  # run lvm2 in the host's mount namespace
    udev_sync: bool = True


@dataclass(frozen=True)
class Config:
    endpoint: Endpoint
    node_id: str
    driver_name: str = DEFAULT_DRIVER_NAME
    mode: Mode = Mode.STANDALONE
    backend: BackendKind = BackendKind.HOSTPATH
    hostpath: HostPathConfig | None = None
    lvm: LvmConfig | None = None
    metrics_address: str | None = None
    log_format: LogFormat = LogFormat.TEXT
    log_level: str = "INFO"
    max_volumes_per_node: int = 0
    grace_period: float = 10.0
    #: staging and target paths must lie strictly below this directory (never a symlink on the way)
    kubelet_dir: Path = Path("/var/lib/kubelet")

    @property
    def topology_key(self) -> str:
        return topology_key(self.driver_name)

    def __post_init__(self) -> None:
        if not _DRIVER_NAME.fullmatch(self.driver_name) or "." not in self.driver_name:
            raise ValueError(
                f"driver name {self.driver_name!r} must be a reverse-DNS style name of at most"
                " 63 lower-case characters, e.g. nodelocal.csi.dev"
            )
        if not self.kubelet_dir.is_absolute() or str(self.kubelet_dir) == "/":
            raise ValueError(
                f"kubelet dir {str(self.kubelet_dir)!r} must be an absolute directory other than /"
            )
        if not self.node_id or len(self.node_id) > 128:
            raise ValueError("node id must be 1 to 128 characters")
