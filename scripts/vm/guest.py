"""Guest side of the real-kernel VM lane; runs as root inside the VM that launch.py boots.

It turns the blank extra disks into the volume group the tests expect, checks that the kernel
really has what the lane exists for (device-mapper, thin pools, XFS project quotas), runs the
steps (pytest tests/vm, csi-sanity against the lvm backend), and takes the volume group apart
again. The csi-sanity runs (mount and block) go side by side, each against a driver of its own
on a volume group of its own, so each sees only its own volumes and the VM's two processors
both work. Progress goes to stdout (the host streams it); the verdict goes to results.json in the
shared output directory.

lvm2 is told not to rely on udev (testkit/lvmconf.py): it creates the device nodes itself.
"""

from __future__ import annotations

import argparse
import os
import queue
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout: testkit

from results import GUEST_UP_MARKER, Counts, Results, Step, junit_counts
from sanity import SanityRun, lvs_in, remove_leftovers, run_sanity

from testkit.lvmconf import LVM_CONF_WITHOUT_UDEV

STATE = Path("/run/csi-vm")
SEARCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MODULES = ("dm_mod", "dm_thin_pool", "dm_snapshot", "dm_raid", "raid1", "dm_mirror", "xfs", "loop")


class SetupError(Exception):
    """The guest cannot provide what the lane needs; the message says what is missing."""


def log(message: str) -> None:
    print(f"csi-vm: {message}", flush=True)


