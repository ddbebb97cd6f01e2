"""Server lifecycle over a real unix socket: permissions, stale sockets, graceful stop."""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from pathlib import Path

import grpc
import pytest

from csi_driver.config import Endpoint
from csi_driver.interceptor import ErrorAndLogInterceptor
from csi_driver.metrics import Metrics
from csi_driver.proto import csi_pb2, csi_pb2_grpc
from csi_driver.server import Server


class Slow(csi_pb2_grpc.IdentityServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.started = threading.Event()

    def Probe(self, request, context):  # type: ignore[no-untyped-def]
        self.started.set()
        time.sleep(1.0)
        return csi_pb2.ProbeResponse()


def _server(path: Path, servicer: Slow, grace: float = 5) -> Server:
    return Server(
        Endpoint("unix", str(path)),
        [lambda s: csi_pb2_grpc.add_IdentityServicer_to_server(servicer, s)],
        [ErrorAndLogInterceptor(Metrics())],
        grace_period=grace,
    )


def test_socket_mode_parent_dir_and_stale_socket(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "csi.sock"
    path.parent.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on, as after a crash
    server = _server(path, Slow())
    server.start()
    try:
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o660
    finally:
        server.stop()
    assert not path.exists()


def test_socket_appears_at_its_path_only_once_the_server_answers(tmp_path: Path) -> None:
    """Bound under a name of its own (a stale one from a kill is removed), renamed into place
    after the server started: a client never finds a socket that is not served yet."""
    path = tmp_path / "csi.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(f"{path}~")
    stale.close()
    server = _server(path, Slow())
    server.start()
    try:
        assert sorted(os.listdir(tmp_path)) == ["csi.sock"]
        with grpc.insecure_channel(f"unix://{path}") as channel:
            csi_pb2_grpc.IdentityStub(channel).Probe(csi_pb2.ProbeRequest(), timeout=10)
    finally:
        server.stop()
    assert os.listdir(tmp_path) == []


def test_refuses_to_remove_a_file_that_is_not_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "csi.sock"
    path.write_text("precious")
    with pytest.raises(RuntimeError, match="not a socket"):
        _server(path, Slow()).start()
    assert path.read_text() == "precious"


def test_in_flight_rpc_finishes_and_new_ones_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "csi.sock"
    servicer = Slow()
    server = _server(path, servicer)
    server.start()
    channel = grpc.insecure_channel(f"unix://{path}")
    stub = csi_pb2_grpc.IdentityStub(channel)
    result: list[object] = []
    t = threading.Thread(
        target=lambda: result.append(stub.Probe(csi_pb2.ProbeRequest(), timeout=10))
    )
    t.start()
    assert servicer.started.wait(5)
    server.request_stop()
    stopper = threading.Thread(target=server.wait)
    stopper.start()
    t.join(10)
    stopper.join(10)
    assert result and isinstance(result[0], csi_pb2.ProbeResponse)
    with pytest.raises(grpc.RpcError) as exc:
        stub.Probe(csi_pb2.ProbeRequest(), timeout=2)
    assert exc.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    channel.close()
    assert not path.exists()
