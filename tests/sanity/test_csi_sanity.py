"""The real csi-sanity against the real driver: standalone mode, hostpath backend, real mounts
and loop devices, once with mount volumes and once with block volumes.

Needs root (mounts, loop devices). Not being root is a failure, not a skip: this lane exists to
run these checks.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from csi_driver.proto import csi_pb2, csi_pb2_grpc

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


def mounts_under(prefix: str) -> list[str]:
    found = []
    with open("/proc/self/mounts") as f:
        for line in f:
            mountpoint = line.split()[1].replace("\\040", " ")
            if mountpoint == prefix or mountpoint.startswith(prefix + "/"):
                found.append(mountpoint)
    return found


def loops_under(prefix: str) -> list[tuple[str, str]]:
    out = subprocess.run(
        ["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    found = []
    for line in out.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[1].strip().startswith(prefix + "/"):
            found.append((parts[0], parts[1].strip()))
    return found


def clean_up_host(workdir: str) -> list[str]:
    """Unmount and detach whatever is left under ``workdir``; returns what had leaked."""
    leaks = []
    for mountpoint in sorted(mounts_under(workdir), key=len, reverse=True):
        leaks.append(f"mount {mountpoint}")
        subprocess.run(["umount", mountpoint], timeout=60, check=False)
    for mountpoint in mounts_under(workdir):
        subprocess.run(["umount", "--lazy", mountpoint], timeout=60, check=False)
    for device, backing in loops_under(workdir):
        leaks.append(f"loop device {device} -> {backing}")
        subprocess.run(["losetup", "--detach", device], timeout=60, check=False)
    return leaks


@dataclass
class Driver:
    workdir: Path
    socket: Path
    log: Path
    process: subprocess.Popen[bytes]

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(no driver log: {exc})"


def wait_until_serving(driver: Driver, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    last_error = "socket not created"
    while time.monotonic() < deadline:
        if driver.process.poll() is not None:
            pytest.fail(
                f"driver exited with {driver.process.returncode} during start:\n"
                + driver.log_tail()
            )
        if driver.socket.exists():
            with grpc.insecure_channel(f"unix://{driver.socket}") as channel:
                try:
                    reply = csi_pb2_grpc.IdentityStub(channel).Probe(
                        csi_pb2.ProbeRequest(), timeout=5
                    )
                    if reply.ready.value:
                        return
                    last_error = "Probe answered not ready"
                except grpc.RpcError as exc:
                    last_error = f"Probe failed: {exc.code().name} {exc.details()}"
        time.sleep(0.2)
    pytest.fail(f"driver not serving after {timeout} s ({last_error}):\n" + driver.log_tail())


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)


@pytest.fixture
def driver() -> Iterator[Driver]:
    if os.geteuid() != 0:
        pytest.fail("the csi-sanity lane needs root for mounts and loop devices")
    # Short path: a unix socket path must stay under 108 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="csi-sanity-", dir="/tmp"))
    socket = workdir / "csi.sock"
    log = workdir / "driver.log"
    (workdir / "root").mkdir()
    argv = [
        sys.executable,
        "-m",
        "csi_driver",
        "--mode",
        "standalone",
        "--backend",
        "hostpath",
        "--hostpath-root",
        str(workdir / "root"),
        "--endpoint",
        f"unix://{socket}",
        "--node-id",
        NODE_ID,
        "--log-level",
        "debug",
        "--max-volumes-per-node",
        str(MAX_VOLUMES_PER_NODE),
    ]
    leaks: list[str] = []
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            argv, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
    d = Driver(workdir, socket, log, process)
    try:
        wait_until_serving(d)
        yield d
    finally:
        stop(process)
        leaks = clean_up_host(str(workdir))
        if not mounts_under(str(workdir)):
            shutil.rmtree(workdir, ignore_errors=True)
    assert process.returncode == 0, f"driver exited with {process.returncode}:\n" + d.log_tail()
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
def test_csi_sanity(driver: Driver, access_type: str) -> None:
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
