"""What a start loads: a module no start path needs stays unloaded, so it costs no start time
and no memory (the lvm backend on a hostpath node, the Kubernetes API client where there is
no peer channel, importlib.metadata anywhere)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

#: build and start the driver as ``run`` does, list the loaded modules, stop
_START = """
import json, sys
from csi_driver.app import build
from csi_driver.cli import parse_config

driver = build(parse_config(sys.argv[1:], env={}))
driver.start()
try:
    print(json.dumps(sorted(sys.modules)))
finally:
    driver.stop()
"""


def _modules_after_start(argv: list[str]) -> set[str]:
    proc = subprocess.run(
        [sys.executable, "-c", _START, *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.splitlines()[-1]))


def _hostpath_argv(tmp_path: Path, mode: str) -> list[str]:
    root = tmp_path / "root"
    root.mkdir()
    return [
        *("--mode", mode, "--backend", "hostpath", "--hostpath-root", str(root)),
        *("--endpoint", f"unix://{tmp_path}/csi.sock", "--node-id", "n1"),
        *("--kubelet-dir", str(tmp_path)),
    ]


@pytest.mark.parametrize("mode", ["standalone", "node"])
def test_a_hostpath_start_loads_no_lvm_peer_channel_or_metadata_module(
    tmp_path: Path, mode: str
) -> None:
    loaded = _modules_after_start(_hostpath_argv(tmp_path, mode))
    assert "csi_driver.backends.hostpath.backend" in loaded  # it did start the backend
    unwanted = sorted(
        name
        for name in loaded
        if name.startswith("csi_driver.backends.lvm")
        or name
        in (
            "csi_driver.config.device_classes",
            "csi_driver.kubeapi",
            "csi_driver.services.peer",
            "importlib.metadata",
        )
    )
    assert unwanted == []


def test_importing_the_package_reads_its_version_without_importlib_metadata() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, csi_driver; print(csi_driver.__version__);"
            " print('importlib.metadata' in sys.modules)",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    version, metadata_loaded = proc.stdout.split()
    import importlib.metadata

    assert version == importlib.metadata.version("csi-driver")
    assert metadata_loaded == "False"
