"""Host side of the real-kernel VM lane: boots Debian's kernel under qemu with virtme-ng and
runs scripts/vm/guest.py inside it.

The guest shares the host's filesystem (read-only, with a throw-away writable overlay over the
checkout), gets four blank sparse disks, and writes its verdict into a shared directory. The
lane passes only when the guest's exit code and its results file both say so; a VM that does
not boot is a failure, never a skip. Everything is torn down on the way out, also on failure,
timeout, Ctrl-C or SIGTERM: the qemu process tree is killed and the disk images deleted.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout: testkit

from results import GUEST_UP_MARKER, Counts, Results

from testkit.vm import (
    QEMU_NOISE,
    become_subreaper,
    kill_session,
    newest_kernel,
    reap,
    session_processes,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
DISK_BYTES = 2 * 1024**3
#: two PVs of the lane's VG, a spare (XFS and ext4 for the quota tests), one VG for a second
#: csi-sanity
DISKS = 4
# The code under test, copied at launch and bind-mounted over the checkout in the guest: the
# guest caches the host's files, so one edited on the host mid-run would turn into ESTALE.
SNAPSHOT = ("csi_driver", "testkit", "tests", "charts")


class Interrupted(Exception):
    pass


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def build_command(
    args: argparse.Namespace, work: Path, out: Path, disks: list[Path], kernel: Path
) -> list[str]:
    guest = [
        str(ROOT / ".venv/bin/python"),
        str(HERE / "guest.py"),
        "--root",
        str(ROOT),
        "--out",
        str(out),
        "--snapshot",
        str(work / "snapshot"),
        "--only",
        args.only,
        "--vg",
        args.vg,
        "--thinpool",
        args.thinpool,
        "--disks",
        str(len(disks)),
        "--disk-bytes",
        str(DISK_BYTES),
        "--csi-sanity",
        args.csi_sanity,
        "--sanity-types",
        args.sanity_types,
        "--sanity-backends",
        args.sanity_backends,
        "--sanity-min-passed",
        str(args.sanity_min_passed),
        "--tools-bin",
        args.tools_bin,
    ]
    if args.extra:
        guest += ["--", *args.extra]
    argv = [
        args.vng,
        "--run",
        str(kernel),
        "--disable-kvm",
        "--name",
        "csi-vm",
        "--memory",
        args.memory,
        "--cpus",
        str(args.cpus),
        "--overlay-rwdir",
        str(ROOT),  # pytest and the driver may write; the host's copy stays
        "--rwdir",
        f"{out}={out}",
    ]
    for disk in disks:
        argv += ["--disk", str(disk)]
    argv += ["--exec", shlex.join(guest)]
    return argv


@dataclass
class Outcome:
    """What the host learned about one VM run, filled in as it goes (also when interrupted)."""

    rc: int = 1
    boot_seconds: float | None = None
    results: Results | None = None
    interrupted: str = ""
    timed_out: bool = False


def stream(proc: subprocess.Popen[str], outcome: Outcome, t0: float) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        if any(noise in line for noise in QEMU_NOISE):
            continue
        if outcome.boot_seconds is None and GUEST_UP_MARKER in line:
            outcome.boot_seconds = time.monotonic() - t0
        sys.stdout.write("[vm] " + line)
        sys.stdout.flush()


def prepare(args: argparse.Namespace, work: Path) -> tuple[list[str], dict[str, str]]:
    """Disk images, the code snapshot, the vng command line and its environment."""
    out = work / "out"
    out.mkdir()
    disks = []
    for i in range(DISKS):
        disk = work / f"disk{i}.img"
        with disk.open("wb") as f:
            f.truncate(DISK_BYTES)  # sparse: costs no space until the guest writes
        disks.append(disk)
    for name in SNAPSHOT:
        shutil.copytree(
            ROOT / name,
            work / "snapshot" / name,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
    try:
        kernel = Path(args.kernel) if args.kernel else newest_kernel()
    except RuntimeError as exc:
        raise SystemExit(f"csi-vm: {exc}") from None
    argv = build_command(args, work, out, disks, kernel)
    env = dict(os.environ)
    env["TMPDIR"] = str(work)  # vng's sockets and pid files go away with the work dir
    path = [str(Path(args.vng).parent), env.get("PATH", "/usr/bin:/bin")]
    if os.access(args.virtiofsd, os.X_OK):
        path.insert(0, str(Path(args.virtiofsd).parent))  # vng looks it up on PATH
    else:
        print(
            f"csi-vm: WARNING: no virtiofsd at {args.virtiofsd}: the guest gets the host's"
            " filesystem over 9p, which is several times slower (scripts/install-vm.sh builds it)",
            flush=True,
        )
    env["PATH"] = ":".join(path)
    print(
        f"csi-vm: booting {kernel} (software emulation, {args.cpus} vCPUs, {args.memory})",
        flush=True,
    )
    if args.verbose:
        print("csi-vm: " + shlex.join(argv), flush=True)
    return argv, env


def run_vm(args: argparse.Namespace, work: Path, outcome: Outcome) -> None:
    argv, env = prepare(args, work)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        argv,
        env=env,
        cwd=work,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    sid = proc.pid

    def on_timeout() -> None:
        outcome.timed_out = True
        kill_session(sid)

    timer = threading.Timer(args.timeout, on_timeout)
    timer.start()
    try:
        stream(proc, outcome, t0)
        outcome.rc = proc.wait()
    finally:
        timer.cancel()
        kill_session(sid)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        survivors = kill_session(sid)
        deadline = time.monotonic() + 5
        while session_processes(sid, zombies=True) and time.monotonic() < deadline:
            reap(sid)  # orphans reach this subreaper a moment after their parent dies
            time.sleep(0.1)
        if survivors:
            print(f"csi-vm: ERROR: processes of the VM survived SIGKILL: {survivors}", flush=True)
        collect(args, work / "out", outcome)


def collect(args: argparse.Namespace, out: Path, outcome: Outcome) -> None:
    outcome.results = Results.read(out)
    if args.junit_dir:
        for report in out.glob("vm-*.xml"):
            shutil.copy(report, Path(args.junit_dir) / report.name)
    if args.log_dir:
        dest = Path(args.log_dir)
        dest.mkdir(parents=True, exist_ok=True)
        for item in out.iterdir():
            shutil.copy(item, dest / item.name)
        print(f"csi-vm: guest logs and reports copied to {dest}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    parser.add_argument("--vng", required=True, help="the vng executable (scripts/install-vm.sh)")
    parser.add_argument("--kernel", default=os.environ.get("CSI_VM_KERNEL", ""))
    cache = os.environ.get("CSI_CACHE_DIR", str(Path.home() / ".cache/nodelocal-csi"))
    parser.add_argument("--virtiofsd", default=f"{cache}/bin/virtiofsd")
    parser.add_argument(
        "--tools-bin",
        default=f"{cache}/bin",
        help="helm and prometheus for the tests (scripts/install-chart-tools.sh)",
    )
    parser.add_argument("--only", choices=("all", "setup", "pytest", "sanity"), default="all")
    parser.add_argument("--memory", default=os.environ.get("CSI_VM_MEMORY", "3G"))
    parser.add_argument("--cpus", type=int, default=int(os.environ.get("CSI_VM_CPUS", "2")))
    parser.add_argument(
        "--timeout", type=float, default=float(os.environ.get("CSI_VM_TIMEOUT", "3600"))
    )
    parser.add_argument("--vg", default=os.environ.get("CSI_TEST_VG", "csitest"))
    parser.add_argument("--thinpool", default=os.environ.get("CSI_TEST_THINPOOL", "thinpool"))
    parser.add_argument("--csi-sanity", default="")
    parser.add_argument(
        "--sanity-types", default=os.environ.get("CSI_VM_SANITY_TYPES", "mount,block")
    )
    parser.add_argument(
        "--sanity-backends",
        default=os.environ.get("CSI_VM_SANITY_BACKENDS", "lvm"),
        help="comma list of lvm, hostpath (hostpath on XFS with project quotas)",
    )
    parser.add_argument(
        "--sanity-min-passed",
        type=int,
        default=int(os.environ.get("CSI_VM_SANITY_MIN_PASSED", "80")),
    )
    parser.add_argument("--junit-dir", default=os.environ.get("CSI_JUNIT_DIR", ""))
    parser.add_argument(
        "--log-dir",
        default=os.environ.get("CSI_VM_LOG_DIR", ""),
        help="keep the guest's logs and reports here",
    )
    parser.add_argument("--verbose", action="store_true")
    # Anything else goes to pytest, or to csi-sanity with --only sanity (e.g. -k lvm).
    args, extra = parser.parse_known_args(argv)
    args.extra = extra

    become_subreaper()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="csi-vm-"))
    if any(c in str(work) for c in ",="):
        raise SystemExit(f"csi-vm: temp dir {work} has ',' or '=' which vng cannot take")
    outcome = Outcome()
    try:
        run_vm(args, work, outcome)
    except Interrupted as exc:
        outcome.interrupted = str(exc)
        outcome.rc = 130
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report(outcome, time.monotonic() - t0)


def report(outcome: Outcome, wall: float) -> int:
    print("csi-vm: ---------------------------------------------------------------", flush=True)
    results = outcome.results
    if outcome.interrupted:
        print(f"csi-vm: INTERRUPTED by {outcome.interrupted}: VM killed, disk images deleted")
    elif outcome.timed_out:
        print(
            "csi-vm: ERROR: the VM ran past the time limit (--timeout / CSI_VM_TIMEOUT)"
            " and was killed"
        )
    if outcome.boot_seconds is None:
        if not outcome.interrupted:
            print(
                "csi-vm: ERROR: THE VM DID NOT START (no sign of life from the guest);"
                " see the vng/qemu output above"
            )
    else:
        print(
            f"csi-vm: boot took {outcome.boot_seconds:.0f} s (host wall time to the guest's"
            " first line)"
        )
        if results is None:
            print("csi-vm: ERROR: the guest wrote no results file (it crashed or was killed)")
        elif not results.finished:
            print("csi-vm: ERROR: the guest did not finish its steps")
    total = Counts()
    for step in results.steps if results else []:
        if step.counts:
            print(step.counts.line(step.name))
            total.passed += step.counts.passed
            total.failed += step.counts.failed
            total.skipped += step.counts.skipped
            for failure in step.counts.failures[:40]:
                print(f"csi-vm:   failed: {failure}")
        if not step.ok and (step.counts is None or step.counts.failed == 0):
            total.failed += 1  # a step that broke without a failed test case still failed
        status = "ok" if step.ok else "FAILED"
        detail = f" ({step.detail})" if step.detail and not step.ok else ""
        print(f"csi-vm: {step.name}: {status} in {step.seconds:.0f} s{detail}")
    ok = outcome.rc == 0 and results is not None and results.ok
    if outcome.rc != 0:
        print(f"csi-vm: the VM exited with status {outcome.rc}")
    print(f"csi-vm: lane {'PASSED' if ok else 'FAILED'} in {wall:.0f} s wall time", flush=True)
    if not ok and total.failed == 0:
        total.failed = 1  # a broken lane is a failure even when no test case failed
    print(total.line("vm"), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
