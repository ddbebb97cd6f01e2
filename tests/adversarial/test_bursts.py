"""Concurrency bursts: what many identical or conflicting calls at the same moment leave.

* 64 concurrent CreateVolume calls with one name make exactly one volume: every answer is OK
  or ABORTED, the OK ones all carry the same id, and a retry after the burst gives it again.
* The same name with different sizes: the mismatching calls get ALREADY_EXISTS (or ABORTED),
  never a second volume, and retries after the burst say the same.
* Two volumes published to one target at the same moment, and publishes and unpublishes of
  one target racing each other, never stack mounts: a watcher reads the namespace's mount
  table all through the burst and never sees two mounts at the target; afterwards the target
  holds exactly what the last successful call implies.
"""

from __future__ import annotations

import collections
import os
import random
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_driver import ids
from csi_driver.proto import csi_pb2, csi_pb2_grpc
from tests.adversarial.conftest import (
    NODE_ID,
    Driver,
    MiB,
    Sandbox,
    cap_for,
    create_request,
    make_driver,
    new_sandbox,
    report,
    root_entries,
    seeds,
)

pytestmark = pytest.mark.root

BURST = 64
CHANNELS = 8
ROUNDS = 4
TARGET_ROUNDS = 25
TIMEOUT = 30.0


@dataclass
class Served:
    box: Sandbox
    driver: Driver
    channels: list[grpc.Channel]

    def controllers(self) -> list[csi_pb2_grpc.ControllerStub]:
        return [csi_pb2_grpc.ControllerStub(c) for c in self.channels]

    def nodes(self) -> list[csi_pb2_grpc.NodeStub]:
        return [csi_pb2_grpc.NodeStub(c) for c in self.channels]


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    with new_sandbox() as box:
        driver = make_driver(box)
        driver.start()
        channels = [grpc.insecure_channel(driver.target) for _ in range(CHANNELS)]
        try:
            yield Served(box, driver, channels)
        finally:
            for c in channels:
                c.close()
            driver.shutdown()


def burst(calls: list[tuple[Any, Any]]) -> list[tuple[int, str, Any]]:
    """Fire every (method, request) at once; (completion order, code, reply) per call."""
    order = [0]
    lock = threading.Lock()
    results: list[tuple[int, str, Any]] = [(-1, "", None)] * len(calls)
    done = threading.Event()
    pending = [len(calls)]

    def finished(i: int, future: Any) -> None:
        with lock:
            order[0] += 1
            try:
                results[i] = (order[0], "OK", future.result())
            except grpc.RpcError as exc:
                results[i] = (order[0], exc.code().name, exc.details())
            pending[0] -= 1
            if not pending[0]:
                done.set()

    futures = [method.future(req, timeout=TIMEOUT) for method, req in calls]
    for i, f in enumerate(futures):
        f.add_done_callback(lambda fut, i=i: finished(i, fut))
    assert done.wait(TIMEOUT + 10), "a burst did not finish"
    return results


def codes(results: list[tuple[int, str, Any]]) -> collections.Counter[str]:
    return collections.Counter(code for _, code, _ in results)


def test_same_name_creates_make_one_volume(served: Served) -> None:
    ctl = served.controllers()
    seen: collections.Counter[str] = collections.Counter()
    for round_ in range(ROUNDS):
        block = round_ % 2 == 1
        name = f"burst-{round_}"
        vid = ids.volume_id_for(name, NODE_ID)
        req = create_request(name, block)
        results = burst([(ctl[i % CHANNELS].CreateVolume, req) for i in range(BURST)])
        seen.update(codes(results))
        bad = {c: n for c, n in codes(results).items() if c not in ("OK", "ABORTED")}
        assert not bad, f"round {round_}: answers other than OK or ABORTED: {bad} {results[:3]}"
        got = {r.volume.volume_id for _, c, r in results if c == "OK"}
        assert got <= {vid}, f"round {round_}: OK answers name {got}, expected {vid}"
        retry = ctl[0].CreateVolume(req, timeout=TIMEOUT)
        assert retry.volume.volume_id == vid
        listed = [
            e.volume.volume_id
            for e in ctl[0].ListVolumes(csi_pb2.ListVolumesRequest(), timeout=TIMEOUT).entries
        ]
        assert listed.count(vid) == 1, f"round {round_}: ListVolumes shows {listed}"
        assert root_entries(served.driver.root)["volumes"] == {vid.partition("@")[0]}
        ctl[0].DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid), timeout=TIMEOUT)
    report(f"bursts: {ROUNDS} x {BURST} same-name creates: {dict(seen)}; one volume each")


