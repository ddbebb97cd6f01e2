"""The driver's metrics listeners (node plugin and controller) bind to the Pod's own address
unless asked otherwise, on the container port named "metrics", and the driver accepts the address
the kubelet makes of ``$(POD_IP):PORT``."""

from __future__ import annotations

import re

import pytest

from csi_driver.config import split_host_port
from tests.chart.chartlib import ChartTools, Obj, Rendered, container, env_field_ref, flags, parse
from tests.chart.chartlib import render_text as render

WORKLOADS = {"node": "DaemonSet", "controller": "Deployment"}


def _metrics_address(
    tools: ChartTools, values: dict[str, object], component: str = "node"
) -> tuple[str, Obj]:
    rendered = Rendered(parse(render(tools, values)))
    driver = container(rendered.one(WORKLOADS[component]), "driver")
    return flags(driver)["metrics-address"], driver


@pytest.mark.parametrize("component", sorted(WORKLOADS))
def test_metrics_bind_to_the_pod_ip_by_default(chart_tools: ChartTools, component: str) -> None:
    address, driver = _metrics_address(chart_tools, {}, component)
    match = re.fullmatch(r"\$\((\w+)\):(\d+)", address)
    assert match, f"--metrics-address={address} is not $(VAR):PORT"
    assert env_field_ref(driver, match.group(1)) == "status.podIP"
    ports = {p["name"]: p["containerPort"] for p in driver["ports"]}
    assert ports["metrics"] == int(match.group(2))


@pytest.mark.parametrize("component", sorted(WORKLOADS))
def test_metrics_port_follows_the_value(chart_tools: ChartTools, component: str) -> None:
    address, driver = _metrics_address(chart_tools, {component: {"metricsPort": 9901}}, component)
    assert address.endswith(":9901")
    assert {"name": "metrics", "containerPort": 9901, "protocol": "TCP"} in driver["ports"]


@pytest.mark.parametrize("component", sorted(WORKLOADS))
def test_metrics_bind_all_addresses_when_asked(chart_tools: ChartTools, component: str) -> None:
    address, _ = _metrics_address(chart_tools, {component: {"metricsBindAll": True}}, component)
    assert address.startswith("0.0.0.0:")


@pytest.mark.parametrize("component", sorted(WORKLOADS))
def test_metrics_bind_all_must_be_a_boolean(chart_tools: ChartTools, component: str) -> None:
    with pytest.raises(AssertionError, match="metricsBindAll"):
        render(chart_tools, {component: {"metricsBindAll": "yes"}})


@pytest.mark.parametrize("pod_ip", ["10.244.1.7", "fd00:10:244::7"])
def test_the_driver_accepts_the_expanded_address(pod_ip: str) -> None:
    assert split_host_port(f"{pod_ip}:9810") == (pod_ip, 9810)
