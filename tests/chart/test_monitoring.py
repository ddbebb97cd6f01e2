"""The chart's monitoring: the PodMonitor, the Grafana dashboard and the PrometheusRule.

The key check is that every PromQL expression the chart ships, in the dashboard and in the
alerts, names only series the driver exports (tests/chart/exported_metrics.py, the one list) with
labels those series carry: a renamed metric would otherwise leave a blank panel and an alert that
can never fire, and nobody would notice.

PodMonitor and PrometheusRule are Prometheus Operator kinds, whose CRDs are not among the
schemas scripts/install-chart-tools.sh generates (it would mean fetching the operator's module
for two kinds); kubeconform skips them here and ``_check_pod_monitor`` and ``_check_rule`` check
their structure instead. Everything else these values render goes through kubeconform -strict.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from tests.chart import exported_metrics
from tests.chart.chartlib import (
    CHART,
    NAMESPACE,
    ChartTools,
    Obj,
    Rendered,
    container,
    kubeconform,
    parse,
    pod_spec,
    render_text,
)
from tests.chart.promql import names
from tests.chart.test_validate import assert_schema_rejects, helm_lint_strict

OPERATOR_KINDS = ("PodMonitor", "PrometheusRule")
POD_MONITOR_API = "monitoring.coreos.com/v1/PodMonitor"
RULE_API = "monitoring.coreos.com/v1/PrometheusRule"
ALL_ON: dict[str, Any] = {
    "metrics": {
        "podMonitor": {"enabled": True, "force": True},
        "dashboard": {"enabled": True},
        "prometheusRule": {"enabled": True, "force": True},
    }
}
JOB = "nodelocal-csi-node"
DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")


def _render(tools: ChartTools, values: dict[str, Any], *extra: str) -> Rendered:
    return Rendered(parse(render_text(tools, values, *extra)))


def _dashboard_config_maps(rendered: Rendered) -> list[Obj]:
    return [
        cm
        for cm in rendered.all("ConfigMap")
        if cm["metadata"].get("labels", {}).get("grafana_dashboard") == "1"
    ]


def _dashboard(rendered: Rendered) -> Obj:
    (cm,) = _dashboard_config_maps(rendered)
    (text,) = cm["data"].values()
    dashboard: Obj = json.loads(text)
    return dashboard


def _panels(dashboard: Obj) -> Iterator[Obj]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _dashboard_exprs(dashboard: Obj) -> list[tuple[str, str]]:
    """(where, expression) for every query of the dashboard: panels and template variables."""
    found = [
        (f"panel {panel['title']!r} {target['refId']}", target["expr"])
        for panel in _panels(dashboard)
        for target in panel.get("targets", [])
    ]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            inner = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", var["query"]["query"])
            assert inner, f"variable {var['name']}: {var['query']['query']!r}"
            found.append((f"variable {var['name']}", inner.group(1)))
            found.append((f"variable {var['name']} label", f"x{{{inner.group(2)}=''}}"))
    return found


def _rules(rendered: Rendered) -> list[Obj]:
    rule = rendered.one("PrometheusRule")
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def problems(expr: str) -> list[str]:
    """What in ``expr`` the driver does not export: unknown series, functions or labels."""
    known = exported_metrics.series_names()
    found = names(expr)
    out = [f"unknown series {s!r}" for s in sorted(found.series - known - {"x"})]
    out += [f"unknown function {f!r}" for f in sorted(found.unknown_functions)]
    if not found.series:
        out.append("selects no series")
    available: set[str] = set()
    for series in found.series & known:
        available |= exported_metrics.labels_of(series)
    if "x" in found.series:  # a variable's label_values label: any series' label will do
        available |= {label for s in known for label in exported_metrics.labels_of(s)}
    for owner, label in sorted(found.labels):
        labels = exported_metrics.labels_of(owner) if owner in known else available
        if owner not in ("", "x") and owner not in known:
            continue  # already reported as an unknown series
        if label not in labels:
            out.append(f"label {label!r} is not on {owner or 'the series used'}")
    return out


# --- what renders when ------------------------------------------------------------------------


def test_nothing_monitoring_related_by_default(chart_tools: ChartTools) -> None:
    rendered = _render(chart_tools, {})
    for kind in OPERATOR_KINDS:
        assert not rendered.all(kind)
    assert not _dashboard_config_maps(rendered)
    assert "csi-health-monitor" not in [
        c["name"] for c in pod_spec(rendered.daemonset)["containers"]
    ]
    assert not [r for r in rendered.all("ClusterRole") if "health-monitor" in r["metadata"]["name"]]


def test_operator_kinds_wait_for_their_api(chart_tools: ChartTools) -> None:
    """Enabled but neither served nor forced: a plain install must not fail on a missing CRD."""
    values = copy.deepcopy(ALL_ON)
    values["metrics"]["podMonitor"]["force"] = False
    values["metrics"]["prometheusRule"]["force"] = False
    rendered = _render(chart_tools, values)
    for kind in OPERATOR_KINDS:
        assert not rendered.all(kind)
    assert len(_dashboard_config_maps(rendered)) == 1  # a ConfigMap needs no CRD

    served = _render(chart_tools, values, "--api-versions", POD_MONITOR_API)
    assert len(served.all("PodMonitor")) == 1
    assert not served.all("PrometheusRule")
    served = _render(
        chart_tools, values, "--api-versions", POD_MONITOR_API, "--api-versions", RULE_API
    )
    assert [len(served.all(kind)) for kind in OPERATOR_KINDS] == [1, 1]


def test_force_without_enabled_renders_nothing(chart_tools: ChartTools) -> None:
    values = {
        "metrics": {
            "podMonitor": {"enabled": False, "force": True},
            "prometheusRule": {"enabled": False, "force": True},
        }
    }
    rendered = _render(chart_tools, values, "--api-versions", POD_MONITOR_API)
    for kind in OPERATOR_KINDS:
        assert not rendered.all(kind)


@pytest.mark.parametrize("backend", ["hostpath", "lvm"])
def test_everything_on_validates(chart_tools: ChartTools, backend: str) -> None:
    values = {**ALL_ON, "backend": backend, "healthMonitor": {"enabled": True}}
    text = render_text(chart_tools, values)
    rendered = Rendered(parse(text))
    _check_pod_monitor(rendered.one("PodMonitor"))
    _check_rule(rendered.one("PrometheusRule"))
    for version in chart_tools.kubernetes_versions:
        result = kubeconform(chart_tools, text, version, skip=OPERATOR_KINDS)
        assert (result.returncode, result.invalid, result.errors) == (0, 0, 0), result.output
        assert result.skipped == len(OPERATOR_KINDS), result.output
        assert result.valid == len(rendered.objects) - len(OPERATOR_KINDS)


# --- PodMonitor ------------------------------------------------------------------------------


def _check_pod_monitor(pm: Obj) -> None:
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(pm["spec"]) == {"selector", "namespaceSelector", "podMetricsEndpoints"}
    for endpoint in pm["spec"]["podMetricsEndpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "relabelings"}
        assert isinstance(endpoint["port"], str)
        for key in ("interval", "scrapeTimeout"):
            if key in endpoint:
                assert DURATION.match(endpoint[key]), endpoint[key]
        for relabel in endpoint["relabelings"]:
            assert set(relabel) <= {
                "action", "sourceLabels", "targetLabel", "replacement", "regex", "separator"
            }  # fmt: skip
            assert relabel["action"] in {"replace", "keep", "drop", "labelmap"}


def test_pod_monitor_scrapes_the_node_plugins_metrics_port(chart_tools: ChartTools) -> None:
    values = copy.deepcopy(ALL_ON)
    values["metrics"]["podMonitor"].update(
        {"interval": "45s", "scrapeTimeout": "10s", "labels": {"release": "kube-prometheus"}}
    )
    rendered = _render(chart_tools, values)
    pm = rendered.one("PodMonitor")
    _check_pod_monitor(pm)
    assert pm["metadata"]["namespace"] == NAMESPACE
    assert pm["metadata"]["labels"]["release"] == "kube-prometheus"
    assert pm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}

    selector = pm["spec"]["selector"]["matchLabels"]
    node_labels = rendered.daemonset["spec"]["template"]["metadata"]["labels"]
    controller_labels = rendered.deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= node_labels.items()
    assert not selector.items() <= controller_labels.items()
    assert selector == rendered.daemonset["spec"]["selector"]["matchLabels"]

    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert (endpoint["interval"], endpoint["scrapeTimeout"]) == ("45s", "10s")
    assert endpoint["path"] == "/metrics"
    driver = container(rendered.daemonset, "driver")
    named = {p["name"]: p["containerPort"] for p in driver["ports"]}
    assert endpoint["port"] == "metrics"
    assert named["metrics"] == 9810

    relabel = {r["targetLabel"]: r for r in endpoint["relabelings"]}
    assert relabel["node"]["sourceLabels"] == ["__meta_kubernetes_pod_node_name"]
    assert relabel["job"]["replacement"] == JOB
    # the alerts select the job the PodMonitor writes
    for rule in _rules(rendered):
        assert f'job="{JOB}"' in rule["expr"], rule["alert"]


# --- dashboard -------------------------------------------------------------------------------


def test_dashboard_config_map(chart_tools: ChartTools) -> None:
    values = copy.deepcopy(ALL_ON)
    values["metrics"]["dashboard"].update(
        {"namespace": "monitoring", "annotations": {"grafana_folder": "Storage"}}
    )
    rendered = _render(chart_tools, values)
    (cm,) = _dashboard_config_maps(rendered)
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Storage"}
    assert list(cm["data"]) == ["nodelocal-csi.json"]
    dashboard = _dashboard(rendered)
    assert dashboard["uid"] == "nodelocal-csi"
    assert json.loads((CHART / "dashboards" / "nodelocal-csi.json").read_text()) == dashboard

    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("node", "device_class"):
        assert variables[name]["type"] == "query"
        assert variables[name]["includeAll"] and variables[name]["multi"]

    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in _panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            # every query is scoped to the chosen nodes (the job variable keeps other
            # exporters' process_* series out)
            assert 'node=~"$node"' in target["expr"], (panel["title"], target["expr"])
            assert 'job=~"$job"' in target["expr"], (panel["title"], target["expr"])
            series = names(target["expr"]).series
            classed = {
                m.name for m in exported_metrics.DRIVER_METRICS if "device_class" in m.labels
            }
            if series & classed:
                assert 'device_class=~"$device_class"' in target["expr"], panel["title"]


def test_dashboard_shows_every_driver_metric(chart_tools: ChartTools) -> None:
    dashboard = _dashboard(_render(chart_tools, ALL_ON))
    used: set[str] = set()
    for _, expr in _dashboard_exprs(dashboard):
        used |= names(expr).series
    for metric in exported_metrics.DRIVER_METRICS:
        shown = {metric.name + s for s in ("", "_bucket", "_sum", "_count")}
        assert used & shown, f"the dashboard shows nothing of {metric.name}"
    assert "process_resident_memory_bytes" in used
    titles = " ".join(p["title"].lower() for p in _panels(dashboard))
    for words in ("p50", "p95", "p99", "errors by code", "thin pool data", "metadata", "ready"):
        assert words in titles


# --- the contract: every expression names what the driver exports ---------------------------


def _every_expression(tools: ChartTools) -> list[tuple[str, str]]:
    rendered = _render(tools, ALL_ON)
    exprs = _dashboard_exprs(_dashboard(rendered))
    exprs += [(f"alert {r['alert']}", r["expr"]) for r in _rules(rendered)]
    return exprs


def test_every_expression_names_exported_metrics(chart_tools: ChartTools) -> None:
    exprs = _every_expression(chart_tools)
    assert len(exprs) > 40
    found = {where: problems(expr) for where, expr in exprs}
    bad = {where: p for where, p in found.items() if p}
    assert not bad, json.dumps(bad, indent=1)


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ('csi_driver_capacity_fre_bytes{node=~"$node"}', "unknown series"),
        ("sum(rate(csi_driver_rpc_totals[5m]))", "unknown series"),
        ("histogram_quantile(0.9, rate(csi_driver_rpc_duration_seconds[5m]))", "unknown series"),
        ("csi_driver_rpc_duration_seconds_bucket_count", "unknown series"),
        ("csi_driver_ready + on (node) node_load1", "unknown series"),
        ("rtae(csi_driver_rpc_total[5m])", "unknown function"),
        ('csi_driver_volumes{deviceclass="fast"}', "label 'deviceclass'"),
        ("sum by (device_class) (csi_driver_rpc_total)", "label 'device_class'"),
        ('csi_driver_ready{le="1"}', "label 'le'"),
        ("vector(1)", "selects no series"),
    ],
)
def test_the_contract_check_catches_mistakes(expr: str, problem: str) -> None:
    """Without this, a green contract test could mean a blind parser."""
    assert any(problem in p for p in problems(expr)), problems(expr)


def test_a_misspelt_metric_in_the_chart_is_caught(chart_tools: ChartTools) -> None:
    exprs = _every_expression(chart_tools)
    for where, expr in exprs:
        for series in sorted(names(expr).series - {"x", "up"}):
            broken = re.sub(rf"\b{series}\b", series[:-1], expr, count=1)
            assert broken != expr
            assert problems(broken), f"{where}: {broken}"


def test_contract_list_is_consistent() -> None:
    all_names = [m.name for m in exported_metrics.all_metrics()]
    assert len(all_names) == len(set(all_names))
    for m in exported_metrics.DRIVER_METRICS + exported_metrics.RECONCILE_METRICS:
        assert m.name.startswith("csi_driver_")
        assert (m.kind == "counter") == m.name.endswith("_total")
        assert m.kind != "histogram" or m.name.endswith("_seconds")
    assert "csi_driver_rpc_duration_seconds_bucket" in exported_metrics.series_names()
    assert "le" in exported_metrics.labels_of("csi_driver_rpc_duration_seconds_bucket")
    assert "le" not in exported_metrics.labels_of("csi_driver_rpc_duration_seconds_count")


# --- alerts ----------------------------------------------------------------------------------


def _check_rule(rule: Obj) -> None:
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule["spec"]) == {"groups"}
    group_names = [g["name"] for g in rule["spec"]["groups"]]
    assert len(group_names) == len(set(group_names))
    for group in rule["spec"]["groups"]:
        assert set(group) == {"name", "rules"}
        for r in group["rules"]:
            assert set(r) == {"alert", "expr", "for", "labels", "annotations"}, r
            assert re.fullmatch(r"NodelocalCSI[A-Za-z]+", r["alert"])
            assert DURATION.match(r["for"]), r["for"]
            assert r["labels"]["severity"] in {"warning", "critical"}
            assert all(isinstance(v, str) for v in r["labels"].values())
            assert set(r["annotations"]) == {"summary", "description"}


def test_alerts_and_their_thresholds(chart_tools: ChartTools) -> None:
    rules = _rules(_render(chart_tools, ALL_ON))
    by_name: dict[str, list[Obj]] = {}
    for r in rules:
        by_name.setdefault(r["alert"], []).append(r)
    assert set(by_name) == {
        "NodelocalCSIThinPoolDataFilling",
        "NodelocalCSIThinPoolMetadataFilling",
        "NodelocalCSIDeviceClassLowFree",
        "NodelocalCSIRPCErrors",
        "NodelocalCSIDriverNotReady",
        "NodelocalCSITargetDown",
        "NodelocalCSIMetricsAbsent",
    }
    for part in ("Data", "Metadata"):
        pool = {r["labels"]["severity"]: r for r in by_name[f"NodelocalCSIThinPool{part}Filling"]}
        assert pool["warning"]["expr"].endswith("> 0.8")
        assert pool["critical"]["expr"].endswith("> 0.95")
        assert f"thinpool_{part.lower()}_used_ratio" in pool["warning"]["expr"]
    (low,) = by_name["NodelocalCSIDeviceClassLowFree"]
    assert "< 0.1" in low["expr"]
    (errors,) = by_name["NodelocalCSIRPCErrors"]
    assert errors["for"] == "10m" and errors["expr"].rstrip().endswith("> 0.05")
    for code in ("INTERNAL", "UNKNOWN", "UNAVAILABLE", "DEADLINE_EXCEEDED"):
        assert code in errors["expr"]
    (ready,) = by_name["NodelocalCSIDriverNotReady"]
    assert ready["expr"] == f'csi_driver_ready{{job="{JOB}"}} == 0' and ready["for"] == "5m"
    (down,) = by_name["NodelocalCSITargetDown"]
    assert down["expr"] == f'up{{job="{JOB}"}} == 0'
    (absent,) = by_name["NodelocalCSIMetricsAbsent"]
    assert absent["expr"] == f'absent(up{{job="{JOB}"}})'

    for r in rules:
        text = r["annotations"]["summary"] + r["annotations"]["description"]
        if r["alert"] != "NodelocalCSIMetricsAbsent":
            assert "{{ $labels.node }}" in text, r["alert"]
        if "device_class" in " ".join(
            label for s in names(r["expr"]).series for label in exported_metrics.labels_of(s)
        ):
            assert "{{ $labels.device_class }}" in r["annotations"]["summary"], r["alert"]


def test_alert_thresholds_come_from_values(chart_tools: ChartTools) -> None:
    values = copy.deepcopy(ALL_ON)
    values["metrics"]["prometheusRule"].update(
        {
            "thinPoolData": {"warning": 0.7, "critical": 0.9},
            "thinPoolMetadata": {"warning": 0.6, "critical": 0.85},
            "freeRatio": 0.2,
            "rpcErrorRatio": 0.01,
            "for": {
                "thinPool": "1m",
                "lowFree": "1h",
                "rpcErrors": "30m",
                "notReady": "2m",
                "targetDown": "10m",
            },
            "alertLabels": {"team": "storage"},
            "labels": {"release": "kube-prometheus"},
        }
    )
    rendered = _render(chart_tools, values)
    assert rendered.one("PrometheusRule")["metadata"]["labels"]["release"] == "kube-prometheus"
    rules = _rules(rendered)
    got = {(r["alert"], r["labels"]["severity"]): r for r in rules}
    assert got["NodelocalCSIThinPoolDataFilling", "warning"]["expr"].endswith("> 0.7")
    assert got["NodelocalCSIThinPoolDataFilling", "critical"]["expr"].endswith("> 0.9")
    assert got["NodelocalCSIThinPoolMetadataFilling", "warning"]["expr"].endswith("> 0.6")
    assert got["NodelocalCSIThinPoolMetadataFilling", "critical"]["expr"].endswith("> 0.85")
    assert (
        "above 85%"
        in got["NodelocalCSIThinPoolMetadataFilling", "critical"]["annotations"]["description"]
    )
    assert "< 0.2" in got["NodelocalCSIDeviceClassLowFree", "warning"]["expr"]
    assert got["NodelocalCSIRPCErrors", "warning"]["expr"].rstrip().endswith("> 0.01")
    assert [r["for"] for r in rules] == ["1m"] * 4 + ["1h", "30m", "2m", "10m", "10m"]
    assert all(r["labels"]["team"] == "storage" for r in rules)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"metrics": {"prometheusRule": {"thinPoolData": {"warning": 80}}}}, "warning"),
        ({"metrics": {"prometheusRule": {"freeRatio": 0}}}, "freeRatio"),
        ({"metrics": {"prometheusRule": {"for": {"thinPool": "five minutes"}}}}, "thinPool"),
        ({"metrics": {"prometheusRule": {"alertLabels": {"severity": "page"}}}}, "alertLabels"),
        ({"metrics": {"podMonitor": {"interval": "30"}}}, "interval"),
        ({"metrics": {"podMonitor": {"enable": True}}}, "enable"),
        ({"metrics": {"dashboard": {"labels": {"grafana_dashboard": "0"}}}}, "labels"),
        ({"healthMonitor": {"enabled": "yes"}}, "enabled"),
        ({"healthMonitor": {"listVolumesInterval": "often"}}, "listVolumesInterval"),
        ({"controller": {"metricsBindAll": 1}}, "metricsBindAll"),
    ],
)
def test_values_schema_checks_monitoring_values(
    chart_tools: ChartTools, values: dict[str, Any], message: str
) -> None:
    assert_schema_rejects(chart_tools, values, message)


# --- volume health ---------------------------------------------------------------------------


def test_health_monitor_runs_beside_the_node_driver(chart_tools: ChartTools) -> None:
    rendered = _render(
        chart_tools,
        {"healthMonitor": {"enabled": True, "listVolumesInterval": "2m", "extraArgs": ["--v=4"]}},
    )
    monitor = container(rendered.daemonset, "csi-health-monitor")
    assert monitor["image"].startswith(
        "registry.k8s.io/sig-storage/csi-external-health-monitor-controller:v"
    )
    args = monitor["args"]
    assert "--list-volumes-interval=2m" in args and args[-1] == "--v=4"
    # one per node, each answering for its own volumes: no leader election, no leases
    assert not any(a.startswith("--leader-election") for a in args)
    assert "csi-health-monitor" not in [
        c["name"] for c in pod_spec(rendered.deployment)["containers"]
    ]

    node_sa = pod_spec(rendered.daemonset)["serviceAccountName"]
    (binding,) = [
        b
        for b in rendered.all("ClusterRoleBinding")
        if b["metadata"]["name"].endswith("-health-monitor")
    ]
    assert binding["subjects"][0]["name"] == node_sa
    role = rendered.one("ClusterRole", binding["roleRef"]["name"])
    granted = {
        (resource, verb)
        for rule in role["rules"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    for resource in ("persistentvolumes", "persistentvolumeclaims", "pods", "nodes"):
        assert {(resource, "get"), (resource, "list"), (resource, "watch")} <= granted
    assert {("events", "create"), ("events", "patch"), ("events", "list")} <= granted
    assert not {v for r, v in granted if r != "events"} - {"get", "list", "watch"}


def test_health_monitor_image_is_pinned_like_the_other_sidecars(chart_tools: ChartTools) -> None:
    rendered = _render(chart_tools, {"healthMonitor": {"enabled": True}})
    image = container(rendered.daemonset, "csi-health-monitor")["image"]
    # the release built against CSI spec v1.12, like the other sidecars (docs/deploy.md)
    assert image == "registry.k8s.io/sig-storage/csi-external-health-monitor-controller:v0.18.0"


def test_helm_lint_with_everything_on(chart_tools: ChartTools) -> None:
    helm_lint_strict(chart_tools, {**ALL_ON, "healthMonitor": {"enabled": True}})
