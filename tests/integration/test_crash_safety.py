"""Crash safety: the driver survives a kill at any point, and no volume is lost or leaked.

Each test keeps one hostpath root and one driver process for several kill points. At each
point a request is sent, the driver's whole process group is SIGKILLed after a delay (spread
over the time the same request takes when nothing interrupts it, seeded by
``CSI_CRASH_SEED``), a new driver is started on the same root, and the request is retried as a
CO would retry it. Then:

* the retried call succeeds, with the id derived from the request's name;
* what was acknowledged before the kill is still there (or still gone, for a delete);
* ListVolumes and ListSnapshots (paged) show exactly the volumes and snapshots that should exist;
* the root's ``volumes/`` and ``snapshots/`` directories hold exactly their storage, nothing
  more (no leak) and nothing less (no loss);
* GetCapacity is the configured capacity minus what those volumes and snapshots hold (nothing
  stays reserved for storage that is gone);
* loop devices backed by files under the root are exactly those of staged block volumes;
* data written before the kill reads back intact.

The delay counts from the moment the client has issued the call. Each kill is recorded with
what the restarted driver showed before the retry (nothing done, half done, done); ``-s``
prints the records, and every failure message carries them with the seed.

Needs root (mounts, loop devices). Mounts, loop devices and processes are cleaned up in
``finally`` blocks and by the ``workdir`` fixture, which also fails a test that leaked any.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_driver import ids
from csi_driver.proto import csi_pb2, csi_pb2_grpc
from testkit.driver_process import REPO as REPO_ROOT
from testkit.driver_process import DriverProcess, loops_under, mounts_under
from tests.integration.conftest import NODE_ID
from tests.requests import block_cap, mount_cap

pytestmark = pytest.mark.root

MiB = 1 << 20
SIZE = 16 * MiB
SEED = int(os.environ.get("CSI_CRASH_SEED", "20261123"))
#: kill points per test (the loop and snapshot-deletion ones have their own, smaller counts):
#: with the default 4, 36 kills of a request in flight and 4 of an idle driver, ~20-40 s
KILLS = int(os.environ.get("CSI_CRASH_KILLS", "4"))
LOOP_KILLS = 3
SNAPSHOT_DELETE_KILLS = 2
#: the driver's configured capacity: well below the free space, so GetCapacity must equal it
#: minus what the expected volumes and snapshots hold (an accounting leak shows there)
CAPACITY = 8 << 30
CALIBRATION_ROUNDS = 3
RPC_TIMEOUT = 60.0
RETRIES = 20
MODE = csi_pb2.VolumeCapability.AccessMode
_LOCAL_ID = re.compile(r"[vs][0-9a-f]{32}")


def cap_for(block: bool) -> csi_pb2.VolumeCapability:
    return block_cap() if block else mount_cap()


def payload(label: str) -> bytes:
    """Recognisable bytes that differ per label, a little over one 4 KiB block."""
    seed = label.encode()
    return (seed + b":" + bytes(range(256)) * 17)[:4200]


@dataclass
class KillRecord:
    label: str
    delay_ms: float
    in_flight: bool  # the reply had not arrived when the kill was sent
    acknowledged: bool  # the RPC had succeeded before the kill
    #: what the restarted driver showed before the retry: "none" (nothing done), "partial"
    #: (storage or mounts without a finished volume), "done"
    found: str = "?"
    startup_kill_ms: float | None = None  # the next driver was killed this far into its start


@dataclass
class Crasher:
    """One driver root across many kills, and what should exist on it."""

    workdir: Path
    rng: random.Random
    driver: DriverProcess = field(init=False)
    channel: grpc.Channel | None = None
    volumes: dict[str, bool] = field(default_factory=dict)  # volume id -> is block
    snapshots: set[str] = field(default_factory=set)
    staged: dict[str, str] = field(default_factory=dict)  # volume id -> staging path
    published: dict[str, str] = field(default_factory=dict)  # volume id -> target path
    kills: list[KillRecord] = field(default_factory=list)
    start_seconds: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.driver = DriverProcess(self.workdir, extra_args=["--hostpath-capacity", str(CAPACITY)])

    # --- the process -----------------------------------------------------------------------

    @property
    def root(self) -> Path:
        return self.driver.root

    def start(self) -> None:
        t0 = time.perf_counter()
        self.driver.start()
        self.start_seconds.append(time.perf_counter() - t0)
        self.channel = grpc.insecure_channel(self.driver.target)

    def kill_while_starting(self, delay: float) -> None:
        """Start a driver and SIGKILL it ``delay`` seconds later, serving or not: a kill
        inside the start-up recovery of what the previous kill left behind."""
        assert self.driver.process is None or self.driver.process.poll() is not None
        with open(self.driver.log, "ab") as log:
            proc = subprocess.Popen(
                self.driver.argv(),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
                start_new_session=True,
            )
        try:
            time.sleep(delay)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)

    def _close_channel(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def kill(self) -> None:
        """SIGKILL the driver and everything it started, as a container runtime would."""
        proc = self.driver.process
        assert proc is not None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        self._close_channel()

    def shutdown(self) -> None:
        """Stop for good (finally): SIGTERM, then make sure nothing of it is left running."""
        self._close_channel()
        proc = self.driver.process
        if proc is None:
            return
        self.driver.stop()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # children a kill may have orphaned

    @property
    def controller(self) -> csi_pb2_grpc.ControllerStub:
        assert self.channel is not None
        return csi_pb2_grpc.ControllerStub(self.channel)

    @property
    def node(self) -> csi_pb2_grpc.NodeStub:
        assert self.channel is not None
        return csi_pb2_grpc.NodeStub(self.channel)

    def rpc(self, service: str, method: str) -> Any:
        stub = self.controller if service == "controller" else self.node
        return getattr(stub, method)

    # --- kill, restart, retry --------------------------------------------------------------

    def call(self, service: str, method: str, request: Any) -> Any:
        """A call that must succeed first time (setup and checks, no kill)."""
        try:
            return self.rpc(service, method)(request, timeout=RPC_TIMEOUT)
        except grpc.RpcError as exc:
            pytest.fail(
                f"{method} failed: {exc.code().name} {exc.details()}\n" + self.driver.log_tail()
            )

    def timed(self, service: str, method: str, request: Any) -> tuple[Any, float]:
        t0 = time.perf_counter()
        reply = self.call(service, method, request)
        return reply, time.perf_counter() - t0

    def kill_during(
        self,
        label: str,
        service: str,
        method: str,
        request: Any,
        delay: float,
        *,
        startup_kill: float | None = None,
    ) -> KillRecord:
        """Send ``request``, SIGKILL the driver ``delay`` seconds later, start a new one (with
        ``startup_kill``: kill that one too, that many seconds into its start, and start
        another)."""
        future = self.rpc(service, method).future(request, timeout=RPC_TIMEOUT)
        deadline = time.perf_counter() + delay
        while time.perf_counter() < deadline:  # bounded by ``delay``
            time.sleep(min(0.001, max(0.0, deadline - time.perf_counter())))
        in_flight = not future.done()
        self.kill()
        acknowledged = future.done() and future.exception() is None and not in_flight
        record = KillRecord(label, round(delay * 1000, 2), in_flight, acknowledged)
        self.kills.append(record)
        if startup_kill is not None:
            self.kill_while_starting(startup_kill)
            record.startup_kill_ms = round(startup_kill * 1000, 1)
        self.start()
        return record

    def retry(self, service: str, method: str, request: Any) -> Any:
        """The CO's retry: again while the driver says busy or unavailable, bounded."""
        last: grpc.RpcError | None = None
        for _ in range(RETRIES):
            try:
                return self.rpc(service, method)(request, timeout=RPC_TIMEOUT, wait_for_ready=True)
            except grpc.RpcError as exc:
                if exc.code() not in (grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE):
                    pytest.fail(
                        f"retried {method} failed: {exc.code().name} {exc.details()}\n"
                        + self.driver.log_tail()
                    )
                last = exc
                time.sleep(0.25)
        assert last is not None
        pytest.fail(
            f"retried {method} still {last.code().name} after {RETRIES} tries: {last.details()}"
        )

    def calibrate(self, one: Callable[[int], float], rounds: int = CALIBRATION_ROUNDS) -> float:
        """The median duration of ``rounds`` uninterrupted operations (``one(i)`` performs the
        i-th and returns its seconds): the span the kill points are spread over."""
        return statistics.median(one(i) for i in range(rounds))

    def spread(self, typical: float) -> list[float]:
        """KILLS delays covering 0 .. ``typical`` seconds: one random point per stratum, so
        early, middle and late kill points all occur."""
        span = max(typical, 0.002)
        return [(i + self.rng.random()) * span / KILLS for i in range(KILLS)]

    # --- volumes ---------------------------------------------------------------------------

    def create_request(
        self,
        name: str,
        block: bool,
        source: csi_pb2.VolumeContentSource | None = None,
    ) -> csi_pb2.CreateVolumeRequest:
        req = csi_pb2.CreateVolumeRequest(
            name=name,
            capacity_range=csi_pb2.CapacityRange(required_bytes=SIZE),
            volume_capabilities=[cap_for(block)],
        )
        if source is not None:
            req.volume_content_source.CopyFrom(source)
        return req

    def create(self, name: str, block: bool) -> str:
        reply = self.call("controller", "CreateVolume", self.create_request(name, block))
        vid = str(reply.volume.volume_id)
        self.volumes[vid] = block
        return vid

    def delete(self, vid: str) -> None:
        self.call("controller", "DeleteVolume", csi_pb2.DeleteVolumeRequest(volume_id=vid))
        self.volumes.pop(vid, None)

    def staging_path(self, vid: str) -> str:
        path = self.workdir / "kubelet" / "staging" / vid.partition("@")[0]
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    def target_path(self, vid: str) -> str:
        parent = self.workdir / "kubelet" / "pods" / vid.partition("@")[0]
        parent.mkdir(parents=True, exist_ok=True)
        return str(parent / "volume")

    def stage_request(self, vid: str) -> csi_pb2.NodeStageVolumeRequest:
        return csi_pb2.NodeStageVolumeRequest(
            volume_id=vid,
            staging_target_path=self.staging_path(vid),
            volume_capability=cap_for(self.volumes[vid]),
        )

    def publish_request(self, vid: str) -> csi_pb2.NodePublishVolumeRequest:
        return csi_pb2.NodePublishVolumeRequest(
            volume_id=vid,
            staging_target_path=self.staging_path(vid),
            target_path=self.target_path(vid),
            volume_capability=cap_for(self.volumes[vid]),
        )

    def stage(self, vid: str) -> None:
        self.call("node", "NodeStageVolume", self.stage_request(vid))
        self.staged[vid] = self.staging_path(vid)

    def publish(self, vid: str) -> str:
        self.call("node", "NodePublishVolume", self.publish_request(vid))
        self.published[vid] = self.target_path(vid)
        return self.published[vid]

    def unpublish(self, vid: str) -> None:
        self.call(
            "node",
            "NodeUnpublishVolume",
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=self.target_path(vid)),
        )
        self.published.pop(vid, None)

    def unstage(self, vid: str) -> None:
        self.call(
            "node",
            "NodeUnstageVolume",
            csi_pb2.NodeUnstageVolumeRequest(
                volume_id=vid, staging_target_path=self.staging_path(vid)
            ),
        )
        self.staged.pop(vid, None)

    def write(self, vid: str, data: bytes) -> None:
        """Publish, write ``data`` durably (a file, or the device's first bytes), unpublish."""
        with self.using(vid) as target:
            write_at(target, self.volumes[vid], data)

    def read(self, vid: str, length: int) -> bytes:
        with self.using(vid) as target:
            return read_at(target, self.volumes[vid], length)

    def using(self, vid: str) -> _Using:
        return _Using(self, vid)

    # --- snapshots -------------------------------------------------------------------------

    def snapshot_request(self, name: str, source: str) -> csi_pb2.CreateSnapshotRequest:
        return csi_pb2.CreateSnapshotRequest(name=name, source_volume_id=source)

    def snapshot(self, name: str, source: str) -> str:
        reply = self.call("controller", "CreateSnapshot", self.snapshot_request(name, source))
        sid = str(reply.snapshot.snapshot_id)
        self.snapshots.add(sid)
        return sid

    # --- what is there ---------------------------------------------------------------------

    def listed_volumes(self) -> list[str]:
        out: list[str] = []
        token = ""
        for _ in range(1000):  # bounded: far more pages than volumes
            reply = self.call(
                "controller",
                "ListVolumes",
                csi_pb2.ListVolumesRequest(max_entries=3, starting_token=token),
            )
            out.extend(e.volume.volume_id for e in reply.entries)
            token = reply.next_token
            if not token:
                return out
        pytest.fail("ListVolumes paging did not end")

    def listed_snapshots(self) -> list[str]:
        out: list[str] = []
        token = ""
        for _ in range(1000):
            reply = self.call(
                "controller",
                "ListSnapshots",
                csi_pb2.ListSnapshotsRequest(max_entries=3, starting_token=token),
            )
            out.extend(e.snapshot.snapshot_id for e in reply.entries)
            token = reply.next_token
            if not token:
                return out
        pytest.fail("ListSnapshots paging did not end")

    def observe_volume(self, vid: str) -> str:
        local = vid.partition("@")[0]
        if vid in self.listed_volumes():
            return "done"
        return "partial" if local in storage_entries(self.root)["volumes"] else "none"

    def observe_snapshot(self, sid: str) -> str:
        local = sid.partition("@")[0]
        if sid in self.listed_snapshots():
            return "done"
        return "partial" if local in storage_entries(self.root)["snapshots"] else "none"

    def observe_node(self, vid: str, path: str) -> str:
        """For a staging or target path: mounted, or (block staging) a loop device attached."""
        if mounts_under(path):
            return "done"
        local = vid.partition("@")[0]
        attached = any(ids_in(backing) == local for _, backing in loops_under(str(self.root)))
        if not self.volumes[vid]:
            return "none"
        if path == self.staging_path(vid):
            return "done" if attached else "none"
        return "partial" if os.path.lexists(path) else "none"

    def check(self, when: str) -> None:
        """Every invariant, with the kill history in the message when one breaks."""
        context = f"{when} (seed {SEED}, kills so far: {self.kills})"
        volumes = self.listed_volumes()
        assert sorted(volumes) == sorted(self.volumes), (
            f"ListVolumes shows {sorted(volumes)}, expected {sorted(self.volumes)}; {context}"
        )
        snapshots = self.listed_snapshots()
        assert sorted(snapshots) == sorted(self.snapshots), (
            f"ListSnapshots shows {sorted(snapshots)}, expected {sorted(self.snapshots)}; {context}"
        )
        on_disk = storage_entries(self.root)
        want_volumes = {v.partition("@")[0] for v in self.volumes}
        want_snapshots = {s.partition("@")[0] for s in self.snapshots}
        assert on_disk["volumes"] == want_volumes, (
            f"volumes/ holds {sorted(on_disk['volumes'])}, expected {sorted(want_volumes)};"
            f" {context}"
        )
        assert on_disk["snapshots"] == want_snapshots, (
            f"snapshots/ holds {sorted(on_disk['snapshots'])}, expected {sorted(want_snapshots)};"
            f" {context}"
        )
        assert not on_disk["other"], (
            f"unexpected entries in the root: {on_disk['other']}; {context}"
        )
        free = shutil.disk_usage(self.root).free
        held = SIZE * (len(self.volumes) + len(self.snapshots))
        if free > CAPACITY + (1 << 30):  # else the free space, not the capacity, decides
            available = self.call(
                "controller", "GetCapacity", csi_pb2.GetCapacityRequest()
            ).available_capacity
            assert available == CAPACITY - held, (
                f"GetCapacity says {available} bytes, expected {CAPACITY} - {held}; {context}"
            )
        loops = loops_under(str(self.root))
        attached = sorted(ids_in(backing) for _, backing in loops)
        want_attached = sorted(
            v.partition("@")[0] for v in self.staged if self.volumes.get(v, False)
        )
        assert attached == want_attached, (
            f"loop devices {loops} are attached, expected ones for {want_attached}; {context}"
        )


