"""csi-sanity against the driver's lvm backend, inside the VM (guest side).

The driver runs as the real program (`python -m csi_driver`, standalone mode) on a unix socket,
csi-sanity drives it over gRPC, and afterwards the volume group and the mount table must hold
nothing the run created: a leak fails the step even when every spec passed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from results import Counts, Step, junit_counts

VOLUME_SIZE = 32 * 1024 * 1024
EXPAND_SIZE = 64 * 1024 * 1024
SOCKET_WAIT = 120.0  # the driver imports grpc over 9p under software emulation: seconds
STOP_WAIT = 30.0


MAX_VOLUMES_PER_NODE = 4


@dataclass(frozen=True)
class SanityRun:
    backend: str  # "lvm", or "hostpath" (its root on an XFS mount with project quotas)
    access_type: str  # "mount" or "block"
    root: Path  # the checkout
    out: Path  # shared output directory (logs and JUnit reports land on the host)
    state: Path  # guest-local scratch directory
    csi_sanity: str
    vg: str
    thinpool: str
    extra_args: list[str] = field(default_factory=list)
    min_passed: int = 80
    timeout: float = 900.0
    hostpath_root: Path | None = None

    @property
    def label(self) -> str:
        return f"csi-sanity {self.backend} {self.access_type}"

    def backend_args(self) -> list[str]:
        if self.backend == "hostpath":
            assert self.hostpath_root is not None
            return ["--backend", "hostpath", "--hostpath-root", str(self.hostpath_root)]
        classes = _device_classes_file(self)
        return ["--backend", "lvm", "--lvm-config", str(classes), "--lvm-udev-sync", "false"]


def lvs_in(vg: str, env: Mapping[str, str], keep: Iterable[str]) -> list[str]:
    """LV names in the VG except `keep` and hidden ones ([..._tmeta] and the like)."""
    proc = subprocess.run(
        ["lvs", "--noheadings", "-o", "lv_name", vg],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    names = [n.strip() for n in proc.stdout.split()]
    return [n for n in names if n and not n.startswith("[") and n not in set(keep)]


def remove_leftovers(vg: str, keep: Iterable[str], env: Mapping[str, str]) -> None:
    """Unmounts and removes what a failed run left in the VG, so the next step starts clean."""
    keep = tuple(keep)
    mapper_prefix = "/dev/mapper/" + vg.replace("-", "--") + "-"
    for line in reversed(Path("/proc/self/mounts").read_text().splitlines()):
        source, target = line.split()[:2]
        if source.startswith(mapper_prefix) or source.startswith(f"/dev/{vg}/"):
            subprocess.run(
                ["umount", "-l", target.encode().decode("unicode_escape")],
                env=dict(env),
                capture_output=True,
                timeout=60,
                check=False,
            )
    for name in lvs_in(vg, env, keep):
        subprocess.run(
            ["lvremove", "-f", "-y", f"{vg}/{name}"],
            env=dict(env),
            capture_output=True,
            timeout=120,
            check=False,
        )


def _device_classes_file(run: SanityRun) -> Path:
    """Device classes in the format of csi_driver/config/device_classes.py: one default thin
    class on the lane's pool."""
    path = run.state / "lvm-classes.json"
    config = {
        "deviceClasses": [
            {"name": "thin", "volumeGroup": run.vg, "thinPool": run.thinpool, "default": True},
        ]
    }
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def _mutable_file(run: SanityRun) -> Path:
    """The VolumeAttributesClass values ControllerModifyVolume specs apply: every volume they
    make is discarded or zeroed on deletion, so that path runs too."""
    path = run.state / "mutable.yaml"
    path.write_text('wipeOnDelete: "true"\n')
    return path


def _wait_for_socket(sock: Path, driver: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + SOCKET_WAIT
    while time.monotonic() < deadline:
        if driver.poll() is not None:
            return f"the driver exited with {driver.returncode} before listening"
        if sock.is_socket():
            return ""
        time.sleep(0.5)
    return f"the driver did not create {sock} within {SOCKET_WAIT:.0f} s"


def _stop(driver: subprocess.Popen[bytes]) -> None:
    if driver.poll() is None:
        driver.send_signal(signal.SIGTERM)
        try:
            driver.wait(STOP_WAIT)
        except subprocess.TimeoutExpired:
            driver.kill()
            driver.wait()


def _mounts_under(directory: Path) -> list[str]:
    prefix = str(directory) + "/"
    return [
        line.split()[1]
        for line in Path("/proc/self/mounts").read_text().splitlines()
        if line.split()[1].startswith(prefix)
    ]


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path})"


