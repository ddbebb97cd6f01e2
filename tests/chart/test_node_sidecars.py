"""The node-driver-registrar and livenessprobe the chart deploys are the ones the tests run.

scripts/install-sidecars.sh builds both from their upstream release sources (or the module
proxy); the registration test and the e2e cluster run those binaries. These tests keep the
chart's image tags, the script's pinned releases and the source tarballs' names in step, and
check that the driver's liveness probe really goes through the livenessprobe sidecar.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.chart.chartlib import (
    REPO,
    ChartTools,
    Obj,
    Rendered,
    container,
    flags,
    parse,
    render_text,
)

SCRIPT = REPO / "scripts" / "install-sidecars.sh"
# chart container -> (image repository, the script's binary and tarball prefix)
NODE_SIDECARS = {
    "node-driver-registrar": ("csi-node-driver-registrar", "node-driver-registrar"),
    "liveness-probe": ("livenessprobe", "livenessprobe"),
}


def _script_releases() -> dict[str, tuple[str, str]]:
    """binary -> (release, tarball) from the script's NODE_SIDECARS table."""
    table = re.search(r"NODE_SIDECARS=\(\n(.*?)\n\)", SCRIPT.read_text(), re.S)
    assert table, f"{SCRIPT} has no NODE_SIDECARS table"
    out = {}
    for line in table.group(1).splitlines():
        binary, release, tarball, *_ = line.strip().strip('"').split()
        out[binary] = (release, tarball)
    return out


def _image_tag(image: str) -> str:
    return image.rpartition(":")[2]


def test_node_sidecar_images_are_the_releases_we_build(chart_tools: ChartTools) -> None:
    rendered = Rendered(parse(render_text(chart_tools, {})))
    built = _script_releases()
    for name, (binary, prefix) in NODE_SIDECARS.items():
        image = container(rendered.daemonset, name)["image"]
        assert image.startswith(f"registry.k8s.io/sig-storage/{binary}:"), image
        release, tarball = built[binary]
        assert _image_tag(image) == release, f"{name}: chart {image}, script builds {release}"
        assert tarball == f"{prefix}-{release}.tar.gz"
    liveness = container(rendered.deployment, "liveness-probe")["image"]
    assert _image_tag(liveness) == built["livenessprobe"][0]


def _probe_port(workload: Obj, port: Any) -> int:
    """The container port a probe's httpGet names (by number or by the driver's port name)."""
    if isinstance(port, int):
        return port
    ports = {p["name"]: p["containerPort"] for p in container(workload, "driver")["ports"]}
    return int(ports[port])


@pytest.mark.parametrize("workload_kind", ["DaemonSet", "Deployment"])
def test_driver_liveness_probe_asks_the_livenessprobe_sidecar(
    chart_tools: ChartTools, workload_kind: str
) -> None:
    """The kubelet probes the driver through the sidecar's /healthz, which runs a CSI Probe."""
    values = {
        "livenessProbe": {
            "startupSeconds": 101,
            "initialDelaySeconds": 3,
            "periodSeconds": 4,
            "timeoutSeconds": 2,
            "failureThreshold": 6,
        },
        "node": {"healthPort": 9901},
        "controller": {"healthPort": 9902},
    }
    workload = Rendered(parse(render_text(chart_tools, values))).one(workload_kind)
    probe = container(workload, "driver")["livenessProbe"]
    assert probe["httpGet"]["path"] == "/healthz"
    sidecar_flags = flags(container(workload, "liveness-probe"))
    endpoint = sidecar_flags["http-endpoint"]
    assert endpoint.rpartition(":")[0] in ("", "0.0.0.0"), endpoint
    port = _probe_port(workload, probe["httpGet"]["port"])
    assert port == int(endpoint.rpartition(":")[2])
    assert port == (9901 if workload_kind == "DaemonSet" else 9902)
    # The sidecar probes the socket the driver serves.
    driver_endpoint = flags(container(workload, "driver"))["endpoint"]
    assert driver_endpoint == f"unix://{sidecar_flags['csi-address']}"
    # The liveness probe counts failures only after the startup probe saw the first answer,
    # which it waits for as long as startupSeconds allows.
    startup = container(workload, "driver")["startupProbe"]
    assert startup["httpGet"] == probe["httpGet"]
    assert startup["initialDelaySeconds"] == 3
    assert startup["timeoutSeconds"] == 2
    assert 101 <= startup["periodSeconds"] * startup["failureThreshold"] < 101 + 5
    assert "initialDelaySeconds" not in probe
    assert {k: probe[k] for k in ("periodSeconds", "timeoutSeconds", "failureThreshold")} == {
        "periodSeconds": 4,
        "timeoutSeconds": 2,
        "failureThreshold": 6,
    }


@pytest.mark.parametrize(
    "bad",
    [
        {"periodSeconds": 0},
        {"failureThreshold": "3"},
        {"timeoutSeconds": 1.5},
        {"initialDelaySeconds": -1},
        {"startupSeconds": 0},
        {"successThreshold": 1},
    ],
)
def test_liveness_probe_values_are_checked(chart_tools: ChartTools, bad: dict[str, Any]) -> None:
    with pytest.raises(AssertionError, match="values don't meet the specifications"):
        render_text(chart_tools, {"livenessProbe": bad})


def test_the_registrar_waits_for_a_slow_driver_before_its_liveness_probe(
    chart_tools: ChartTools,
) -> None:
    """The registrar's /healthz fails until the driver first answers; its startup probe gives
    it the driver's startup allowance (the e2e lane's emulated node takes over a minute), and
    the liveness probe only takes over once it passed."""
    probe = {"startupSeconds": 600, "timeoutSeconds": 15}
    daemonset = Rendered(parse(render_text(chart_tools, {"livenessProbe": probe}))).daemonset
    registrar = container(daemonset, "node-driver-registrar")
    startup, liveness = registrar["startupProbe"], registrar["livenessProbe"]
    assert startup["httpGet"] == liveness["httpGet"] == {"path": "/healthz", "port": "registrar"}
    # a try that times out takes its whole timeout: the tries are no closer than that
    assert startup["periodSeconds"] >= startup["timeoutSeconds"] == 15
    assert startup["periodSeconds"] * startup["failureThreshold"] == 600
    assert startup == container(daemonset, "driver")["startupProbe"] | {
        "httpGet": startup["httpGet"]
    }
    assert "initialDelaySeconds" not in liveness
    ports = {p["name"]: p["containerPort"] for p in registrar["ports"]}
    assert flags(registrar)["http-endpoint"].endswith(f":{ports['registrar']}")
