"""The gRPC server: unix socket handling, what one client may hold, graceful stop on SIGTERM.

Why an asyncio server under synchronous servicers: the synchronous ``grpc.server`` hands a
call to a worker thread as soon as its HEADERS arrive, and that thread then blocks until the
request message is complete. A client that sends HEADERS and half a message holds a worker for
as long as it likes; a pool's worth of such streams (one connection is enough) froze every RPC,
Probe included. ``grpc.aio`` receives messages on its event loop: a stalled stream costs a few
KiB and no thread, and only a complete request reaches a worker. The servicers stay
synchronous (they run external commands and SQLite) on a bounded thread pool, behind
:class:`SyncContext`, which gives them the context the synchronous server gave: ``abort``
raises, ``add_callback`` runs when the RPC ends, also when the client cancels or its deadline
passes, ``is_active`` turns false then.

What one client can hold is bounded: streams per connection, connections, request size, time
to say hello (:data:`LIMITS`), and calls still waiting for their message, over all
connections (:class:`_Bridge`). Connections are never closed for being idle or old: the
kubernetes-csi sidecars treat a lost connection to the driver as fatal and restart.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import stat
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from types import FrameType
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from csi_driver import callmemo
from csi_driver.config import Endpoint

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660
MAX_REQUEST_BYTES = 4 << 20  # a CSI request is small; a Kubernetes Secret is at most 1 MiB
MAX_STREAMS_PER_CONNECTION = 100  # the sidecars' default worker count fits in one connection
MAX_CONNECTIONS = 2048
MAX_WAITING_CALLS = 1024  # calls whose message has not arrived yet, ~20 KiB each

LIMITS: tuple[tuple[str, int], ...] = (
    ("grpc.so_reuseport", 0),
    ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
    ("grpc.max_allowed_incoming_connections", MAX_CONNECTIONS),
    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
    # a connection that has not sent its HTTP/2 preface by then is closed
    ("grpc.server_handshake_timeout_ms", 10_000),
    # find peers that vanished without a FIN (tcp endpoints); answered pings keep a connection
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
)

# What a registration gets: the generated ``add_*Servicer_to_server`` functions only call
# ``add_generic_rpc_handlers`` and ``add_registered_method_handlers``, which both servers have.
Registration = Callable[[Any], None]
if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    Interceptor = grpc.ServerInterceptor[Any, Any]
    _AioInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    Handler, Interceptor = grpc.RpcMethodHandler, grpc.ServerInterceptor
    _AioInterceptor = grpc.aio.ServerInterceptor


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


class _Aborted(Exception):
    """Raised by :meth:`SyncContext.abort` to end the servicer; the bridge sends the status."""


class SyncContext(grpc.ServicerContext):
    """The synchronous servicer context, for a servicer running on a worker thread under the
    asyncio server. Everything the servicer asks is answered from what was captured when the
    call started, or from state guarded by a lock; the status is sent from the event loop."""

    def __init__(
        self,
        task: asyncio.Task[Any] | None,
        loop: asyncio.AbstractEventLoop,
        metadata: Any,
        peer: str,
        time_remaining: float | None,
    ) -> None:
        self._task, self._loop = task, loop
        self._metadata, self._peer = metadata, peer
        self._deadline = None if time_remaining is None else time.monotonic() + time_remaining
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self._ended = False
        self.code: grpc.StatusCode | None = None
        self.details: str = ""
        self.trailing: tuple[tuple[str, str | bytes], ...] = ()

    # --- the RPC's life ---------------------------------------------------------------------

    def is_active(self) -> bool:
        with self._lock:
            return not self._ended

    def time_remaining(self) -> float | None:  # type: ignore[override]
        return None if self._deadline is None else max(self._deadline - time.monotonic(), 0.0)

    def cancel(self) -> None:
        if self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)

    def add_callback(self, callback: Callable[[], None]) -> bool:
        with self._lock:
            if self._ended:
                return False
            self._callbacks.append(callback)
            return True

    def end(self) -> None:
        """The RPC is over (answered, failed, cancelled or past its deadline): run the
        callbacks once, in the order they were added."""
        with self._lock:
            if self._ended:
                return
            self._ended = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("RPC termination callback failed")

    # --- status -----------------------------------------------------------------------------

    def abort(self, code: grpc.StatusCode, details: str) -> Any:
        if code is grpc.StatusCode.OK:
            raise ValueError("abort needs a non-OK status code")
        self.code, self.details = code, details
        raise _Aborted(details)

    def abort_with_status(self, status: grpc.Status) -> Any:
        self.trailing = tuple(status.trailing_metadata or ())
        self.abort(status.code, status.details)

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, trailing_metadata: Any) -> None:
        self.trailing = tuple(trailing_metadata)

    def send_initial_metadata(self, initial_metadata: Any) -> None:
        raise NotImplementedError("initial metadata is not supported for synchronous servicers")

    # --- who is asking ----------------------------------------------------------------------

    def invocation_metadata(self) -> Any:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def peer_identities(self) -> None:
        return None

    def peer_identity_key(self) -> None:
        return None

    def auth_context(self) -> dict[str, bytes]:
        return {}


def _chain(
    interceptors: Sequence[Interceptor], index: int, base: Handler | None, details: Any
) -> Handler | None:
    """The synchronous interceptors applied in order, the first one outermost."""
    if index == len(interceptors):
        return base
    nxt = functools.partial(_chain, interceptors, index + 1, base)
    handler: Handler | None = interceptors[index].intercept_service(nxt, details)
    return handler


async def _refuse(_requests: Any, context: Any) -> None:
    await context.abort(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "too many requests have started without sending their message; retry later",
    )


class _Bridge(_AioInterceptor):
    """Runs the synchronous interceptors, then turns a synchronous unary handler into a
    coroutine that runs it on the bounded pool and sends its status from the event loop.

    It sees each call when its HEADERS arrive, before its message: calls still waiting for
    their message are counted, and past ``max_waiting`` a new call is refused at once with
    RESOURCE_EXHAUSTED (its message is never read), so half-sent requests cannot take memory
    without bound. A complete request waits microseconds; only a stalled one stays counted.
    """

    def __init__(
        self, interceptors: Sequence[Interceptor], pool: futures.Executor, max_waiting: int
    ) -> None:
        self._interceptors, self._pool = tuple(interceptors), pool
        self._max_waiting = max_waiting
        self._waiting: set[asyncio.Task[Any]] = set()
        #: method -> (the intercepted handler, its bridge): made once per method, not per call
        self._bridged: dict[str, tuple[Handler, Handler]] = {}
        self._refused, self._warned_at = 0, 0.0

    async def intercept_service(  # type: ignore[override]
        self, continuation: Callable[[Any], Any], handler_call_details: Any
    ) -> Handler | None:
        task = asyncio.current_task()
        if task is not None:
            if len(self._waiting) >= self._max_waiting:
                self._warn_refused()
                return grpc.stream_unary_rpc_method_handler(_refuse)
            self._waiting.add(task)
            task.add_done_callback(self._waiting.discard)
        base = await continuation(handler_call_details)
        handler = _chain(self._interceptors, 0, base, handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        cached = self._bridged.get(handler_call_details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        bridge: Handler = grpc.unary_unary_rpc_method_handler(
            functools.partial(self._call, handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        self._bridged[handler_call_details.method] = (handler, bridge)
        return bridge

    def _warn_refused(self) -> None:
        """At most one line every 10 s, however many calls are refused."""
        self._refused += 1
        now = time.monotonic()
        if now - self._warned_at >= 10:
            log.warning(
                "refusing calls: too many are waiting for their request message",
                extra={"waiting": len(self._waiting), "refused": self._refused},
            )
            self._warned_at, self._refused = now, 0

    async def _call(self, servicer: Callable[..., Any], request: Any, context: Any) -> Any:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        if task is not None:
            self._waiting.discard(task)  # its message has arrived
        sync = SyncContext(
            task,
            loop,
            context.invocation_metadata(),
            context.peer(),
            context.time_remaining(),
        )
        try:
            response = await loop.run_in_executor(
                self._pool, callmemo.in_call, servicer, request, sync
            )
        except _Aborted:
            response = None
        finally:
            # Also when cancelled by the client, its deadline or the end of the grace period:
            # a call still queued then never runs; a running one learns it from its callbacks.
            sync.end()
        if sync.trailing:
            context.set_trailing_metadata(sync.trailing)
        if sync.code is not None and sync.code is not grpc.StatusCode.OK:
            await context.abort(sync.code, sync.details)
        return response


class Server:
    """The CSI services on one endpoint. ``start`` returns once the socket is served; the
    event loop runs on a thread of its own, so signals stay with the main thread."""

    def __init__(
        self,
        endpoint: Endpoint,
        registrations: Sequence[Registration],
        interceptors: Sequence[Interceptor],
        *,
        grace_period: float = 10.0,
        max_workers: int = 32,
        max_connections: int = MAX_CONNECTIONS,
        max_waiting_calls: int = MAX_WAITING_CALLS,
        handshake_timeout_ms: int = 10_000,
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        self.endpoint = endpoint
        #: TLS for a tcp endpoint (the peer channel); the unix socket is guarded by its mode
        self._credentials = credentials
        self.grace_period = grace_period
        self._registrations = tuple(registrations)
        self._interceptors = tuple(interceptors)
        self._max_workers = max_workers
        self._max_waiting_calls = max_waiting_calls
        overridden = {"grpc.max_allowed_incoming_connections", "grpc.server_handshake_timeout_ms"}
        self._options = (
            *(o for o in LIMITS if o[0] not in overridden),
            ("grpc.max_allowed_incoming_connections", max_connections),
            ("grpc.server_handshake_timeout_ms", handshake_timeout_ms),
        )
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pool: futures.ThreadPoolExecutor | None = None
        self._server: grpc.aio.Server | None = None

    def start(self) -> None:
        """Serve. A unix socket is bound under a name of its own and renamed into place only
        once the server answers: a sidecar that connects in between bind and start may see
        its connection dropped, which the kubernetes-csi sidecars treat as fatal ("Lost
        connection to CSI driver, exiting"); on a slow node that window lasts seconds."""
        unix = self.endpoint.scheme == "unix"
        bind_path = self.endpoint.address + "~"
        if unix:
            _prepare_socket_path(self.endpoint.address)
            _prepare_socket_path(bind_path)
        self._pool = futures.ThreadPoolExecutor(self._max_workers, thread_name_prefix="rpc")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="grpc-loop", daemon=True
        )
        self._thread.start()
        address = f"unix:{bind_path}" if unix else self.endpoint.address
        old_umask = os.umask(0o117) if unix else None
        try:
            self._run(self._serve(address), timeout=30)
        finally:
            if old_umask is not None:
                os.umask(old_umask)
        if unix:
            os.chmod(bind_path, SOCKET_MODE)
            os.rename(bind_path, self.endpoint.address)
        log.info("listening", extra={"endpoint": str(self.endpoint)})

    async def _serve(self, address: str) -> None:
        assert self._pool is not None
        server = grpc.aio.server(
            migration_thread_pool=self._pool,
            interceptors=[_Bridge(self._interceptors, self._pool, self._max_waiting_calls)],
            options=self._options,
        )
        for register in self._registrations:
            register(server)
        if self._credentials is not None:
            server.add_secure_port(address, self._credentials)
        else:
            server.add_insecure_port(address)
        await server.start()
        self._server = server

    def _run(self, coro: Any, timeout: float) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

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
        server, loop, thread = self._server, self._loop, self._thread
        self._server = None
        if server is not None:
            try:
                self._run(server.stop(self.grace_period), timeout=self.grace_period + 5)
            except (TimeoutError, futures.TimeoutError):
                log.warning("server did not stop within the grace period")
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)
        if self.endpoint.scheme == "unix":
            _remove_socket(self.endpoint.address)
        log.info("stopped")
