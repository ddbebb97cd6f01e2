"""The gRPC server: unix socket handling, graceful stop on SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import os
import signal
import stat
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from types import FrameType

import grpc

from csi_driver.config import Endpoint

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660

Registration = Callable[[grpc.Server], None]


def _prepare_socket_path(path: str) -> None:
    """Create the parent directory; remove a stale socket, but never anything that is not one."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o750, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise RuntimeError(f"{path} exists and is not a socket; refusing to remove it")
    os.unlink(path)
    log.info("removed stale socket", extra={"path": path})


def _remove_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


class Server:
    def __init__(
        self,
        endpoint: Endpoint,
        registrations: Sequence[Registration],
        interceptors: Sequence[grpc.ServerInterceptor],  # type: ignore[type-arg]
        *,
        grace_period: float = 10.0,
        max_workers: int = 32,
    ) -> None:
        self.endpoint = endpoint
        self.grace_period = grace_period
        self._stop = threading.Event()
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"),
            interceptors=list(interceptors),
            options=[("grpc.so_reuseport", 0)],
        )
        for register in registrations:
            register(self._server)

    def start(self) -> None:
        if self.endpoint.scheme == "unix":
            path = self.endpoint.address
            _prepare_socket_path(path)
            old_umask = os.umask(0o117)
            try:
                self._server.add_insecure_port(f"unix:{path}")
                self._server.start()
            finally:
                os.umask(old_umask)
            os.chmod(path, SOCKET_MODE)
        else:
            self._server.add_insecure_port(self.endpoint.address)
            self._server.start()
        log.info("listening", extra={"endpoint": str(self.endpoint)})

    def request_stop(self, signum: int | None = None, _frame: FrameType | None = None) -> None:
        if signum is not None:
            log.info("signal received, stopping", extra={"signal": signal.Signals(signum).name})
        self._stop.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def wait(self) -> None:
        """Block until a stop is requested, then stop gracefully."""
        while not self._stop.wait(timeout=3600):
            pass
        self.stop()

    def stop(self) -> None:
        """No new RPCs; in-flight ones get ``grace_period`` seconds; then the socket is removed."""
        done = self._server.stop(self.grace_period)
        done.wait(self.grace_period + 5)
        if self.endpoint.scheme == "unix":
            _remove_socket(self.endpoint.address)
        log.info("stopped")