def test_same_name_different_sizes(served: Served) -> None:
    ctl = served.controllers()
    seen: collections.Counter[str] = collections.Counter()
    sizes = [16 * MiB, 32 * MiB, 48 * MiB, 64 * MiB]
    for round_ in range(ROUNDS):
        name = f"sizes-{round_}"
        vid = ids.volume_id_for(name, NODE_ID)

        def request(size: int, name: str = name) -> csi_pb2.CreateVolumeRequest:
            req = create_request(name, False, size)
            req.capacity_range.limit_bytes = size
            return req

        calls = [(ctl[i % CHANNELS].CreateVolume, request(sizes[i % 4])) for i in range(BURST)]
        results = burst(calls)
        seen.update(codes(results))
        bad = {c for _, c, _ in results if c not in ("OK", "ABORTED", "ALREADY_EXISTS")}
        assert not bad, f"round {round_}: unexpected answers {bad}"
        won = {sizes[i % 4] for i, (_, c, _) in enumerate(results) if c == "OK"}
        assert len(won) <= 1, f"round {round_}: sizes {won} all answered OK for one name"
        for i, (_, code, reply) in enumerate(results):
            if code == "OK":
                assert reply.volume.volume_id == vid
                assert reply.volume.capacity_bytes == sizes[i % 4]
        # after the burst: the volume's size is the winner's; the others are refused
        size = (
            ctl[0]
            .ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=vid), timeout=TIMEOUT)
            .volume.capacity_bytes
        )
        assert won <= {size}
        for s in sizes:
            try:
                ctl[0].CreateVolume(request(s), timeout=TIMEOUT)
                assert s == size, f"round {round_}: size {s} accepted, the volume has {size}"
            except grpc.RpcError as exc:
                assert s != size and exc.code() == grpc.StatusCode.ALREADY_EXISTS, (
                    f"round {round_}: size {s} answered {exc.code().name} ({size} exists)"
                )
        assert len(root_entries(served.driver.root)["volumes"]) == 1
        ctl[0].DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid), timeout=TIMEOUT)
    report(f"bursts: {ROUNDS} x {BURST} creates of one name in 4 sizes: {dict(seen)}")


def stack_depth(box: Sandbox, path: str) -> int:
    """How many mounts are stacked at ``path``: the longest chain of mounts there each
    mounted on the one below (its parent id is that one's id). Reading the mount table is
    not atomic (a long one takes several reads, each with the table as it is then), so
    counting lines can see an unmount and the next mount as two; the chain cannot."""
    at: dict[str, str] = {}  # mount id -> parent id, of the mounts at ``path``
    with open(f"/proc/{box.ns.holder.pid}/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            if unescape(fields[4]) == path:
                at[fields[0]] = fields[1]
    depth = 0
    for mount_id in at:
        n, seen = 1, {mount_id}
        while at.get(mount_id) in at and at[mount_id] not in seen:
            mount_id = at[mount_id]
            seen.add(mount_id)
            n += 1
        depth = max(depth, n)
    return depth


def unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


class Watcher:
    """Reads the namespace's mount table as fast as it can while a burst runs and keeps the
    deepest stack of mounts seen at one path."""

    def __init__(self, box: Sandbox, path: str) -> None:
        self.box, self.path = box, path
        self.most = 0
        self.reads = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.most = max(self.most, stack_depth(self.box, self.path))
            self.reads += 1

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.most = max(self.most, stack_depth(self.box, self.path))


@pytest.fixture
def two_staged(served: Served) -> Iterator[tuple[list[str], dict[str, str]]]:
    """Two staged mount volumes: (ids, staging path per id)."""
    ctl, node = served.controllers()[0], served.nodes()[0]
    vids, staging = [], {}
    for name in ("twin-a", "twin-b"):
        vid = ctl.CreateVolume(create_request(name, False), timeout=TIMEOUT).volume.volume_id
        path = str(served.box.workdir / "k" / "staging" / name)
        node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=vid, staging_target_path=path, volume_capability=cap_for(False)
            ),
            timeout=TIMEOUT,
        )
        vids.append(vid)
        staging[vid] = path
    try:
        yield vids, staging
    finally:
        for vid in vids:
            node.NodeUnstageVolume(
                csi_pb2.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=staging[vid]),
                timeout=TIMEOUT,
            )
            ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid), timeout=TIMEOUT)


def publish(vid: str, staging: str, target: str) -> csi_pb2.NodePublishVolumeRequest:
    return csi_pb2.NodePublishVolumeRequest(
        volume_id=vid,
        staging_target_path=staging,
        target_path=target,
        volume_capability=cap_for(False),
    )


def shows(box: Sandbox, target: str) -> list[str]:
    """The roots (source directories) of the mounts at ``target``."""
    return [root for m, root, _ in box.ns.mounts() if m == target]