def sh(
    argv: Sequence[str], env: Mapping[str, str], *, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(argv), env=dict(env), capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise SetupError(
            f"{' '.join(argv)} exited with {proc.returncode}: {proc.stderr.strip()[-2000:]}"
        )
    return proc


def uptime() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


def root_fstype() -> str:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == "/":
            return fields[2]
    return "?"


def extra_disks(count: int, size_bytes: int) -> list[str]:
    """The lane's blank disks: virtio disks of the size the host made them, sorted by name."""
    found = []
    for block in sorted(Path("/sys/block").iterdir()):
        if not (block.name.startswith("vd") or block.name.startswith("sd")):
            continue
        sectors = int((block / "size").read_text())
        if sectors * 512 == size_bytes:
            found.append(f"/dev/{block.name}")
    if len(found) != count:
        listing = ", ".join(p.name for p in sorted(Path("/sys/block").iterdir()))
        raise SetupError(
            f"expected {count} extra disks of {size_bytes} bytes, found {found} (block devices:"
            f" {listing})"
        )
    return found


def freeze_checkout(root: Path, snapshot: Path, env: Mapping[str, str]) -> None:
    """Bind-mounts the host's launch-time copies over the checkout, so edits made on the host
    while the lane runs neither leak into it nor break it (the guest caches the host's files,
    and a replaced file would read as ESTALE)."""
    for copy in sorted(snapshot.iterdir()):
        sh(["mount", "--bind", str(copy), str(root / copy.name)], env)


class Guest:
    """Sets up and tears down the storage the VM tests run against."""

    def __init__(self, args: argparse.Namespace, env: dict[str, str]) -> None:
        self.args = args
        self.env = env
        self.vg: str = args.vg
        self.thinpool: str = args.thinpool
        self.pvs: list[str] = []
        self.spare: str = ""
        #: one blank disk per csi-sanity run beyond the first, each made a VG of its own
        self.sanity_disks: list[str] = []
        self.vgs_created: list[str] = []
        self.xfs_mount: Path | None = None

    def setup(self) -> str:
        for module in MODULES:
            sh(["modprobe", module], self.env)
        if not Path("/sys/class/misc/device-mapper").exists():
            raise SetupError("no /sys/class/misc/device-mapper after modprobe dm_mod")
        filesystems = Path("/proc/filesystems").read_text()
        if "\txfs\n" not in filesystems:
            raise SetupError("the guest kernel has no xfs in /proc/filesystems")
        self._configure_lvm()
        disks = extra_disks(self.args.disks, self.args.disk_bytes)
        self.pvs, self.spare, self.sanity_disks = disks[:2], disks[2], disks[3:]
        for disk in disks:
            probe = sh(["blkid", "-p", disk], self.env, check=False)
            if probe.returncode != 2:
                raise SetupError(f"{disk} is not blank: {probe.stdout.strip()}")
        sh(["pvcreate", "-y", *self.pvs], self.env)
        sh(["vgcreate", self.vg, *self.pvs], self.env)
        self.vgs_created.append(self.vg)
        # Striped over both PVs so each keeps room for striped and raid1 volumes.
        sh(
            [
                "lvcreate",
                "-y",
                "--type",
                "thin-pool",
                "-i",
                "2",
                "-L",
                self.args.thinpool_size,
                "-n",
                self.thinpool,
                self.vg,
            ],
            self.env,
        )
        self._check_device_nodes()
        self._check_xfs_project_quota()
        vgs = sh(
            ["vgs", "--noheadings", "--units", "m", "-o", "vg_name,vg_size,vg_free", self.vg],
            self.env,
        ).stdout.split()
        return (
            f"VG {self.vg} on {' '.join(self.pvs)} (size {vgs[1]}, free {vgs[2]}), thin pool"
            f" {self.thinpool} {self.args.thinpool_size}, spare disk {self.spare}"
        )

    def sanity_vgs(self, wanted: int) -> list[str]:
        """Up to ``wanted`` volume groups for csi-sanity runs side by side: the lane's VG, then
        one VG per sanity disk, each with a thin pool named like the lane's."""
        vgs = [self.vg]
        for i, disk in enumerate(self.sanity_disks[: max(0, wanted - 1)], start=1):
            vg = f"{self.vg}{i}"
            sh(["pvcreate", "-y", disk], self.env)
            sh(["vgcreate", vg, disk], self.env)
            self.vgs_created.append(vg)
            size = self.args.thinpool_size
            sh(
                ["lvcreate", "-y", "--type", "thin-pool", "-L", size, "-n", self.thinpool, vg],
                self.env,
            )
            vgs.append(vg)
        return vgs

    def _configure_lvm(self) -> None:
        conf_dir = Path("/etc/lvm")
        try:
            conf_dir.mkdir(parents=True, exist_ok=True)
            (conf_dir / "lvm.conf").write_text(LVM_CONF_WITHOUT_UDEV)
        except OSError:
            # /etc/lvm read-only: point every lvm2 call of this process tree elsewhere.
            conf_dir = STATE / "lvm"
            conf_dir.mkdir(parents=True, exist_ok=True)
            (conf_dir / "lvm.conf").write_text(LVM_CONF_WITHOUT_UDEV)
            self.env["LVM_SYSTEM_DIR"] = str(conf_dir)
        log(f"lvm2 configured without udev ({conf_dir}/lvm.conf)")

    def _check_device_nodes(self) -> None:
        probe = "csivm-probe"
        sh(
            ["lvcreate", "-y", "-V", "16M", "-T", f"{self.vg}/{self.thinpool}", "-n", probe],
            self.env,
        )
        node = Path(f"/dev/{self.vg}/{probe}")
        if not node.exists():
            sh(["vgmknodes", self.vg], self.env, check=False)
        try:
            if not node.is_block_device():
                raise SetupError(f"lvcreate made no device node {node} (no udev in the guest)")
            sh(["mkfs.ext4", "-q", str(node)], self.env)
        finally:
            sh(["lvremove", "-y", f"{self.vg}/{probe}"], self.env)

    def _check_xfs_project_quota(self) -> None:
        """Project quotas enforced on a real XFS mount: the reason the hostpath quota tests
        need this kernel. Done on the spare disk, which is wiped again afterwards."""
        mnt = STATE / "xfs-check"
        mnt.mkdir(parents=True, exist_ok=True)
        sh(["mkfs.xfs", "-q", "-f", self.spare], self.env)
        sh(["mount", "-o", "prjquota", self.spare, str(mnt)], self.env)
        try:
            state = sh(["xfs_quota", "-x", "-c", "state -p", str(mnt)], self.env).stdout
            if "Enforcement: ON" not in state:
                raise SetupError(f"xfs project quota not enforced on {self.spare}:\n{state}")
        finally:
            sh(["umount", str(mnt)], self.env)
            sh(["wipefs", "-a", "-q", self.spare], self.env)

    def hostpath_root(self) -> Path:
        """A fresh directory on the spare disk, XFS mounted with project quotas, for the
        hostpath backend (its quota code only works on such a mount)."""
        if self.xfs_mount is None:
            mnt = STATE / "hostpath-xfs"
            mnt.mkdir(parents=True, exist_ok=True)
            sh(["mkfs.xfs", "-q", "-f", self.spare], self.env)
            sh(["mount", "-o", "prjquota", self.spare, str(mnt)], self.env)
            self.xfs_mount = mnt
        root = Path(tempfile.mkdtemp(prefix="root-", dir=self.xfs_mount))
        return root

    def test_env(self) -> dict[str, str]:
        env = dict(self.env)
        env.update(
            CSI_VM_LANE="1",
            CSI_TEST_VG=self.vg,
            CSI_TEST_THINPOOL=self.thinpool,
            CSI_TEST_PVS=" ".join(self.pvs),
            CSI_TEST_SPARE_DISK=self.spare,
            CSI_TEST_LVM_UDEV="0",
            CSI_TOOLS_BIN=self.args.tools_bin,
            CSI_TEST_DRIVER_START_TIMEOUT="180",
        )
        return env

    def teardown(self) -> str:
        """Removes the VG and wipes the disks; what could not be removed is reported."""
        problems = []
        if self.xfs_mount is not None:
            if sh(["umount", str(self.xfs_mount)], self.env, check=False).returncode != 0:
                problems.append(f"umount {self.xfs_mount} failed")
            sh(["wipefs", "-a", "-q", self.spare], self.env, check=False)
        for vg in reversed(self.vgs_created):
            remove_leftovers(vg, keep=(), env=self.env)
            if sh(["vgremove", "-f", "-y", vg], self.env, check=False).returncode != 0:
                problems.append(f"vgremove {vg} failed")
        if self.pvs:
            sh(["pvremove", "-ff", "-y", *self.pvs, *self.sanity_disks], self.env, check=False)
        left = sh(["dmsetup", "ls"], self.env, check=False).stdout.strip()
        if left and "No devices found" not in left:
            problems.append(f"device-mapper devices left: {left}")
        return "; ".join(problems)


def run_pytest(guest: Guest, args: argparse.Namespace) -> Step:
    out = Path(args.out)
    report = out / "vm-pytest.xml"
    argv = [
        f"{args.root}/.venv/bin/pytest",
        "tests/vm",
        "-v",
        "-rfEsP",
        "--durations=12",
        "-p",
        "no:cacheprovider",
        f"--junitxml={report}",
        *args.pytest_args,
    ]
    log(f"pytest: {' '.join(argv)}")
    t0 = time.monotonic()
    try:
        rc = subprocess.run(
            argv,
            cwd=args.root,
            env=guest.test_env(),
            stdin=subprocess.DEVNULL,
            timeout=args.pytest_timeout,
            check=False,
        ).returncode
        detail = f"pytest exited with {rc}"
    except subprocess.TimeoutExpired:
        rc, detail = -1, f"pytest timed out after {args.pytest_timeout} s"
    counts = junit_counts(report) or Counts()
    ok = rc == 0 and counts.failed == 0 and counts.passed > 0
    leftovers = lvs_in(guest.vg, guest.env, keep=(guest.thinpool,))
    if leftovers:
        ok = False
        detail += f"; tests/vm left LVs behind: {', '.join(leftovers)}"
        remove_leftovers(guest.vg, keep=(guest.thinpool,), env=guest.env)
    return Step("pytest tests/vm", ok, time.monotonic() - t0, detail, counts)


def run_sanity_side_by_side(
    guest: Guest, args: argparse.Namespace, sanity_args: list[str]
) -> list[Step]:
    """Every csi-sanity run asked for. The lvm runs go side by side, one per volume group
    (a run takes a VG from the pool and gives it back empty: run_sanity removes leftovers);
    hostpath runs share the one XFS filesystem (project ids, free space), so they go one
    after the other, once the lvm runs are done."""
    combos = [
        (backend, access_type)
        for backend in args.sanity_backends.split(",")
        if backend
        for access_type in args.sanity_types.split(",")
        if access_type
    ]
    lvm_runs = [c for c in combos if c[0] != "hostpath"]
    t0 = time.monotonic()
    vgs: queue.Queue[str] = queue.Queue()
    try:
        for vg in guest.sanity_vgs(len(lvm_runs)):
            vgs.put(vg)
        hostpath_roots = {c: guest.hostpath_root() for c in combos if c[0] == "hostpath"}
    except (SetupError, subprocess.TimeoutExpired, OSError) as exc:
        return [Step("csi-sanity setup", False, time.monotonic() - t0, str(exc))]

    def one(combo: tuple[str, str], vg: str) -> Step:
        backend, access_type = combo
        run = SanityRun(
            backend=backend,
            access_type=access_type,
            root=Path(args.root),
            out=Path(args.out),
            state=STATE / f"sanity-{backend}-{access_type}",
            csi_sanity=args.csi_sanity,
            vg=vg,
            thinpool=guest.thinpool,
            extra_args=sanity_args,
            min_passed=args.sanity_min_passed if not sanity_args else 1,
            timeout=args.sanity_timeout,
            hostpath_root=hostpath_roots.get(combo),
        )
        return run_sanity(run, guest.test_env())

    def on_a_vg(combo: tuple[str, str]) -> Step:
        vg = vgs.get()
        try:
            return one(combo, vg)
        finally:
            vgs.put(vg)

    steps: dict[tuple[str, str], Step] = {}
    if lvm_runs:
        with ThreadPoolExecutor(max_workers=vgs.qsize()) as pool:
            steps.update(zip(lvm_runs, pool.map(on_a_vg, lvm_runs), strict=True))
    for combo in combos:
        if combo not in steps:
            steps[combo] = one(combo, guest.vg)
    return [steps[c] for c in combos]


def main(argv: Sequence[str] | None = None) -> int:
    os.dup2(1, 2)  # one console stream: stderr on its own port arrives out of order
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", required=True, help="the checkout (shared from the host)")
    parser.add_argument("--out", required=True, help="shared read-write output directory")
    parser.add_argument("--snapshot", required=True, help="copies of checkout directories")
    parser.add_argument("--only", choices=("all", "setup", "pytest", "sanity"), default="all")
    parser.add_argument("--vg", default="csitest")
    parser.add_argument("--thinpool", default="thinpool")
    parser.add_argument("--thinpool-size", default="1536M")
    parser.add_argument("--disks", type=int, default=4)
    parser.add_argument("--disk-bytes", type=int, required=True)
    parser.add_argument("--csi-sanity", default="")
    parser.add_argument("--sanity-types", default="mount,block")
    parser.add_argument("--sanity-backends", default="lvm", help="lvm and/or hostpath")
    parser.add_argument("--sanity-min-passed", type=int, default=80)
    parser.add_argument("--tools-bin", default="", help="helm and prometheus for the tests")
    parser.add_argument("--pytest-timeout", type=float, default=1800)
    # per run; two runs share the VM's processors
    parser.add_argument("--sanity-timeout", type=float, default=1800)
    parser.add_argument("extra", nargs="*", help="arguments for pytest (or csi-sanity)")
    args = parser.parse_args(argv)
    args.pytest_args = args.extra if args.only != "sanity" else []
    sanity_args = args.extra if args.only == "sanity" else []

    out = Path(args.out)
    results = Results(guest_uptime_at_start=uptime())
    results.write(out)
    print(
        f"{GUEST_UP_MARKER} after {results.guest_uptime_at_start:.1f} s of guest uptime,"
        f" kernel {os.uname().release}, host filesystem over {root_fstype()}",
        flush=True,
    )
    STATE.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CSI_")}
    env.update(
        PATH=SEARCH_PATH,
        PYTHONDONTWRITEBYTECODE="1",
        LVM_SUPPRESS_FD_WARNINGS="1",
        LC_ALL="C.UTF-8",
        HOME=str(STATE),
        TMPDIR="/tmp",
    )
    guest = Guest(args, env)
    t0 = time.monotonic()
    try:
        try:
            freeze_checkout(Path(args.root), Path(args.snapshot), env)
            detail = guest.setup()
            results.steps.append(Step("setup", True, time.monotonic() - t0, detail))
            log(f"setup done in {time.monotonic() - t0:.1f} s: {detail}")
        except (SetupError, subprocess.TimeoutExpired, OSError) as exc:
            results.steps.append(Step("setup", False, time.monotonic() - t0, str(exc)))
            log(f"SETUP FAILED: {exc}")
            return 1
        results.write(out)
        # one after the other: csi-sanity beside pytest starved the drivers' starts in the
        # emulated guest (more than 60 s each) while the host lane ran beside the VM
        if args.only in ("all", "pytest"):
            results.steps.append(run_pytest(guest, args))
            results.write(out)
        if args.only in ("all", "sanity"):
            results.steps.extend(run_sanity_side_by_side(guest, args, sanity_args))
            results.write(out)
    finally:
        t1 = time.monotonic()
        problems = guest.teardown()
        results.steps.append(Step("teardown", not problems, time.monotonic() - t1, problems))
        results.finished = True
        results.write(out)
        for step in results.steps:
            line = step.counts.line(step.name) if step.counts else step.name
            log(
                f"{'ok  ' if step.ok else 'FAIL'} {line} ({step.seconds:.0f} s)"
                + (f": {step.detail}" if step.detail and not step.ok else "")
            )
        sys.stdout.flush()
    return 0 if results.ok else 1


if __name__ == "__main__":
    sys.exit(main())
