"""ListVolumes and ListSnapshots pages on the real hostpath backend and its SQLite file.

A page starts after the id its token names, so volumes created and deleted between pages
never make the listing repeat an entry or skip one that existed throughout; and a page is read
along the primary key, so its cost is its own rows, not every volume. Both are checked here
through the servicer on a real backend (temporary directories, no root).
"""

from __future__ import annotations

import itertools
import random
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import grpc
import pytest

from csi_driver import callmemo, ids
from csi_driver.backends.base import listed_after
from csi_driver.backends.hostpath.backend import HostPathBackend
from csi_driver.backends.hostpath.layout import Layout
from csi_driver.backends.hostpath.store import Store
from csi_driver.config import Config, Endpoint, Mode
from csi_driver.locks import KeyLocks
from csi_driver.proto import csi_pb2
from csi_driver.services.controller import ControllerServicer
from csi_driver.system.runner import SubprocessRunner
from csi_driver.units import GiB, MiB

NODE = "unit-node"
CTX = cast(grpc.ServicerContext, None)
VC = csi_pb2.VolumeCapability
MOUNT = VC(mount=VC.MountVolume(), access_mode=VC.AccessMode(mode=VC.AccessMode.SINGLE_NODE_WRITER))


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[HostPathBackend]:
    opened = HostPathBackend(tmp_path / "root", GiB, NODE, SubprocessRunner())
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def ctl(backend: HostPathBackend) -> ControllerServicer:
    config = Config(endpoint=Endpoint("unix", "/tmp/x.sock"), node_id=NODE, mode=Mode.STANDALONE)
    return ControllerServicer(config, backend, KeyLocks())


def create(ctl: ControllerServicer, name: str) -> str:
    request = csi_pb2.CreateVolumeRequest(
        name=name,
        volume_capabilities=[MOUNT],
        capacity_range=csi_pb2.CapacityRange(required_bytes=MiB),
    )
    return str(ctl.CreateVolume(request, CTX).volume.volume_id)


def delete(ctl: ControllerServicer, volume_id: str) -> None:
    ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id), CTX)


def all_volumes(ctl: ControllerServicer) -> list[str]:
    reply = ctl.ListVolumes(csi_pb2.ListVolumesRequest(), CTX)
    return [e.volume.volume_id for e in reply.entries]


def test_pages_neither_repeat_nor_skip_while_volumes_come_and_go(ctl: ControllerServicer) -> None:
    rng = random.Random(20240611)
    names = (f"pvc-{i}" for i in itertools.count())
    initial = {create(ctl, next(names)) for _ in range(20)}
    created: set[str] = set()
    deleted: set[str] = set()
    deleted_unlisted: set[str] = set()
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        reply = ctl.ListVolumes(
            csi_pb2.ListVolumesRequest(max_entries=3, starting_token=token), CTX
        )
        page = [e.volume.volume_id for e in reply.entries]
        assert 0 < len(page) <= 3
        seen += page
        token, pages = reply.next_token, pages + 1
        if not token:
            break
        # Between pages: delete the entry the token names, one listed before it and one not
        # yet listed, and create two (their ids fall anywhere, before or after the cursor).
        present = (initial | created) - deleted
        victims = {page[-1]}
        if behind := sorted(present & set(seen) - victims):
            victims.add(rng.choice(behind))
        if ahead := sorted(present - set(seen)):
            victims.add(rng.choice(ahead))
        for volume_id in sorted(victims):
            delete(ctl, volume_id)
        deleted |= victims
        deleted_unlisted |= victims - set(seen)
        created |= {create(ctl, next(names)), create(ctl, next(names))}
    assert pages > 5  # the churn really ran between pages
    assert seen == sorted(set(seen))  # in id order, no entry twice
    assert initial - deleted <= set(seen)  # none that existed throughout was skipped
    assert not set(seen) & deleted_unlisted  # what went before its turn is not listed
    assert set(seen) <= initial | created
    assert all_volumes(ctl) == sorted((initial | created) - deleted)


