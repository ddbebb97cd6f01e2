"""Kubelet plugin registration, with the real csi-node-driver-registrar and our driver.

The registrar runs with the arguments of the node DaemonSet in deploy/nodelocal-csi.yaml (paths
moved into a temporary directory), and the test plays the kubelet's plugin watcher: it dials the
registration socket the registrar creates, asks GetInfo, dials the CSI endpoint it is told about
(NodeGetInfo, as the kubelet's CSI plugin does) and reports the outcome with
NotifyRegistrationStatus.

The registrar is the release the chart deploys, built by scripts/install-sidecars.sh (from the
upstream sources in ../shared/third_party, else the Go module proxy) into
${CSI_CACHE_DIR:-~/.cache/nodelocal-csi}/bin; the test runs that script, which is idempotent.
$CSI_NODE_DRIVER_REGISTRAR names another binary instead. Without one the test fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from csi_driver import DEFAULT_DRIVER_NAME
from csi_driver.config import topology_key
from csi_driver.proto import csi_pb2, csi_pb2_grpc, registration_pb2, registration_pb2_grpc
from testkit.ports import free_port

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "nodelocal-csi.yaml"
NODE_ID = "n1"
START_TIMEOUT = 30.0


def registrar_binary() -> Path:
    explicit = os.environ.get("CSI_NODE_DRIVER_REGISTRAR")
    if explicit:
        return Path(explicit)
    cache = Path(os.environ.get("CSI_CACHE_DIR", Path.home() / ".cache" / "nodelocal-csi"))
    return cache / "bin" / "csi-node-driver-registrar"


@pytest.fixture(scope="module")
def installed_registrar() -> Path:
    """The registrar binary, built first when it is not given explicitly."""
    if not os.environ.get("CSI_NODE_DRIVER_REGISTRAR"):
        proc = subprocess.run(
            ["bash", str(REPO / "scripts" / "install-sidecars.sh")],
            capture_output=True,
            text=True,
            timeout=3000,
            check=False,
        )
        assert proc.returncode == 0, f"install-sidecars.sh failed:\n{proc.stdout}\n{proc.stderr}"
    binary = registrar_binary()
    assert binary.is_file() and os.access(binary, os.X_OK), (
        f"csi-node-driver-registrar not found at {binary}: scripts/install-sidecars.sh builds it,"
        " or set CSI_NODE_DRIVER_REGISTRAR"
    )
    return binary


def chart_sidecar_args(container: str) -> list[str]:
    """A node sidecar's arguments exactly as the chart renders them for the node DaemonSet."""
    for doc in yaml.safe_load_all(DEPLOY.read_text()):
        if doc and doc["kind"] == "DaemonSet":
            for c in doc["spec"]["template"]["spec"]["containers"]:
                if c["name"] == container:
                    args: list[str] = c["args"]
                    return args
    raise AssertionError(f"{DEPLOY} has no DaemonSet with a {container} container")


def chart_registrar_args() -> list[str]:
    return chart_sidecar_args("node-driver-registrar")


def replace_flag(args: list[str], name: str, value: str) -> list[str]:
    prefix = f"--{name}="
    assert sum(a.startswith(prefix) for a in args) == 1, f"{prefix} not in {args}"
    return [prefix + value if a.startswith(prefix) else a for a in args]


def flag_value(args: list[str], name: str) -> str:
    prefix = f"--{name}="
    (value,) = [a[len(prefix) :] for a in args if a.startswith(prefix)]
    return value


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return f"--- {self.name} log ---\n{self.log.read_text(errors='replace')[-4000:]}"


def start(name: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> Proc:
    handle = log.open("wb")
    try:
        popen = subprocess.Popen(
            argv,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=None if env is None else {**os.environ, **env},
        )
    finally:
        handle.close()
    return Proc(name, popen, log)


def stop(proc: Proc) -> int:
    if proc.popen.poll() is None:
        proc.popen.send_signal(signal.SIGTERM)
        try:
            proc.popen.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.popen.pid, signal.SIGKILL)
            proc.popen.wait(timeout=15)
    return proc.popen.returncode