class _Using:
    """Stage and publish a volume for the length of a ``with`` block, then undo both."""

    def __init__(self, crasher: Crasher, vid: str) -> None:
        self.crasher, self.vid = crasher, vid

    def __enter__(self) -> str:
        self.crasher.stage(self.vid)
        return self.crasher.publish(self.vid)

    def __exit__(self, *exc: object) -> None:
        self.crasher.unpublish(self.vid)
        self.crasher.unstage(self.vid)


def write_at(target: str, block: bool, data: bytes) -> None:
    path = target if block else os.path.join(target, "data")
    fd = os.open(path, os.O_RDWR if block else os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        assert os.pwrite(fd, data, 0) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_at(target: str, block: bool, length: int) -> bytes:
    path = target if block else os.path.join(target, "data")
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, 0)
    finally:
        os.close(fd)


def undone(state: str) -> str:
    """For an operation that removes something: it is done when the thing is gone."""
    return {"done": "none", "none": "done"}.get(state, state)


def ids_in(backing: str) -> str:
    """The volume whose image ``backing`` is (``.../volumes/<local id>/disk.img``)."""
    found = _LOCAL_ID.findall(os.path.basename(os.path.dirname(backing)))
    return found[0] if found else f"<no id: {backing}>"


def storage_entries(root: Path) -> dict[str, set[str]]:
    """Local ids found in the root's ``volumes/`` and ``snapshots/``; ``other`` collects any
    entry that names no id, or any top-level entry that is not known state."""
    out: dict[str, set[str]] = {"volumes": set(), "snapshots": set(), "other": set()}
    for kind in ("volumes", "snapshots"):
        d = root / kind
        if not d.exists():
            continue
        for entry in d.iterdir():
            found = _LOCAL_ID.findall(entry.name)
            if len(found) == 1 and entry.name.startswith(found[0]):
                out[kind].add(found[0])
            else:
                out["other"].add(f"{kind}/{entry.name}")
    return out


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def crasher(workdir: Path, request: pytest.FixtureRequest) -> Iterator[Crasher]:
    rng = random.Random(f"{SEED}:{request.node.name}")
    c = Crasher(workdir, rng)
    try:
        c.start()
        yield c
    finally:
        try:
            if c.channel is not None and c.driver.process and c.driver.process.poll() is None:
                for vid in list(c.published):
                    _quietly(partial(c.unpublish, vid))
                for vid in list(c.staged):
                    _quietly(partial(c.unstage, vid))
        finally:
            c.shutdown()
        print(f"\nkill points (seed {SEED}): {c.kills}")