def test_two_volumes_to_one_target_never_stack(
    served: Served, two_staged: tuple[list[str], dict[str, str]]
) -> None:
    vids, staging = two_staged
    nodes = served.nodes()
    seen: collections.Counter[str] = collections.Counter()
    most = 0
    for round_ in range(TARGET_ROUNDS):
        target = str(served.box.workdir / "k" / "pods" / f"shared-{round_}" / "mount")
        calls = [
            (
                nodes[i % CHANNELS].NodePublishVolume,
                publish(vids[i % 2], staging[vids[i % 2]], target),
            )
            for i in range(8)
        ]
        with Watcher(served.box, target) as watch:
            results = burst(calls)
        most = max(most, watch.most)
        seen.update(codes(results))
        assert watch.most <= 1, f"round {round_}: {watch.most} mounts stacked at {target}"
        bad = {
            c
            for _, c, _ in results
            if c not in ("OK", "ABORTED", "ALREADY_EXISTS", "FAILED_PRECONDITION")
        }
        assert not bad, f"round {round_}: unexpected answers {bad}: {results}"
        winners = {vids[i % 2] for i, (_, c, _) in enumerate(results) if c == "OK"}
        assert len(winners) <= 1, f"round {round_}: both volumes published at {target}"
        mounted = shows(served.box, target)
        if winners:
            (vid,) = winners
            local = vid.partition("@")[0]
            assert len(mounted) == 1 and local in mounted[0], (
                f"round {round_}: {vid} answered OK but {target} shows {mounted}"
            )
            nodes[0].NodeUnpublishVolume(
                csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target),
                timeout=TIMEOUT,
            )
        else:
            assert not mounted, f"round {round_}: nothing answered OK but {target} shows {mounted}"
        assert not shows(served.box, target)
    report(
        f"bursts: {TARGET_ROUNDS} x 8 publishes of two volumes to one target: {dict(seen)};"
        f" at most {most} mount at the target"
    )


def test_publish_and_unpublish_race_never_stack(
    served: Served, two_staged: tuple[list[str], dict[str, str]]
) -> None:
    vids, staging = two_staged
    vid = vids[0]
    nodes = served.nodes()
    rng = random.Random(seeds()[0])
    target = str(served.box.workdir / "k" / "pods" / "racing" / "mount")
    seen: collections.Counter[str] = collections.Counter()
    most = 0
    unpublish = csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target)
    for round_ in range(TARGET_ROUNDS):
        kinds = [rng.random() < 0.5 for _ in range(16)]  # True: publish
        node = nodes[round_ % CHANNELS]
        calls = [
            (node.NodePublishVolume, publish(vid, staging[vid], target))
            if k
            else (node.NodeUnpublishVolume, unpublish)
            for k in kinds
        ]
        with Watcher(served.box, target) as watch:
            results = burst(calls)
        most = max(most, watch.most)
        seen.update(codes(results))
        assert watch.most <= 1, f"round {round_}: {watch.most} mounts stacked at {target}"
        bad = {c for _, c, _ in results if c not in ("OK", "ABORTED")}
        assert not bad, f"round {round_}: unexpected answers {bad}: {results}"
        ok = sorted((order, kinds[i]) for i, (order, c, _) in enumerate(results) if c == "OK")
        mounted = shows(served.box, target)
        # Replies of calls that finish within a moment of each other can arrive out of order
        # (a worker thread finishes, then the event loop sends), so the final state is
        # checked against the last call only when every successful call was of one kind.
        if ok and len({kind for _, kind in ok}) == 1:
            last_is_publish = ok[-1][1]
            assert len(mounted) == (1 if last_is_publish else 0), (
                f"round {round_}: the last successful call was"
                f" {'a publish' if last_is_publish else 'an unpublish'}, {target} shows {mounted}"
            )
            if not last_is_publish:
                assert not os.path.lexists(served.box.ns.path(target)), f"{target} left behind"
        nodes[0].NodeUnpublishVolume(unpublish, timeout=TIMEOUT)
        assert not shows(served.box, target)
    report(
        f"bursts: {TARGET_ROUNDS} x 16 racing publishes and unpublishes of one target:"
        f" {dict(seen)}; at most {most} mount at the target"
    )


def test_nothing_left(served: Served) -> None:
    """Runs last in this module: the bursts left no volume, mount or loop device."""
    ctl = served.controllers()[0]
    listed = ctl.ListVolumes(csi_pb2.ListVolumesRequest(), timeout=TIMEOUT).entries
    assert not listed, [e.volume.volume_id for e in listed]
    assert not any(root_entries(served.driver.root).values())
    assert not served.box.ns_mounts_under(served.box.workdir)
    assert Path(served.driver.root).is_dir()
