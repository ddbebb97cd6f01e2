"""What one hostile or broken client can hold: stalled gRPC streams, idle connections, idle
metrics scrapes, oversize requests. None of it may freeze the driver for everybody else.

The stalled client speaks HTTP/2 by hand (a few frames are all it takes): the connection
preface, HEADERS for a unary CSI method, then a DATA frame whose gRPC prefix promises 100
bytes of request and delivers none of them. A server that gives each such half-sent request a
worker thread runs out of workers; one that receives messages on its event loop does not.

Every socket the tests open is closed in a ``finally``; at most about 1,300 are open at once.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_driver.proto import csi_pb2
from testkit.driver_process import Csi, DriverProcess, csi_stubs
from testkit.ports import free_port
from tests.h2raw import (
    ACK,
    GOAWAY,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    frame,
    read_frames,
    refused_streams,
    stalled_connection,
    stalled_streams,
)
from tests.requests import create_request

pytestmark = pytest.mark.root

STALLED_CONNECTIONS = 8
STREAMS_PER_CONNECTION = 32  # the old worker pool's size: one connection's worth froze it
IDLE_CONNECTIONS = 1000
IDLE_METRICS_CONNECTIONS = 300
ANSWER_WITHIN = 1.0  # seconds

# --- the driver and what it costs -----------------------------------------------------------


def threads_and_rss(pid: int) -> tuple[int, int]:
    """(threads, resident KiB) of a process, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()
    return int(fields["Threads"][0]), int(fields["VmRSS"][0])


def timed(call: Callable[[], Any]) -> float:
    """Seconds ``call`` took; infinity when it failed (a timeout under load counts as never)."""
    start = time.monotonic()
    try:
        call()
    except grpc.RpcError:
        return float("inf")
    return time.monotonic() - start


@pytest.fixture
def served(workdir: Path) -> Iterator[tuple[DriverProcess, Csi]]:
    d = DriverProcess(workdir, metrics_port=free_port(), log_level="info")
    try:
        d.start()
        with csi_stubs(d.target) as csi:
            yield d, csi
    finally:
        d.stop()
    assert all(code == 0 for code in d.exits), d.log_tail()


@contextlib.contextmanager
def open_sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    try:
        yield opened
    finally:
        for s in opened:
            with contextlib.suppress(OSError):
                s.close()


# --- the tests ------------------------------------------------------------------------------


def test_stalled_streams_and_idle_connections_do_not_freeze_the_server(served) -> None:  # type: ignore[no-untyped-def]
    driver, csi = served
    assert driver.process is not None
    pid = driver.process.pid
    csi.identity.Probe(csi_pb2.ProbeRequest(), timeout=5)
    threads_before, rss_before = threads_and_rss(pid)
    with open_sockets() as opened:
        started = time.monotonic()
        stalled = []
        for n in range(STALLED_CONNECTIONS):
            # half-sent Probes and CreateVolumes, the cheapest and the heaviest RPC
            method = "/csi.v1.Identity/Probe" if n % 2 else "/csi.v1.Controller/CreateVolume"
            s = stalled_connection(str(driver.socket), method, STREAMS_PER_CONNECTION)
            opened.append(s)
            stalled.append(s)
        for n in range(IDLE_CONNECTIONS):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            opened.append(s)
            s.connect(str(driver.socket))
            if n % 2:  # half of them say hello and then nothing
                s.sendall(PREFACE + frame(SETTINGS, 0, 0))
        time.sleep(0.5)  # let the server take all of it in

        # a timeout counts as never; 2 s keeps the run short when the server is frozen
        probes = [
            timed(lambda: csi.identity.Probe(csi_pb2.ProbeRequest(), timeout=2)) for _ in range(5)
        ]
        create = timed(
            lambda: csi.controller.CreateVolume(create_request("under-siege"), timeout=2)
        )
        threads_during, rss_during = threads_and_rss(pid)
        refused = [f for s in stalled for f in refused_streams(s)]
        print(
            f"\n{STALLED_CONNECTIONS * STREAMS_PER_CONNECTION} stalled streams,"
            f" {IDLE_CONNECTIONS} idle connections, opened in {time.monotonic() - started:.2f} s:"
            f" Probe max {max(probes) * 1000:.1f} ms, CreateVolume {create * 1000:.1f} ms;"
            f" threads {threads_before} -> {threads_during},"
            f" RSS {rss_before} -> {rss_during} KiB"
        )
        assert not refused, f"the stalled streams were refused, not held: {refused[:3]}"
        assert max(probes) < ANSWER_WITHIN, probes
        assert create < ANSWER_WITHIN, create
        assert threads_during <= threads_before + 4, (threads_before, threads_during)
    # and after all of them went away, the driver is as it was
    assert timed(lambda: csi.identity.Probe(csi_pb2.ProbeRequest(), timeout=5)) < ANSWER_WITHIN
    csi.controller.DeleteVolume(
        csi_pb2.DeleteVolumeRequest(
            volume_id=csi.controller.CreateVolume(
                create_request("under-siege"), timeout=5
            ).volume.volume_id
        ),
        timeout=5,
    )


