"""The metrics listener under idle, slow and odd clients: bounded, and never stuck."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from csi_driver.config import split_host_port
from csi_driver.metrics import Metrics, MetricsServer


@contextlib.contextmanager
def serving(health=lambda: None, **kw) -> Iterator[MetricsServer]:  # type: ignore[no-untyped-def]
    server = MetricsServer("127.0.0.1:0", Metrics(), health, **kw)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def get(port: int, request: bytes = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    return reply


def closed_by_server(s: socket.socket, within: float) -> bool:
    s.settimeout(within)
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_idle_connection_is_dropped_after_the_read_timeout() -> None:
    with serving(read_timeout=0.5) as server:
        idle = socket.create_connection(("127.0.0.1", server.port))
        half = socket.create_connection(("127.0.0.1", server.port))
        try:
            half.sendall(b"GET /metrics HTTP/1.1\r\n")
            start = time.monotonic()
            assert closed_by_server(idle, 5) and closed_by_server(half, 5)
            assert time.monotonic() - start < 3
        finally:
            idle.close()
            half.close()


def test_a_full_listener_drops_its_oldest_idle_connection_for_a_new_client() -> None:
    with serving(read_timeout=30, max_connections=4) as server:
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(4)]
        try:
            time.sleep(0.2)
            assert get(server.port).startswith(b"HTTP/1.1 200 OK")
            assert closed_by_server(idle[0], 2), "the oldest idle connection makes room"
            assert not closed_by_server(idle[3], 0.2)
        finally:
            for s in idle:
                s.close()


def test_answers_and_refusals() -> None:
    with serving() as server:
        assert b"# TYPE csi_driver_rpc_total counter" in get(
            server.port, b"GET /metrics?x=1 HTTP/1.1\r\n\r\n"
        )
        assert get(server.port, b"GET /nope HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404")
        assert get(server.port, b"POST /healthz HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405")
        assert get(server.port, b"garbage\r\n\r\n").startswith(b"HTTP/1.1 400")
        # a head over 8 KiB is not read to its end
        assert get(server.port, b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n") == b""


def test_a_hanging_health_check_answers_503_and_is_run_once() -> None:
    release = threading.Event()
    calls = []

    def health() -> str | None:
        calls.append(1)
        release.wait(10)
        return None

    with serving(health, health_timeout=0.5) as server:
        try:
            replies = []
            threads = [
                threading.Thread(target=lambda: replies.append(get(server.port))) for _ in range(5)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
            assert len(replies) == 5
            assert all(r.startswith(b"HTTP/1.1 503") for r in replies), replies
            assert b"did not answer within 0.5 s" in replies[0]
            assert len(calls) == 1, "concurrent probes share one health check"
        finally:
            release.set()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0.0.0.0:9808", ("0.0.0.0", 9808)),
        ("10.1.2.3:9808", ("10.1.2.3", 9808)),  # $(POD_IP):9808 as the kubelet expands it
        ("fd00::5:9808", ("fd00::5", 9808)),  # an IPv6 Pod IP, unbracketed
        ("[fd00::5]:9808", ("fd00::5", 9808)),
        (":9808", ("", 9808)),
    ],
)
def test_split_host_port(value: str, expected: tuple[str, int]) -> None:
    assert split_host_port(value) == expected


@pytest.mark.parametrize("value", ["9808", "host:", "host:port", "$(POD_IP)", "h:70000"])
def test_split_host_port_refuses(value: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        split_host_port(value)


def test_name_parameters_select_families_and_are_bounded() -> None:
    with serving() as server:
        server._metrics.observe_rpc("Probe", "OK", 0.01)
        reply = get(
            server.port, b"GET /metrics?name[]=csi_driver_rpc_total HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        assert reply.startswith(b"HTTP/1.1 200")
        assert b'csi_driver_rpc_total{code="OK",method="Probe"} 1.0' in reply
        assert b"process_" not in reply and b"csi_driver_rpc_duration" not in reply
        many = "&".join(f"name[]=m{i}" for i in range(65)).encode()
        reply = get(server.port, b"GET /metrics?" + many + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 400")
        reply = get(server.port, b"GET /metrics?name[]=%ff HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 400")