def _quietly(call: Callable[[], object]) -> None:
    with contextlib.suppress(grpc.RpcError, pytest.fail.Exception):
        call()


def expect_some_in_flight(c: Crasher) -> None:
    """The delays are meant to land inside requests; a run where none did tested nothing."""
    assert any(k.in_flight for k in c.kills), f"no kill interrupted a request: {c.kills}"


# --- the tests -----------------------------------------------------------------------------


def time_stage(c: Crasher, i: int) -> float:
    """One uninterrupted NodeStageVolume of a fresh block volume (a loop device attached)."""
    vid = c.create(f"calib-stage-{i}", True)
    _, took = c.timed("node", "NodeStageVolume", c.stage_request(vid))
    c.staged[vid] = c.staging_path(vid)
    c.unstage(vid)
    return took


@pytest.mark.parametrize("block", [False, True], ids=["mount", "block"])
def test_kill_during_create_volume(crasher: Crasher, block: bool) -> None:
    c = crasher
    kind = "block" if block else "mount"
    keep = c.create(f"keep-{kind}", block)
    c.write(keep, payload(keep))

    def calibration(i: int) -> float:
        _, took = c.timed("controller", "CreateVolume", c.create_request(f"calib-{i}", block))
        c.volumes[ids.volume_id_for(f"calib-{i}", NODE_ID)] = block
        return took

    typical = c.calibrate(calibration)
    c.check("after calibration")

    for i, delay in enumerate(c.spread(typical)):
        name = f"create-{kind}-{i}"
        vid = ids.volume_id_for(name, NODE_ID)
        req = c.create_request(name, block)
        record = c.kill_during(name, "controller", "CreateVolume", req, delay)
        record.found = c.observe_volume(vid)
        if record.acknowledged:
            assert record.found == "done", f"acknowledged CreateVolume {vid} lost: {record}"
        reply = c.retry("controller", "CreateVolume", req)
        assert reply.volume.volume_id == vid
        assert reply.volume.capacity_bytes >= SIZE
        c.volumes[vid] = block
        c.check(f"after kill {record}")

    assert c.read(keep, 4200) == payload(keep)
    # The volumes made through a kill work: data goes in and comes back out.
    last = ids.volume_id_for(f"create-{kind}-{KILLS - 1}", NODE_ID)
    c.write(last, payload(last))
    assert c.read(last, 4200) == payload(last)
    c.check("at the end")
    expect_some_in_flight(c)


