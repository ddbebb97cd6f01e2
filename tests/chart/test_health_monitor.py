"""Where the chart runs external-health-monitor-controller, and why there.

The sidecar (v0.18) exits at start unless its driver offers the CONTROLLER_SERVICE plugin
capability, the controller capability VOLUME_CONDITION, and LIST_VOLUMES or GET_VOLUME. These
tests start the driver with the arguments the chart renders for each workload and ask it exactly
those questions: the node plugin's driver answers yes (so the chart puts the sidecar there), the
controller Deployment's does not (the sidecar would crash-loop beside it). The sidecar itself is
not run: its module is not served by the Go module proxy here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_driver.proto import csi_pb2, csi_pb2_grpc
from tests.chart.chartlib import ChartTools, Rendered, container, parse, render_text

_Rpc = csi_pb2.ControllerServiceCapability.RPC
START_TIMEOUT = 30.0


def _driver_argv(chart_tools: ChartTools, kind: str, tmp: Path) -> list[str]:
    """The driver's rendered arguments, with the host paths moved under ``tmp``."""
    values = {"modify": {"enabled": False}, "healthMonitor": {"enabled": True}}
    rendered = Rendered(parse(render_text(chart_tools, values)))
    args = container(rendered.one(kind), "driver")["args"]
    moved = {
        "--endpoint": f"unix://{tmp / 'csi.sock'}",
        "--kubelet-dir": str(tmp / "kubelet"),
        "--hostpath-root": str(tmp / "root"),
        "--metrics-address": "127.0.0.1:0",
        "--node-id": "node-a",
    }
    out = []
    for arg in args:
        name = arg.partition("=")[0]
        out.append(f"{name}={moved[name]}" if name in moved else arg)
    return [sys.executable, "-m", "csi_driver", *out]


@pytest.fixture(params=["DaemonSet", "Deployment"])
def driver(
    request: pytest.FixtureRequest, chart_tools: ChartTools, tmp_path: Path
) -> Iterator[tuple[str, grpc.Channel]]:
    kind: str = request.param
    (tmp_path / "kubelet").mkdir()
    (tmp_path / "root").mkdir()
    log = tmp_path / "driver.log"
    with log.open("wb") as handle:
        proc = subprocess.Popen(
            _driver_argv(chart_tools, kind, tmp_path),
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    channel = grpc.insecure_channel(f"unix://{tmp_path / 'csi.sock'}")
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not (tmp_path / "csi.sock").exists():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"no socket\n{log.read_text()}"
            time.sleep(0.1)
        yield kind, channel
    finally:
        channel.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)


def test_only_the_node_plugin_can_serve_the_health_monitor(
    driver: tuple[str, grpc.Channel],
) -> None:
    kind, channel = driver
    plugin = csi_pb2_grpc.IdentityStub(channel).GetPluginCapabilities(
        csi_pb2.GetPluginCapabilitiesRequest(), timeout=10
    )
    services = {c.service.type for c in plugin.capabilities if c.HasField("service")}
    assert csi_pb2.PluginCapability.Service.CONTROLLER_SERVICE in services
    controller = csi_pb2_grpc.ControllerStub(channel)
    caps = {
        c.rpc.type
        for c in controller.ControllerGetCapabilities(
            csi_pb2.ControllerGetCapabilitiesRequest(), timeout=10
        ).capabilities
    }
    monitor_starts = _Rpc.VOLUME_CONDITION in caps and bool(
        {_Rpc.LIST_VOLUMES, _Rpc.GET_VOLUME} & caps
    )
    assert monitor_starts is (kind == "DaemonSet"), sorted(_Rpc.Type.Name(c) for c in caps)
    if kind == "DaemonSet":
        # the call the monitor makes every listVolumesInterval
        assert _Rpc.LIST_VOLUMES in caps
        listed = controller.ListVolumes(csi_pb2.ListVolumesRequest(), timeout=10)
        assert list(listed.entries) == []


def test_the_chart_puts_the_monitor_where_it_can_start(chart_tools: ChartTools) -> None:
    rendered = Rendered(parse(render_text(chart_tools, {"healthMonitor": {"enabled": True}})))
    assert container(rendered.daemonset, "csi-health-monitor")
    names = [c["name"] for c in rendered.deployment["spec"]["template"]["spec"]["containers"]]
    assert "csi-health-monitor" not in names
