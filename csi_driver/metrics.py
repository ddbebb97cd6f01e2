"""Prometheus metrics in the text exposition format, served with /healthz on a small HTTP server.

A tiny registry of our own keeps the runtime dependencies to grpcio and protobuf.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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
    """Serves /metrics and /healthz (200 when ``health()`` returns None, else 503 with why)."""

    def __init__(self, address: str, metrics: Metrics, health: Callable[[], str | None]) -> None:
        host, _, port = address.rpartition(":")
        metrics_ref, health_ref = metrics, health

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    self._reply(200, metrics_ref.render(), "text/plain; version=0.0.4")
                elif self.path == "/healthz":
                    problem = health_ref()
                    if problem is None:
                        self._reply(200, "ok\n", "text/plain")
                    else:
                        self._reply(503, problem + "\n", "text/plain")
                else:
                    self._reply(404, "not found\n", "text/plain")

            def _reply(self, status: int, body: str, ctype: str) -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                return

        self._httpd = ThreadingHTTPServer((host or "0.0.0.0", int(port)), Handler)  # noqa: S104
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        self._thread.start()
        log.info("metrics server listening", extra={"port": self.port})

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
