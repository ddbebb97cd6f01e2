"""Running virtme-ng VMs from the host: the kernel to boot, and killing and reaping a VM's
whole process session (vng, virtme-run, qemu, virtiofsd) however it ends. Used by the VM lane
(scripts/vm/launch.py) and the e2e lane's lvm node (tests/e2e/vmnode.py)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36

# qemu's notes that vng attaches raw images without naming the format: true and harmless.
QEMU_NOISE = (
    "Image format was not specified",
    "Automatically detecting the format is dangerous",
    "Specify the 'raw' format explicitly",
)


def newest_kernel() -> Path:
    """The newest /boot/vmlinuz-* whose modules are installed (Debian's, from
    linux-image-amd64); the host's own kernel may lack device-mapper and quotas."""
    candidates = []
    for image in Path("/boot").glob("vmlinuz-*"):
        version = image.name.removeprefix("vmlinuz-")
        if (Path("/lib/modules") / version / "kernel/drivers/md").is_dir():
            candidates.append(image)
    if not candidates:
        raise RuntimeError("no /boot/vmlinuz-* with modules: run scripts/install-vm.sh")
    proc = subprocess.run(
        ["linux-version", "sort", *[c.name[8:] for c in candidates]],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode == 0 and proc.stdout.split():
        return Path("/boot") / f"vmlinuz-{proc.stdout.split()[-1]}"
    return sorted(candidates)[-1]


def session_processes(sid: int, zombies: bool = False) -> list[int]:
    """Pids still in the session the VM was started in (vng, virtme-run, qemu, virtiofsd)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields after "(comm)": state ppid pgrp session ...; a zombie is already dead
        if int(fields[3]) == sid and (zombies or fields[0] != "Z"):
            pids.append(int(stat.parent.name))
    return pids


def become_subreaper() -> None:
    """Orphans of the VM (qemu, virtiofsd once vng is gone) get reparented to this process,
    which reaps them, instead of lingering as zombies until PID 1 gets round to it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def reap(sid: int) -> None:
    """Reaps the session's zombies that were reparented here, but never the session leader
    (vng itself), whose exit status Popen.wait() still has to collect."""
    me = os.getpid()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        if fields[0] == "Z" and int(fields[1]) == me and int(fields[3]) == sid and pid != sid:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


def kill_session(sid: int) -> list[int]:
    """SIGTERM, then SIGKILL, every process of the VM's session; returns the survivors."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        pids = session_processes(sid)
        if not pids:
            return []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and session_processes(sid):
            reap(sid)
            time.sleep(0.1)
        reap(sid)
    return session_processes(sid)
