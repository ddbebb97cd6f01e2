"""Wiring: configuration in, a running server out. The only module that knows every part."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from csi_driver import __version__
from csi_driver.backends import build_backend
from csi_driver.backends.base import Backend
from csi_driver.config import Config
from csi_driver.interceptor import ErrorAndLogInterceptor
from csi_driver.locks import KeyLocks
from csi_driver.logs import setup as setup_logging
from csi_driver.metrics import Metrics, MetricsServer
from csi_driver.model import StorageReport
from csi_driver.proto import csi_pb2_grpc
from csi_driver.server import Registration, Server
from csi_driver.storage_metrics import StorageCollector
from csi_driver.system.cgroup_io import CgroupIo
from csi_driver.system.runner import SubprocessRunner

if TYPE_CHECKING:
    from csi_driver.reconcile.periodic import Periodic
    from csi_driver.services.peer import Forwarder

log = logging.getLogger(__name__)


class StartError(Exception):
    """The configuration cannot be served (a file it names is unreadable, ...): reported in
    one line and the process exits 2, as for a usage error."""


@dataclass
class Driver:
    config: Config
    server: Server
    backend: Backend | None
    metrics: Metrics
    metrics_server: MetricsServer | None
    #: node mode with the peer channel: ControllerModifyVolume from the controller (TLS, TCP)
    peer_server: Server | None = None
    #: what else must be well for this process to serve (the node's mount table, ...)
    checks: list[Callable[[], str | None]] = field(default_factory=list)
    #: the opt-in reconcilers (docs/operations.md), threads of their own
    reconcilers: list[Periodic] = field(default_factory=list)

    def health(self) -> str | None:
        """Why this process cannot serve now, or None: the one answer behind Probe and
        /healthz."""
        for check in [*([self.backend.health] if self.backend is not None else []), *self.checks]:
            problem = check()
            if problem is not None:
                return problem
        return None

    def start(self) -> None:
        self.server.start()
        if self.peer_server is not None:
            try:
                self.peer_server.start()
            except RuntimeError as exc:  # grpc cannot bind the address
                self.server.stop()
                raise StartError(f"the peer channel: {exc}") from exc
        if self.metrics_server is not None:
            self.metrics_server.start()
        for reconciler in self.reconcilers:
            reconciler.start()

    def stop(self) -> None:
        self.server.stop()
        self.stop_side_servers()

    def stop_side_servers(self) -> None:
        if self.reconcilers:
            from csi_driver.reconcile.periodic import stop_all

            # all at once, within one short shared wait: this follows the RPC grace period
            # inside the Pod's terminationGracePeriodSeconds
            left = stop_all(self.reconcilers)
            if left:
                log.warning("reconcilers still running at exit", extra={"reconcilers": left})
        if self.peer_server is not None:
            self.peer_server.stop()
        if self.metrics_server is not None:
            self.metrics_server.stop()


def build(config: Config) -> Driver:
    from csi_driver.services.controller import ControllerServicer
    from csi_driver.services.identity import IdentityServicer

    metrics = Metrics()
    runner = SubprocessRunner(observer=metrics.observe_command)
    #: the one view of the Pods' cgroups (IO limits), for the backend and the node service
    cgroup = CgroupIo(str(config.cgroup_root), config.kubelet_cgroup_root)
    backend = build_backend(config, runner, cgroup) if config.mode.owns_volumes else None
    locks = KeyLocks()

    checks: list[Callable[[], str | None]] = []
    identity = IdentityServicer(config, lambda: driver.health())
    controller = ControllerServicer(config, backend, locks, _forwarder(config))
    registrations: list[Registration] = [
        lambda s: csi_pb2_grpc.add_IdentityServicer_to_server(identity, s),
        lambda s: csi_pb2_grpc.add_ControllerServicer_to_server(controller, s),
    ]
    if config.mode.serves_node:
        assert backend is not None
        from csi_driver.services.node import NodeServicer
        from csi_driver.system.filesystem import Filesystems
        from csi_driver.system.mounter import Mounter

        node = NodeServicer(config, backend, locks, Mounter(), Filesystems(runner), cgroup=cgroup)
        controller.after_modify = node.io_limits.reapply
        checks.append(node.health)
        registrations.append(lambda s: csi_pb2_grpc.add_NodeServicer_to_server(node, s))
    else:
        from csi_driver.services.node import NodeCapabilitiesServicer

        caps = NodeCapabilitiesServicer()
        registrations.append(lambda s: csi_pb2_grpc.add_NodeServicer_to_server(caps, s))

    server = Server(
        config.endpoint,
        registrations,
        [ErrorAndLogInterceptor(metrics)],
        grace_period=config.grace_period,
    )
    driver = Driver(config, server, backend, metrics, None, checks=checks)
    if config.peer is not None and config.peer.listen:
        from csi_driver.config import Endpoint
        from csi_driver.services.peer import PEER_LIMITS, PeerControllerServicer, server_credentials

        peer = PeerControllerServicer(controller, config.node_id)
        try:
            credentials = server_credentials(config.peer.tls_dir)
        except ValueError as exc:
            raise StartError(f"the peer channel (--peer-*): {exc}") from exc
        driver.peer_server = Server(
            Endpoint("tcp", config.peer.listen),
            [lambda s: csi_pb2_grpc.add_ControllerServicer_to_server(peer, s)],
            [ErrorAndLogInterceptor(metrics)],
            grace_period=config.grace_period,
            max_workers=PEER_LIMITS.max_workers,
            max_connections=PEER_LIMITS.max_connections,
            max_waiting_calls=PEER_LIMITS.max_waiting_calls,
            handshake_timeout_ms=PEER_LIMITS.handshake_timeout_ms,
            credentials=credentials,
        )
    if config.reconcile.any_on:
        from csi_driver.kubeapi import ApiError
        from csi_driver.reconcile.start import build_reconcilers

        try:
            driver.reconcilers = build_reconcilers(config, backend, locks, metrics.registry)
        except ApiError as exc:
            raise StartError(f"the reconcilers (--node-loss, --orphans): {exc}") from exc
    if config.metrics_address:
        report = backend.storage_report if backend is not None else _no_storage
        metrics.add_collector(StorageCollector(report, driver.health))
        driver.metrics_server = MetricsServer(config.metrics_address, metrics, driver.health)
    return driver


def _no_storage(max_volumes: int) -> StorageReport:
    """The controller without a backend (the peer channel's) has no storage to report."""
    return StorageReport()


def _forwarder(config: Config) -> Forwarder | None:
    """Controller mode with the peer channel: what hands ControllerModifyVolume to the nodes."""
    peer = config.peer
    if config.mode.owns_volumes or peer is None:
        return None
    from csi_driver.kubeapi import ApiError, KubeApi
    from csi_driver.services.peer import Forwarder, NodePlugins, channel_credentials

    assert peer.port is not None and peer.namespace is not None and peer.selector is not None
    try:
        plugins = NodePlugins(KubeApi.in_cluster(), peer.namespace, peer.selector, peer.port)
        channel_credentials(peer.tls_dir)  # readable now, or the start fails here
        return Forwarder(plugins, lambda: channel_credentials(peer.tls_dir))
    except (ApiError, ValueError) as exc:
        raise StartError(f"the peer channel (--peer-*): {exc}") from exc


def run(config: Config) -> int:
    setup_logging(config.log_format, config.log_level)
    log.info(
        "starting",
        extra={
            "version": __version__,
            "driver": config.driver_name,
            "mode": config.mode.value,
            "backend": config.backend.value,
            "node": config.node_id,
            "endpoint": str(config.endpoint),
        },
    )
    try:
        driver = build(config)
        driver.server.install_signal_handlers()
        driver.start()
    except StartError as exc:
        log.error("cannot start", extra={"reason": str(exc)})
        print(f"csi-driver: cannot start: {exc}", file=sys.stderr, flush=True)
        return 2
    if config.endpoint.scheme == "unix":
        # Printed (not only logged) so a person starting the driver by hand sees where it is.
        print(f"csi-driver listening on {config.endpoint.address}", flush=True)
    try:
        driver.server.wait()
    finally:
        driver.stop_side_servers()
    return 0


__all__ = ["Driver", "StartError", "build", "run"]