def wait_for(
    what: str, check: Callable[[], bool], procs: list[Proc], timeout: float = START_TIMEOUT
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.popen.poll() is not None:
                logs = "\n".join(p.output() for p in procs)
                raise AssertionError(
                    f"{proc.name} exited ({proc.popen.returncode}) while waiting for {what}\n{logs}"
                )
        if check():
            return
        time.sleep(0.1)
    logs = "\n".join(p.output() for p in procs)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{logs}")


def is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.stat().st_mode)
    except FileNotFoundError:
        return False


@dataclass
class Setup:
    tmp: Path
    driver: Proc
    driver_socket: Path
    registry: Path
    args: list[str]
    http_port: int
    procs: list[Proc]

    def start_registrar(self) -> Proc:
        proc = start(
            "registrar",
            [str(registrar_binary()), *self.args],
            self.tmp / f"registrar-{len(self.procs)}.log",
        )
        self.procs.append(proc)
        return proc

    @property
    def registration_socket(self) -> Path:
        return self.registry / f"{DEFAULT_DRIVER_NAME}-reg.sock"


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory: unix socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="reg-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def setup(short_tmp: Path, installed_registrar: Path) -> Iterator[Setup]:
    tmp_path = short_tmp
    plugin_dir = tmp_path / "plugins" / DEFAULT_DRIVER_NAME
    registry = tmp_path / "plugins_registry"
    data = tmp_path / "data"
    for d in (plugin_dir, registry, data):
        d.mkdir(parents=True)
    driver_socket = plugin_dir / "csi.sock"
    procs: list[Proc] = []
    try:
        driver = start(
            "driver",
            [
                sys.executable,
                "-m",
                "csi_driver",
                "--mode",
                "node",
                "--endpoint",
                f"unix://{driver_socket}",
                "--node-id",
                NODE_ID,
                "--hostpath-root",
                str(data),
                "--log-format",
                "text",
            ],
            tmp_path / "driver.log",
            # The temporary directory plays the kubelet's root (plugins/, plugins_registry/).
            env={"CSI_DRIVER_KUBELET_DIR": str(tmp_path)},
        )
        procs.append(driver)
        wait_for("the driver's socket", lambda: is_socket(driver_socket), procs)

        http_port = free_port()
        args = chart_registrar_args()
        args = replace_flag(args, "csi-address", str(driver_socket))
        args = replace_flag(args, "plugin-registration-path", str(registry))
        args = replace_flag(args, "http-endpoint", f"127.0.0.1:{http_port}")
        yield Setup(tmp_path, driver, driver_socket, registry, args, http_port, procs)
    finally:
        for proc in reversed(procs):
            stop(proc)


@contextlib.contextmanager
def channel(path: Path) -> Iterator[grpc.Channel]:
    ch = grpc.insecure_channel(f"unix://{path}")
    try:
        grpc.channel_ready_future(ch).result(timeout=10)
        yield ch
    finally:
        ch.close()


def healthz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            code: int = resp.status
            return code
    except urllib.error.HTTPError as exc:
        return exc.code


