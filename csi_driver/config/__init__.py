"""Configuration, parsed and validated once at start into frozen objects: :class:`Config` and
its parts; the lvm backend's device classes are in :mod:`.device_classes`."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from csi_driver import DEFAULT_DRIVER_NAME
from csi_driver.ids import check_node_id

if TYPE_CHECKING:
    # Only a type here: the device classes are read by an lvm start alone, so the hostpath
    # start does not load their module (start-up time).
    from csi_driver.config.device_classes import DeviceClass


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


def split_host_port(value: str, what: str = "address") -> tuple[str, int]:
    """``HOST:PORT``, ``[IPv6]:PORT`` or ``IPv6:PORT`` (what ``$(POD_IP):PORT`` in a manifest
    becomes on an IPv6 cluster) as (host without brackets, port); an empty host means every
    address. The one parser of listen addresses (metrics, the peer channel)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{what} must be HOST:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


#: a cgroup name as a kubelet's --cgroup-root has them: no "." or ".." (nor any name starting
#: with a dot), nothing YAML, a shell or a path would read otherwise
_CGROUP_NAME = re.compile(r"[A-Za-z0-9_@:+-][A-Za-z0-9_.@:+-]{0,254}")


def cgroup_path(value: str, what: str = "--kubelet-cgroup-root") -> tuple[str, ...]:
    """A path within the cgroup hierarchy as the kubelet's --cgroup-root names it
    (``/nodelocal``, ``kube.slice``; ``/`` or empty: the hierarchy's root), as its names."""
    names = tuple(name for name in value.split("/") if name)
    if len(value) > 512 or len(names) > 8 or any(not _CGROUP_NAME.fullmatch(n) for n in names):
        raise ValueError(
            f"{what} must be a path of at most 8 cgroup names (letters, digits, _ @ : + - and"
            f" dots, none first), got {value[:64]!r}"
        )
    return names


def host_port(value: str, what: str = "address") -> str:
    """``HOST:PORT`` with an IPv6 host in brackets, as gRPC wants it."""
    host, port = split_host_port(value, what)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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


#: percent of a thin pool in use at which its volumes' condition turns abnormal
DEFAULT_THIN_POOL_THRESHOLD = 90.0


@dataclass(frozen=True)
class LvmConfig:
    #: parsed and checked at start (exactly one default; device_classes.py)
    device_classes: tuple[DeviceClass, ...]
    use_nsenter: bool = False  # run lvm2 in the host's mount namespace
    udev_sync: bool = True
    #: a thin volume's condition turns abnormal when its pool's data or metadata use reaches
    #: this many percent (docs/volume-health.md)
    thin_pool_threshold: float = DEFAULT_THIN_POOL_THRESHOLD

    def __post_init__(self) -> None:
        check_thin_pool_threshold(self.thin_pool_threshold)


def check_thin_pool_threshold(percent: float) -> None:
    """Above 0 and at most 100: a pool at 100% is full whatever the threshold, and one at 0%
    would make every thin volume abnormal."""
    if not 0 < percent <= 100:
        raise ValueError(
            f"the thin pool threshold must be a percentage above 0 and at most 100, got {percent:g}"
        )


@dataclass(frozen=True)
class PeerConfig:
    """The channel on which the controller Deployment hands ControllerModifyVolume to the node
    plugin that holds the volume (docs/deploy.md), authenticated both ways by TLS: each side
    presents a certificate from its own CA and trusts only the other side's CA."""

    #: ``ca.crt`` (the CA of the other side), ``tls.crt`` and ``tls.key`` (this side's)
    tls_dir: Path
    #: node mode: the HOST:PORT the node plugin serves the forwarded calls on (an IPv6 host in
    #: brackets: :func:`host_port` makes it so)
    listen: str | None = None
    #: controller mode: the port the node plugins listen on, the namespace of their pods and
    #: the label selector that finds them
    port: int | None = None
    namespace: str | None = None
    selector: str | None = None


class Reconcile(enum.Enum):
    """What an opt-in reconciler does with what it finds (docs/operations.md)."""

    OFF = "off"
    REPORT = "report"
    DELETE = "delete"


#: the shortest grace period a deleting reconciler accepts (seconds)
MIN_DELETE_GRACE = 30.0


