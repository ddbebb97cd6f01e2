"""A driver process for measurements: started on a temporary root, talked to over its unix socket,
its Prometheus metrics scraped over 127.0.0.1.

Kept apart from the measurements so each benchmark script stays about what it measures.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from csi_driver.proto import csi_pb2, csi_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0

_COMMAND_LINE = re.compile(
    r'^csi_driver_command_total\{program="((?:[^"\\]|\\.)*)",result="((?:[^"\\]|\\.)*)"\}'
    r"\s+(\S+)$"
)

CommandCounts = dict[tuple[str, str], float]


def free_port() -> int:
    """A port nobody listens on right now. The driver does not print the port it bound for
    ``:0``, so the benchmark picks one and hands it over (a race with other programs is
    possible but harmless: the driver then fails to start, loudly)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_command_counts(text: str) -> CommandCounts:
    counts: CommandCounts = {}
    for line in text.splitlines():
        m = _COMMAND_LINE.match(line.strip())
        if m:
            counts[(m.group(1), m.group(2))] = float(m.group(3))
    return counts


def diff_counts(after: CommandCounts, before: CommandCounts) -> CommandCounts:
    out: CommandCounts = {}
    for key, value in after.items():
        delta = value - before.get(key, 0.0)
        if delta:
            out[key] = delta
    return out


@dataclass
class Stubs:
    channel: grpc.Channel
    identity: csi_pb2_grpc.IdentityStub
    controller: csi_pb2_grpc.ControllerStub
    node: csi_pb2_grpc.NodeStub


class DriverProcess:
    """``python -m csi_driver`` in standalone mode with the hostpath backend on ``workdir/root``."""

    def __init__(self, workdir: Path, node_id: str = "bench-node", log_level: str = "warning"):
        self.workdir = workdir
        self.node_id = node_id
        self.log_level = log_level
        self.metrics_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

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
            "--metrics-address",
            f"127.0.0.1:{self.metrics_port}",
            "--log-level",
            self.log_level,
        ]

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.argv(),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        last = "socket not created"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
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
        raise RuntimeError(f"driver not serving after {START_TIMEOUT} s ({last})")

    def stop(self) -> None:
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=STOP_TIMEOUT)

    def metrics_text(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            body: bytes = reply.read()
        return body.decode()

    def command_counts(self) -> CommandCounts:
        return parse_command_counts(self.metrics_text())

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(no driver log: {exc})"

    @contextmanager
    def stubs(self) -> Iterator[Stubs]:
        channel = grpc.insecure_channel(self.target)
        try:
            yield Stubs(
                channel,
                csi_pb2_grpc.IdentityStub(channel),
                csi_pb2_grpc.ControllerStub(channel),
                csi_pb2_grpc.NodeStub(channel),
            )
        finally:
            channel.close()


def mounts_under(prefix: str) -> list[str]:
    found = []
    with open("/proc/self/mounts") as f:
        for line in f:
            mountpoint = line.split()[1].replace("\\040", " ")
            if mountpoint == prefix or mountpoint.startswith(prefix + "/"):
                found.append(mountpoint)
    return found


def loops_under(prefix: str) -> list[str]:
    try:
        out = subprocess.run(
            ["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    found = []
    for line in out.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[1].strip().startswith(prefix + "/"):
            found.append(parts[0])
    return found


def clean_up_host(prefix: str) -> list[str]:
    """Unmount and detach whatever a benchmark left below ``prefix``; return what was found."""
    leaks = []
    for _ in range(4):
        found = sorted(mounts_under(prefix), key=len, reverse=True)
        if not found:
            break
        for mountpoint in found:
            leaks.append(f"mount {mountpoint}")
            subprocess.run(["umount", mountpoint], timeout=60, check=False, capture_output=True)
    for device in loops_under(prefix):
        leaks.append(f"loop {device}")
        subprocess.run(["losetup", "--detach", device], timeout=60, check=False)
    return leaks
