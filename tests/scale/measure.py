"""What the scale lane reads from the machine, the apiserver and the drivers' roots.

Processes: RSS (``VmRSS``) and CPU seconds (``utime + stime``) from ``/proc``. The machine: busy
share of all CPUs from ``/proc/stat`` and the load average. The apiserver: its own ``/metrics``
counters, summed by label (the provisioners' requests are the series of their FlowSchema). A
node's allocated bytes and volumes: its root's own state (``state.db``, read-only) and the
``volumes`` directory, not what the driver or the API say.
"""

from __future__ import annotations

import re
import sqlite3
import ssl
import statistics
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLOCK_TICKS = 100
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


# ----------------------------------------------------------------------------- processes


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # utime and stime are the 14th and 15th fields; fields[0] here is the 3rd (state).
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot."""
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + parts[4]
    total = sum(parts[:8])
    return float(total - idle), float(total)


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def summary(values: Iterable[float]) -> dict[str, float]:
    v = sorted(values)
    if not v:
        return {"n": 0}
    return {
        "n": len(v),
        "min": round(v[0], 1),
        "median": round(statistics.median(v), 1),
        "max": round(v[-1], 1),
        "sum": round(sum(v), 1),
    }


@dataclass
class Sampler:
    """Samples the RSS of process groups and the load average every few seconds in a thread,
    keeping each process's peak."""

    groups: Callable[[], dict[str, list[int]]]
    every: float = 5.0
    peak_rss: dict[str, dict[int, int]] = field(default_factory=lambda: defaultdict(dict))
    peak_load: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, name="scale-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def sample(self) -> None:
        self.peak_load = max(self.peak_load, loadavg())
        for group, pids in self.groups().items():
            peaks = self.peak_rss[group]
            for pid in pids:
                peaks[pid] = max(peaks.get(pid, 0), rss_bytes(pid))


@dataclass
class CpuWindow:
    """CPU seconds of each process group, and the machine's busy share, over a window."""

    groups: Callable[[], dict[str, list[int]]]
    start: dict[str, float] = field(default_factory=dict)
    machine_start: tuple[float, float] = (0.0, 0.0)
    t0: float = 0.0

    def begin(self) -> None:
        self.t0 = time.monotonic()
        self.machine_start = machine_cpu()
        self.start = {g: sum(cpu_seconds(p) for p in pids) for g, pids in self.groups().items()}

    def end(self) -> dict[str, Any]:
        seconds = time.monotonic() - self.t0
        busy, total = machine_cpu()
        b0, t0 = self.machine_start
        used = {
            g: round(sum(cpu_seconds(p) for p in pids) - self.start.get(g, 0.0), 1)
            for g, pids in self.groups().items()
        }
        return {
            "seconds": round(seconds, 1),
            "machine_busy_share": round((busy - b0) / max(1.0, total - t0), 3),
            "cpu_seconds": used,
            "cores_used": {g: round(s / max(seconds, 1e-3), 2) for g, s in used.items()},
        }


# ----------------------------------------------------------------------------- apiserver


def scrape(url: str, ca: Path | None, cert: Path, key: Path) -> str:
    """A /metrics page over TLS with a client certificate; ``ca`` None: a component on this
    host serving its own self-signed certificate (kube-controller-manager's)."""
    ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
    if ca is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(str(cert), str(key))
    with urllib.request.urlopen(url, context=ctx, timeout=60) as resp:
        return str(resp.read().decode())


def counter_sums(text: str, metric: str, by: str) -> dict[str, float]:
    """The metric's samples summed by one label."""
    sums: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None or m.group(1) != metric:
            continue
        labels = dict(_LABEL.findall(m.group(2) or ""))
        sums[labels.get(by, "")] += float(m.group(3))
    return dict(sums)


def rates(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    keys = set(before) | set(after)
    return {
        k: round((after.get(k, 0.0) - before.get(k, 0.0)) / max(seconds, 1e-3), 2)
        for k in sorted(keys)
    }


# ----------------------------------------------------------------------------- roots


@dataclass(frozen=True)
class RootState:
    allocated: int
    volumes: int
    entries: int


def root_state(root: Path) -> RootState:
    """What the root itself holds: the state database's allocated total and volume rows
    (read-only, beside the running driver), and the entries of its volumes directory."""
    db = sqlite3.connect(f"file:{root / 'state.db'}?mode=ro", uri=True, timeout=30)
    try:
        allocated = int(db.execute("SELECT bytes FROM allocated WHERE id = 1").fetchone()[0])
        volumes = int(db.execute("SELECT count(*) FROM volumes").fetchone()[0])
    finally:
        db.close()
    vol_dir = root / "volumes"
    entries = len(list(vol_dir.iterdir())) if vol_dir.exists() else 0
    return RootState(allocated, volumes, entries)


# ----------------------------------------------------------------------------- output


def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"
