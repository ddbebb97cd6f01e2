"""helm lint --strict, and kubeconform -strict against the supported Kubernetes releases."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.chart.chartlib import CHART, ChartTools, kubeconform, parse, render_text, run, set_args
from tests.chart.scenarios import SCENARIOS


def helm_lint_strict(chart_tools: ChartTools, values: dict[str, Any]) -> None:
    proc = run(
        [chart_tools.helm, "lint", "--strict", "--kube-version", "1.34.4", CHART, *set_args(values)]
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_helm_lint_strict(chart_tools: ChartTools, scenario: str) -> None:
    helm_lint_strict(chart_tools, SCENARIOS[scenario])


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_rendered_objects_validate_strictly(chart_tools: ChartTools, scenario: str) -> None:
    text = render_text(chart_tools, SCENARIOS[scenario])
    count = len(parse(text))
    assert count >= 12
    for version in chart_tools.kubernetes_versions:
        result = kubeconform(chart_tools, text, version)
        assert (result.returncode, result.invalid, result.errors, result.skipped) == (0, 0, 0, 0), (
            f"Kubernetes {version}:\n{result.output}"
        )
        assert result.valid == count, f"Kubernetes {version}: {result.valid} of {count} valid"


def test_schemas_cover_the_supported_releases(chart_tools: ChartTools) -> None:
    assert "1.34.4" in chart_tools.kubernetes_versions
    assert len(chart_tools.kubernetes_versions) >= 2


@pytest.mark.parametrize(
    ("mutation", "expected"),
    [
        # A misspelt field deep in a pod template.
        (("mountPropagation: Bidirectional", "mountPropagaton: Bidirectional"), "mountPropagaton"),
        # A wrong type in a built-in kind.
        (("attachRequired: false", 'attachRequired: "no"'), "attachRequired"),
        # An unknown top-level field of a CRD-defined kind.
        (("deletionPolicy: Delete", "deletionPolicy: Delete\nsurprise: true"), "surprise"),
    ],
)
def test_kubeconform_rejects_broken_objects(
    chart_tools: ChartTools, mutation: tuple[str, str], expected: str
) -> None:
    """The schemas are strict: without this, a green validation would prove nothing."""
    text = render_text(chart_tools, {})
    old, new = mutation
    assert old in text
    broken = text.replace(old, new, 1)
    for version in chart_tools.kubernetes_versions:
        result = kubeconform(chart_tools, broken, version)
        assert result.returncode != 0
        assert result.invalid == 1, result.output
        assert expected in result.output


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"backend": "zfs"}, "backend"),
        ({"snapshot": {"enabled": True}}, "snapshot"),
        ({"node": {"metricsPort": 70000}}, "metricsPort"),
        ({"lvm": {"deviceClasses": []}}, "deviceClasses"),
        ({"provisioner": {"timeout": "a minute"}}, "timeout"),
        ({"csiDriver": {"fsGroupPolicy": "Always"}}, "fsGroupPolicy"),
    ],
)
def test_values_schema_rejects_bad_values(
    chart_tools: ChartTools, values: dict[str, Any], message: str
) -> None:
    assert_schema_rejects(chart_tools, values, message)


def assert_schema_rejects(chart_tools: ChartTools, values: dict[str, Any], message: str) -> None:
    """helm refuses the values by the chart's schema, naming ``message``."""
    proc = run([chart_tools.helm, "template", "x", CHART, *set_args(values)])
    assert proc.returncode != 0
    assert "schema" in proc.stderr.lower()
    assert message in proc.stderr


def _two_defaults() -> list[dict[str, Any]]:
    from tests.chart.scenarios import LVM_CLASSES

    classes = copy.deepcopy(LVM_CLASSES)
    for cls in classes:
        cls["default"] = True
    return classes


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"backend": "lvm", "lvm": {"deviceClasses": _two_defaults()}}, "at most one device class"),
        (
            {
                "backend": "lvm",
                "lvm": {
                    "deviceClasses": [
                        {"name": "a", "volumeGroup": "vg1", "storageClass": {"create": False}},
                        {"name": "a", "volumeGroup": "vg2", "storageClass": {"create": False}},
                    ]
                },
            },
            "used twice",
        ),
    ],
)
def test_render_refuses_inconsistent_device_classes(
    chart_tools: ChartTools, values: dict[str, Any], message: str
) -> None:
    proc = run([chart_tools.helm, "template", "x", CHART, *set_args(values)])
    assert proc.returncode != 0
    assert message in proc.stderr
