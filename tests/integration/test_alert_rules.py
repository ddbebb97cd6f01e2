"""The chart's alerts in a real Prometheus, on what a real hostpath driver exports.

The rules are rendered from the chart (testkit/prometheus.py) with every ``for`` at 0s, loaded
into Prometheus 2.42 (Debian's, the oldest a cluster is likely to run), which scrapes the
driver every second under the labels the chart's PodMonitor gives it. Each scenario breaks
one thing for real and checks exactly which alerts fire: a healthy driver fires none and every
rule evaluates without error; promising a root's budget away fires the low-capacity alert; a
read-only root fires not-ready and, through the calls it makes fail, the RPC error ratio; a
stopped driver fires target-down; no target at all fires metrics-absent. The VM lane does the
thin pool's alerts (tests/vm/test_lvm_health.py).
"""

from __future__ import annotations

import functools
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_driver.proto import csi_pb2
from testkit.driver_process import DriverProcess, csi_stubs
from testkit.ports import free_port
from testkit.prometheus import Alert, Prometheus, bin_dir, render_rules
from tests.requests import create_request, rpc_code

MiB = 1 << 20
CAPACITY = 64 * MiB
NODE = "alert-node"
FAILED = 'csi_driver_rpc_total{code=~"INTERNAL|UNKNOWN|UNAVAILABLE|DEADLINE_EXCEEDED"}'
AVAILABLE = 'csi_driver_capacity_available_bytes{device_class="hostpath"}'
SEVERITY = {
    "NodelocalCSIDeviceClassLowFree": "warning",
    "NodelocalCSIDriverNotReady": "critical",
    "NodelocalCSIRPCErrors": "warning",
    "NodelocalCSITargetDown": "warning",
    "NodelocalCSIMetricsAbsent": "warning",
}


@pytest.fixture(scope="module")
def rules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for tool in ("helm", "prometheus", "promtool"):
        assert (bin_dir() / tool).exists(), f"no {tool}: run scripts/install-chart-tools.sh"
    return render_rules(tmp_path_factory.mktemp("rules") / "rules.yml", backend="hostpath")


@pytest.fixture
def driver(workdir: Path) -> Iterator[DriverProcess]:
    d = DriverProcess(
        workdir,
        node_id=NODE,
        metrics_port=free_port(),
        extra_args=["--hostpath-capacity", str(CAPACITY)],
    )
    try:
        d.start()
        yield d
    finally:
        d.stop()


@pytest.fixture
def prometheus(tmp_path: Path, rules: Path, driver: DriverProcess) -> Iterator[Prometheus]:
    with Prometheus(
        tmp_path / "prometheus", rules, {f"127.0.0.1:{driver.metrics_port}": NODE}
    ) as p:
        yield p


def only(firing: dict[str, list[Alert]], *names: str) -> dict[str, Alert]:
    """Exactly the alerts ``names`` fire, once each, for this driver's node and with their
    severity; returns them by name."""
    assert sorted(firing) == sorted(names), firing
    out = {}
    for name, alerts in firing.items():
        assert len(alerts) == 1, alerts
        (alert,) = alerts
        assert alert.labels["severity"] == SEVERITY[name], alert
        if name != "NodelocalCSIMetricsAbsent":
            assert alert.labels["node"] == NODE, alert
        out[name] = alert
    return out


def test_promtool_accepts_every_rule(rules: Path) -> None:
    proc = subprocess.run(
        [str(bin_dir() / "promtool"), "check", "rules", str(rules)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 9 rules found" in proc.stdout, proc.stdout


def test_a_healthy_driver_fires_nothing_and_every_rule_evaluates(
    prometheus: Prometheus,
) -> None:
    assert only(prometheus.firing_after_scrapes()) == {}
    health = prometheus.rule_health()
    assert len(health) == 7, health  # rule names: the two thin pool ones have two severities
    assert set(health.values()) == {"ok"}, health


def test_promising_the_budget_away_fires_low_capacity(
    driver: DriverProcess, prometheus: Prometheus
) -> None:
    with csi_stubs(driver.target) as csi:
        csi.controller.CreateVolume(create_request("alert-a", size=32 * MiB))
        half_left = prometheus.firing_after_scrapes(f"{AVAILABLE} == {32 * MiB}")
        assert only(half_left) == {}, "half the budget left is fine"
        b = csi.controller.CreateVolume(create_request("alert-b", size=28 * MiB))
        low = only(
            prometheus.firing_after_scrapes(f"{AVAILABLE} == {4 * MiB}"),
            "NodelocalCSIDeviceClassLowFree",
        )
        alert = low["NodelocalCSIDeviceClassLowFree"]
        assert alert.labels["device_class"] == "hostpath"
        assert alert.value == pytest.approx(4 / 64)
        csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=b.volume.volume_id))
        room_again = prometheus.firing_after_scrapes(f"{AVAILABLE} == {32 * MiB}")
        assert only(room_again) == {}, "resolved"


def test_a_read_only_root_fires_not_ready_and_rpc_errors(
    driver: DriverProcess, prometheus: Prometheus
) -> None:
    root = str(driver.root)
    subprocess.run(["mount", "--bind", root, root], check=True, timeout=30)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", root], check=True, timeout=30)
        # a failing call's series starts at its first failure, and rate() counts only what
        # follows, so the creates go on (as a provisioner's retries would) until Prometheus
        # has seen the failures grow
        grown = f"csi_driver_ready == 0 and on() sum(increase({FAILED}[1m])) > 0"
        codes: list[grpc.StatusCode] = []
        with csi_stubs(driver.target) as csi:
            deadline = time.monotonic() + 60
            while not prometheus.query(grown) and time.monotonic() < deadline:
                request = create_request(f"ro-{len(codes)}", size=MiB)
                codes.append(rpc_code(functools.partial(csi.controller.CreateVolume, request)))
                time.sleep(0.3)
        # a read-only root is the driver's trouble, not the caller's: UNAVAILABLE or INTERNAL,
        # which the RPC error ratio counts
        assert set(codes) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL}, codes
        firing = prometheus.firing_after_scrapes(grown)
        only(firing, "NodelocalCSIDriverNotReady", "NodelocalCSIRPCErrors")
    finally:
        subprocess.run(["umount", root], check=True, timeout=30)
    assert "NodelocalCSIDriverNotReady" not in prometheus.firing_after_scrapes(
        "csi_driver_ready == 1"
    )


def test_a_stopped_driver_fires_target_down(driver: DriverProcess, prometheus: Prometheus) -> None:
    driver.stop()
    only(prometheus.firing_after_scrapes("up == 0"), "NodelocalCSITargetDown")


def test_no_target_at_all_fires_metrics_absent(tmp_path: Path, rules: Path) -> None:
    with Prometheus(tmp_path / "prometheus", rules, {}) as prometheus:
        only(prometheus.firing_after_scrapes(), "NodelocalCSIMetricsAbsent")
