"""Prometheus metrics, served with /healthz on a small HTTP server of the driver's own.

The metrics are prometheus-client's (a maintained library): its counters and histograms, its
text exposition, the process collector (``process_*``: memory, CPU, open descriptors) and
custom collectors for what is computed at scrape time (storage_metrics.py). They live in a
registry of the driver's own, not the library's global default, so that two drivers in one
process (the tests) keep apart and nothing imported by accident shows up in a scrape.

The HTTP side is not the library's: its ``start_http_server`` answers every connection on a
thread of its own and reads the request with no timeout, so a few idle or slow clients hold
threads for ever, a regression for a daemon on every node. :class:`MetricsServer` keeps the
bounds it had (asyncio, a bounded request head, timeouts, a connection cap) and takes only
the body of /metrics from the library (``generate_latest``).

The library renders values as floats (``3.0``) and ``le`` bounds as ``1.0`` where the old
exposition wrote ``3`` and ``1``; Prometheus reads both the same. Counters export no
``*_created`` series (docs/metrics.md).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import urllib.parse
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from csi_driver.config import split_host_port

log = logging.getLogger(__name__)

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# A ``*_created`` gauge per counter and histogram series would double the series the driver
# exports for a timestamp nobody reads; the library only offers this switch process-wide.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]


class Metrics:
    """The driver's metrics. One instance, passed to whoever records."""

    def __init__(self) -> None:
        # auto_describe: the process collector has no describe(), and `name[]` must find it too
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        self.rpc_total = Counter(
            "csi_driver_rpc_total",
            "CSI RPCs handled, by method and gRPC code.",
            ("method", "code"),
            registry=self.registry,
        )
        self.rpc_seconds = Histogram(
            "csi_driver_rpc_duration_seconds",
            "CSI RPC latency.",
            ("method",),
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.command_total = Counter(
            "csi_driver_command_total",
            "External commands run, by program and outcome.",
            ("program", "result"),
            registry=self.registry,
        )
        self.command_seconds = Histogram(
            "csi_driver_command_duration_seconds",
            "External command latency.",
            ("program",),
            buckets=_BUCKETS,
            registry=self.registry,
        )

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        self.rpc_total.labels(method, code).inc()
        self.rpc_seconds.labels(method).observe(seconds)

    def observe_command(self, program: str, seconds: float, ok: bool) -> None:
        self.command_total.labels(program, "ok" if ok else "error").inc()
        self.command_seconds.labels(program).observe(seconds)

    def add_collector(self, collector: Collector) -> None:
        """Export what ``collector`` computes at scrape time (storage_metrics.py)."""
        self.registry.register(collector)

    def value(self, name: str, **labels: str) -> float:
        """The current value of one sample (0 when it was never recorded), for tests and
        benchmarks that read a counter in process."""
        return self.registry.get_sample_value(name, labels) or 0.0

    def render(self, names: Collection[str] = ()) -> str:
        """The text exposition of every metric, or of the families ``names`` lists (sample
        names, as Prometheus's ``name[]`` parameter gives them). Collectors may wait for a
        storage report (at most their bound), so the server calls this off its event loop; a
        scrape of other families runs no report."""
        registry = self.registry.restricted_registry(names) if names else self.registry
        return prometheus_client.generate_latest(registry).decode()


#: ``/metrics?name[]=...`` parameters one scrape may give
MAX_NAMES = 64


def _requested_names(query: bytes) -> frozenset[str] | None:
    """The ``name[]`` parameters of a query (none: every family), or None past MAX_NAMES."""
    try:
        pairs = urllib.parse.parse_qsl(
            query.decode("ascii"), max_num_fields=4 * MAX_NAMES, errors="strict"
        )
    except (UnicodeDecodeError, ValueError):
        return None
    names = frozenset(v for k, v in pairs if k == "name[]")
    return names if len(names) <= MAX_NAMES else None


class MetricsServer:
    """Serves /metrics and /healthz (200 when ``health()`` returns None, else 503 with why).

    One request per connection, on an asyncio loop of its own thread: an idle or slow client
    costs a few KiB and never a thread. A client gets ``read_timeout`` seconds to send its
    request head (at most 8 KiB) and as long to take the answer, then the connection is closed;
    past ``max_connections`` open at once, a new one replaces the one that has waited longest
    for its request head (it is refused only when all of them are being answered).
    ``health()`` may run external commands, so it runs on one worker thread, shared by
    concurrent probes, and answers 503 when it takes longer than ``health_timeout``. The
    /metrics page is rendered on another worker thread, one scrape at a time: a collector may
    wait for its storage report (never longer than its own bound), and the loop goes on
    serving meanwhile.
    """

    MAX_HEAD = 8192

    def __init__(
        self,
        address: str,
        metrics: Metrics,
        health: Callable[[], str | None],
        *,
        read_timeout: float = 5.0,
        max_connections: int = 256,
        health_timeout: float = 10.0,
    ) -> None:
        host, port = split_host_port(address, "metrics address")
        self._metrics, self._health = metrics, health
        self._read_timeout, self._health_timeout = read_timeout, health_timeout
        self._max_connections = max_connections
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.create_server((host, port), family=family, dualstack_ipv6=False)
        self._sock.setblocking(False)
        self._open = 0
        self._waiting: dict[asyncio.StreamWriter, None] = {}  # still sending the head, oldest first
        self._health_check: asyncio.Future[str | None] | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="healthz")
        self._render_pool = ThreadPoolExecutor(1, thread_name_prefix="metrics-render")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="metrics-loop", daemon=True
        )
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    def start(self) -> None:
        self._thread.start()

        async def serve() -> asyncio.Server:
            return await asyncio.start_server(self._handle, sock=self._sock, limit=self.MAX_HEAD)

        self._server = asyncio.run_coroutine_threadsafe(serve(), self._loop).result(10)
        log.info("metrics server listening", extra={"port": self.port})

    def stop(self) -> None:
        """Close the listener and every open connection; idempotent."""
        if self._thread.is_alive():
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
            try:
                future.result(5)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(5)
        self._sock.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._render_pool.shutdown(wait=False, cancel_futures=True)

    async def _shutdown(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= self._max_connections:
            if not self._waiting:
                writer.transport.abort()
                return
            # Full: make room by dropping the connection that has kept us waiting longest.
            oldest = next(iter(self._waiting))
            del self._waiting[oldest]
            oldest.transport.abort()
        self._open += 1
        self._waiting[writer] = None
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self._read_timeout)
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            finally:
                self._waiting.pop(writer, None)
            status, body, ctype = await self._answer(head)
            data = body.encode()
            writer.write(
                f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                + data
            )
            await asyncio.wait_for(writer.drain(), self._read_timeout)
        except (TimeoutError, OSError):
            pass
        finally:
            self._open -= 1
            writer.close()

    async def _answer(self, head: bytes) -> tuple[int, str, str]:
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return 400, "bad request\n", "text/plain"
        if parts[0] != b"GET":
            return 405, "only GET\n", "text/plain"
        path, _, query = parts[1].partition(b"?")
        if path == b"/metrics":
            names = _requested_names(query)
            if names is None:
                return (
                    400,
                    f"bad query: ASCII, at most {MAX_NAMES} name[] parameters\n",
                    "text/plain",
                )
            body = await asyncio.get_running_loop().run_in_executor(
                self._render_pool, self._metrics.render, names
            )
            return 200, body, CONTENT_TYPE_PLAIN_0_0_4
        if path == b"/healthz":
            problem = await self._check_health()
            return (
                (200, "ok\n", "text/plain")
                if problem is None
                else (503, problem + "\n", "text/plain")
            )
        return 404, "not found\n", "text/plain"

    async def _check_health(self) -> str | None:
        """One ``health()`` call at a time; probes arriving meanwhile share its answer."""
        if self._health_check is None or self._health_check.done():
            self._health_check = asyncio.ensure_future(
                asyncio.get_running_loop().run_in_executor(self._pool, self._health)
            )
        try:
            return await asyncio.wait_for(asyncio.shield(self._health_check), self._health_timeout)
        except TimeoutError:
            return f"health check did not answer within {self._health_timeout:g} s"
        except Exception as exc:
            return f"health check failed: {type(exc).__name__}: {exc}"


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}
