"""The driver as a child process, and the host state a run of it may leave behind.

One home for what the integration lane, the csi-sanity lane, the VM lane and the benchmarks all
need: start ``python -m csi_driver`` on a unix socket and wait until Probe says ready, stop it
with SIGTERM, open stubs over its socket, read its command counters from ``/metrics``, and find
(and remove) the mounts and loop devices left below a directory.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from csi_driver.proto import csi_pb2, csi_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
#: how long a start may take; the VM lane's guest, emulated and sharing the host with the host
#: lane, sets more through CSI_TEST_DRIVER_START_TIMEOUT
START_TIMEOUT = float(os.environ.get("CSI_TEST_DRIVER_START_TIMEOUT", "60"))
STOP_TIMEOUT = 30.0

CommandCounts = dict[tuple[str, str], float]
_COMMAND_LINE = re.compile(
    r'^csi_driver_command_total\{program="((?:[^"\\]|\\.)*)",result="((?:[^"\\]|\\.)*)"\}'
    r"\s+(\S+)$"
)


class DriverStartError(AssertionError):
    """The driver exited or did not serve in time; the message has its log's tail."""


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_samples(text: str) -> Samples:
    """Every sample of a /metrics page, by name and sorted labels."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(page: Samples, name: str, **labels: str) -> float:
    """One sample of a parsed page (KeyError when it is not there)."""
    return page[(name, tuple(sorted(labels.items())))]


def parse_command_counts(text: str) -> CommandCounts:
    """``csi_driver_command_total`` from a /metrics page: (program, result) -> count."""
    counts: CommandCounts = {}
    for line in text.splitlines():
        m = _COMMAND_LINE.match(line.strip())
        if m:
            counts[(m.group(1), m.group(2))] = float(m.group(3))
    return counts


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


@dataclass
class DriverProcess:
    """``python -m csi_driver --mode standalone`` with its socket, log and (for the hostpath
    backend) root in ``workdir``. Subclasses change :meth:`backend_args` for another backend.
    ``metrics_port`` 0 leaves the metrics endpoint off."""

    workdir: Path
    node_id: str = "it-node"
    extra_args: list[str] = field(default_factory=list)
    log_level: str = "debug"
    metrics_port: int = 0
    #: extra environment of the driver (e.g. CSI_DRIVER_FAILPOINTS)
    env: dict[str, str] = field(default_factory=dict)
    #: argv prefix, e.g. a MountNamespace's enter() to run the driver in a private namespace
    prefix: list[str] = field(default_factory=list)
    #: how often readiness is polled while starting
    poll_interval: float = 0.01
    process: subprocess.Popen[bytes] | None = None
    exits: list[int] = field(default_factory=list)  # exit codes of SIGTERM stops

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

    def backend_args(self) -> list[str]:
        return ["--backend", "hostpath", "--hostpath-root", str(self.root)]

    def argv(self) -> list[str]:
        metrics = (
            ["--metrics-address", f"127.0.0.1:{self.metrics_port}"] if self.metrics_port else []
        )
        return [
            *self.prefix,
            sys.executable,
            "-m",
            "csi_driver",
            "--mode",
            "standalone",
            *self.backend_args(),
            "--endpoint",
            self.target,
            "--node-id",
            self.node_id,
            "--log-level",
            self.log_level,
            "--kubelet-dir",
            str(self.workdir),
            *metrics,
            *self.extra_args,
        ]

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.argv(),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                start_new_session=True,
                env={**os.environ, **self.env},
            )
        self._wait_until_serving()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL to its process group after STOP_TIMEOUT; records the exit code."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=STOP_TIMEOUT)
        self.exits.append(proc.returncode)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, lines: int = 80) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(no driver log: {exc})"

    def command_counts(self) -> CommandCounts:
        """External commands the driver ran so far, from its own /metrics."""
        # only this family: a full scrape would run a storage report (an lvm2 command) itself
        url = f"http://127.0.0.1:{self.metrics_port}/metrics?name[]=csi_driver_command_total"
        with urllib.request.urlopen(url, timeout=10) as reply:
            body: bytes = reply.read()
        return parse_command_counts(body.decode())

    def scrape(self, timeout: float = 30.0) -> Samples:
        """A full scrape of its /metrics, parsed (it runs a storage report when the cached one
        is older than the collector's TTL)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            body: bytes = reply.read()
        return parse_samples(body.decode())

    def stubs(self) -> contextlib.AbstractContextManager[Csi]:
        return csi_stubs(self.target)

    def _wait_until_serving(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        last = "socket not created"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise DriverStartError(
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
            time.sleep(self.poll_interval)
        raise DriverStartError(
            f"driver not serving after {START_TIMEOUT} s ({last}):\n" + self.log_tail()
        )


def wait_for_exit(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    """The exit status of a driver expected to die (a failpoint); SIGKILLs it after timeout."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT)
        raise


class MountNamespace:
    """A private mount namespace held open by a sleeping process, so that a driver (and its
    restarts) can run in it through :meth:`enter` and nothing it mounts or unmounts reaches
    the host. Closing it ends the holder: the namespace and every mount in it go away (loop
    devices are global and are cleaned up by the caller)."""

    def __init__(self) -> None:
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sleep", "infinity"],
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        own = os.readlink("/proc/self/ns/mnt")
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{self.holder.pid}/ns/mnt") != own:
                    return
            time.sleep(0.02)
        self.close()
        raise RuntimeError("unshare did not make a mount namespace")

    def enter(self) -> list[str]:
        return ["nsenter", f"--mount=/proc/{self.holder.pid}/ns/mnt", "--"]

    def run(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.enter(), *argv], capture_output=True, text=True, timeout=60, check=False
        )

    def mounts(self) -> list[tuple[str, str, str]]:
        """(mount point, root, options) of every mount in the namespace."""
        out = []
        with open(f"/proc/{self.holder.pid}/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                out.append((_unescape(fields[4]), _unescape(fields[3]), fields[5]))
        return out

    def mounts_under(self, prefix: str) -> list[str]:
        return [
            m for m, _, _ in self.mounts() if m == prefix or m.startswith(prefix.rstrip("/") + "/")
        ]

    def path(self, path: str | Path) -> Path:
        """``path`` as seen inside the namespace (through the holder's root)."""
        return Path(f"/proc/{self.holder.pid}/root{path}")

    def close(self) -> None:
        if self.holder.poll() is None:
            self.holder.kill()
            self.holder.wait(timeout=30)


# --- what a run may leave on the host ---------------------------------------------------------


def _unescape(field: str) -> str:
    """A /proc/self/mounts field with its octal escapes (``\\040`` for a space) decoded."""
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


def read_only_flag(device: str) -> bool:
    """A block device's own read-only flag as util-linux reads it (``blockdev --getro``): an
    outside view of what the driver set."""
    out = subprocess.run(
        ["blockdev", "--getro", device], capture_output=True, text=True, check=True, timeout=30
    )
    return out.stdout.strip() == "1"
