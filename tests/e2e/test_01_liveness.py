"""Scenario 1b: a wedged driver is restarted by the kubelet through the livenessprobe sidecar.

The driver's container has a liveness probe on the livenessprobe sidecar's /healthz, which
answers with a CSI Probe of the driver. The hostpath backend reports not ready when its root is
unusable: here its snapshots directory is renamed away from the host side, so the process keeps
running and serving while Probe answers ready=false. The kubelet must then kill and restart the
driver container (the new process recreates the directory and is healthy again); afterwards the
directory is put back, so the node holds what it held before.

The e2e values (conftest.helm_values) probe every few seconds, so this takes well under a
minute; the chart's defaults are slower.
"""

from __future__ import annotations

import contextlib
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .conftest import DRIVER_NAMESPACE, Release, Timings, driver_registered
from .kube import Kube, wait_until

CONTAINER = "driver"
# Probe period x failure threshold of the e2e values, the driver's grace period and the restart.
RESTART_TIMEOUT = 90.0


def _node_pod(kube: Kube) -> Any:
    pods = kube.items(
        kube.core.list_namespaced_pod,
        DRIVER_NAMESPACE,
        label_selector="app.kubernetes.io/component=node",
    )
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    return pods[0]


def _driver_status(pod: Any) -> Any:
    (status,) = [c for c in pod["status"]["containerStatuses"] if c["name"] == CONTAINER]
    return status


def _health_port(pod: Any) -> int:
    (driver,) = [c for c in pod["spec"]["containers"] if c["name"] == CONTAINER]
    port = driver["livenessProbe"]["httpGet"]["port"]
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in driver["ports"] if p["name"] == port]
    return int(number)


def _healthz(pod_ip: str, port: int) -> int:
    """The sidecar's answer, reached from the host as the kubelet's probe reaches it."""
    try:
        with urllib.request.urlopen(f"http://{pod_ip}:{port}/healthz", timeout=5) as resp:
            code: int = resp.status
            return code
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _restore(current: Path, moved: Path) -> None:
    """Put the renamed directory back. rename(2) replaces the empty directory the restarted
    driver created in one step, so the driver never sees it missing."""
    if moved.exists():
        os.rename(moved, current)


def test_wedged_driver_is_restarted(driver: Release, timings: Timings) -> None:
    kube = Kube(driver.cluster.api_client(), DRIVER_NAMESPACE)
    pod = _node_pod(kube)
    name, pod_ip = pod["metadata"]["name"], pod["status"]["podIP"]
    port = _health_port(pod)
    before = _driver_status(pod)
    assert before["ready"], kube.describe(name)
    assert _healthz(pod_ip, port) == 200

    current = driver.cluster.hostpath_root / "snapshots"
    moved = current.with_name("snapshots.wedged")
    assert current.is_dir() and not moved.exists()
    os.rename(current, moved)
    wedged_at = time.monotonic()
    try:
        # The process still runs; only its Probe says not ready, and the sidecar passes it on.
        wait_until(
            "the livenessprobe sidecar reports failure", lambda: _healthz(pod_ip, port) == 500, 30
        )
        restarted = wait_until(
            "the kubelet restarts the driver container",
            lambda: (
                (s := _driver_status(kube.read_pod(name)))["restartCount"] > before["restartCount"]
                and s
            ),
            RESTART_TIMEOUT,
        )
        timings.record("liveness_wedge_to_restart", time.monotonic() - wedged_at)
    finally:
        with contextlib.suppress(FileNotFoundError):
            _restore(current, moved)

    # It was the liveness probe that restarted it, not a crash of the driver.
    events = kube.events(name)
    assert "failed liveness probe" in events, events
    assert restarted["lastState"].get("terminated"), restarted

    def healthy_again() -> bool:
        # A sidecar holding a connection to the old process may exit with it and be restarted
        # too: wait until the whole pod is back.
        statuses = kube.read_pod(name)["status"]["containerStatuses"]
        (s,) = [c for c in statuses if c["name"] == CONTAINER]
        return bool(
            all(c["ready"] for c in statuses)
            and s.get("state", {}).get("running")
            and s["containerID"] != before["containerID"]
            and _healthz(pod_ip, port) == 200
        )

    wait_until("the restarted driver healthy", healthy_again, 90)
    timings.record("liveness_wedge_to_healthy", time.monotonic() - wedged_at)
    assert current.is_dir() and not moved.exists()
    # The node still lists the driver (the registrar kept, or renewed, the registration).
    wait_until("CSINode lists the driver", lambda: driver_registered(kube.storage), 60)