def test_streams_per_connection_are_capped(served) -> None:  # type: ignore[no-untyped-def]
    """One connection cannot open an unbounded number of streams: past the advertised
    SETTINGS_MAX_CONCURRENT_STREAMS the server refuses them."""
    driver, csi = served
    with open_sockets() as opened:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        opened.append(sock)
        sock.connect(str(driver.socket))
        sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
        settings = [p for k, f, _, p in read_frames(sock, 2.0) if k == SETTINGS and not f & ACK]
        assert settings, "the server sends its SETTINGS first"
        advertised = {
            int.from_bytes(p[i : i + 2], "big"): int.from_bytes(p[i + 2 : i + 6], "big")
            for p in settings
            for i in range(0, len(p), 6)
        }
        limit = advertised.get(0x3)  # SETTINGS_MAX_CONCURRENT_STREAMS
        assert limit is not None and limit <= 256, advertised
        sock.sendall(frame(SETTINGS, ACK, 0))
        sock.sendall(stalled_streams("/csi.v1.Identity/Probe", range(1, 2 * (limit + 8), 2)))
        answered = read_frames(sock, 1.0)
        refused = {s for k, _, s, _ in answered if k == RST_STREAM}
        assert refused or any(k == GOAWAY for k, _, _, _ in answered), answered[:5]
        assert timed(lambda: csi.identity.Probe(csi_pb2.ProbeRequest(), timeout=5)) < 1


def test_oversize_request_is_refused_and_harmless(served) -> None:  # type: ignore[no-untyped-def]
    driver, csi = served
    big = create_request("too-big", {"junk": "x" * (5 << 20)})
    with pytest.raises(grpc.RpcError) as exc:
        csi.controller.CreateVolume(big, timeout=10)
    assert exc.value.code() in (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INVALID_ARGUMENT,
    ), exc.value
    assert csi.identity.Probe(csi_pb2.ProbeRequest(), timeout=5).ready.value
    volumes = driver.root / "volumes"
    assert not volumes.exists() or not any(volumes.iterdir()), "nothing was created"
    assert driver.process is not None and driver.process.poll() is None


def test_idle_metrics_connections_are_bounded_and_dropped(served) -> None:  # type: ignore[no-untyped-def]
    driver, _ = served
    assert driver.process is not None
    pid = driver.process.pid
    url_host = ("127.0.0.1", driver.metrics_port)
    threads_before, _ = threads_and_rss(pid)
    with open_sockets() as opened:
        for n in range(IDLE_METRICS_CONNECTIONS):
            s = socket.create_connection(url_host, timeout=5)
            opened.append(s)
            if n % 2:  # a request line, and then nothing more
                s.sendall(b"GET /metrics HTTP/1.1\r\n")
        time.sleep(0.5)
        threads_during, _ = threads_and_rss(pid)

        def healthz() -> None:
            with socket.create_connection(url_host, timeout=5) as c:
                c.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                reply = b""
                while chunk := c.recv(4096):
                    reply += chunk
                assert reply.startswith(b"HTTP/1.") and b" 200 " in reply.split(b"\r\n")[0]

        seconds = timed(healthz)
        print(
            f"\n{IDLE_METRICS_CONNECTIONS} idle metrics connections: /healthz {seconds * 1000:.1f}"
            f" ms, threads {threads_before} -> {threads_during}"
        )
        assert seconds < ANSWER_WITHIN
        assert threads_during <= threads_before + 8, (threads_before, threads_during)
        # idle connections are dropped after a few seconds: the server closes its end
        deadline = time.monotonic() + 15
        still_open = list(opened)
        while still_open and time.monotonic() < deadline:
            time.sleep(0.5)
            for s in list(still_open):
                s.settimeout(0)
                try:
                    if s.recv(4096) == b"":
                        still_open.remove(s)
                except BlockingIOError:
                    pass
                except OSError:
                    still_open.remove(s)
        assert not still_open, f"{len(still_open)} idle connections still held after 15 s"
    assert os.path.exists(f"/proc/{pid}")
