"""The adversarial suite: the driver as a hostile client and a restarting DaemonSet see it.

Three parts, each against real ``python -m csi_driver`` processes (standalone mode, hostpath
backend), every one of them inside its own private mount namespace so that nothing it mounts
or unmounts reaches the host:

* ``test_fuzz.py``: structured bad requests to every RPC, checked for crashes, hangs, INTERNAL
  or UNKNOWN answers, changes outside the paths passed, leaks and memory growth;
* ``test_kills.py``: SIGKILLs of the driver's process group in the middle of controller and
  node operations, each followed by a restart and the CO's retry, with the whole state
  checked after every one;
* ``test_bursts.py``: concurrent same-name creates and concurrent publishes to one target.

Seeds. Each randomised test runs with a fixed seed and a fresh random one; both are printed
in the summary at the end of the run and in every failure message. ``CSI_ADVERSARIAL_SEED=N``
runs seed ``N`` only, to replay a failure.

Fixtures
--------
``sandbox``
    A short work directory under /tmp (it is the driver's ``--kubelet-dir``), a decoy directory
    outside it, and a :class:`MountNamespace`. Its finaliser fails the test when a mount below
    the work directory or a loop device backed by a file below it is left, then removes
    everything.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_driver.proto import csi_pb2, csi_pb2_grpc
from testkit.driver_process import (
    DriverProcess,
    MountNamespace,
    clean_up_host,
    loops_under,
)
from tests.requests import block_cap, mount_cap

NODE_ID = "adv-node"
FIXED_SEED = 20261130
SEED_ENV = "CSI_ADVERSARIAL_SEED"
MiB = 1 << 20
GiB = 1 << 30
#: what the hostpath backend offers in these tests; well below the free space of /tmp
CAPACITY = 64 * GiB

#: lines for the summary printed at the end of the run (seeds, tables, figures)
SUMMARY: list[str] = []


_RANDOM_SEED = random.SystemRandom().randrange(1, 2**31)  # one per run, for every test


def seeds() -> list[int]:
    """The fixed seed and this run's random one, or only the one named by
    CSI_ADVERSARIAL_SEED."""
    chosen = os.environ.get(SEED_ENV, "").strip()
    if chosen:
        return [int(chosen)]
    return [FIXED_SEED, _RANDOM_SEED]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not SUMMARY:
        return
    terminalreporter.section("adversarial suite")
    for line in SUMMARY:
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"(replay one seed: {SEED_ENV}=<seed> pytest tests/adversarial)")


def report(line: str) -> None:
    """Add ``line`` to the end-of-run summary and print it (seen with ``-s``)."""
    SUMMARY.append(line)
    print(line)


def cut(value: object, width: int = 160) -> str:
    """A bounded rendering of a request field for a failure message."""
    text = repr(value)
    if len(text) <= width:
        return text
    return f"{text[: width // 2]}...{text[-width // 4 :]} ({len(text)} characters)"


def describe(message: Any, width: int = 160) -> str:
    """A protobuf message with every long string and map cut: one bounded line per field."""
    parts = []
    for desc, value in message.ListFields():
        if desc.message_type is not None and desc.message_type.GetOptions().map_entry:
            items = list(value.items())
            shown = {cut(k, 40): cut(v, 60) for k, v in items[:4]}
            more = f" +{len(items) - 4} more" if len(items) > 4 else ""
            parts.append(f"{desc.name}={shown}{more}")
        elif desc.is_repeated:
            shown_items = [
                describe(v, 80) if hasattr(v, "ListFields") else cut(v, 60) for v in value[:3]
            ]
            more = f" +{len(value) - 3} more" if len(value) > 3 else ""
            parts.append(f"{desc.name}=[{', '.join(shown_items)}]{more}")
        elif hasattr(value, "ListFields"):
            parts.append(f"{desc.name}={{{describe(value, 80)}}}")
        else:
            parts.append(f"{desc.name}={cut(value, width)}")
    return f"{type(message).__name__}({', '.join(parts)})"


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the adversarial suite needs root (mount namespaces, mounts, loop devices)")


# --- the sandbox -------------------------------------------------------------------------------


@dataclass
class Sandbox:
    """A work directory (the kubelet directory), a decoy outside it, a private namespace."""

    workdir: Path
    decoy: Path
    ns: MountNamespace

    def ns_mounts_under(self, prefix: Path | str) -> list[str]:
        return self.ns.mounts_under(str(prefix))

    def ns_run(self, *argv: str) -> None:
        done = self.ns.run(list(argv))
        assert done.returncode == 0, f"{argv} failed in the namespace: {done.stderr}"


@contextlib.contextmanager
def new_sandbox() -> Iterator[Sandbox]:
    """A sandbox; on leaving, a mount or loop device left below the work directory fails."""
    require_root()
    workdir = Path(tempfile.mkdtemp(prefix="csi-adv-", dir="/tmp"))
    decoy = Path(tempfile.mkdtemp(prefix="csi-adv-decoy-", dir="/tmp"))
    ns = MountNamespace()
    box = Sandbox(workdir, decoy, ns)
    leaks: list[str] = []
    try:
        yield box
        leaks += [f"mount {m} (in the driver's namespace)" for m in box.ns_mounts_under(workdir)]
        leaks += [f"loop device {d} -> {b}" for d, b in loops_under(str(workdir))]
    finally:
        ns.close()
        clean_up_host(str(workdir))  # loop devices (namespaces end with their holder)
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(decoy, ignore_errors=True)
    assert not leaks, f"left behind: {leaks}"


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with new_sandbox() as box:
        yield box


# --- the driver ----------------------------------------------------------------------------------


@dataclass
class Driver(DriverProcess):
    """A driver in the sandbox's namespace that starts fast (readiness polled every 10 ms, as
    the kill tests restart it hundreds of times) and can be killed like a container."""

    channel: grpc.Channel | None = None
    starts: list[float] = field(default_factory=list)
    poll_interval: float = 0.01

    def start(self) -> None:
        t0 = time.perf_counter()
        super().start()
        self.starts.append(time.perf_counter() - t0)
        self.open_channel()

    def open_channel(self) -> None:
        self.close_channel()
        self.channel = grpc.insecure_channel(
            self.target,
            options=[
                ("grpc.max_send_message_length", 8 << 20),
                ("grpc.max_receive_message_length", 8 << 20),
            ],
        )

    def close_channel(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def stub(self, service: str) -> Any:
        assert self.channel is not None
        return {
            "Identity": csi_pb2_grpc.IdentityStub,
            "Controller": csi_pb2_grpc.ControllerStub,
            "Node": csi_pb2_grpc.NodeStub,
            "GroupController": csi_pb2_grpc.GroupControllerStub,
            "SnapshotMetadata": csi_pb2_grpc.SnapshotMetadataStub,
        }[service](self.channel)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the driver's whole process group, as a container runtime does."""
        proc = self.process
        assert proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        self.close_channel()

    def shutdown(self) -> None:
        self.close_channel()
        proc = self.process
        if proc is None:
            return
        self.stop()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def rss_kib(self) -> int:
        assert self.process is not None
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS in /proc/PID/status")

    def start_with(self, env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Start a driver with extra ``env`` (a failpoint) and wait until it serves."""
        saved = self.env
        self.env = {**saved, **env}
        try:
            self.start()
        finally:
            self.env = saved
        assert self.process is not None
        return self.process


def make_driver(box: Sandbox, *, log_level: str = "info", extra: list[str] | None = None) -> Driver:
    return Driver(
        box.workdir,
        node_id=NODE_ID,
        log_level=log_level,
        prefix=box.ns.enter(),
        extra_args=["--hostpath-capacity", str(CAPACITY), *(extra or [])],
    )


@contextlib.contextmanager
def running(driver: Driver) -> Iterator[Driver]:
    try:
        driver.start()
        yield driver
    finally:
        driver.shutdown()


# --- requests everyone builds --------------------------------------------------------------------

MODE = csi_pb2.VolumeCapability.AccessMode


def cap_for(
    block: bool, mode: csi_pb2.VolumeCapability.AccessMode.Mode = MODE.SINGLE_NODE_WRITER
) -> csi_pb2.VolumeCapability:
    return block_cap(mode) if block else mount_cap(mode)


def create_request(name: str, block: bool, size: int = 16 * MiB) -> csi_pb2.CreateVolumeRequest:
    return csi_pb2.CreateVolumeRequest(
        name=name,
        capacity_range=csi_pb2.CapacityRange(required_bytes=size),
        volume_capabilities=[cap_for(block)],
    )


EPHEMERAL_CONTEXT = {
    "csi.storage.k8s.io/ephemeral": "true",
    "csi.storage.k8s.io/pod.name": "adv-pod",
    "size": "8Mi",
}


def root_entries(root: Path) -> dict[str, set[str]]:
    """What the hostpath root holds: ``volumes/`` and ``snapshots/`` entries, and anything at
    its top level that is not known state (``other``)."""
    out: dict[str, set[str]] = {"volumes": set(), "snapshots": set(), "other": set()}
    for kind in ("volumes", "snapshots"):
        d = root / kind
        if d.is_dir():
            out[kind] = {e.name for e in d.iterdir()}
    if root.is_dir():
        for entry in root.iterdir():
            if entry.name not in ("volumes", "snapshots") and not entry.name.startswith("state.db"):
                out["other"].add(entry.name)
    return out