def test_kill_during_create_volume_from_snapshot(crasher: Crasher) -> None:
    c = crasher
    sources: dict[bool, str] = {}
    for block in (False, True):
        kind = "block" if block else "mount"
        vid = c.create(f"origin-{kind}", block)
        c.write(vid, payload(vid))
        sources[block] = c.snapshot(f"snap-{kind}", vid)
    c.check("after setup")

    def source_of(block: bool) -> csi_pb2.VolumeContentSource:
        return csi_pb2.VolumeContentSource(
            snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=sources[block])
        )

    def calibration(i: int) -> float:
        req = c.create_request(f"calib-{i}", i % 2 == 1, source_of(i % 2 == 1))
        _, took = c.timed("controller", "CreateVolume", req)
        c.volumes[ids.volume_id_for(f"calib-{i}", NODE_ID)] = i % 2 == 1
        return took

    typical = c.calibrate(calibration)

    for i, delay in enumerate(c.spread(typical)):
        block = i % 2 == 1
        name = f"restore-{i}"
        vid = ids.volume_id_for(name, NODE_ID)
        req = c.create_request(name, block, source_of(block))
        record = c.kill_during(name, "controller", "CreateVolume", req, delay)
        record.found = c.observe_volume(vid)
        if record.acknowledged:
            assert record.found == "done", f"acknowledged CreateVolume {vid} lost: {record}"
        reply = c.retry("controller", "CreateVolume", req)
        assert reply.volume.volume_id == vid
        assert reply.volume.content_source.snapshot.snapshot_id == sources[block]
        c.volumes[vid] = block
        c.check(f"after kill {record}")
        origin = ids.volume_id_for(f"origin-{'block' if block else 'mount'}", NODE_ID)
        assert c.read(vid, 4200) == payload(origin), f"restored {vid} lacks the snapshot's data"

    for block in (False, True):
        origin = ids.volume_id_for(f"origin-{'block' if block else 'mount'}", NODE_ID)
        assert c.read(origin, 4200) == payload(origin)
    c.check("at the end")
    expect_some_in_flight(c)


