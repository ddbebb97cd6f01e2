"""The benchmarks run, end to end, in a size that takes seconds, so they cannot rot.

Their numbers are not looked at: a benchmark is not a test, and timings on a shared machine
prove nothing. What is checked is that every step ran on both drivers and produced a figure,
that the reference driver (built by scripts/install-sidecars.sh from its release source) really
took part, and that nothing was left mounted or attached.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.versus import DEFAULT_REFERENCE, OURS, REFERENCE
from testkit.driver_process import loops_under, mounts_under
from tests.integration.conftest import require_root

REPO = Path(__file__).resolve().parents[2]


def reference_binary() -> Path:
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "install-sidecars.sh"), "hostpathplugin"],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert proc.returncode == 0, f"install-sidecars.sh failed:\n{proc.stdout}\n{proc.stderr}"
    return DEFAULT_REFERENCE


def test_versus_smoke_measures_every_metric_on_both_drivers(tmp_path: Path) -> None:
    require_root()
    out = tmp_path / "versus.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.versus",
            "--smoke",
            "--reference",
            str(reference_binary()),
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    rows = {r["metric"]: r for r in results["rows"]}
    expected = [
        "start to ready Probe, median",
        "idle RSS, 2 s after start",
        "CreateVolume+DeleteVolume p50, 3 volumes",
        "CreateVolume+DeleteVolume p50, 12 volumes",
        "driver CPU per pair, 12 volumes",
        "8 concurrent clients, pairs per second, 3 volumes",
        "ListVolumes with max_entries 0, 12 volumes",
        "ListVolumes, every page of 5, 12 volumes",
        "NodePublishVolume+NodeUnpublishVolume p50, mount",
    ]
    assert sorted(set(expected) - set(rows)) == []
    for metric in expected:
        values = rows[metric]["values"]
        assert isinstance(values[OURS], int | float) and values[OURS] > 0, (metric, values)
        if metric.startswith("ListVolumes, every page"):
            # The reference hands out no token (its paging is broken); the benchmark says so.
            assert str(values[REFERENCE]).startswith("cannot page"), values
            continue
        assert isinstance(values[REFERENCE], int | float) and values[REFERENCE] > 0, values
        assert rows[metric]["ratio"] == round(values[OURS] / values[REFERENCE], 2)
    assert "ratio" in proc.stdout and "load average" in proc.stdout
    assert not mounts_under("/tmp/csi-versus-") and not loops_under("/tmp/csi-versus-")


def test_rpc_latency_smoke_counts_commands_of_the_node_cycle() -> None:
    require_root()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.rpc_latency",
            *("--pairs", "3", "--small", "2", "--large", "6", "--list-rounds", "1"),
            *("--page-size", "4", "--node-cycles", "2", "--out", "-"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for row in (
        "CreateVolume (6 existing)",
        "ListVolumes, all 6 in pages of 4",
        "node cycle, 4 RPCs (block)",
    ):
        assert row in proc.stdout, proc.stdout
