"""Command line: each flag has an environment twin ``CSI_DRIVER_<FLAG>``; parsed once to Config."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from csi_driver import DEFAULT_DRIVER_NAME, __version__
from csi_driver.bounded import echo
from csi_driver.config import (
    DEFAULT_THIN_POOL_THRESHOLD,
    BackendKind,
    Config,
    HostPathConfig,
    LogFormat,
    LvmConfig,
    Mode,
    PeerConfig,
    Reconcile,
    ReconcileConfig,
    cgroup_path,
    host_port,
    parse_endpoint,
)
from csi_driver.units import parse_bytes

ENV_PREFIX = "CSI_DRIVER_"
DEFAULT_ENDPOINT = "unix:///run/nodelocal-csi/csi.sock"
DEFAULT_HOSTPATH_ROOT = "/var/lib/nodelocal-csi/hostpath"
DEFAULT_KUBELET_DIR = "/var/lib/kubelet"


def _env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def _bool(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _bytes(value: str) -> int:
    try:
        return parse_bytes(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _percent(value: str) -> float:
    """``90``, ``87.5`` or ``90%``; checked against its range by the config."""
    try:
        return float(value.strip().removesuffix("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a percentage such as 90, got {value!r}"
        ) from None


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="csi-driver",
        description=(
            "Kubernetes CSI driver for node-local persistent volumes (lvm and hostpath backends)."
            f" Every flag can also be set through its environment variable {ENV_PREFIX}<FLAG>,"
            " e.g. CSI_DRIVER_NODE_ID; a flag given on the command line wins."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )

    def add(flag: str, help_text: str, default: object = None, **kw: object) -> None:
        env_name = _env_name(flag)
        value = env.get(env_name, default)
        # An environment value is a string default: argparse runs it through ``type`` (a bad one
        # is a usage error) but never checks it against ``choices``, so that is done here.
        choices = kw.get("choices")
        if env_name in env and isinstance(choices, list) and value not in choices:
            parser.error(f"{env_name}={echo(value)}: choose one of {', '.join(choices)}")
        parser.add_argument(flag, default=value, help=f"{help_text} [env {env_name}]", **kw)  # type: ignore[arg-type]

    add(
        "--endpoint",
        "gRPC endpoint: unix:///path/csi.sock (tcp://127.0.0.1:PORT only for debugging)",
        DEFAULT_ENDPOINT,
    )
    add(
        "--node-id",
        "this node's id (default: $NODE_NAME, else the hostname)",
        env.get("NODE_NAME") or socket.gethostname(),
    )
    add("--driver-name", "CSI driver name (reverse-DNS)", DEFAULT_DRIVER_NAME)
    add(
        "--mode",
        "standalone: Identity, Controller and Node in one process; node: the per-node"
        " plugin (also provisions this node's volumes); controller: ControllerPublish and"
        " ControllerUnpublish only",
        Mode.STANDALONE.value,
        choices=[m.value for m in Mode],
    )
    add(
        "--backend",
        "storage backend",
        BackendKind.HOSTPATH.value,
        choices=[b.value for b in BackendKind],
    )
    add(
        "--hostpath-root",
        "hostpath backend: directory holding volumes, snapshots and state.db",
        DEFAULT_HOSTPATH_ROOT,
    )
    add(
        "--hostpath-capacity",
        "hostpath backend: bytes offered (suffixes like Gi allowed;"
        " default: the free space of the root's filesystem)",
        None,
        type=_bytes,
    )
    add("--lvm-config", "lvm backend: device classes file (YAML or JSON), see docs/lvm.md", None)
    add("--lvm-volume-group", "lvm backend: a single default linear device class on this VG", None)
    add(
        "--lvm-nsenter",
        "lvm backend: run lvm2 in the host's mount namespace through nsenter"
        " (for a containerised driver with the host's /proc)",
        False,
        type=_bool,
        nargs="?",
        const=True,
    )
    add(
        "--lvm-udev-sync",
        "lvm backend: wait for udev to create device nodes",
        True,
        type=_bool,
        nargs="?",
        const=True,
    )
    add(
        "--lvm-thin-pool-threshold",
        "lvm backend: percent of a thin pool's data or metadata space in use at which the"
        " condition of its volumes (NodeGetVolumeStats, ListVolumes, ControllerGetVolume)"
        " turns abnormal; a full pool (100%%) always does",
        DEFAULT_THIN_POOL_THRESHOLD,
        type=_percent,
    )
    add(
        "--kubelet-dir",
        "the kubelet's root directory: staging and target paths must lie strictly below it,"
        " and no component on the way may be a symbolic link",
        DEFAULT_KUBELET_DIR,
    )
    add(
        "--cgroup-root",
        "where the cgroup v2 hierarchy is mounted (the Pods' cgroups, for IO limits)",
        "/sys/fs/cgroup",
    )
    add(
        "--kubelet-cgroup-root",
        "the kubelet's --cgroup-root (cgroupRoot), when it has one: the Pods' cgroups are looked"
        " for below it first (IO limits)",
        "/",
    )
    add(
        "--peer-tls-dir",
        "node and controller mode: directory with ca.crt, tls.crt and tls.key of the"
        " controller-to-node channel that carries ControllerModifyVolume (off when empty)",
        None,
    )
    add("--peer-listen", "node mode: HOST:PORT on which the peer channel is served", None)
    add(
        "--peer-port",
        "controller mode: the port the node plugins serve the peer channel on",
        None,
        type=int,
    )
    add(
        "--peer-namespace",
        "controller mode: namespace of the node plugin pods (default: $POD_NAMESPACE)",
        env.get("POD_NAMESPACE"),
    )
    add("--peer-selector", "controller mode: label selector of the node plugin pods", None)
    reconcile_choices = [r.value for r in Reconcile]
    add(
        "--node-loss",
        "controller mode: PVs of deleted Nodes: off, report (log, Event, metric) or delete"
        " (also delete their PVCs, and PVs with reclaim policy Delete); docs/operations.md",
        Reconcile.OFF.value,
        choices=reconcile_choices,
    )
    add(
        "--node-loss-grace-period",
        "seconds a Node must stay deleted before its PVs count as lost",
        600.0,
        type=float,
    )
    add("--node-loss-interval", "seconds between node loss rounds", 30.0, type=float)
    add(
        "--node-loss-max-nodes",
        "hold node loss (nothing reported or deleted) while more nodes than this are missing",
        3,
        type=int,
    )
    add(
        "--node-loss-max-percent",
        "... or while more than this percentage of the nodes is missing",
        50.0,
        type=float,
    )
    add(
        "--orphans",
        "node mode: volumes no PV names: off, report (log, Event on the Node, metric) or"
        " delete; docs/operations.md",
        Reconcile.OFF.value,
        choices=reconcile_choices,
    )
    add(
        "--orphans-grace-period",
        "seconds a volume must stay without a PV before it counts as orphaned",
        3600.0,
        type=float,
    )
    add("--orphans-interval", "seconds between orphan rounds", 300.0, type=float)
    add(
        "--reconcile-namespace",
        "controller mode: namespace of the node loss leader Lease (default: $POD_NAMESPACE)",
        env.get("POD_NAMESPACE"),
    )
    add("--max-volumes-per-node", "reported in NodeGetInfo; 0 means no limit", 0, type=int)
    add("--grace-period", "seconds in-flight RPCs get to finish on SIGTERM", 10.0, type=float)
    add(
        "--metrics-address",
        "serve Prometheus /metrics and /healthz on HOST:PORT (off when empty)",
        None,
    )
    add("--log-format", "log format", LogFormat.TEXT.value, choices=[f.value for f in LogFormat])
    add(
        "--log-level",
        "log level",
        "INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "debug", "info", "warning", "error"],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def parse_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    env = os.environ if env is None else env
    parser = build_parser(env)
    args = parser.parse_args(argv)
    if not args.peer_tls_dir and (args.peer_listen or args.peer_port or args.peer_selector):
        parser.error("the --peer-* flags need --peer-tls-dir: the channel is never served bare")
    try:
        endpoint = parse_endpoint(args.endpoint)
        backend = BackendKind(args.backend)
        lvm = None
        if backend is BackendKind.LVM:
            # imported here: only the lvm backend reads device classes (start-up time)
            from csi_driver.config.device_classes import load_device_classes

            lvm = LvmConfig(
                device_classes=load_device_classes(
                    Path(args.lvm_config) if args.lvm_config else None, args.lvm_volume_group
                ),
                use_nsenter=args.lvm_nsenter,
                udev_sync=args.lvm_udev_sync,
                thin_pool_threshold=args.lvm_thin_pool_threshold,
            )
        hostpath = None
        if backend is BackendKind.HOSTPATH:
            root = Path(args.hostpath_root)
            if not root.is_absolute():
                root = Path.cwd() / root
            hostpath = HostPathConfig(root=root, capacity_bytes=args.hostpath_capacity)
        return Config(
            endpoint=endpoint,
            node_id=args.node_id,
            driver_name=args.driver_name,
            mode=Mode(args.mode),
            backend=backend,
            hostpath=hostpath,
            lvm=lvm,
            metrics_address=args.metrics_address or None,
            log_format=LogFormat(args.log_format),
            log_level=args.log_level.upper(),
            max_volumes_per_node=args.max_volumes_per_node,
            grace_period=args.grace_period,
            kubelet_dir=Path(os.path.normpath(os.path.abspath(args.kubelet_dir))),
            cgroup_root=Path(os.path.normpath(os.path.abspath(args.cgroup_root))),
            kubelet_cgroup_root=cgroup_path(args.kubelet_cgroup_root),
            peer=PeerConfig(
                tls_dir=Path(args.peer_tls_dir),
                listen=host_port(args.peer_listen, "--peer-listen") if args.peer_listen else None,
                port=args.peer_port,
                namespace=args.peer_namespace or None,
                selector=args.peer_selector or None,
            )
            if args.peer_tls_dir
            else None,
            reconcile=ReconcileConfig(
                node_loss=Reconcile(args.node_loss),
                node_loss_grace_seconds=args.node_loss_grace_period,
                node_loss_interval=args.node_loss_interval,
                node_loss_max_nodes=args.node_loss_max_nodes,
                node_loss_max_percent=args.node_loss_max_percent,
                orphans=Reconcile(args.orphans),
                orphans_grace_seconds=args.orphans_grace_period,
                orphans_interval=args.orphans_interval,
                namespace=args.reconcile_namespace or None,
            ),
        )
    except ValueError as exc:
        parser.error(str(exc))
    raise AssertionError("unreachable")  # pragma: no cover


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    from csi_driver.app import run  # imported late: --help and --version stay fast

    return run(config)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