def test_kill_during_delete_volume(crasher: Crasher) -> None:
    c = crasher
    keep = c.create("keep", False)
    c.write(keep, payload(keep))

    def calibration(i: int) -> float:
        vid = c.create(f"calib-{i}", i % 2 == 0)
        _, took = c.timed("controller", "DeleteVolume", csi_pb2.DeleteVolumeRequest(volume_id=vid))
        del c.volumes[vid]
        return took

    typical = c.calibrate(calibration)
    c.check("after calibration")

    # The restarted driver finishes interrupted deletions in the background while it serves;
    # it is killed inside that too, somewhere within its usual start-up time.
    startup = c.spread(statistics.median(c.start_seconds))
    for i, delay in enumerate(c.spread(typical)):
        block = i % 2 == 0
        vid = c.create(f"doomed-{i}", block)
        c.write(vid, payload(vid))
        req = csi_pb2.DeleteVolumeRequest(volume_id=vid)
        record = c.kill_during(
            f"delete {vid}", "controller", "DeleteVolume", req, delay, startup_kill=startup[i]
        )
        record.found = undone(c.observe_volume(vid))
        if record.acknowledged:
            assert record.found == "done", f"acknowledged DeleteVolume {vid} undone: {record}"
        c.retry("controller", "DeleteVolume", req)
        del c.volumes[vid]
        c.check(f"after kill {record}")
        # Deleting it again is still fine (idempotent), and the name can be used anew.
        c.retry("controller", "DeleteVolume", req)

    assert c.read(keep, 4200) == payload(keep)
    c.check("at the end")
    expect_some_in_flight(c)


