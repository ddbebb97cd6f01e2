"""deploy/ holds exactly what scripts/render-deploy.sh renders from the chart today."""

from __future__ import annotations

import difflib
from pathlib import Path

from tests.chart.chartlib import REPO, ChartTools, kubeconform, parse, run


def test_deploy_manifests_are_up_to_date(chart_tools: ChartTools, tmp_path: Path) -> None:
    proc = run(
        ["bash", REPO / "scripts" / "render-deploy.sh", "--out", tmp_path],
    )
    assert proc.returncode == 0, proc.stderr
    fresh = sorted(p.name for p in tmp_path.glob("*.yaml"))
    committed = sorted(p.name for p in (REPO / "deploy").glob("*.yaml"))
    assert fresh == committed == ["nodelocal-csi-lvm.yaml", "nodelocal-csi.yaml"]
    for name in fresh:
        want = (tmp_path / name).read_text()
        have = (REPO / "deploy" / name).read_text()
        diff = "".join(
            difflib.unified_diff(
                have.splitlines(True), want.splitlines(True), f"deploy/{name}", "rendered"
            )
        )
        assert not diff, f"deploy/ is stale; run scripts/render-deploy.sh\n{diff[:4000]}"


def test_deploy_manifests_validate(chart_tools: ChartTools) -> None:
    for path in sorted((REPO / "deploy").glob("*.yaml")):
        text = path.read_text()
        count = len(parse(text))
        for version in chart_tools.kubernetes_versions:
            result = kubeconform(chart_tools, text, version)
            assert result.returncode == 0, result.output
            assert result.valid == count
