"""SIGKILL at random points of controller and node operations, then the CO's retry.

Two lanes run side by side, each a driver in its own sandbox and mount namespace. A lane walks
a handful of volumes through their life: create (mount and block), snapshot, expand on the
controller and on the node, stage, publish (writable, read-only, block, inline ephemeral),
unpublish, unstage, delete. Most steps are interrupted: the request is sent, the driver's
whole process group is SIGKILLed after a delay drawn from 0 to a little over the time the
same step takes uninterrupted (so kills land inside it), a new driver starts on the same
root, and the identical request is retried as a CO would until it succeeds. Some kills come
from the driver's failpoints instead (``CSI_DRIVER_FAILPOINTS``): it dies at a named point
between two steps of an RPC.

After every kill the whole state is compared with what should exist: ListVolumes and
ListSnapshots, the root's ``volumes/`` and ``snapshots/`` (nothing more, nothing less),
GetCapacity, loop devices (one per staged block volume), and the namespace's mount table
(exactly the staging and publish mounts, none stacked). At the end everything is removed
through the API and the root must be empty, its capacity back, no mount or loop device left.

``CSI_ADVERSARIAL_KILLS`` sets the number of kills per lane (default 160: 320 in all);
``CSI_ADVERSARIAL_SEED`` replays one seed.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_driver import ids
from csi_driver.proto import csi_pb2
from testkit.driver_process import loops_under, wait_for_exit
from tests.adversarial.conftest import (
    CAPACITY,
    EPHEMERAL_CONTEXT,
    NODE_ID,
    Driver,
    MiB,
    Sandbox,
    cap_for,
    create_request,
    describe,
    make_driver,
    new_sandbox,
    report,
    root_entries,
    seeds,
)
from tests.requests import mount_cap

pytestmark = pytest.mark.root

KILLS = int(os.environ.get("CSI_ADVERSARIAL_KILLS", "160"))
LANES = 2
FAILPOINT_SHARE = 0.12
RETRIES = 40
RPC_TIMEOUT = 30.0
MODE = csi_pb2.VolumeCapability.AccessMode
EPHEMERAL_SIZE = 8 * MiB
SETTLE = 5.0  # seconds storage may lag the API after a restart (background deletions)


@dataclass
class KVol:
    name: str
    block: bool
    size: int = 16 * MiB
    staged: bool = False
    targets: dict[str, bool] = field(default_factory=dict)  # path -> read-only

    @property
    def vid(self) -> str:
        return ids.volume_id_for(self.name, NODE_ID)

    @property
    def local(self) -> str:
        return self.vid.partition("@")[0]


@dataclass
class Step:
    label: str
    service: str
    method: str
    request: Any
    apply: Callable[[Any], object]  # what it returns is dropped
    failpoints: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.label}: {self.method} {describe(self.request, 100)}"


@dataclass
class Kill:
    step: str
    how: str  # "random 12.3 ms" or "failpoint NAME"
    in_flight: bool


@dataclass
class Lane:
    box: Sandbox
    driver: Driver
    rng: random.Random
    seed: int
    name: str
    vols: dict[str, KVol] = field(default_factory=dict)
    snaps: dict[str, tuple[str, int]] = field(default_factory=dict)  # sid -> (source, size)
    ephemeral: dict[str, str] = field(default_factory=dict)  # kubelet id -> target
    kills: list[Kill] = field(default_factory=list)
    typical: dict[str, float] = field(default_factory=dict)
    counter: int = 0
    settled: list[str] = field(default_factory=list)  # checks that waited for the background
    failpoints_hit: collections.Counter[str] = field(default_factory=collections.Counter)
    failpoints_missed: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def w(self) -> Path:
        return self.box.workdir

    def context(self) -> str:
        return f"lane {self.name}, seed {self.seed}, last kills: {self.kills[-3:]}"

    # --- calls ---

    def stub(self, service: str) -> Any:
        return self.driver.stub(service)

    def call(self, step: Step) -> Any:
        """The CO's call and retries: again while the driver is busy or away, bounded."""
        last = None
        for _ in range(RETRIES):
            if self.driver.channel is None:
                self.driver.open_channel()
            try:
                return getattr(self.stub(step.service), step.method)(
                    step.request, timeout=RPC_TIMEOUT, wait_for_ready=True
                )
            except grpc.RpcError as exc:
                if exc.code() not in (grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE):
                    pytest.fail(
                        f"{step} answered {exc.code().name}: {exc.details()}"
                        f" ({self.context()})\n{self.driver.log_tail(20)}"
                    )
                last = exc
                time.sleep(0.05)
        pytest.fail(f"{step} still {last} after {RETRIES} tries ({self.context()})")

    def run(self, step: Step) -> None:
        t0 = time.perf_counter()
        reply = self.call(step)
        took = time.perf_counter() - t0
        old = self.typical.get(step.method, took)
        self.typical[step.method] = 0.7 * old + 0.3 * took
        step.apply(reply)

    def killed(self, step: Step) -> None:
        """Send ``step``, SIGKILL the driver at a random point, restart, retry."""
        typical = self.typical.get(step.method, 0.02)
        delay = self.rng.uniform(0, typical * 1.3)
        assert self.driver.channel is not None
        future = getattr(self.stub(step.service), step.method).future(
            step.request, timeout=RPC_TIMEOUT
        )
        deadline = time.perf_counter() + delay
        while time.perf_counter() < deadline:
            time.sleep(min(0.0005, max(0.0, deadline - time.perf_counter())))
        in_flight = not future.done()
        self.driver.kill()
        self.kills.append(Kill(step.label, f"random {delay * 1000:.1f} ms", in_flight))
        self.driver.start()
        step.apply(self.call(step))

    def failpoint(self, step: Step, point: str) -> None:
        """Restart the driver armed with ``point``, send ``step``: it dies there (or the point
        is not on this step's way); restart unarmed and retry."""
        self.driver.kill()
        proc = self.driver.start_with({"CSI_DRIVER_FAILPOINTS": point})
        died = False
        try:
            getattr(self.stub(step.service), step.method)(step.request, timeout=RPC_TIMEOUT)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                pytest.fail(f"{step} with failpoint {point}: {exc.code().name} {exc.details()}")
            died = True
        if died:
            wait_for_exit(proc)
            self.failpoints_hit[point] += 1
            self.kills.append(Kill(step.label, f"failpoint {point}", True))
        else:
            self.failpoints_missed[point] += 1
        self.driver.kill()
        self.driver.start()
        step.apply(self.call(step))

    # --- the steps ---

    def staging(self, v: KVol) -> str:
        return str(self.w / "k" / "plugins" / "staging" / v.local / "globalmount")

    def new_target(self, v: KVol) -> str:
        self.counter += 1
        kind = "volumeDevices" if v.block else "volumes"
        return str(self.w / "k" / "pods" / f"pod{self.counter}" / kind / v.local / "mount")

    def next_step(self) -> Step:
        rng = self.rng
        options: list[Callable[[], Step | None]] = [
            self.create,
            self.delete,
            self.snapshot,
            self.delete_snapshot,
            self.expand,
            self.stage,
            self.unstage,
            self.publish,
            self.publish,
            self.unpublish,
            self.node_expand,
            self.ephemeral_publish,
            self.ephemeral_unpublish,
        ]
        while True:
            step = rng.choice(options)()
            if step is not None:
                return step

    def pick(self, ok: Callable[[KVol], bool]) -> KVol | None:
        found = [v for v in self.vols.values() if ok(v)]
        return self.rng.choice(found) if found else None

    def create(self) -> Step | None:
        if len(self.vols) >= 5:
            return None
        self.counter += 1
        v = KVol(f"{self.name}-vol-{self.counter}", self.rng.random() < 0.4)

        def apply(reply: Any) -> None:
            assert reply.volume.volume_id == v.vid, f"CreateVolume gave {reply.volume.volume_id}"
            self.vols[v.vid] = v

        kind = "block" if v.block else "mount"
        return Step(
            f"create {kind}", "Controller", "CreateVolume", create_request(v.name, v.block), apply
        )

    def delete(self) -> Step | None:
        v = self.pick(lambda v: not v.staged and not v.targets)
        if v is None:
            return None
        return Step(
            f"delete {'block' if v.block else 'mount'}",
            "Controller",
            "DeleteVolume",
            csi_pb2.DeleteVolumeRequest(volume_id=v.vid),
            lambda _: self.vols.pop(v.vid),
        )

    def snapshot(self) -> Step | None:
        v = self.pick(lambda v: True)
        if v is None or len(self.snaps) >= 3:
            return None
        self.counter += 1
        name = f"{self.name}-snap-{self.counter}"
        sid = ids.snapshot_id_for(name, NODE_ID)
        size = v.size

        def apply(reply: Any) -> None:
            assert reply.snapshot.snapshot_id == sid and reply.snapshot.ready_to_use
            self.snaps[sid] = (v.vid, size)

        req = csi_pb2.CreateSnapshotRequest(name=name, source_volume_id=v.vid)
        return Step("create snapshot", "Controller", "CreateSnapshot", req, apply)

    def delete_snapshot(self) -> Step | None:
        if not self.snaps:
            return None
        sid = self.rng.choice(sorted(self.snaps))
        req = csi_pb2.DeleteSnapshotRequest(snapshot_id=sid)
        return Step(
            "delete snapshot", "Controller", "DeleteSnapshot", req, lambda _: self.snaps.pop(sid)
        )

    def expand(self) -> Step | None:
        v = self.pick(lambda v: v.size < 96 * MiB)
        if v is None:
            return None
        size = v.size + 16 * MiB

        def apply(reply: Any) -> None:
            assert reply.capacity_bytes == size, f"expanded to {reply.capacity_bytes}"
            v.size = size

        req = csi_pb2.ControllerExpandVolumeRequest(
            volume_id=v.vid, capacity_range=csi_pb2.CapacityRange(required_bytes=size)
        )
        return Step("controller expand", "Controller", "ControllerExpandVolume", req, apply)

    def stage(self) -> Step | None:
        v = self.pick(lambda v: not v.staged)
        if v is None:
            return None
        req = csi_pb2.NodeStageVolumeRequest(
            volume_id=v.vid, staging_target_path=self.staging(v), volume_capability=cap_for(v.block)
        )
        return Step(
            f"stage {'block' if v.block else 'mount'}",
            "Node",
            "NodeStageVolume",
            req,
            lambda _: setattr(v, "staged", True),
            ("stage.dir", "stage.done"),
        )

    def unstage(self) -> Step | None:
        v = self.pick(lambda v: v.staged and not v.targets)
        if v is None:
            return None
        req = csi_pb2.NodeUnstageVolumeRequest(volume_id=v.vid, staging_target_path=self.staging(v))
        return Step(
            f"unstage {'block' if v.block else 'mount'}",
            "Node",
            "NodeUnstageVolume",
            req,
            lambda _: setattr(v, "staged", False),
            ("unstage.done",) if v.block else ("unstage.unmounted", "unstage.done"),
        )

    def publish(self) -> Step | None:
        v = self.pick(lambda v: v.staged and len(v.targets) < 2)
        if v is None:
            return None
        ro = any(v.targets.values()) if v.targets else self.rng.random() < 0.35
        target = self.new_target(v)
        req = csi_pb2.NodePublishVolumeRequest(
            volume_id=v.vid,
            staging_target_path=self.staging(v),
            target_path=target,
            volume_capability=cap_for(v.block),
            readonly=ro,
        )
        points = ["publish.target", "publish.done"]
        if v.block and ro and not v.targets:
            points.append("publish.device-flag")
        kind = f"{'block' if v.block else 'mount'}{' read-only' if ro else ''}"
        return Step(
            f"publish {kind}",
            "Node",
            "NodePublishVolume",
            req,
            lambda _: v.targets.__setitem__(target, ro),
            tuple(points),
        )

    def unpublish(self) -> Step | None:
        v = self.pick(lambda v: bool(v.targets))
        if v is None:
            return None
        target = self.rng.choice(sorted(v.targets))
        req = csi_pb2.NodeUnpublishVolumeRequest(volume_id=v.vid, target_path=target)
        points = (
            ("unpublish.unmounted", "unpublish.removed") if v.block else ("unpublish.unmounted",)
        )
        return Step(
            f"unpublish {'block' if v.block else 'mount'}",
            "Node",
            "NodeUnpublishVolume",
            req,
            lambda _: v.targets.pop(target),
            points,
        )

    def node_expand(self) -> Step | None:
        v = self.pick(lambda v: bool(v.targets) and v.size < 96 * MiB)
        if v is None:
            return None
        size = v.size + 16 * MiB
        req = csi_pb2.NodeExpandVolumeRequest(
            volume_id=v.vid,
            volume_path=sorted(v.targets)[0],
            staging_target_path=self.staging(v),
            capacity_range=csi_pb2.CapacityRange(required_bytes=size),
            volume_capability=cap_for(v.block),
        )

        def apply(reply: Any) -> None:
            assert reply.capacity_bytes in (0, size), f"node expand gave {reply.capacity_bytes}"
            v.size = size

        return Step(
            f"node expand {'block' if v.block else 'mount'}",
            "Node",
            "NodeExpandVolume",
            req,
            apply,
            ("expand.grown", "expand.refreshed"),
        )

    def ephemeral_publish(self) -> Step | None:
        if len(self.ephemeral) >= 2:
            return None
        self.counter += 1
        kubelet_id = f"csi-{self.name}-{self.counter:04d}"
        target = str(self.w / "k" / "pods" / f"pod{self.counter}" / "volumes" / "inline" / "mount")
        req = csi_pb2.NodePublishVolumeRequest(
            volume_id=kubelet_id,
            target_path=target,
            volume_capability=mount_cap(),
            volume_context=EPHEMERAL_CONTEXT,
        )
        return Step(
            "publish ephemeral",
            "Node",
            "NodePublishVolume",
            req,
            lambda _: self.ephemeral.__setitem__(kubelet_id, target),
            ("ephemeral.created", "ephemeral.staged", "stage.dir", "publish.target"),
        )

    def ephemeral_unpublish(self) -> Step | None:
        if not self.ephemeral:
            return None
        kubelet_id = self.rng.choice(sorted(self.ephemeral))
        req = csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=kubelet_id, target_path=self.ephemeral[kubelet_id]
        )
        return Step(
            "unpublish ephemeral",
            "Node",
            "NodeUnpublishVolume",
            req,
            lambda _: self.ephemeral.pop(kubelet_id),
            ("unpublish.unmounted", "ephemeral.unstaged"),
        )

    # --- the state ---

    def listed(self, method: str, request: Any, key: Callable[[Any], str]) -> list[str]:
        out: list[str] = []
        token = ""
        for _ in range(100):
            request.starting_token = token
            reply = self.call(Step("check", "Controller", method, request, lambda _: None))
            out += [key(e) for e in reply.entries]
            token = reply.next_token
            if not token:
                return out
        pytest.fail(f"{method} paging did not end")

    def check(self, when: str) -> None:
        where = f"{when} ({self.context()})"
        eph_vids = {ids.volume_id_for(k, NODE_ID): k for k in self.ephemeral}
        want_vols = sorted([*self.vols, *eph_vids])
        vols = self.listed(
            "ListVolumes", csi_pb2.ListVolumesRequest(max_entries=4), lambda e: e.volume.volume_id
        )
        assert sorted(vols) == want_vols, (
            f"ListVolumes {sorted(vols)}, expected {want_vols}; {where}"
        )
        snaps = self.listed(
            "ListSnapshots",
            csi_pb2.ListSnapshotsRequest(max_entries=4),
            lambda e: e.snapshot.snapshot_id,
        )
        assert sorted(snaps) == sorted(self.snaps), (
            f"ListSnapshots {sorted(snaps)}, expected {sorted(self.snaps)}; {where}"
        )
        # Storage and capacity: a deletion a kill interrupted is finished in the background
        # after the restart, so they may lag the API for a moment, never for long.
        t0 = time.monotonic()
        problems = self.storage_problems(want_vols)
        lagged = bool(problems)
        while problems and time.monotonic() - t0 < SETTLE:
            time.sleep(0.05)
            problems = self.storage_problems(want_vols)
        assert not problems, f"{'; '.join(problems)}; {where}"
        if lagged:
            self.settled.append(f"{when}: {time.monotonic() - t0:.2f} s")
        loops = sorted(os.path.basename(os.path.dirname(b)) for _, b in loops_under(str(self.w)))
        want_loops = sorted(v.local for v in self.vols.values() if v.block and v.staged)
        assert loops == want_loops, f"loop devices for {loops}, expected {want_loops}; {where}"
        mounts = sorted(self.box.ns_mounts_under(self.w))
        want_mounts = []
        for v in self.vols.values():
            if v.staged and not v.block:
                want_mounts.append(self.staging(v))
            want_mounts += list(v.targets)
        for k, target in self.ephemeral.items():
            local = ids.volume_id_for(k, NODE_ID).partition("@")[0]
            want_mounts += [target, str(self.w / "ephemeral" / local)]
        assert mounts == sorted(want_mounts), (
            f"mounts {mounts}, expected {sorted(want_mounts)}; {where}"
        )

    def storage_problems(self, want_vols: list[str]) -> list[str]:
        """How the root and GetCapacity differ from what should exist."""
        problems = []
        entries = root_entries(self.driver.root)
        want_locals = {v.partition("@")[0] for v in want_vols}
        if entries["volumes"] != want_locals:
            problems.append(
                f"volumes/ holds {sorted(entries['volumes'])}, expected {sorted(want_locals)}"
            )
        want_snaps = {s.partition("@")[0] for s in self.snaps}
        if entries["snapshots"] != want_snaps:
            problems.append(
                f"snapshots/ holds {sorted(entries['snapshots'])}, expected {sorted(want_snaps)}"
            )
        if entries["other"]:
            problems.append(f"unexpected in the root: {entries['other']}")
        held = sum(v.size for v in self.vols.values()) + sum(s for _, s in self.snaps.values())
        held += EPHEMERAL_SIZE * len(self.ephemeral)
        free = os.statvfs(self.driver.root)
        if free.f_bavail * free.f_frsize > CAPACITY + (4 << 30):
            step = Step(
                "check", "Controller", "GetCapacity", csi_pb2.GetCapacityRequest(), lambda _: None
            )
            available = self.call(step).available_capacity
            if available != CAPACITY - held:
                problems.append(f"GetCapacity {available}, expected {CAPACITY} - {held}")
        return problems

    def clean_up(self) -> None:
        """Everything removed through the API, without kills."""
        for kubelet_id in sorted(self.ephemeral):
            step = self.ephemeral_unpublish_of(kubelet_id)
            self.run(step)
        for v in list(self.vols.values()):
            for target in sorted(v.targets):
                req = csi_pb2.NodeUnpublishVolumeRequest(volume_id=v.vid, target_path=target)
                self.run(Step("cleanup", "Node", "NodeUnpublishVolume", req, lambda _: None))
            v.targets.clear()
            if v.staged:
                req2 = csi_pb2.NodeUnstageVolumeRequest(
                    volume_id=v.vid, staging_target_path=self.staging(v)
                )
                self.run(Step("cleanup", "Node", "NodeUnstageVolume", req2, lambda _: None))
                v.staged = False
        for sid in list(self.snaps):
            req3 = csi_pb2.DeleteSnapshotRequest(snapshot_id=sid)
            self.run(Step("cleanup", "Controller", "DeleteSnapshot", req3, lambda _: None))
            del self.snaps[sid]
        for vid in list(self.vols):
            req4 = csi_pb2.DeleteVolumeRequest(volume_id=vid)
            self.run(Step("cleanup", "Controller", "DeleteVolume", req4, lambda _: None))
            del self.vols[vid]

    def ephemeral_unpublish_of(self, kubelet_id: str) -> Step:
        req = csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=kubelet_id, target_path=self.ephemeral[kubelet_id]
        )
        return Step(
            "cleanup", "Node", "NodeUnpublishVolume", req, lambda _: self.ephemeral.pop(kubelet_id)
        )

    # --- the lane ---

    def go(self, kills: int) -> None:
        self.check("at the start")
        steps = 0
        while len(self.kills) < kills:
            step = self.next_step()
            steps += 1
            r = self.rng.random()
            if r < FAILPOINT_SHARE and step.failpoints:
                self.failpoint(step, self.rng.choice(step.failpoints))
            elif r < 0.75:
                self.killed(step)
            else:
                self.run(step)
                continue
            self.check(f"after the kill {self.kills[-1]} in {step}")
        self.clean_up()
        self.check("after the cleanup")
        entries = root_entries(self.driver.root)
        assert not any(entries.values()), f"the root still holds {entries}; {self.context()}"