@dataclass(frozen=True)
class ReconcileConfig:
    """The reconcilers: node loss in controller mode, orphans in node mode."""

    node_loss: Reconcile = Reconcile.OFF
    node_loss_grace_seconds: float = 600.0
    node_loss_interval: float = 30.0
    #: more nodes missing at once than this, or than this percentage, hold node loss
    node_loss_max_nodes: int = 3
    node_loss_max_percent: float = 50.0
    orphans: Reconcile = Reconcile.OFF
    orphans_grace_seconds: float = 3600.0
    orphans_interval: float = 300.0
    #: controller mode: where the leader election's Lease lives
    namespace: str | None = None

    @property
    def any_on(self) -> bool:
        return Reconcile.OFF is not self.node_loss or Reconcile.OFF is not self.orphans

    def check(self, mode: Mode) -> None:
        for what, value in (
            ("--node-loss-grace-period", self.node_loss_grace_seconds),
            ("--node-loss-interval", self.node_loss_interval),
            ("--orphans-grace-period", self.orphans_grace_seconds),
            ("--orphans-interval", self.orphans_interval),
        ):
            if not 1 <= value <= 366 * 86400:
                raise ValueError(f"{what} must be between 1 second and a year, got {value:g}")
        for name, mode_of, grace, interval in (
            ("--node-loss", self.node_loss, self.node_loss_grace_seconds, self.node_loss_interval),
            ("--orphans", self.orphans, self.orphans_grace_seconds, self.orphans_interval),
        ):
            if mode_of is Reconcile.OFF:
                continue
            # a grace period must span rounds: one round alone is never evidence
            if grace < interval:
                raise ValueError(f"{name}: the grace period must be at least the interval")
            if mode_of is Reconcile.DELETE and grace < max(MIN_DELETE_GRACE, 2 * interval):
                raise ValueError(
                    f"{name}=delete: the grace period must be at least {MIN_DELETE_GRACE:g}s and"
                    f" twice the interval, got {grace:g}s"
                )
        if self.node_loss_max_nodes < 1 or not 0 < self.node_loss_max_percent <= 100:
            raise ValueError(
                "--node-loss-max-nodes must be at least 1 and --node-loss-max-percent in (0, 100]"
            )
        if self.node_loss is not Reconcile.OFF:
            if mode is not Mode.CONTROLLER:
                raise ValueError("--node-loss runs in the controller Deployment (controller mode)")
            if not self.namespace:
                raise ValueError("--node-loss needs --reconcile-namespace (its leader Lease)")
        if self.orphans is not Reconcile.OFF and not mode.owns_volumes:
            raise ValueError("--orphans runs where the volumes are (--mode=node or standalone)")


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
    #: where the cgroup v2 hierarchy is mounted: the Pods' cgroups for IO limits
    cgroup_root: Path = Path("/sys/fs/cgroup")
    #: the kubelet's --cgroup-root, as names within that hierarchy (empty: its root)
    kubelet_cgroup_root: tuple[str, ...] = ()
    #: the controller-to-node channel (node and controller mode, when the chart enables it)
    peer: PeerConfig | None = None
    #: the opt-in reconcilers (docs/operations.md)
    reconcile: ReconcileConfig = ReconcileConfig()

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
        if not self.cgroup_root.is_absolute():
            raise ValueError(f"cgroup root {str(self.cgroup_root)!r} must be an absolute path")
        if cgroup_path("/".join(self.kubelet_cgroup_root)) != self.kubelet_cgroup_root:
            raise ValueError(f"kubelet cgroup root {self.kubelet_cgroup_root!r} must be names")
        check_node_id(self.node_id)
        if self.metrics_address is not None:
            split_host_port(self.metrics_address, "--metrics-address")
        if self.peer is not None:
            self._check_peer(self.peer)
        self.reconcile.check(self.mode)

    def _check_peer(self, peer: PeerConfig) -> None:
        if self.mode is Mode.STANDALONE:
            raise ValueError(
                "the peer channel (--peer-*) joins a controller and node plugins; a standalone"
                " driver serves ControllerModifyVolume itself"
            )
        if self.mode is Mode.NODE and not peer.listen:
            raise ValueError("--peer-tls-dir in node mode needs --peer-listen HOST:PORT")
        if self.mode is Mode.CONTROLLER and peer.listen:
            raise ValueError("--peer-listen is for node mode: the controller only calls out")
        if self.mode is Mode.NODE and peer.listen:
            host, port = split_host_port(peer.listen, "--peer-listen")
            if not host or port == 0:
                raise ValueError(f"--peer-listen must be HOST:PORT, got {peer.listen!r}")
        if self.mode is Mode.CONTROLLER and not (
            peer.port and 0 < peer.port < 65536 and peer.namespace and peer.selector
        ):
            raise ValueError(
                "--peer-tls-dir in controller mode needs --peer-port (1-65535),"
                " --peer-namespace and --peer-selector"
            )