def run_sanity(run: SanityRun, env: Mapping[str, str]) -> Step:
    t0 = time.monotonic()
    print(f"csi-vm: {run.label}: starting", flush=True)
    if not run.csi_sanity or not os.access(run.csi_sanity, os.X_OK):
        return Step(
            run.label,
            False,
            0.0,
            f"no csi-sanity binary at {run.csi_sanity!r} (scripts/install-csi-sanity.sh)",
        )
    run.state.mkdir(parents=True, exist_ok=True)
    sock = run.state / "csi.sock"
    driver_log = run.out / f"driver-{run.backend}-{run.access_type}.log"
    report = run.out / f"vm-sanity-{run.backend}-{run.access_type}.xml"
    # its own file: runs go side by side, and their output would interleave on the console
    sanity_log = run.out / f"csi-sanity-{run.backend}-{run.access_type}.log"
    driver_argv = [
        str(run.root / ".venv/bin/python"),
        "-m",
        "csi_driver",
        "--mode",
        "standalone",
        *run.backend_args(),
        "--endpoint",
        f"unix://{sock}",
        "--node-id",
        "vmnode",
        "--kubelet-dir",
        str(run.state),
        "--log-level",
        "DEBUG",
        # small, so the attach-limit spec runs (and quickly)
        "--max-volumes-per-node",
        str(MAX_VOLUMES_PER_NODE),
    ]
    with driver_log.open("wb") as log_file:
        driver = subprocess.Popen(
            driver_argv,
            cwd=run.root,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    problems: list[str] = []
    counts: Counts | None = None
    try:
        problem = _wait_for_socket(sock, driver)
        if problem:
            problems.append(problem)
        else:
            print(f"csi-vm: driver up after {time.monotonic() - t0:.1f} s", flush=True)
            sanity_argv = [
                run.csi_sanity,
                f"-csi.endpoint=unix://{sock}",
                f"-csi.testvolumeaccesstype={run.access_type}",
                f"-csi.testvolumesize={VOLUME_SIZE}",
                f"-csi.testvolumeexpandsize={EXPAND_SIZE}",
                f"-csi.mountdir={run.state / 'target'}",
                f"-csi.stagingdir={run.state / 'staging'}",
                f"-ginkgo.junit-report={report}",
                f"-csi.testvolumemutableparameters={_mutable_file(run)}",
                "-csi.testnodevolumeattachlimit",
                "-ginkgo.no-color",
                *run.extra_args,
            ]
            print(f"csi-vm: {' '.join(sanity_argv)} > {sanity_log.name}", flush=True)
            try:
                with sanity_log.open("wb") as sanity_out:
                    rc = subprocess.run(
                        sanity_argv,
                        env=dict(env),
                        stdin=subprocess.DEVNULL,
                        stdout=sanity_out,
                        stderr=subprocess.STDOUT,
                        timeout=run.timeout,
                        check=False,
                    ).returncode
                if rc != 0:
                    problems.append(f"csi-sanity exited with {rc}")
            except subprocess.TimeoutExpired:
                problems.append(f"csi-sanity timed out after {run.timeout:.0f} s")
            counts = junit_counts(report)
            if counts is None:
                problems.append(f"csi-sanity wrote no report {report.name}")
            elif counts.failed:
                problems.append(f"{counts.failed} specs failed")
            elif counts.passed < run.min_passed:
                problems.append(f"only {counts.passed} specs passed, expected >= {run.min_passed}")
    finally:
        _stop(driver)
    if driver.returncode not in (0, -signal.SIGTERM) and not problems:
        problems.append(f"the driver exited with {driver.returncode} on SIGTERM")
    mounts = _mounts_under(run.state)
    if mounts:
        problems.append(f"mounts left behind: {', '.join(mounts)}")
    leftovers = lvs_in(run.vg, env, keep=(run.thinpool,))
    if leftovers:
        problems.append(f"LVs left behind: {', '.join(leftovers)}")
    remove_leftovers(run.vg, keep=(run.thinpool,), env=env)
    for target in reversed(_mounts_under(run.state)):
        subprocess.run(["umount", "-l", target], capture_output=True, timeout=60, check=False)
    if problems:
        print(
            f"csi-vm: {run.label}: last lines of {sanity_log.name}:\n{_tail(sanity_log, 120)}\n"
            f"csi-vm: {run.label}: last lines of {driver_log.name}:\n{_tail(driver_log)}",
            flush=True,
        )
    step = Step(run.label, not problems, time.monotonic() - t0, "; ".join(problems), counts)
    print(f"csi-vm: {(counts or Counts()).line(run.label)}", flush=True)
    return step
