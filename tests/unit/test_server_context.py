"""What a synchronous servicer sees of its RPC under the asyncio server: the end of the RPC
(answered, cancelled, past its deadline) reaches its callbacks while it still runs; abort ends
it with the code; a connection past the server's bound is closed."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_driver.config import Endpoint
from csi_driver.proto import csi_pb2, csi_pb2_grpc
from csi_driver.server import Server


class Watched(csi_pb2_grpc.IdentityServicer):  # type: ignore[misc]
    """Probe runs until its RPC ends (or 10 s), recording what its context said."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.ended = threading.Event()
        self.seen: dict[str, Any] = {}

    def Probe(self, request, context):  # type: ignore[no-untyped-def]
        self.seen["remaining"] = context.time_remaining()
        self.seen["registered"] = context.add_callback(self.ended.set)
        self.started.set()
        self.seen["ended_in_time"] = self.ended.wait(10)
        self.seen["active_after"] = context.is_active()
        return csi_pb2.ProbeResponse()

    def GetPluginInfo(self, request, context):  # type: ignore[no-untyped-def]
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not now")

    def GetPluginCapabilities(self, request, context):  # type: ignore[no-untyped-def]
        context.set_code(grpc.StatusCode.NOT_FOUND)
        context.set_details("set, not raised")
        return csi_pb2.GetPluginCapabilitiesResponse()


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload
    )


def stalled_connection(path: str, streams: int) -> socket.socket:
    """HTTP/2 by hand (tests/h2raw.py has the commented version): ``streams`` Probes whose
    message promises 100 bytes and never comes."""
    headers = (
        b"\x83\x86\x04\x16/csi.v1.Identity/Probe\x01\x09localhost"
        b"\x0f\x10\x10application/grpc\x00\x02te\x08trailers"
    )
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(0x4, 0, 0)
    for n in range(streams):
        out += _frame(0x1, 0x4, 2 * n + 1, headers) + _frame(0x0, 0, 2 * n + 1, b"\0\0\0\0\x64")
    sock.sendall(out)
    return sock


@contextlib.contextmanager
def serving(tmp_path: Path, **kw: Any) -> Iterator[tuple[Server, Watched, str]]:
    servicer = Watched()
    path = tmp_path / "csi.sock"
    server = Server(
        Endpoint("unix", str(path)),
        [lambda s: csi_pb2_grpc.add_IdentityServicer_to_server(servicer, s)],
        [],
        grace_period=1,
        **kw,
    )
    server.start()
    try:
        yield server, servicer, str(path)
    finally:
        servicer.ended.set()
        server.stop()


def test_deadline_reaches_the_running_servicer(tmp_path: Path) -> None:
    with serving(tmp_path) as (_, servicer, path), grpc.insecure_channel(f"unix://{path}") as ch:
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as exc:
            csi_pb2_grpc.IdentityStub(ch).Probe(csi_pb2.ProbeRequest(), timeout=0.5)
        assert exc.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert servicer.ended.wait(5), "the callback runs when the deadline passes"
        assert time.monotonic() - start < 3
        assert servicer.seen["registered"] is True
        # the client's 0.5 s, as the server measures it from the header it got: never more
        # than that but for the two clocks' reading order (measured: 0.50003 on a busy host)
        assert 0 < servicer.seen["remaining"] <= 0.5 + 0.01


def test_client_cancel_reaches_the_running_servicer(tmp_path: Path) -> None:
    with serving(tmp_path) as (_, servicer, path), grpc.insecure_channel(f"unix://{path}") as ch:
        future = csi_pb2_grpc.IdentityStub(ch).Probe.future(csi_pb2.ProbeRequest(), timeout=30)
        assert servicer.started.wait(5)
        future.cancel()
        assert servicer.ended.wait(5), "the callback runs when the client cancels"
        deadline = time.monotonic() + 5
        while "active_after" not in servicer.seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert servicer.seen["active_after"] is False


def test_abort_and_set_code_become_the_status(tmp_path: Path) -> None:
    with serving(tmp_path) as (_, _servicer, path), grpc.insecure_channel(f"unix://{path}") as ch:
        stub = csi_pb2_grpc.IdentityStub(ch)
        with pytest.raises(grpc.RpcError) as exc:
            stub.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=5)
        assert (exc.value.code(), exc.value.details()) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "not now",
        )
        with pytest.raises(grpc.RpcError) as exc:
            stub.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest(), timeout=5)
        assert (exc.value.code(), exc.value.details()) == (
            grpc.StatusCode.NOT_FOUND,
            "set, not raised",
        )


def test_connections_past_the_bound_are_closed(tmp_path: Path) -> None:
    with serving(tmp_path, max_connections=8) as (_, _servicer, path):
        held: list[socket.socket] = []
        try:
            for _ in range(8):
                s = socket.socket(socket.AF_UNIX)
                held.append(s)
                s.connect(path)
                s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(0x4, 0, 0))
            time.sleep(0.3)
            extra = socket.socket(socket.AF_UNIX)
            held.append(extra)
            extra.connect(path)
            extra.settimeout(3)
            assert extra.recv(1024) == b"", "the ninth connection is closed by the server"
        finally:
            for s in held:
                s.close()
        time.sleep(0.3)
        with grpc.insecure_channel(f"unix://{path}") as ch, pytest.raises(grpc.RpcError) as exc:
            csi_pb2_grpc.IdentityStub(ch).GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=5)
        assert exc.value.code() is grpc.StatusCode.FAILED_PRECONDITION, "served again"


def test_calls_waiting_for_their_message_are_bounded(tmp_path: Path) -> None:
    """Past the bound, a new call is refused at once instead of taking more memory; when the
    stalled client goes, the server serves again."""
    with serving(tmp_path, max_waiting_calls=8) as (_, _servicer, path):
        stalled = stalled_connection(path, 8)
        try:
            time.sleep(0.3)
            with grpc.insecure_channel(f"unix://{path}") as ch, pytest.raises(grpc.RpcError) as exc:
                csi_pb2_grpc.IdentityStub(ch).GetPluginInfo(
                    csi_pb2.GetPluginInfoRequest(), timeout=5
                )
            assert exc.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            stalled.close()
        deadline = time.monotonic() + 5
        code = None
        while time.monotonic() < deadline:
            with grpc.insecure_channel(f"unix://{path}") as ch, pytest.raises(grpc.RpcError) as exc:
                csi_pb2_grpc.IdentityStub(ch).GetPluginInfo(
                    csi_pb2.GetPluginInfoRequest(), timeout=5
                )
            code = exc.value.code()
            if code is grpc.StatusCode.FAILED_PRECONDITION:
                break
            time.sleep(0.1)
        assert code is grpc.StatusCode.FAILED_PRECONDITION, "served again once the client left"
