"""The driver as users start it: a process, its socket, SIGTERM."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import grpc

from csi_driver import DEFAULT_DRIVER_NAME
from csi_driver.proto import csi_pb2, csi_pb2_grpc


def _wait_for_socket(path: Path, proc: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.05)
    raise AssertionError(f"{path} did not appear")


def test_controller_mode_process_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    sock = tmp_path / "run" / "csi.sock"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "csi_driver",
            "--mode",
            "controller",
            "--node-id",
            "n1",
            "--endpoint",
            f"unix://{sock}",
            "--log-format",
            "json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_socket(sock, proc)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
        with grpc.insecure_channel(f"unix://{sock}") as ch:
            info = csi_pb2_grpc.IdentityStub(ch).GetPluginInfo(
                csi_pb2.GetPluginInfoRequest(), timeout=10
            )
            assert info.name == DEFAULT_DRIVER_NAME
            probe = csi_pb2_grpc.IdentityStub(ch).Probe(csi_pb2.ProbeRequest(), timeout=10)
            assert probe.ready.value
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert f"listening on {sock}" in out
        assert '"signal": "SIGTERM"' in err
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_flag_exits_2_with_a_message(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "csi_driver", "--endpoint", "http://nope", "--node-id", "n"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "endpoint must start with unix:// or tcp://" in proc.stderr


def test_version_flag() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "csi_driver", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0 and proc.stdout.startswith("csi-driver ")


def test_controller_mode_answers_node_capabilities_for_the_resizer(tmp_path: Path) -> None:
    sock = tmp_path / "csi.sock"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "csi_driver",
            "--mode",
            "controller",
            "--node-id",
            "n1",
            "--endpoint",
            f"unix://{sock}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_socket(sock, proc)
        with grpc.insecure_channel(f"unix://{sock}") as ch:
            node = csi_pb2_grpc.NodeStub(ch)
            caps = node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest(), timeout=10)
            kinds = {c.rpc.type for c in caps.capabilities}
            assert csi_pb2.NodeServiceCapability.RPC.EXPAND_VOLUME in kinds
            try:
                node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=10)
            except grpc.RpcError as exc:
                assert exc.code() is grpc.StatusCode.UNIMPLEMENTED
            else:
                raise AssertionError("controller mode must not answer NodeGetInfo")
            ctrl = csi_pb2_grpc.ControllerStub(ch).ControllerGetCapabilities(
                csi_pb2.ControllerGetCapabilitiesRequest(), timeout=10
            )
            rpcs = {c.rpc.type for c in ctrl.capabilities}
            assert csi_pb2.ControllerServiceCapability.RPC.EXPAND_VOLUME not in rpcs
    finally:
        proc.terminate()
        proc.wait(30)
