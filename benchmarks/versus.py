"""This driver side by side with the reference hostpath driver, under one client, in one run.

The reference is kubernetes-csi's ``hostpathplugin`` (Go), built offline from its release
source (``scripts/install-sidecars.sh hostpathplugin``). Both drivers run as real processes on
their own unix sockets and their own state directories under one temporary directory; one
client speaks to both. Sequential measurements are interleaved call by call (A then B, then B
then A), so a change in the machine's load hits both alike; concurrent measurements alternate
whole rounds. What it reports, for each driver and as the ratio this driver / reference:

* start to ready: from exec until the first Probe answers ready (median of ``--starts``);
* idle RSS after that start;
* CreateVolume + DeleteVolume pair latency (p50, p95) with each of ``--sizes`` volumes present,
  and the driver's CPU per pair (its own and its children's, from /proc);
* pairs per second with ``--clients`` concurrent clients, each on its own channel;
* ListVolumes: every page of ``--page-size`` through all volumes at the largest size (the
  reference does not page: it is asked once and what it answers is reported), and one reply of
  all of them at each size up to 1,000 and at the largest;
* NodePublishVolume + NodeUnpublishVolume of a staged mount volume (root only: real bind mounts).

``--alone`` runs this driver only (where the reference cannot be built). ``--smoke`` is a
seconds-long run of every step that ``make test`` uses so the benchmark cannot rot; its numbers
mean nothing. It is a benchmark, not a test: nothing here asserts a timing.

Run: ``scripts/bench.sh`` (``make bench``), or ``.venv/bin/python -m benchmarks.versus --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import grpc

from benchmarks.harness import DriverProcess, clean_up_host, render_table, write_results
from benchmarks.rpc_latency import create_request, mount_cap, percentile
from csi_driver import __version__
from csi_driver.proto import csi_pb2, csi_pb2_grpc

RPC_TIMEOUT = 60.0
START_TIMEOUT = 60.0
POLL = 0.001
IDLE_SECONDS = 2.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
DEFAULT_REFERENCE = (
    Path(os.environ.get("CSI_CACHE_DIR", Path.home() / ".cache" / "nodelocal-csi"))
    / "bin"
    / "hostpathplugin"
)
OURS = "nodelocal"
REFERENCE = "reference"


class Contender:
    """One driver as a process: how to start it, where it listens, what it costs."""

    name: str

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def socket(self) -> Path:
        return self.workdir / "csi.sock"

    @property
    def target(self) -> str:
        return f"unix://{self.socket}"

    @property
    def log(self) -> Path:
        return self.workdir / "driver.log"

    @property
    def kubelet_dir(self) -> Path:
        return self.workdir / "kubelet"

    def argv(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> float:
        """Exec the driver; return the seconds until its first Probe answered ready."""
        assert self.process is None, f"{self.name} is already running"
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        with open(self.log, "ab") as log:
            t0 = time.perf_counter()
            self.process = subprocess.Popen(
                self.argv(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            deadline = t0 + START_TIMEOUT
            with grpc.insecure_channel(self.target) as channel:
                probe = csi_pb2_grpc.IdentityStub(channel).Probe
                while time.perf_counter() < deadline:
                    if self.process.poll() is not None:
                        break
                    if self.socket.exists():
                        with contextlib.suppress(grpc.RpcError):
                            reply = probe(csi_pb2.ProbeRequest(), timeout=1)
                            # An unset `ready` means ready (CSI spec).
                            if not reply.HasField("ready") or reply.ready.value:
                                return time.perf_counter() - t0
                    time.sleep(POLL)
        tail = self.log.read_text(errors="replace").splitlines()[-30:]
        self.stop()
        raise RuntimeError(f"{self.name} did not become ready:\n" + "\n".join(tail))

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=30)

    def cpu_seconds(self) -> float:
        """CPU used so far by the driver's live threads (to the nanosecond, from each one's
        schedstat; /proc's stat counts in ticks of 10 ms) and its waited-for children."""
        assert self.process is not None
        proc = f"/proc/{self.process.pid}"
        ns = 0
        for task in os.listdir(f"{proc}/task"):
            with (
                contextlib.suppress(FileNotFoundError, ProcessLookupError),
                open(f"{proc}/task/{task}/schedstat") as f,
            ):
                ns += int(f.read().split()[0])
        with open(f"{proc}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        # cutime and cstime are fields 16 and 17; fields[0] here is field 3.
        return ns / 1e9 + (int(fields[13]) + int(fields[14])) / CLK_TCK

    def rss_bytes(self) -> int:
        assert self.process is not None
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    @contextlib.contextmanager
    def stubs(self) -> Iterator[Stubs]:
        channel = grpc.insecure_channel(self.target)
        try:
            yield Stubs(channel)
        finally:
            channel.close()


class Ours(Contender):
    name = OURS

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        # The argv the tests and the other benchmarks use: hostpath backend, metrics on (as the
        # chart deploys it), warning-level logs.
        self._driver = DriverProcess(workdir)

    def argv(self) -> list[str]:
        self._driver.root.mkdir(parents=True, exist_ok=True)
        return self._driver.argv()  # its kubelet directory is the workdir, above ours


class Reference(Contender):
    name = REFERENCE

    def __init__(self, workdir: Path, binary: Path) -> None:
        super().__init__(workdir)
        self.binary = binary

    def argv(self) -> list[str]:
        state = self.workdir / "state"
        state.mkdir(exist_ok=True)
        return [
            str(self.binary),
            f"--endpoint={self.target}",
            "--nodeid=bench-node",
            f"--statedir={state}",
            "--v=0",
        ]


@dataclass
class Stubs:
    channel: grpc.Channel
    controller: csi_pb2_grpc.ControllerStub = field(init=False)
    node: csi_pb2_grpc.NodeStub = field(init=False)

    def __post_init__(self) -> None:
        self.controller = csi_pb2_grpc.ControllerStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)

    def pair(self, name: str, size: int) -> None:
        reply = self.controller.CreateVolume(create_request(name, size=size), timeout=RPC_TIMEOUT)
        self.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=reply.volume.volume_id), timeout=RPC_TIMEOUT
        )

    def create(self, name: str, size: int) -> str:
        reply = self.controller.CreateVolume(create_request(name, size=size), timeout=RPC_TIMEOUT)
        return str(reply.volume.volume_id)

    def delete(self, volume_id: str) -> None:
        self.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=volume_id), timeout=RPC_TIMEOUT
        )

    def list_page(self, max_entries: int, token: str) -> csi_pb2.ListVolumesResponse:
        reply: csi_pb2.ListVolumesResponse = self.controller.ListVolumes(
            csi_pb2.ListVolumesRequest(max_entries=max_entries, starting_token=token),
            timeout=RPC_TIMEOUT,
        )
        return reply


