"""The real csi-sanity against the real driver: standalone mode, hostpath backend, real mounts
and loop devices, once with mount volumes and once with block volumes.

Needs root (mounts, loop devices). Not being root is a failure, not a skip: this lane exists to
run these checks.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit.driver_process import DriverProcess, clean_up_host, mounts_under

ROOT = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = ROOT / "scripts" / "install-csi-sanity.sh"
NODE_ID = "sanity-node"
MiB = 1 << 20
VOLUME_SIZE = 64 * MiB
EXPAND_SIZE = 128 * MiB
MAX_VOLUMES_PER_NODE = 4  # small, so the attach-limit spec runs quickly
# csi-sanity v5.4.0 has 92 specs: 1 is pending upstream, 6 need the GroupController service and
# 1 PUBLISH_READONLY, neither of which this driver offers. Everything else must pass, including
# the 8 ControllerModifyVolume specs (with wipeOnDelete as the mutable parameter).
MIN_PASSED = 92 - 1 - 6 - 1
SANITY_TIMEOUT = 480  # seconds for one csi-sanity run (pytest stops a test at 600)


def csi_sanity_binary() -> str:
    """The binary the install script manages (it installs it if missing, and prints its path)."""
    proc = subprocess.run(
        [str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=900, check=False
    )
    assert proc.returncode == 0, f"{INSTALL_SCRIPT} failed:\n{proc.stdout}\n{proc.stderr}"
    path = proc.stdout.strip().splitlines()[-1]
    assert os.access(path, os.X_OK), f"install script printed {path!r}, not an executable"
    return path


@pytest.fixture
def driver() -> Iterator[DriverProcess]:
    if os.geteuid() != 0:
        pytest.fail("the csi-sanity lane needs root for mounts and loop devices")
    # Short path: a unix socket path must stay under 108 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="csi-sanity-", dir="/tmp"))
    d = DriverProcess(
        workdir,
        node_id=NODE_ID,
        extra_args=["--max-volumes-per-node", str(MAX_VOLUMES_PER_NODE)],
    )
    leaks: list[str] = []
    try:
        d.start()
        yield d
    finally:
        d.stop()
        leaks = clean_up_host(str(workdir))
        if not mounts_under(str(workdir)):
            shutil.rmtree(workdir, ignore_errors=True)
    assert d.exits == [0], f"driver exited with {d.exits}:\n" + d.log_tail()
    assert not leaks, f"left behind after csi-sanity and driver stop: {leaks}"


SECRET_FIELDS = (
    "CreateVolumeSecret",
    "DeleteVolumeSecret",
    "ControllerPublishVolumeSecret",
    "ControllerUnpublishVolumeSecret",
    "ControllerValidateVolumeCapabilitiesSecret",
    "NodeStageVolumeSecret",
    "NodePublishVolumeSecret",
    "CreateSnapshotSecret",
    "DeleteSnapshotSecret",
    "ControllerExpandVolumeSecret",
    "ListSnapshotsSecret",
)


def write_secrets(path: Path) -> list[str]:
    """A csi-sanity secrets file with a distinct random value per RPC; returns the values.

    Every request then carries secrets, and the driver (logging each request at debug level)
    must accept them and never write one of the values to its log.
    """
    values = [f"s3cr3t-{secrets.token_hex(12)}" for _ in SECRET_FIELDS]
    path.write_text(
        "".join(
            f"{field}:\n  password: {value}\n"
            for field, value in zip(SECRET_FIELDS, values, strict=True)
        )
    )
    return values


def junit_counts(report: Path) -> tuple[Counter[str], list[str]]:
    """Counts per status, and the names of failed specs with their first message line."""
    counts: Counter[str] = Counter()
    failures = []
    for case in ET.parse(report).getroot().iter("testcase"):
        name = case.get("name", "")
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
            problem = case.find("failure")
            if problem is None:
                problem = case.find("error")
            assert problem is not None
            message = (problem.get("message") or problem.text or "").strip().splitlines()
            failures.append(f"{name}: {message[0] if message else ''}")
        elif case.find("skipped") is not None or case.get("status") in ("skipped", "pending"):
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts, failures


@pytest.mark.root
@pytest.mark.parametrize("access_type", ["mount", "block"])
def test_csi_sanity(driver: DriverProcess, access_type: str) -> None:
    binary = csi_sanity_binary()
    report = driver.workdir / f"junit-{access_type}.xml"
    output = driver.workdir / f"csi-sanity-{access_type}.log"
    secrets_file = driver.workdir / "secrets.yaml"
    secret_values = write_secrets(secrets_file)
    mutable_file = driver.workdir / "mutable.yaml"
    mutable_file.write_text('wipeOnDelete: "true"\n')
    argv = [
        binary,
        f"--csi.endpoint=unix://{driver.socket}",
        f"--csi.testvolumeaccesstype={access_type}",
        f"--csi.testvolumesize={VOLUME_SIZE}",
        f"--csi.testvolumeexpandsize={EXPAND_SIZE}",
        f"--csi.stagingdir={driver.workdir / 'staging'}",
        f"--csi.mountdir={driver.workdir / 'mount'}",
        f"-ginkgo.junit-report={report}",
        "--csi.testnodevolumeattachlimit",
        f"--csi.secrets={secrets_file}",
        f"--csi.testvolumemutableparameters={mutable_file}",
        "-ginkgo.no-color",
        f"-ginkgo.timeout={SANITY_TIMEOUT}s",
    ]
    with open(output, "wb") as out:
        proc = subprocess.run(
            argv, stdout=out, stderr=subprocess.STDOUT, timeout=SANITY_TIMEOUT + 60, check=False
        )
    text = output.read_text(errors="replace")
    assert report.exists(), f"csi-sanity wrote no report (exit {proc.returncode}):\n{text[-4000:]}"
    counts, failures = junit_counts(report)
    summary = (
        f"csi-sanity {access_type}: {counts['passed']} passed, {counts['failed']} failed,"
        f" {counts['skipped']} skipped"
    )
    print(summary)
    if failures:
        print("failed specs:\n  " + "\n  ".join(failures))
        print(text[-8000:])
        print("driver log tail:\n" + driver.log_tail(120))
    assert counts["failed"] == 0, summary + "\n" + "\n".join(failures)
    assert proc.returncode == 0, f"{summary}, yet csi-sanity exited {proc.returncode}"
    assert counts["passed"] >= MIN_PASSED, summary
    driver_log = driver.log.read_text(errors="replace")
    assert "password" in driver_log, "the driver log shows no request with secrets at all"
    leaked = [v for v in secret_values if v in driver_log]
    assert not leaked, f"secret values reached the driver log: {leaked}"
