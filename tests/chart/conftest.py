"""Fixtures of the chart tests: the tools, installed once per session."""

from __future__ import annotations

import pytest

from tests.chart.chartlib import ChartTools, install_chart_tools


@pytest.fixture(scope="session")
def chart_tools() -> ChartTools:
    tools = install_chart_tools()
    assert tools.kubernetes_versions, f"no kubeconform schemas were generated in {tools.schema_dir}"
    return tools