def one_lane(seed: int, index: int) -> Lane:
    with new_sandbox() as box:
        driver = make_driver(box)
        rng = random.Random(f"{seed}:{index}")
        lane = Lane(box, driver, rng, seed, f"l{index}")
        try:
            driver.start()
            lane.go(KILLS)
            capacity = driver.stub("Controller").GetCapacity(
                csi_pb2.GetCapacityRequest(), timeout=10
            )
            free = os.statvfs(driver.root)
            if free.f_bavail * free.f_frsize > CAPACITY + (4 << 30):
                assert capacity.available_capacity == CAPACITY, (
                    f"capacity {capacity.available_capacity} after everything was deleted,"
                    f" not {CAPACITY}; {lane.context()}"
                )
        finally:
            with contextlib.suppress(Exception):
                driver.shutdown()
            if driver.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(driver.process.pid, signal.SIGKILL)
        return lane


def test_kills_during_controller_and_node_operations() -> None:
    t0 = time.monotonic()
    chosen = seeds()
    # one lane per seed: the fixed seed and the random one (or the replayed one twice)
    lane_seeds = (chosen * LANES)[:LANES]
    with concurrent.futures.ThreadPoolExecutor(LANES) as pool:
        futures = [pool.submit(one_lane, s, i) for i, s in enumerate(lane_seeds)]
        lanes = [f.result() for f in futures]
    took = time.monotonic() - t0
    kills = [k for lane in lanes for k in lane.kills]
    in_flight = sum(k.in_flight for k in kills)
    by_step = collections.Counter(k.step for k in kills)
    hit = sum((lane.failpoints_hit for lane in lanes), collections.Counter())
    missed = sum((lane.failpoints_missed for lane in lanes), collections.Counter())
    starts = [s for lane in lanes for s in lane.driver.starts]
    report(
        f"kills: {len(kills)} survived (seeds {lane_seeds}) in {took:.0f} s, {in_flight} inside a"
        f" request, {sum(hit.values())} at failpoints; restarts {len(starts)}, median"
        f" {sorted(starts)[len(starts) // 2]:.2f} s; 0 leaks"
    )
    report("  kills by step: " + ", ".join(f"{s} {n}" for s, n in sorted(by_step.items())))
    report("  failpoints hit: " + ", ".join(f"{p} {n}" for p, n in sorted(hit.items())))
    settled = [x for lane in lanes for x in lane.settled]
    if settled:
        report(
            f"  storage lagged the API (background deletions) after {len(settled)} kills:"
            f" {settled[:5]}"
        )
    if missed:
        report(
            "  failpoints not on the step's way: "
            + ", ".join(f"{p} {n}" for p, n in sorted(missed.items()))
        )
    assert in_flight >= len(kills) // 3, f"only {in_flight} of {len(kills)} kills hit a request"