def test_snapshot_pages_and_their_filters(ctl: ControllerServicer) -> None:
    sources = [create(ctl, f"src-{i}") for i in range(2)]
    snaps: dict[str, str] = {}
    for i in range(7):
        request = csi_pb2.CreateSnapshotRequest(name=f"snap-{i}", source_volume_id=sources[i % 2])
        snaps[ctl.CreateSnapshot(request, CTX).snapshot.snapshot_id] = sources[i % 2]

    def walk(
        max_entries: int, snapshot_id: str = "", source_volume_id: str = ""
    ) -> list[list[str]]:
        pages, token = [], ""
        while True:
            request = csi_pb2.ListSnapshotsRequest(
                max_entries=max_entries,
                starting_token=token,
                snapshot_id=snapshot_id,
                source_volume_id=source_volume_id,
            )
            reply = ctl.ListSnapshots(request, CTX)
            pages.append([e.snapshot.snapshot_id for e in reply.entries])
            token = reply.next_token
            if not token:
                return pages

    everything = sorted(snaps)
    assert walk(3) == [everything[0:3], everything[3:6], everything[6:]]
    of_first = sorted(s for s, v in snaps.items() if v == sources[0])
    pages = walk(2, source_volume_id=sources[0])
    assert [len(p) for p in pages] == [2, 2] and [s for p in pages for s in p] == of_first
    one = everything[4]
    assert walk(1, snapshot_id=one) == [[one]]
    assert walk(1, snapshot_id=one, source_volume_id=snaps[one]) == [[one]]
    other = sources[0] if snaps[one] == sources[1] else sources[1]
    assert walk(1, snapshot_id=one, source_volume_id=other) == [[]]


def test_a_token_of_another_node_starts_where_its_id_sorts(
    ctl: ControllerServicer, backend: HostPathBackend
) -> None:
    """Only a hand-made token names an id of another node; the page still starts exactly
    after that id in id order, where the node part decides between equal local parts."""
    volumes = sorted(create(ctl, f"pvc-{i}") for i in range(5))
    local = volumes[2].partition("@")[0]
    for node in ("a-node", "unit-nod", "unit-node0", "z-node"):
        after = ids.id_of(local, node)
        expected = listed_after(volumes, lambda v: v, after, 2)
        assert [v.id for v in backend.list_volumes(after, 2)] == expected
    assert [v.id for v in backend.list_volumes(ids.id_of(local, "a-node"), 1)] == [volumes[2]]
    assert [v.id for v in backend.list_volumes(ids.id_of(local, "z-node"), 1)] == [volumes[3]]


def test_a_page_reads_its_own_rows_not_every_row(
    ctl: ControllerServicer, backend: HostPathBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    volumes = sorted(create(ctl, f"pvc-{i}") for i in range(60))
    listings: list[tuple[str, tuple[object, ...], int]] = []
    real_query = Store._query

    def recording(self: Store, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        rows = real_query(self, sql, args)
        if "FROM volumes" in sql and "ORDER BY" in sql:
            listings.append((sql, args, len(rows)))
        return rows

    monkeypatch.setattr(Store, "_query", recording)
    token = ""
    for expected in (volumes[0:5], volumes[5:10], volumes[10:15]):
        request = csi_pb2.ListVolumesRequest(max_entries=5, starting_token=token)
        reply = ctl.ListVolumes(request, CTX)
        assert [e.volume.volume_id for e in reply.entries] == expected
        token = reply.next_token
    # one query a page, returning (and so converting) the page, one row to know that another
    # page follows and, after the first, the row the token names: not all 60
    assert [n for _, _, n in listings] == [6, 7, 7]

    db = sqlite3.connect(f"file:{Layout(backend.root).database}?mode=ro", uri=True)
    try:
        for sql, args, _ in listings:
            plan = " | ".join(str(r[-1]) for r in db.execute("EXPLAIN QUERY PLAN " + sql, args))
            # along the primary key, stopping at LIMIT: no sort of every row, no state index
            assert "sqlite_autoindex_volumes_1" in plan, plan
            assert "TEMP B-TREE" not in plan and "volumes_state" not in plan, plan
            assert sql.endswith(" LIMIT ?") and args[-1] in (6, 7), sql
    finally:
        db.close()


def test_a_volume_deleted_after_its_listing_is_not_reported_broken(
    ctl: ControllerServicer, backend: HostPathBackend
) -> None:
    """Within one call the conditions of listed volumes come from the rows the listing read;
    one deleted meanwhile (its directory gone with it) must not read as 'missing'."""
    kept, gone = create(ctl, "pvc-kept"), create(ctl, "pvc-gone")
    with callmemo.call():
        assert {v.id for v in backend.list_volumes("", 10)} == {kept, gone}
        delete(ctl, gone)
        assert not backend.volume_condition(gone).abnormal
        assert not backend.volume_condition(kept).abnormal
        # a volume really broken behind the driver's back still is, listed or not
        parsed = ids.parse(kept, "v")
        assert parsed is not None
        shutil.rmtree(backend.root / "volumes" / parsed.local)
        assert "is missing" in backend.volume_condition(kept).message
