"""The scale lane's one fixture: a reduced run (20 simulated nodes, 200 Pods with PVCs), made
once per session by the same harness as ``make scale`` (tests/scale/run.py), its result shared
by the tests that assert the correctness goals. The run tears everything down before the tests
read its result; a failed run fails every test with its error.

Needs root and what scripts/install-cluster.sh and scripts/install-kwok.sh install; anywhere
else the tests fail loudly rather than skip.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.cluster import cache_dir

from .run import Config, Run, report

NODES = int(os.environ.get("CSI_SCALE_NODES", "20"))
PODS = int(os.environ.get("CSI_SCALE_PODS", "200"))


def artifacts_dir() -> Path:
    return Path(os.environ.get("CSI_SCALE_ARTIFACTS", cache_dir() / "scale-artifacts" / "ci"))


@pytest.fixture(scope="session")
def scale_run() -> dict[str, Any]:
    if os.geteuid() != 0:
        pytest.fail("the scale lane needs root (it runs a control plane)", pytrace=False)
    cfg = Config(nodes=NODES, pods=PODS, idle_seconds=10.0, timeout=600.0)
    run = Run(cfg, artifacts_dir())
    try:
        result = run.execute()
    except BaseException as exc:
        run.result["error"] = f"{type(exc).__name__}: {exc}"
        _write(run.result)
        raise
    _write(result)
    print("\n" + report(result))
    return result


def _write(result: dict[str, Any]) -> None:
    out = artifacts_dir()
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
