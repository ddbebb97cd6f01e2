"""The chart's half of the opt-in reconcilers (docs/operations.md): off by default (no flag,
no role), and when on, the driver gets flags its own parser accepts, each service account
exactly the permissions its reconciler uses (deletions only with the deleting switch), the
objects validate, and the schema refuses grace periods that make no sense."""

from __future__ import annotations

from typing import Any

import pytest

from csi_driver.cli import parse_config
from csi_driver.config import Reconcile
from tests.chart.chartlib import (
    ChartTools,
    Rendered,
    container,
    kubeconform,
    parse,
    pod_spec,
    render_text,
)
from tests.chart.test_invariants import _granted
from tests.chart.test_validate import assert_schema_rejects, helm_lint_strict

ON = {
    "nodeLoss": {
        "enabled": True,
        "deletePVCs": True,
        "gracePeriodSeconds": 70,
        "intervalSeconds": 3,
        "maxLostNodes": 5,
        "maxLostPercent": 20,
    },
    "orphans": {"enabled": True, "delete": True, "gracePeriodSeconds": 90, "intervalSeconds": 4},
}
REPORT_ONLY = {"nodeLoss": {"enabled": True}, "orphans": {"enabled": True}}

_ENV = {"NODE_NAME": "n1", "POD_NAMESPACE": "kube-system", "POD_IP": "10.0.0.5"}


def _config(workload: dict[str, Any]) -> Any:
    """The driver's Config from the container's args, as the kubelet expands them."""
    args = container(workload, "driver")["args"]
    expanded = []
    for arg in args:
        for name, value in _ENV.items():
            arg = arg.replace(f"$({name})", value)
        expanded.append(arg)
    # the peer flags name files; the config does not read them
    return parse_config(expanded, env={})


def _render(tools: ChartTools, values: dict[str, Any]) -> Rendered:
    return Rendered(parse(render_text(tools, values)))


def test_off_by_default(chart_tools: ChartTools) -> None:
    rendered = _render(chart_tools, {})
    for workload in (rendered.daemonset, rendered.deployment):
        args = " ".join(container(workload, "driver")["args"])
        assert "--node-loss" not in args and "--orphans" not in args
    names = [r["metadata"]["name"] for r in rendered.all("ClusterRole")]
    assert not [n for n in names if n.endswith(("-node-loss", "-orphans"))]


def test_flags_reach_the_driver_and_parse(chart_tools: ChartTools) -> None:
    rendered = _render(chart_tools, ON)
    ctl = _config(rendered.deployment).reconcile
    assert ctl.node_loss is Reconcile.DELETE and ctl.orphans is Reconcile.OFF
    assert (ctl.node_loss_grace_seconds, ctl.node_loss_interval) == (70, 3)
    assert (ctl.node_loss_max_nodes, ctl.node_loss_max_percent) == (5, 20)
    assert ctl.namespace == "kube-system"
    node = _config(rendered.daemonset).reconcile
    assert node.orphans is Reconcile.DELETE and node.node_loss is Reconcile.OFF
    assert (node.orphans_grace_seconds, node.orphans_interval) == (90, 4)
    report = _render(chart_tools, REPORT_ONLY)
    assert _config(report.deployment).reconcile.node_loss is Reconcile.REPORT
    defaults = _config(report.deployment).reconcile
    assert (defaults.node_loss_max_nodes, defaults.node_loss_max_percent) == (3, 50)
    assert _config(report.daemonset).reconcile.orphans is Reconcile.REPORT


@pytest.mark.parametrize("values", [ON, REPORT_ONLY], ids=["delete", "report"])
def test_each_account_gets_what_its_reconciler_uses(
    chart_tools: ChartTools, values: dict[str, Any]
) -> None:
    rendered = _render(chart_tools, values)
    deleting = values["nodeLoss"].get("deletePVCs", False)
    ctrl = _granted(rendered, pod_spec(rendered.deployment)["serviceAccountName"])
    node = _granted(rendered, pod_spec(rendered.daemonset)["serviceAccountName"])
    for need in [
        ("", "nodes", "list"),
        ("", "persistentvolumes", "list"),
        ("", "events", "create"),
        ("coordination.k8s.io", "leases", "create"),
        ("coordination.k8s.io", "leases", "update"),
    ]:
        assert need in ctrl, need
    assert ("", "persistentvolumeclaims", "get") in ctrl  # the claim is read before its DELETE
    for need in [
        ("", "persistentvolumeclaims", "delete"),
        ("", "persistentvolumes", "delete"),
    ]:
        assert (need in ctrl) is deleting, need
    # patch (the provisioner's finalizer): the resizer holds it anyway
    assert ("", "persistentvolumes", "patch") in ctrl
    for need in [("", "persistentvolumes", "list"), ("", "nodes", "get"), ("", "events", "create")]:
        assert need in node, need
    assert ("", "persistentvolumeclaims", "delete") not in node
    own = next(r for r in rendered.all("ClusterRole") if r["metadata"]["name"].endswith("-orphans"))
    verbs = {v for rule in own["rules"] for v in rule["verbs"]}
    assert verbs <= {"get", "list", "watch", "create"}, "orphans need no write but Events"


def test_objects_validate(chart_tools: ChartTools) -> None:
    helm_lint_strict(chart_tools, ON)
    text = render_text(chart_tools, ON)
    count = len(parse(text))
    for version in chart_tools.kubernetes_versions:
        result = kubeconform(chart_tools, text, version)
        assert (result.returncode, result.invalid, result.errors) == (0, 0, 0), result.output
        assert result.valid == count


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"nodeLoss": {"gracePeriodSeconds": 0}}, "gracePeriodSeconds"),
        ({"orphans": {"intervalSeconds": 0}}, "intervalSeconds"),
        ({"orphans": {"delete": "yes"}}, "delete"),
        ({"nodeLoss": {"deletePvcs": True}}, "deletePvcs"),
        ({"nodeLoss": {"maxLostPercent": 101}}, "maxLostPercent"),
        ({"nodeLoss": {"maxLostNodes": 0}}, "maxLostNodes"),
    ],
)
def test_schema_refuses(chart_tools: ChartTools, values: dict[str, Any], message: str) -> None:
    assert_schema_rejects(chart_tools, values, message)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (  # deleting on a grace period of seconds
            {"nodeLoss": {**ON["nodeLoss"], "gracePeriodSeconds": 10, "intervalSeconds": 2}},
            "nodeLoss: deleting needs gracePeriodSeconds of at least 30",
        ),
        (  # shorter than two rounds
            {"orphans": {**ON["orphans"], "gracePeriodSeconds": 100, "intervalSeconds": 60}},
            "orphans: deleting needs",
        ),
        (  # one round alone would decide, even when only reporting
            {"orphans": {"enabled": True, "gracePeriodSeconds": 10, "intervalSeconds": 60}},
            "orphans.gracePeriodSeconds (10) must be at least orphans.intervalSeconds (60)",
        ),
    ],
)
def test_grace_periods_the_driver_would_refuse_fail_the_render(
    chart_tools: ChartTools, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(AssertionError) as exc:
        render_text(chart_tools, values)
    assert message in str(exc.value)