def test_registrar_registers_the_driver_with_the_kubelet(setup: Setup) -> None:
    registrar = setup.start_registrar()
    wait_for("the registration socket", lambda: is_socket(setup.registration_socket), setup.procs)
    # Only the kubelet (root) may dial it.
    assert stat.S_IMODE(setup.registration_socket.stat().st_mode) & 0o077 == 0

    chart_registration_path = flag_value(chart_registrar_args(), "kubelet-registration-path")
    assert chart_registration_path == f"/var/lib/kubelet/plugins/{DEFAULT_DRIVER_NAME}/csi.sock"

    with channel(setup.registration_socket) as ch:
        stub = registration_pb2_grpc.RegistrationStub(ch)
        info = stub.GetInfo(registration_pb2.InfoRequest(), timeout=10)
        assert info.type == "CSIPlugin"
        assert info.name == DEFAULT_DRIVER_NAME
        assert info.endpoint == chart_registration_path
        assert "1.0.0" in info.supported_versions

        # The kubelet now dials info.endpoint; on this machine that path is the test's socket.
        with channel(setup.driver_socket) as csi:
            plugin = csi_pb2_grpc.IdentityStub(csi).GetPluginInfo(
                csi_pb2.GetPluginInfoRequest(), timeout=10
            )
            assert plugin.name == info.name
            node = csi_pb2_grpc.NodeStub(csi).NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=10)
            assert node.node_id == NODE_ID
            segments: dict[str, Any] = dict(node.accessible_topology.segments)
            assert segments == {topology_key(DEFAULT_DRIVER_NAME): NODE_ID}

        stub.NotifyRegistrationStatus(
            registration_pb2.RegistrationStatus(plugin_registered=True), timeout=10
        )

    # Registered: the registrar keeps serving and reports healthy.
    time.sleep(1.0)
    assert registrar.popen.poll() is None, registrar.output()
    assert healthz(setup.http_port) == 200
    with channel(setup.registration_socket) as ch:
        again = registration_pb2_grpc.RegistrationStub(ch).GetInfo(
            registration_pb2.InfoRequest(), timeout=10
        )
        assert again.name == DEFAULT_DRIVER_NAME

    # A pod shutdown (SIGTERM) removes the registration socket, so the kubelet deregisters.
    assert stop(registrar) == 0, registrar.output()
    assert not setup.registration_socket.exists()
    assert setup.driver.popen.poll() is None, setup.driver.output()


def test_failed_registration_restarts_the_registrar(setup: Setup) -> None:
    """A failure reported by the kubelet makes the registrar exit, so its container restarts."""
    registrar = setup.start_registrar()
    wait_for("the registration socket", lambda: is_socket(setup.registration_socket), setup.procs)
    with channel(setup.registration_socket) as ch:
        stub = registration_pb2_grpc.RegistrationStub(ch)
        assert stub.GetInfo(registration_pb2.InfoRequest(), timeout=10).name == DEFAULT_DRIVER_NAME
        with contextlib.suppress(grpc.RpcError):  # it may exit before answering
            stub.NotifyRegistrationStatus(
                registration_pb2.RegistrationStatus(
                    plugin_registered=False, error="CSINode update failed"
                ),
                timeout=10,
            )
    registrar.popen.wait(timeout=15)
    assert registrar.popen.returncode == 1, registrar.output()
    assert "CSINode update failed" in registrar.log.read_text(errors="replace")


def test_livenessprobe_passes_on_the_drivers_probe(setup: Setup) -> None:
    """The other node sidecar, as the chart runs it: its /healthz is the driver's CSI Probe, so
    a driver whose hostpath root became unusable fails the kubelet's liveness probe, and passes
    again once the root is whole (tests/e2e/test_01_liveness.py shows the kubelet's restart)."""
    binary = registrar_binary().with_name("livenessprobe")
    assert binary.is_file(), f"{binary} is missing: scripts/install-sidecars.sh builds it"
    port = free_port()
    args = chart_sidecar_args("liveness-probe")
    args = replace_flag(args, "csi-address", str(setup.driver_socket))
    args = replace_flag(args, "http-endpoint", f"127.0.0.1:{port}")
    probe = start("livenessprobe", [str(binary), *args], setup.tmp / "livenessprobe.log")
    setup.procs.append(probe)

    def answers(code: int) -> Callable[[], bool]:
        def check() -> bool:
            try:
                return healthz(port) == code
            except urllib.error.URLError:
                return False

        return check

    wait_for("/healthz 200", answers(200), setup.procs)
    snapshots = setup.tmp / "data" / "snapshots"
    moved = snapshots.with_name("snapshots.away")
    snapshots.rename(moved)
    try:
        wait_for("/healthz 500 while the root is broken", answers(500), setup.procs)
    finally:
        moved.rename(snapshots)
    wait_for("/healthz 200 again", answers(200), setup.procs)
    assert "driver responded but is not ready" in probe.log.read_text(errors="replace").lower()