def test_kill_during_create_snapshot(crasher: Crasher) -> None:
    c = crasher
    sources = {block: c.create(f"snap-src-{int(block)}", block) for block in (False, True)}
    for vid in sources.values():
        c.write(vid, payload(vid))

    def calibration(i: int) -> float:
        req = c.snapshot_request(f"calib-{i}", sources[i % 2 == 1])
        _, took = c.timed("controller", "CreateSnapshot", req)
        c.snapshots.add(ids.snapshot_id_for(f"calib-{i}", NODE_ID))
        return took

    typical = c.calibrate(calibration)
    c.check("after calibration")

    for i, delay in enumerate(c.spread(typical)):
        block = i % 2 == 1
        name = f"snap-{i}"
        sid = ids.snapshot_id_for(name, NODE_ID)
        req = c.snapshot_request(name, sources[block])
        record = c.kill_during(name, "controller", "CreateSnapshot", req, delay)
        record.found = c.observe_snapshot(sid)
        if record.acknowledged:
            assert record.found == "done", f"acknowledged CreateSnapshot {sid} lost: {record}"
        reply = c.retry("controller", "CreateSnapshot", req)
        assert reply.snapshot.snapshot_id == sid
        assert reply.snapshot.source_volume_id == sources[block]
        assert reply.snapshot.ready_to_use
        c.snapshots.add(sid)
        c.check(f"after kill {record}")

        # The snapshot holds the data: a volume restored from it reads it back.
        restored = c.create_request(
            f"from-{name}",
            block,
            csi_pb2.VolumeContentSource(
                snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=sid)
            ),
        )
        vid = str(c.call("controller", "CreateVolume", restored).volume.volume_id)
        c.volumes[vid] = block
        assert c.read(vid, 4200) == payload(sources[block])
        c.delete(vid)

    # Deleting snapshots, killed: the calibration ones time it, then some of the others.
    typical = c.calibrate(partial(time_snapshot_delete, c))
    for i, delay in enumerate(c.spread(typical)[:SNAPSHOT_DELETE_KILLS]):
        sid = ids.snapshot_id_for(f"snap-{i}", NODE_ID)
        dreq = csi_pb2.DeleteSnapshotRequest(snapshot_id=sid)
        record = c.kill_during(f"delete {sid}", "controller", "DeleteSnapshot", dreq, delay)
        record.found = undone(c.observe_snapshot(sid))
        if record.acknowledged:
            assert record.found == "done", f"acknowledged DeleteSnapshot {sid} undone: {record}"
        c.retry("controller", "DeleteSnapshot", dreq)
        c.snapshots.discard(sid)
        c.check(f"after kill {record}")

    for vid in sources.values():
        assert c.read(vid, 4200) == payload(vid)
    c.check("at the end")
    expect_some_in_flight(c)


