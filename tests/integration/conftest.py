"""Shared fixtures for the host integration lane: the real driver process on a unix socket.

Every test here runs as root against real mounts and loop devices. Not being root is a
failure, not a skip: this lane exists to exercise exactly those.

Fixtures
--------
``workdir``
    A fresh short directory under /tmp (unix socket paths must stay under 108 bytes). Its
    finaliser unmounts everything below it and detaches every loop device backed by a file
    below it, and then FAILS the test if anything had to be cleaned up that way (a leak), so
    leaks are seen rather than silently swept away.
``driver``
    A running ``python -m csi_driver`` (standalone mode, hostpath backend rooted at
    ``workdir/root``, socket ``workdir/csi.sock``, node id :data:`NODE_ID`). ``driver.restart()``
    stops it with SIGTERM and starts it again on the same socket and root;
    ``driver.log_tail()`` helps failure messages. Stopped in the finaliser.
``csi``
    Stubs over a channel to ``driver``: ``csi.identity``, ``csi.controller``, ``csi.node``;
    they survive a restart of the driver (gRPC reconnects).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from csi_driver.proto import csi_pb2, csi_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
NODE_ID = "it-node"
START_TIMEOUT = 60.0


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the integration lane needs root (real mounts and loop devices); run as root")


def _unescape(field: str) -> str:
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_under(prefix: str) -> list[str]:
    """Mount points at or below ``prefix``, from /proc/self/mounts."""
    found = []
    with open("/proc/self/mounts") as f:
        for line in f:
            mountpoint = _unescape(line.split()[1])
            if mountpoint == prefix or mountpoint.startswith(prefix + "/"):
                found.append(mountpoint)
    return found


def loops_under(prefix: str) -> list[tuple[str, str]]:
    """(device, backing file) of loop devices whose backing file is below ``prefix``."""
    out = subprocess.run(
        ["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    found = []
    for line in out.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2:
            backing = parts[1].strip().removesuffix(" (deleted)")
            if backing.startswith(prefix + "/"):
                found.append((parts[0], backing))
    return found


def clean_up_host(prefix: str) -> list[str]:
    """Unmount everything below ``prefix`` (deepest first), detach its loop devices and make
    their devices writable again; return what was found (each item a leak)."""
    leaks = []
    for _ in range(4):  # stacked mounts need more than one pass
        found = sorted(mounts_under(prefix), key=len, reverse=True)
        if not found:
            break
        for mountpoint in found:
            leaks.append(f"mount {mountpoint}")
            subprocess.run(["umount", mountpoint], timeout=60, check=False, capture_output=True)
    for mountpoint in mounts_under(prefix):
        subprocess.run(["umount", "--lazy", mountpoint], timeout=60, check=False)
    for device, backing in loops_under(prefix):
        leaks.append(f"loop device {device} -> {backing}")
        subprocess.run(["blockdev", "--setrw", device], timeout=30, check=False)
        subprocess.run(["losetup", "--detach", device], timeout=60, check=False)
    return sorted(set(leaks))


@pytest.fixture
def workdir() -> Iterator[Path]:
    require_root()
    path = Path(tempfile.mkdtemp(prefix="csi-it-", dir="/tmp"))
    leaks: list[str] = []
    try:
        yield path
    finally:
        leaks = clean_up_host(str(path))
        if not mounts_under(str(path)):
            shutil.rmtree(path, ignore_errors=True)
    assert not leaks, f"left behind by the test or the driver: {leaks}"


@dataclass
class DriverProcess:
    """The driver as a child process; see the module docstring."""

    workdir: Path
    node_id: str = NODE_ID
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    exits: list[int] = field(default_factory=list)

    @property
    def socket(self) -> Path:
        return self.workdir / "csi.sock"

    @property
    def root(self) -> Path:
        return self.workdir / "root"

    @property
    def log(self) -> Path:
        return self.workdir / "driver.log"

    @property
    def target(self) -> str:
        return f"unix://{self.socket}"

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "csi_driver",
            "--mode",
            "standalone",
            "--backend",
            "hostpath",
            "--hostpath-root",
            str(self.root),
            "--endpoint",
            self.target,
            "--node-id",
            self.node_id,
            "--log-level",
            "debug",
            *self.extra_args,
        ]

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        self.root.mkdir(exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.argv(), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
            )
        self._wait_until_serving()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 30 s; records the exit code."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        self.exits.append(proc.returncode)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, lines: int = 80) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(no driver log: {exc})"

    def _wait_until_serving(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        last = "socket not created"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(
                    f"driver exited with {self.process.returncode} while starting:\n"
                    + self.log_tail()
                )
            if self.socket.exists():
                with grpc.insecure_channel(self.target) as channel:
                    try:
                        reply = csi_pb2_grpc.IdentityStub(channel).Probe(
                            csi_pb2.ProbeRequest(), timeout=5
                        )
                        if reply.ready.value:
                            return
                        last = "Probe answered not ready"
                    except grpc.RpcError as exc:
                        last = f"Probe failed: {exc.code().name} {exc.details()}"
            time.sleep(0.1)
        pytest.fail(f"driver not serving after {START_TIMEOUT} s ({last}):\n" + self.log_tail())


@pytest.fixture
def driver(workdir: Path) -> Iterator[DriverProcess]:
    d = DriverProcess(workdir)
    try:
        d.start()
        yield d
    finally:
        d.stop()
    bad = [code for code in d.exits if code != 0]
    assert not bad, f"driver exited with {bad} on SIGTERM:\n" + d.log_tail()


@dataclass
class Csi:
    channel: grpc.Channel
    identity: csi_pb2_grpc.IdentityStub
    controller: csi_pb2_grpc.ControllerStub
    node: csi_pb2_grpc.NodeStub


@contextlib.contextmanager
def csi_stubs(target: str) -> Iterator[Csi]:
    """Identity, Controller and Node stubs over one channel to ``target``."""
    channel = grpc.insecure_channel(target)
    try:
        yield Csi(
            channel,
            csi_pb2_grpc.IdentityStub(channel),
            csi_pb2_grpc.ControllerStub(channel),
            csi_pb2_grpc.NodeStub(channel),
        )
    finally:
        channel.close()


@pytest.fixture
def csi(driver: DriverProcess) -> Iterator[Csi]:
    with csi_stubs(driver.target) as stubs:
        yield stubs
