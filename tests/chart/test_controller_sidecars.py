"""The controller pod as the chart composes it: the real csi-resizer and csi-attacher against the
driver in controller mode, each started with the arguments the chart renders.

Both sidecars inspect the driver's capabilities before they talk to the API server, and choose
how to work from the answer: the resizer must pick its node-expansion-only mode (the driver grows
volumes in NodeExpandVolume), the attacher its real ControllerPublishVolume handler. The API
server they are given is a closed local port: this test is about the driver, not the cluster.
The sidecars come from scripts/install-sidecars.sh (built from the Go module proxy, cached).
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.chart.chartlib import (
    REPO,
    ChartTools,
    Rendered,
    cache_dir,
    container,
    flags,
    parse,
    render_text,
)

START_TIMEOUT = 60.0


@pytest.fixture(scope="session")
def sidecar_bin() -> Path:
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "install-sidecars.sh")],
        capture_output=True,
        text=True,
        timeout=3000,
        check=False,
    )
    assert proc.returncode == 0, f"install-sidecars.sh failed:\n{proc.stdout}\n{proc.stderr}"
    return cache_dir() / "bin"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _expand(args: list[str], env: dict[str, str]) -> list[str]:
    """$(VAR) in container args, as the kubelet expands them."""
    out = []
    for arg in args:
        for key, value in env.items():
            arg = arg.replace(f"$({key})", value)
        assert "$(" not in arg, f"unexpanded variable in {arg!r}"
        out.append(arg)
    return out


def _with(args: list[str], name: str, value: str) -> list[str]:
    prefix = f"--{name}="
    assert sum(a.startswith(prefix) for a in args) == 1, f"{prefix} not in {args}"
    return [prefix + value if a.startswith(prefix) else a for a in args]


def _peer_tls(rendered: Rendered, into: Path) -> Path:
    """The controller's peer channel certificates, as its Secret volume shows them."""
    secret = rendered.one("Secret", "-peer-controller")
    into.mkdir()
    for key, value in secret["data"].items():
        (into / key).write_bytes(base64.b64decode(value))
    return into


@dataclass
class Running:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class ControllerPod:
    tmp: Path
    rendered: Rendered
    socket: Path
    kubeconfig: Path
    sidecar_bin: Path
    running: list[Running]

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Running:
        log = self.tmp / f"{name}.log"
        with log.open("wb") as handle:
            popen = subprocess.Popen(
                argv,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **(env or {})},
            )
        proc = Running(name, popen, log)
        self.running.append(proc)
        return proc

    def start_sidecar(self, container_name: str, binary: str) -> Running:
        c = container(self.rendered.deployment, container_name)
        args = _expand(c["args"], {"NAMESPACE": "kube-system"})
        args = _with(args, "csi-address", str(self.socket))
        return self.start(
            container_name,
            [str(self.sidecar_bin / binary), *args, f"--kubeconfig={self.kubeconfig}"],
        )

    def wait_for_log(self, proc: Running, text: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if text in proc.text():
                return
            if proc.popen.poll() is not None:
                break
            time.sleep(0.2)
        logs = "\n".join(f"--- {p.name} ---\n{p.text()[-3000:]}" for p in self.running)
        raise AssertionError(f"{proc.name} never logged {text!r}\n{logs}")


def _stop(proc: Running) -> None:
    if proc.popen.poll() is None:
        proc.popen.send_signal(signal.SIGTERM)
        try:
            proc.popen.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.popen.pid, signal.SIGKILL)
            proc.popen.wait(timeout=15)


@pytest.fixture
def controller_pod(
    chart_tools: ChartTools, sidecar_bin: Path, tmp_path: Path
) -> Iterator[ControllerPod]:
    rendered = Rendered(parse(render_text(chart_tools, {"csiDriver": {"attachRequired": True}})))
    sock = tmp_path / "csi" / "csi.sock"
    sock.parent.mkdir()
    kubeconfig = tmp_path / "kubeconfig"
    closed = _free_port()  # nothing listens there: the sidecars' API calls fail fast
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters: [{{name: none, cluster: {{server: 'http://127.0.0.1:{closed}'}}}}]\n"
        "users: [{name: none, user: {}}]\n"
        "contexts: [{name: none, context: {cluster: none, user: none}}]\n"
        "current-context: none\n"
    )
    pod = ControllerPod(tmp_path, rendered, sock, kubeconfig, sidecar_bin, [])
    try:
        driver = container(rendered.deployment, "driver")
        args = _expand(
            driver["args"],
            {"NODE_NAME": "ctrl-node", "POD_NAMESPACE": "kube-system", "POD_IP": "127.0.0.1"},
        )
        args = _with(args, "endpoint", f"unix://{sock}")
        args = _with(args, "metrics-address", f"127.0.0.1:{_free_port()}")
        args = _with(args, "peer-tls-dir", str(_peer_tls(rendered, tmp_path / "peer")))
        assert flags({"name": "driver", "args": args})["mode"] == "controller"
        proc = pod.start(
            "driver",
            [sys.executable, "-m", "csi_driver", *args],
            {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(closed)},
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not sock.exists():
            assert proc.popen.poll() is None, proc.text()
            assert time.monotonic() < deadline, f"no driver socket\n{proc.text()}"
            time.sleep(0.1)
        yield pod
    finally:
        for running in reversed(pod.running):
            _stop(running)


def test_resizer_hands_expansion_to_the_node(controller_pod: ControllerPod) -> None:
    resizer = controller_pod.start_sidecar("csi-resizer", "csi-resizer")
    controller_pod.wait_for_log(resizer, "supports node resize only, using trivial resizer")
    time.sleep(1.0)
    assert resizer.popen.poll() is None, resizer.text()
    assert "Failed to create CSI resizer" not in resizer.text()


def test_attacher_uses_controller_publish(controller_pod: ControllerPod) -> None:
    attacher = controller_pod.start_sidecar("csi-attacher", "csi-attacher")
    controller_pod.wait_for_log(
        attacher, "CSI driver supports ControllerPublishUnpublish, using real CSI handler"
    )
    time.sleep(1.0)
    assert attacher.popen.poll() is None, attacher.text()
