"""What the e2e cluster changes on the host outside its work directory, and how to undo it.

The cluster runs as plain background processes, so teardown must remove by hand what they
leave behind: processes (containerd's shims and the containers under them are not children of
anything we started), mounts (kubelet volumes, overlay rootfs, network namespaces), cgroups,
the CNI bridge, loop devices and the iptables rules that the kubelet and we add. Snapshots
taken before start make the cleanup remove only what appeared during the run.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

IPTABLES_TABLES = ("filter", "nat", "mangle")


# ----------------------------------------------------------------------------- processes


@dataclass
class Daemon:
    """A background process with its own session and a log file."""

    name: str
    argv: Sequence[str]
    log: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            out.write(f"+ {shlex.join(self.argv)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                list(self.argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=self.env,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def require_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.proc.returncode}; last log lines:\n"
                + tail(self.log)
            )

    def stop(self, grace: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"({path}: {exc})"


def pids_matching(predicate: Iterable[str], exe_name: str) -> list[int]:
    """Pids of processes named exe_name whose command line contains every given string."""
    wanted = list(predicate)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not cmdline or Path(cmdline[0].decode(errors="replace")).name != exe_name:
            continue
        text = " ".join(c.decode(errors="replace") for c in cmdline)
        if all(w in text for w in wanted):
            found.append(int(entry.name))
    return found


def kill_pids(pids: Iterable[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# ----------------------------------------------------------------------------- mounts


def mount_points() -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        # The mount point is field 5; octal escapes stand for spaces and the like.
        raw = line.split(" ")[4]
        points.append(raw.encode().decode("unicode_escape"))
    return points


def unmount_under(prefixes: Sequence[str]) -> list[str]:
    """Unmount every mount at or below the prefixes, deepest first; return what stayed."""

    def under(point: str) -> bool:
        return any(point == p or point.startswith(p.rstrip("/") + "/") for p in prefixes)

    for _ in range(5):
        points = [p for p in mount_points() if under(p)]
        if not points:
            return []
        for point in sorted(set(points), key=lambda p: (-p.count("/"), p)):
            res = subprocess.run(["umount", point], capture_output=True, timeout=60)
            if res.returncode != 0:
                subprocess.run(["umount", "-l", point], capture_output=True, timeout=60)
    return [p for p in mount_points() if under(p)]


# ----------------------------------------------------------------------------- loop devices


def detach_loops_under(prefix: str) -> None:
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            target = backing.read_text().strip()
        except OSError:
            continue
        if target.startswith(prefix.rstrip("/") + "/"):
            dev = f"/dev/{backing.parent.parent.name}"
            subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=60)


# ----------------------------------------------------------------------------- network


def list_dir(path: str) -> set[str]:
    try:
        return set(os.listdir(path))
    except FileNotFoundError:
        return set()


def tree(path: str) -> set[str] | None:
    """Every path below path (path excluded), or None when path does not exist."""
    if not os.path.lexists(path):
        return None
    found: set[str] = set()
    for dirpath, dirs, files in os.walk(path):
        found.update(os.path.join(dirpath, d) for d in dirs)
        found.update(os.path.join(dirpath, f) for f in files)
    return found


def delete_link(name: str) -> None:
    if Path(f"/sys/class/net/{name}").exists():
        subprocess.run(["ip", "link", "delete", name], capture_output=True, timeout=30)


@dataclass(frozen=True)
class IptablesSnapshot:
    """Chains and rules per (command, table) before the cluster started."""

    rules: dict[tuple[str, str], frozenset[str]]
    chains: dict[tuple[str, str], frozenset[str]]


def _save(cmd: str, table: str) -> tuple[set[str], set[str]]:
    res = subprocess.run([f"{cmd}-save", "-t", table], capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        return set(), set()
    chains = {ln[1:].split()[0] for ln in res.stdout.splitlines() if ln.startswith(":")}
    rules = {ln for ln in res.stdout.splitlines() if ln.startswith("-A ")}
    return chains, rules


def iptables_commands() -> list[str]:
    return [c for c in ("iptables", "ip6tables") if _which(f"{c}-save")]


def _which(name: str) -> bool:
    return any((Path(d) / name).exists() for d in os.environ.get("PATH", "").split(":") if d)


def iptables_snapshot() -> IptablesSnapshot:
    rules, chains = {}, {}
    for cmd in iptables_commands():
        for table in IPTABLES_TABLES:
            c, r = _save(cmd, table)
            chains[(cmd, table)] = frozenset(c)
            rules[(cmd, table)] = frozenset(r)
    return IptablesSnapshot(rules, chains)


def iptables_restore(before: IptablesSnapshot) -> list[str]:
    """Delete the rules and chains that appeared since the snapshot; return what failed."""
    failed = []
    for cmd in iptables_commands():
        for table in IPTABLES_TABLES:
            old_chains = before.chains.get((cmd, table), frozenset())
            old_rules = before.rules.get((cmd, table), frozenset())
            chains, rules = _save(cmd, table)
            new_chains = chains - old_chains
            # Rules in chains that existed before: delete them one by one.
            for rule in sorted(rules - old_rules):
                parts = shlex.split(rule)
                if parts[1] in new_chains:
                    continue
                res = subprocess.run(
                    [cmd, "-w", "-t", table, "-D", *parts[1:]], capture_output=True, timeout=60
                )
                if res.returncode != 0:
                    failed.append(f"{cmd} -t {table} {rule}")
            for chain in new_chains:
                subprocess.run(
                    [cmd, "-w", "-t", table, "-F", chain], capture_output=True, timeout=60
                )
            for chain in new_chains:
                res = subprocess.run(
                    [cmd, "-w", "-t", table, "-X", chain], capture_output=True, timeout=60
                )
                if res.returncode != 0:
                    failed.append(f"{cmd} -t {table} -X {chain}")
    return failed


# ----------------------------------------------------------------------------- cgroups


def cgroup_hierarchies() -> list[Path]:
    """Every mounted cgroup hierarchy: v1 controllers, named v1 ones and the v2 one (runc joins
    all of them on a hybrid host)."""
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        point, fstype = line.split()[1:3]
        if fstype in ("cgroup", "cgroup2"):
            found.append(Path(point))
    return found


def create_cgroup(name: str) -> None:
    """mkdir the cgroup in every hierarchy; cpuset needs cpus and mems before tasks join."""
    for hierarchy in cgroup_hierarchies():
        path = hierarchy / name
        path.mkdir(exist_ok=True)
        for knob in ("cpuset.cpus", "cpuset.mems"):
            own, parent = path / knob, hierarchy / knob
            if own.exists() and not own.read_text().strip():
                own.write_text(parent.read_text())


def remove_cgroup(name: str) -> list[str]:
    """Kill every process in the cgroup subtrees and remove them; return what stayed."""
    left = []
    for hierarchy in cgroup_hierarchies():
        top = hierarchy / name
        if not top.exists():
            continue
        dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        dirs.append(top)
        for _ in range(20):
            pids = set()
            for d in dirs:
                with contextlib.suppress(OSError):
                    pids |= {int(x) for x in (d / "cgroup.procs").read_text().split()}
            if not pids:
                break
            kill_pids(pids)
            time.sleep(0.5)
        for d in dirs:
            try:
                d.rmdir()
            except OSError:
                if d.exists():
                    left.append(str(d))
    return left