def time_snapshot_delete(c: Crasher, i: int) -> float:
    sid = ids.snapshot_id_for(f"calib-{i}", NODE_ID)
    _, took = c.timed(
        "controller", "DeleteSnapshot", csi_pb2.DeleteSnapshotRequest(snapshot_id=sid)
    )
    c.snapshots.discard(sid)
    return took


def test_kill_during_node_stage_and_publish(crasher: Crasher, workdir: Path) -> None:
    c = crasher
    typical = c.calibrate(partial(time_stage, c))
    c.check("after calibration")

    for i, delay in enumerate(c.spread(typical)):
        block = i % 2 == 0
        vid = c.create(f"node-{i}", block)
        on_stage = i % 4 < 2  # kill during NodeStage for two in four, NodePublish otherwise
        if on_stage:
            req: Any = c.stage_request(vid)
            record = c.kill_during(f"stage {vid}", "node", "NodeStageVolume", req, delay)
            record.found = c.observe_node(vid, c.staging_path(vid))
            if record.acknowledged:
                assert record.found == "done", f"acknowledged NodeStage undone: {record}"
            c.retry("node", "NodeStageVolume", req)
            c.staged[vid] = c.staging_path(vid)
            c.check(f"after kill {record}")
            target = c.publish(vid)
        else:
            c.stage(vid)
            req = c.publish_request(vid)
            record = c.kill_during(f"publish {vid}", "node", "NodePublishVolume", req, delay)
            record.found = c.observe_node(vid, c.target_path(vid))
            if record.acknowledged:
                assert record.found == "done", f"acknowledged NodePublish undone: {record}"
            c.retry("node", "NodePublishVolume", req)
            target = c.published[vid] = c.target_path(vid)
            c.check(f"after kill {record}")
        write_at(target, block, payload(vid))

        # A kill with nothing in flight: the mounts outlive the driver, the data too.
        c.kill()
        c.start()
        assert read_at(target, block, 4200) == payload(vid)
        c.call("node", "NodePublishVolume", c.publish_request(vid))  # still published: OK

        # Tearing down, killed too: NodeUnpublish for odd points, NodeUnstage for even ones.
        unpublish = csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target)
        unstage = csi_pb2.NodeUnstageVolumeRequest(
            volume_id=vid, staging_target_path=c.staging_path(vid)
        )
        if i % 2 == 1:
            record = c.kill_during(
                f"unpublish {vid}", "node", "NodeUnpublishVolume", unpublish, delay
            )
            record.found = undone(c.observe_node(vid, target))
            if record.acknowledged:
                assert record.found == "done", f"acknowledged NodeUnpublish undone: {record}"
            c.retry("node", "NodeUnpublishVolume", unpublish)
            del c.published[vid]
            c.unstage(vid)
        else:
            c.unpublish(vid)
            record = c.kill_during(f"unstage {vid}", "node", "NodeUnstageVolume", unstage, delay)
            record.found = undone(c.observe_node(vid, c.staging_path(vid)))
            if record.acknowledged:
                assert record.found == "done", f"acknowledged NodeUnstage undone: {record}"
            c.retry("node", "NodeUnstageVolume", unstage)
            del c.staged[vid]
        assert not mounts_under(str(workdir / "kubelet")), mounts_under(str(workdir / "kubelet"))
        c.check(f"after unstaging {vid}")
        assert c.read(vid, 4200) == payload(vid)

    c.check("at the end")
    expect_some_in_flight(c)


def test_no_loop_device_outlives_its_volume(crasher: Crasher) -> None:
    """A block volume whose staging and deletion were both killed leaves no loop device."""
    c = crasher
    delays = c.spread(c.calibrate(partial(time_stage, c)))[:LOOP_KILLS]
    for i, delay in enumerate(delays):
        vid = c.create(f"loop-{i}", True)
        req = c.stage_request(vid)
        record = c.kill_during(f"stage {vid}", "node", "NodeStageVolume", req, delay)
        record.found = c.observe_node(vid, c.staging_path(vid))
        c.retry("node", "NodeStageVolume", req)
        c.staged[vid] = c.staging_path(vid)
        c.check(f"after kill {record}")
        c.unstage(vid)
        dreq = csi_pb2.DeleteVolumeRequest(volume_id=vid)
        record = c.kill_during(f"delete {vid}", "controller", "DeleteVolume", dreq, delay)
        record.found = undone(c.observe_volume(vid))
        c.retry("controller", "DeleteVolume", dreq)
        del c.volumes[vid]
        c.check(f"after kill {record}")
    assert not loops_under(str(c.workdir)), f"loop devices left: {loops_under(str(c.workdir))}"
    expect_some_in_flight(c)
