"""Prometheus metrics in the text exposition format, served with /healthz on a small HTTP server.

A tiny registry of our own keeps the runtime dependencies to grpcio and protobuf.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import socket
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from csi_driver.config import split_host_port

log = logging.getLogger(__name__)

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    parts = []
    for n, v in zip(names, values, strict=True):
        escaped = v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        parts.append(f'{n}="{escaped}"')
    return "{" + ",".join(parts) + "}"


class Counter:
    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        self.name, self.help, self.label_names = name, help_text, tuple(labels)
        self._values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        with self._lock:
            return self._values.get(labels, 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        with self._lock:
            for key, val in sorted(self._values.items()):
                lines.append(f"{self.name}{_labels(self.label_names, key)} {val:g}")
        return lines


class Histogram:
    def __init__(
        self,
        name: str,
        help_text: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = _BUCKETS,
    ) -> None:
        self.name, self.help, self.label_names = name, help_text, tuple(labels)
        self.buckets = tuple(buckets)
        self._data: dict[tuple[str, ...], tuple[list[int], float, int]] = {}
        self._lock = threading.Lock()

    def observe(self, value: float, *labels: str) -> None:
        with self._lock:
            counts, total, n = self._data.get(labels, ([0] * len(self.buckets), 0.0, 0))
            i = bisect.bisect_left(self.buckets, value)
            if i < len(counts):
                counts[i] += 1
            self._data[labels] = (counts, total + value, n + 1)

    def count(self, *labels: str) -> int:
        with self._lock:
            return self._data.get(labels, ([], 0.0, 0))[2]

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        names = (*self.label_names, "le")
        with self._lock:
            for key, (counts, total, n) in sorted(self._data.items()):
                cumulative = 0
                for bound, c in zip(self.buckets, counts, strict=True):
                    cumulative += c
                    lines.append(
                        f"{self.name}_bucket{_labels(names, (*key, f'{bound:g}'))} {cumulative}"
                    )
                lines.append(f"{self.name}_bucket{_labels(names, (*key, '+Inf'))} {n}")
                lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {total:g}")
                lines.append(f"{self.name}_count{_labels(self.label_names, key)} {n}")
        return lines


class Metrics:
    """The driver's metrics. One instance, passed to whoever records."""

    def __init__(self) -> None:
        self.rpc_total = Counter(
            "csi_driver_rpc_total", "CSI RPCs handled, by method and gRPC code.", ("method", "code")
        )
        self.rpc_seconds = Histogram(
            "csi_driver_rpc_duration_seconds", "CSI RPC latency.", ("method",)
        )
        self.command_total = Counter(
            "csi_driver_command_total",
            "External commands run, by program and outcome.",
            ("program", "result"),
        )
        self.command_seconds = Histogram(
            "csi_driver_command_duration_seconds", "External command latency.", ("program",)
        )

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        self.rpc_total.inc(method, code)
        self.rpc_seconds.observe(seconds, method)

    def observe_command(self, program: str, seconds: float, ok: bool) -> None:
        self.command_total.inc(program, "ok" if ok else "error")
        self.command_seconds.observe(seconds, program)

    def render(self) -> str:
        lines: list[str] = []
        for m in (self.rpc_total, self.rpc_seconds, self.command_total, self.command_seconds):
            lines.extend(m.render())
        return "\n".join(lines) + "\n"


class MetricsServer:
    """Serves /metrics and /healthz (200 when ``health()`` returns None, else 503 with why).

    One request per connection, on an asyncio loop of its own thread: an idle or slow client
    costs a few KiB and never a thread. A client gets ``read_timeout`` seconds to send its
    request head (at most 8 KiB) and as long to take the answer, then the connection is closed;
    past ``max_connections`` open at once, a new one replaces the one that has waited longest
    for its request head (it is refused only when all of them are being answered).
    ``health()`` may run external commands, so it runs on one worker thread, shared by
    concurrent probes, and answers 503 when it takes longer than ``health_timeout``.
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
        path = parts[1].split(b"?", 1)[0]
        if path == b"/metrics":
            return 200, self._metrics.render(), "text/plain; version=0.0.4"
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
