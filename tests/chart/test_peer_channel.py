"""The chart's half of the peer channel (ControllerModifyVolume from the controller to the
node plugin holding the volume): the two workloads mount the right Secret where their flags
point, agree on the port, the controller's selector finds exactly the node plugin Pods, and the
certificates the chart generates let a real controller-side client reach a real node-mode
driver, and not the other way round."""

from __future__ import annotations

import base64
from pathlib import Path

import grpc
import pytest

from csi_driver.errors import CsiError
from csi_driver.proto import csi_pb2
from csi_driver.services.peer import Forwarder, channel_credentials
from testkit.driver_process import DriverProcess
from testkit.ports import free_port
from tests.chart.chartlib import (
    ChartTools,
    Obj,
    Rendered,
    container,
    env_field_ref,
    flags,
    parse,
    resolve,
    volume,
)
from tests.chart.chartlib import render_text as render
from tests.requests import create_request


def _secret_dir(rendered: Rendered, workload: Obj, c: Obj, into: Path) -> Path:
    """The files the container sees at its --peer-tls-dir, from the rendered Secret."""
    name, inner = resolve(workload, c, flags(c)["peer-tls-dir"])
    assert inner == ""
    secret_name = volume(workload, name)["secret"]["secretName"]
    secret = next(s for s in rendered.all("Secret") if s["metadata"]["name"] == secret_name)
    into.mkdir()
    for key in ("ca.crt", "tls.crt", "tls.key"):
        (into / key).write_bytes(base64.b64decode(secret["data"][key]))
    return into


def test_both_sides_are_wired_alike(chart_tools: ChartTools) -> None:
    rendered = Rendered(parse(render(chart_tools, {"modify": {"port": 9999}})))
    node, ctl = container(rendered.daemonset, "driver"), container(rendered.deployment, "driver")
    listen = flags(node)["peer-listen"]
    assert listen == "$(POD_IP):9999" and env_field_ref(node, "POD_IP") == "status.podIP"
    assert {p["name"]: p["containerPort"] for p in node["ports"]}["peer"] == 9999
    assert flags(ctl)["peer-port"] == "9999"
    assert flags(ctl)["peer-namespace"] == "$(POD_NAMESPACE)"
    assert env_field_ref(ctl, "POD_NAMESPACE") == "metadata.namespace"
    selector = dict(kv.split("=", 1) for kv in flags(ctl)["peer-selector"].split(","))
    node_labels = rendered.daemonset["spec"]["template"]["metadata"]["labels"]
    ctl_labels = rendered.deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= node_labels.items()
    assert not selector.items() <= ctl_labels.items()
    roles = [r for r in rendered.all("Role") if r["metadata"]["name"].endswith("-peer")]
    assert roles and roles[0]["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}
    ]


def test_the_network_policy_lets_only_the_controller_in(chart_tools: ChartTools) -> None:
    rendered = Rendered(parse(render(chart_tools, {"modify": {"networkPolicy": True}})))
    (policy,) = rendered.all("NetworkPolicy")
    node_labels = rendered.daemonset["spec"]["template"]["metadata"]["labels"]
    ctl_labels = rendered.deployment["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= node_labels.items()
    peer_rule, open_rule = policy["spec"]["ingress"]
    (source,) = peer_rule["from"]
    allowed = source["podSelector"]["matchLabels"]
    assert allowed.items() <= ctl_labels.items() and not allowed.items() <= node_labels.items()
    ports = {
        p["name"]: p["containerPort"]
        for c in (container(rendered.daemonset, "driver"),)
        for p in c["ports"]
    }
    assert [p["port"] for p in peer_rule["ports"]] == [ports["peer"]]
    # what stays reachable by everyone: the node plugin's metrics and its liveness endpoint
    assert "from" not in open_rule
    assert {p["port"] for p in open_rule["ports"]} == {ports["metrics"], ports["healthz"]}
    assert not Rendered(parse(render(chart_tools, {}))).all("NetworkPolicy")


def test_off_means_no_channel_at_all(chart_tools: ChartTools) -> None:
    rendered = Rendered(parse(render(chart_tools, {"modify": {"enabled": False}})))
    for workload in (rendered.daemonset, rendered.deployment):
        assert not [f for f in flags(container(workload, "driver")) if f.startswith("peer-")]
    assert not rendered.all("Secret")
    assert not rendered.all("NetworkPolicy")
    assert not [r for r in rendered.all("Role") if r["metadata"]["name"].endswith("-peer")]
    assert "peer" not in {p["name"] for p in container(rendered.daemonset, "driver")["ports"]}


@pytest.mark.root
def test_the_generated_certificates_connect_controller_to_node(
    chart_tools: ChartTools, tmp_path: Path
) -> None:
    rendered = Rendered(parse(render(chart_tools, {})))
    node_dir = _secret_dir(
        rendered, rendered.daemonset, container(rendered.daemonset, "driver"), tmp_path / "n"
    )
    ctl_dir = _secret_dir(
        rendered, rendered.deployment, container(rendered.deployment, "driver"), tmp_path / "c"
    )
    address = f"127.0.0.1:{free_port()}"
    driver = DriverProcess(
        tmp_path / "driver",
        node_id="chart-node",
        log_level="info",
        extra_args=["--mode", "node", "--peer-tls-dir", str(node_dir), "--peer-listen", address],
    )

    class At:
        def address(self, node: str, timeout: float) -> str:
            return address

    try:
        driver.start()
        with driver.stubs() as csi:
            vid = csi.controller.CreateVolume(create_request("chart-peer")).volume.volume_id
        request = csi_pb2.ControllerModifyVolumeRequest(
            volume_id=vid, mutable_parameters={"wipeOnDelete": "true"}
        )
        Forwarder(At(), lambda: channel_credentials(ctl_dir)).modify_volume(  # type: ignore[arg-type]
            "chart-node", request, 30
        )
        # a node plugin's own certificate (it trusts the node CA, as the controller does) is
        # no key to another node plugin
        stolen = grpc.ssl_channel_credentials(
            root_certificates=(ctl_dir / "ca.crt").read_bytes(),
            private_key=(node_dir / "tls.key").read_bytes(),
            certificate_chain=(node_dir / "tls.crt").read_bytes(),
        )
        with pytest.raises(CsiError) as exc:
            Forwarder(At(), lambda: stolen).modify_volume("chart-node", request, 30)  # type: ignore[arg-type]
        assert exc.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        driver.stop()
