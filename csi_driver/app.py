"""Wiring: configuration in, a running server out. The only module that knows every part."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from csi_driver import __version__
from csi_driver.backends import build_backend
from csi_driver.backends.base import Backend
from csi_driver.config import Config
from csi_driver.interceptor import ErrorAndLogInterceptor
from csi_driver.locks import KeyLocks
from csi_driver.logs import setup as setup_logging
from csi_driver.metrics import Metrics, MetricsServer
from csi_driver.proto import csi_pb2_grpc
from csi_driver.server import Registration, Server
from csi_driver.system.runner import SubprocessRunner

log = logging.getLogger(__name__)


@dataclass
class Driver:
    config: Config
    server: Server
    backend: Backend | None
    metrics: Metrics
    metrics_server: MetricsServer | None
    #: what else must be well for this process to serve (the node's mount table, ...)
    checks: list[Callable[[], str | None]] = field(default_factory=list)

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
        if self.metrics_server is not None:
            self.metrics_server.start()

    def stop(self) -> None:
        self.server.stop()
        if self.metrics_server is not None:
            self.metrics_server.stop()


def build(config: Config) -> Driver:
    from csi_driver.services.controller import ControllerServicer
    from csi_driver.services.identity import IdentityServicer

    metrics = Metrics()
    runner = SubprocessRunner(observer=metrics.observe_command)
    backend = build_backend(config, runner) if config.mode.owns_volumes else None
    locks = KeyLocks()

    checks: list[Callable[[], str | None]] = []
    identity = IdentityServicer(config, lambda: driver.health())
    controller = ControllerServicer(config, backend, locks)
    registrations: list[Registration] = [
        lambda s: csi_pb2_grpc.add_IdentityServicer_to_server(identity, s),
        lambda s: csi_pb2_grpc.add_ControllerServicer_to_server(controller, s),
    ]
    if config.mode.serves_node:
        assert backend is not None
        from csi_driver.services.node import NodeServicer
        from csi_driver.system.filesystem import Filesystems
        from csi_driver.system.mounter import Mounter

        node = NodeServicer(config, backend, locks, Mounter(), Filesystems(runner))
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
    driver = Driver(config, server, backend, metrics, None, checks)
    if config.metrics_address:
        driver.metrics_server = MetricsServer(config.metrics_address, metrics, driver.health)
    return driver


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
    driver = build(config)
    driver.server.install_signal_handlers()
    driver.start()
    if config.endpoint.scheme == "unix":
        # Printed (not only logged) so a person starting the driver by hand sees where it is.
        print(f"csi-driver listening on {config.endpoint.address}", flush=True)
    try:
        driver.server.wait()
    finally:
        if driver.metrics_server is not None:
            driver.metrics_server.stop()
    return 0


__all__ = ["Driver", "build", "run"]