@dataclass
class Row:
    """One line of the table: a metric measured on each driver."""

    metric: str
    unit: str
    values: dict[str, float | str | None]
    lower_is_better: bool = True

    def ratio(self) -> float | None:
        ours, ref = self.values.get(OURS), self.values.get(REFERENCE)
        if isinstance(ours, int | float) and isinstance(ref, int | float) and ref:
            return round(ours / ref, 2)
        return None


def interleaved(
    drivers: Sequence[tuple[Contender, Stubs]],
    rounds: int,
    call: Callable[[Contender, Stubs, int], object],
) -> dict[str, list[float]]:
    """``rounds`` timed calls on each driver, alternating which goes first."""
    seconds: dict[str, list[float]] = {c.name: [] for c, _ in drivers}
    for i in range(rounds):
        order = drivers if i % 2 == 0 else list(reversed(drivers))
        for contender, stubs in order:
            t0 = time.perf_counter()
            call(contender, stubs, i)
            seconds[contender.name].append(time.perf_counter() - t0)
    return seconds


def ms(values: Sequence[float], p: float | None = None) -> float:
    v = statistics.median(values) if p is None else percentile(values, p)
    return round(v * 1000, 3)


class Run:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.rows: list[Row] = []
        self.notes: list[str] = []

    def contenders(self, phase: str) -> list[Contender]:
        out: list[Contender] = []
        if not self.args.alone:
            out.append(Reference(self.workdir / phase / REFERENCE, self.args.reference))
        out.append(Ours(self.workdir / phase / OURS))
        return out

    def say(self, text: str) -> None:
        print(f"[versus] {text}", flush=True)

    # --- start-up and memory -----------------------------------------------------------------

    def start_up(self) -> None:
        self.say(f"start to ready, {self.args.starts} starts each")
        contenders = self.contenders("start")
        times: dict[str, list[float]] = {c.name: [] for c in contenders}
        rss: dict[str, float | str | None] = {}
        try:
            for i in range(self.args.starts):
                for c in contenders if i % 2 == 0 else reversed(contenders):
                    times[c.name].append(c.start())
                    if i == self.args.starts - 1:
                        time.sleep(IDLE_SECONDS)
                        rss[c.name] = round(c.rss_bytes() / 1e6, 1)
                    c.stop()
        finally:
            for c in contenders:
                c.stop()
        self.rows.append(
            Row("start to ready Probe, median", "ms", {k: ms(v) for k, v in times.items()})
        )
        self.rows.append(Row(f"idle RSS, {IDLE_SECONDS:g} s after start", "MB", rss))

    # --- the controller ----------------------------------------------------------------------

    def controller(self) -> None:
        contenders = self.contenders("controller")
        for c in contenders:
            c.start()
        try:
            with contextlib.ExitStack() as stack:
                drivers = [(c, stack.enter_context(c.stubs())) for c in contenders]
                self._controller(drivers)
                if os.geteuid() == 0 and self.args.node_pairs:
                    self._node(drivers)
                elif self.args.node_pairs:
                    self.notes.append("node publish not measured: needs root (bind mounts)")
        finally:
            for c in contenders:
                c.stop()

    def _controller(self, drivers: list[tuple[Contender, Stubs]]) -> None:
        size = self.args.volume_size
        existing: dict[str, list[str]] = {c.name: [] for c, _ in drivers}
        # Unmeasured warm-up: lazy imports and first-call caches.
        interleaved(drivers, 10, partial(timed_pair, "warm", size))
        sizes = self.args.sizes
        for n in sizes:
            self.say(f"filling to {n} volumes")
            for c, s in drivers:
                have = existing[c.name]
                while len(have) < n:
                    have.append(s.create(f"fill-{len(have):06d}", size))
            self.say(f"{self.args.pairs} create+delete pairs with {n} volumes")
            cpu0 = {c.name: c.cpu_seconds() for c, _ in drivers}
            seconds = interleaved(drivers, self.args.pairs, partial(timed_pair, f"p{n}", size))
            cpu = {
                c.name: round((c.cpu_seconds() - cpu0[c.name]) / self.args.pairs * 1000, 2)
                for c, _ in drivers
            }
            self.rows.append(
                Row(
                    f"CreateVolume+DeleteVolume p50, {n:,} volumes",
                    "ms",
                    {k: ms(v) for k, v in seconds.items()},
                )
            )
            self.rows.append(
                Row(
                    f"CreateVolume+DeleteVolume p95, {n:,} volumes",
                    "ms",
                    {k: ms(v, 95) for k, v in seconds.items()},
                )
            )
            self.rows.append(Row(f"driver CPU per pair, {n:,} volumes", "ms", dict(cpu)))
            if n == sizes[0] and self.args.clients:
                self._concurrent(drivers, n)
            if n <= 1000 or n == sizes[-1]:
                self._list_one_reply(drivers, n)
        self._list_pages(drivers, sizes[-1])
        self.say("deleting every volume")
        for c, s in drivers:
            for volume_id in existing[c.name]:
                s.delete(volume_id)

    def _concurrent(self, drivers: list[tuple[Contender, Stubs]], n: int) -> None:
        clients, duration = self.args.clients, self.args.concurrency_seconds
        self.say(f"{clients} concurrent clients, {duration:g} s rounds")
        rates: dict[str, list[float]] = {c.name: [] for c, _ in drivers}
        for r in range(self.args.concurrency_rounds):
            for c, _ in drivers if r % 2 == 0 else list(reversed(drivers)):
                rates[c.name].append(concurrent_pairs(c, clients, duration, self.args.volume_size))
        self.rows.append(
            Row(
                f"{clients} concurrent clients, pairs per second, {n:,} volumes",
                "pairs/s",
                {k: round(statistics.median(v), 1) for k, v in rates.items()},
                lower_is_better=False,
            )
        )

    def _list_one_reply(self, drivers: list[tuple[Contender, Stubs]], n: int) -> None:
        """max_entries 0: "no limit". A driver that still pages (this one does past 4,096
        entries or 2 MiB, to stay under gRPC's default 4 MiB receive limit) is followed
        through its tokens, and its page count is noted."""
        pages: dict[str, int] = {}

        def one_reply(c: Contender, s: Stubs, i: int) -> None:
            got, token, calls = 0, "", 0
            while calls <= n:
                reply = s.list_page(0, token)
                got, token, calls = got + len(reply.entries), reply.next_token, calls + 1
                if not token:
                    break
            if got != n:
                raise RuntimeError(f"{c.name}: ListVolumes returned {got} of {n} volumes")
            pages[c.name] = calls

        seconds = interleaved(drivers, self.args.list_rounds, one_reply)
        self.rows.append(
            Row(
                f"ListVolumes with max_entries 0, {n:,} volumes",
                "ms",
                {k: ms(v) for k, v in seconds.items()},
            )
        )
        for name, calls in sorted(pages.items()):
            if calls > 1:
                self.notes.append(f"{name} answered max_entries 0 for {n:,} in {calls} pages")

    def _list_pages(self, drivers: list[tuple[Contender, Stubs]], n: int) -> None:
        page = self.args.page_size
        self.say(f"ListVolumes, every page of {page} through {n} volumes")
        values: dict[str, float | str | None] = {}
        for c, s in drivers:
            first = s.list_page(page, "")
            if len(first.entries) < n and not first.next_token:
                values[c.name] = f"cannot page ({len(first.entries)} of {n}, no token)"
                continue
            seen: list[str] = []
            t_all: list[float] = []
            for _ in range(self.args.list_rounds):
                seen, token = [], ""
                t0 = time.perf_counter()
                for _page in range(n // max(page, 1) + 2):
                    reply = s.list_page(page, token)
                    seen.extend(e.volume.volume_id for e in reply.entries)
                    token = reply.next_token
                    if not token:
                        break
                t_all.append(time.perf_counter() - t0)
            if len(seen) != n or len(set(seen)) != n:
                raise RuntimeError(f"{c.name}: paging saw {len(seen)} entries, expected {n}")
            values[c.name] = ms(t_all)
        self.rows.append(Row(f"ListVolumes, every page of {page}, {n:,} volumes", "ms", values))

    # --- the node ----------------------------------------------------------------------------

    def _node(self, drivers: list[tuple[Contender, Stubs]]) -> None:
        self.say(f"{self.args.node_pairs} NodePublish+NodeUnpublish pairs")
        cap = mount_cap()
        staged: list[tuple[Contender, Stubs, str]] = []
        try:
            for c, s in drivers:
                volume_id = s.create("node-volume", self.args.volume_size)
                staging = c.kubelet_dir / "staging"
                staging.mkdir(parents=True, exist_ok=True)
                (c.kubelet_dir / "pods").mkdir(exist_ok=True)
                s.node.NodeStageVolume(
                    csi_pb2.NodeStageVolumeRequest(
                        volume_id=volume_id,
                        staging_target_path=str(staging),
                        volume_capability=cap,
                    ),
                    timeout=RPC_TIMEOUT,
                )
                staged.append((c, s, volume_id))
            ids = {c.name: v for c, _, v in staged}

            def publish_unpublish(c: Contender, s: Stubs, i: int) -> None:
                target = str(c.kubelet_dir / "pods" / "volume")
                s.node.NodePublishVolume(
                    csi_pb2.NodePublishVolumeRequest(
                        volume_id=ids[c.name],
                        staging_target_path=str(c.kubelet_dir / "staging"),
                        target_path=target,
                        volume_capability=cap,
                    ),
                    timeout=RPC_TIMEOUT,
                )
                s.node.NodeUnpublishVolume(
                    csi_pb2.NodeUnpublishVolumeRequest(volume_id=ids[c.name], target_path=target),
                    timeout=RPC_TIMEOUT,
                )

            seconds = interleaved(drivers, self.args.node_pairs, publish_unpublish)
            self.rows.append(
                Row(
                    "NodePublishVolume+NodeUnpublishVolume p50, mount",
                    "ms",
                    {k: ms(v) for k, v in seconds.items()},
                )
            )
        finally:
            for c, s, volume_id in staged:
                with contextlib.suppress(grpc.RpcError):
                    s.node.NodeUnstageVolume(
                        csi_pb2.NodeUnstageVolumeRequest(
                            volume_id=volume_id, staging_target_path=str(c.kubelet_dir / "staging")
                        ),
                        timeout=RPC_TIMEOUT,
                    )
                    s.delete(volume_id)


def timed_pair(prefix: str, size: int, contender: Contender, stubs: Stubs, i: int) -> None:
    stubs.pair(f"{prefix}-{i}", size)


def concurrent_pairs(contender: Contender, clients: int, duration: float, size: int) -> float:
    """Create+delete pairs per second with ``clients`` threads, each on its own channel."""
    done = [0] * clients
    errors: list[BaseException] = []
    start = threading.Barrier(clients + 1)
    stop = threading.Event()

    def client(k: int) -> None:
        try:
            with contender.stubs() as s:
                s.pair(f"conc-warm-{k}", size)
                start.wait(timeout=RPC_TIMEOUT)
                i = 0
                while not stop.is_set():
                    s.pair(f"conc-{k}-{i}", size)
                    i += 1
                    done[k] += 1
        except BaseException as exc:  # reported below; a dead client would skew the rate
            errors.append(exc)
            with contextlib.suppress(threading.BrokenBarrierError):
                start.abort()

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    start.wait(timeout=RPC_TIMEOUT)
    before = sum(done)
    t0 = time.perf_counter()
    time.sleep(duration)
    after = sum(done)
    elapsed = time.perf_counter() - t0
    stop.set()
    for t in threads:
        t.join(timeout=RPC_TIMEOUT)
    if errors:
        raise RuntimeError(f"{contender.name}: a concurrent client failed: {errors[0]!r}")
    return (after - before) / elapsed


# --- output ----------------------------------------------------------------------------------


def table(rows: Sequence[Row], names: Sequence[str]) -> str:
    head = ["metric", *names, "ratio" if len(names) > 1 else ""]
    lines = [head]
    for r in rows:
        cells = [f"{r.metric} ({r.unit})"]
        for n in names:
            v = r.values.get(n)
            cells.append("-" if v is None else f"{v:g}" if isinstance(v, float | int) else str(v))
        ratio = r.ratio()
        cells.append("" if ratio is None else f"{ratio:g}")
        lines.append(cells)
    return render_table(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.versus",
        description="This driver and the reference hostpath driver, side by side in one run.",
    )
    p.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE, help="hostpathplugin")
    p.add_argument("--alone", action="store_true", help="run this driver only")
    p.add_argument("--smoke", action="store_true", help="every step, tiny sizes (for make test)")
    p.add_argument("--sizes", default="10,1000,10000", help="volume counts, ascending")
    p.add_argument("--pairs", type=int, default=200, help="create+delete pairs per size")
    p.add_argument("--volume-size", type=int, default=1 << 20, help="bytes per volume")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (0: skip)")
    p.add_argument("--concurrency-seconds", type=float, default=3.0)
    p.add_argument("--concurrency-rounds", type=int, default=4)
    p.add_argument("--starts", type=int, default=10, help="starts per driver")
    p.add_argument("--list-rounds", type=int, default=3)
    p.add_argument("--page-size", type=int, default=100)
    p.add_argument("--node-pairs", type=int, default=100, help="0: skip the node")
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/...; '-')")
    args = p.parse_args(argv)
    if args.smoke:
        args.sizes, args.pairs, args.starts, args.list_rounds = "3,12", 4, 2, 1
        args.concurrency_seconds, args.concurrency_rounds, args.node_pairs = 0.3, 2, 2
        args.page_size = 5
    try:
        args.sizes = [int(s) for s in str(args.sizes).split(",")]
    except ValueError:
        p.error("--sizes takes comma-separated integers")
    if args.sizes != sorted(args.sizes) or not 1 <= args.sizes[0] <= args.sizes[-1] <= 200_000:
        p.error("--sizes must ascend, between 1 and 200000")
    for name in ("pairs", "starts", "list_rounds", "page_size", "concurrency_rounds"):
        if not 1 <= getattr(args, name) <= 100_000:
            p.error(f"--{name.replace('_', '-')} must be between 1 and 100000")
    if not 0 <= args.clients <= 64 or not 0 <= args.node_pairs <= 100_000:
        p.error("--clients must be 0-64 and --node-pairs 0-100000")
    if not args.alone and not os.access(args.reference, os.X_OK):
        p.error(
            f"no reference driver at {args.reference}: build it with"
            " `scripts/install-sidecars.sh hostpathplugin`, or pass --alone"
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    names = [OURS] if args.alone else [REFERENCE, OURS]
    workdir = Path(tempfile.mkdtemp(prefix="csi-versus-", dir="/tmp"))
    run = Run(args, workdir)
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    leaks: list[str] = []
    try:
        run.start_up()
        run.controller()
    finally:
        leaks = clean_up_host(str(workdir))
        if not leaks:
            shutil.rmtree(workdir, ignore_errors=True)
    if leaks:
        raise RuntimeError(f"left behind under {workdir}: {leaks}")
    load_end = os.getloadavg()
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "driver_version": __version__,
        "reference": None if args.alone else str(args.reference),
        "smoke": args.smoke,
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_start": [round(x, 2) for x in load_start],
            "load_average_end": [round(x, 2) for x in load_end],
            "kernel": platform.release(),
            "python": platform.python_version(),
        },
        "parameters": {
            k: v for k, v in vars(args).items() if k not in ("reference", "out", "smoke")
        },
        "rows": [
            {
                "metric": r.metric,
                "unit": r.unit,
                "values": r.values,
                "ratio": r.ratio(),
                "lower_is_better": r.lower_is_better,
            }
            for r in run.rows
        ],
        "notes": run.notes,
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    print()
    print(table(run.rows, names))
    for note in run.notes:
        print(f"note: {note}")
    print(
        f"{os.cpu_count()} CPUs; load average {load_start[0]:.2f} at start,"
        f" {load_end[0]:.2f} at end; {results['total_seconds']} s"
    )
    write_results(results, args.out, "versus-")
    return 0


if __name__ == "__main__":
    sys.exit(main())
