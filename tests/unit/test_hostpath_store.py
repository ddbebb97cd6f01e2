"""The hostpath backend's state and its rules, on temporary directories (no root, no devices).

The database (store.py) is checked directly for what it promises: schema versioning, one
process per root, the allocated-bytes total, unique project ids. The backend on top is
checked for the rules that need no loop device or quota: idempotent create, ALREADY_EXISTS
saying what differs, capacity accounting, recovery after a kill at each step, bad input
changing nothing. Loop devices, real copies of images and path attacks run as root in
tests/integration/test_hostpath_backend.py; enforced quotas in tests/vm.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from csi_driver import ids
from csi_driver.backends.hostpath import limits as limits_mod
from csi_driver.backends.hostpath.backend import SIZE_ENFORCED_KEY, HostPathBackend
from csi_driver.backends.hostpath.layout import IMAGE_NAME
from csi_driver.backends.hostpath.snapshots import Snapshots
from csi_driver.backends.hostpath.store import (
    FIRST_PROJECT_ID,
    SCHEMA_VERSION,
    SnapshotRow,
    State,
    Store,
    StoreError,
    VolumeRow,
)
from csi_driver.backends.hostpath.volumes import Volumes
from csi_driver.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from csi_driver.model import AccessType, ContentSource, Parameters, SourceKind, VolumeSpec
from csi_driver.system import extents, fsinfo
from csi_driver.system.quota import ProjectUsage
from csi_driver.system.runner import CommandError, CommandResult, SubprocessRunner
from csi_driver.units import MiB
from tests.fake_runner import FakeRunner

NODE = "unit-node"


class FailingRunner(FakeRunner):
    """The real runner, except that programs named in ``fail`` exit 1."""

    def __init__(self) -> None:
        super().__init__(self._inject, passthrough=SubprocessRunner())
        self.fail: set[str] = set()

    def _inject(self, argv: tuple[str, ...]) -> CommandResult | None:
        if argv[0] in self.fail:
            raise CommandError(argv, 1, "", f"{argv[0]}: injected failure")
        return None


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, not even ``except Exception`` handlers."""


@pytest.fixture
def runner() -> FailingRunner:
    return FailingRunner()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "root"


@pytest.fixture
def open_backend(root: Path, runner: FailingRunner) -> Iterator[_Opener]:
    opener = _Opener(root, runner)
    try:
        yield opener
    finally:
        opener.close()


class _Opener:
    """Opens backends on one root; closes the previous one first, as a restart does."""

    def __init__(self, root: Path, runner: FailingRunner) -> None:
        self.root = root
        self.runner = runner
        self.current: HostPathBackend | None = None

    def __call__(self, capacity: int | None = 64 * MiB) -> HostPathBackend:
        self.close()
        self.current = HostPathBackend(self.root, capacity, NODE, self.runner)
        return self.current

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None


def spec(
    name: str,
    size: int = 4 * MiB,
    access: AccessType = AccessType.MOUNT,
    fs_type: str = "",
    source: ContentSource | None = None,
    parameters: Mapping[str, str] | None = None,
) -> VolumeSpec:
    """What the service edge hands over: parameters as validate_parameters returns them, a
    size round_size gave (the backend trusts both)."""
    return VolumeSpec(name, size, access, fs_type, Parameters(parameters), source)


def local(volume_id: str) -> str:
    return volume_id.partition("@")[0]


def storage(root: Path) -> list[str]:
    """Everything under volumes/ and snapshots/, as relative paths."""
    return sorted(
        str(p.relative_to(root))
        for d in ("volumes", "snapshots")
        if (root / d).exists()
        for p in (root / d).rglob("*")
    )


def volume_row(local_id: str, **kw: object) -> VolumeRow:
    fields: dict[str, object] = {
        "local_id": local_id,
        "name": local_id,
        "state": State.READY,
        "capacity_bytes": MiB,
        "access_type": AccessType.MOUNT,
        "fs_type": "ext4",
        "created_ns": 1,
    }
    fields.update(kw)
    return VolumeRow(**fields)  # type: ignore[arg-type]


def other_fs_type(backend: HostPathBackend) -> str:
    return "btrfs" if backend.supported_fs_types()[0] != "btrfs" else "xfs"


# --- the database ----------------------------------------------------------------------------


def test_schema_is_versioned_in_wal_mode_with_full_sync(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    assert store.created
    store.close()
    db = sqlite3.connect(tmp_path / "state.db")
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()
    again = Store(tmp_path / "state.db")
    try:
        assert not again.created
        # NORMAL: the store syncs the log itself after each commit (group commit)
        assert again._db.execute("PRAGMA synchronous").fetchone()[0] == 1
    finally:
        again.close()


def _count_log_syncs(
    monkeypatch: pytest.MonkeyPatch, store: Store, delay: float = 0.0
) -> list[int]:
    """Syncs of the store's write-ahead log, each recorded as the commits done when it began."""
    wal = os.stat(f"{store.path}-wal").st_ino
    real_fsync = os.fsync
    began: list[int] = []

    def fsync(fd: int) -> None:
        if os.fstat(fd).st_ino == wal:
            began.append(store._commits)
            if delay:
                threading.Event().wait(delay)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return began


def test_every_write_returns_after_a_sync_of_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path / "state.db")
    try:
        syncs = _count_log_syncs(monkeypatch, store)
        before = store._commits
        store.insert_volume(volume_row("v" + "1" * 32), with_project_id=True)
        assert syncs == [before + 1]
        store.set_volume_state("v" + "1" * 32, State.READY)
        store.delete_volume("v" + "1" * 32)
        # one sync per transaction, begun after its commit
        assert syncs == [before + 1, before + 2, before + 3]
        store.volume("v" + "1" * 32)
        assert len(syncs) == 3  # reads sync nothing
    finally:
        store.close()


def test_concurrent_writes_share_syncs_and_each_waits_for_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path / "state.db")
    try:
        syncs = _count_log_syncs(monkeypatch, store, delay=0.05)
        before = store._commits
        done: list[tuple[str, int]] = []  # (volume, the newest sync begun when it returned)
        errors: list[BaseException] = []

        def write(i: int) -> None:
            try:
                local = f"v{i:032x}"
                store.insert_volume(volume_row(local), with_project_id=False)
                done.append((local, max(syncs)))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert len(done) == 8
        assert 1 <= len(syncs) < 8  # grouped
        # the last sync began after the last of the 8 commits: none returned before it
        assert max(syncs) == before + 8
        assert all(newest > before for _, newest in done)
    finally:
        store.close()
    reopened = Store(tmp_path / "state.db")
    try:
        assert len(reopened.volumes()) == 8
    finally:
        reopened.close()


def test_a_failed_sync_fails_every_later_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path / "state.db")
    try:
        wal = os.stat(f"{store.path}-wal").st_ino
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            if os.fstat(fd).st_ino == wal:
                raise OSError(5, "Input/output error")
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        with pytest.raises(StoreError, match="restart the driver"):
            store.insert_volume(volume_row("v" + "2" * 32), with_project_id=False)
        monkeypatch.setattr(os, "fsync", real_fsync)
        with pytest.raises(StoreError, match="restart the driver"):
            store.insert_volume(volume_row("v" + "3" * 32), with_project_id=False)
        assert store.volume("v" + "3" * 32) is None
        # and the health check (Probe, /healthz) says so, so that the driver gets restarted
        with pytest.raises(StoreError, match="restart the driver"):
            store.ping()
    finally:
        store.close()


def test_a_newer_schema_is_refused_untouched(tmp_path: Path) -> None:
    Store(tmp_path / "state.db").close()
    db = sqlite3.connect(tmp_path / "state.db")
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema version 99"):
        Store(tmp_path / "state.db")
    db = sqlite3.connect(tmp_path / "state.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == 99
    db.close()


def test_only_one_store_per_database(tmp_path: Path) -> None:
    first = Store(tmp_path / "state.db")
    try:
        with pytest.raises(StoreError, match="another driver process"):
            Store(tmp_path / "state.db")
    finally:
        first.close()
    Store(tmp_path / "state.db").close()


def test_allocated_bytes_follow_every_change(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    try:
        store.insert_volume(
            volume_row("v" + "1" * 32, capacity_bytes=3 * MiB), with_project_id=False
        )
        store.insert_volume(
            volume_row("v" + "2" * 32, capacity_bytes=5 * MiB), with_project_id=False
        )
        assert store.allocated_bytes() == 8 * MiB
        store.set_volume_capacity("v" + "1" * 32, 4 * MiB)
        assert store.allocated_bytes() == 9 * MiB
        store.insert_snapshot(
            SnapshotRow("s" + "1" * 32, "s", State.READY, "x", AccessType.MOUNT, 2 * MiB, 1)
        )
        assert store.allocated_bytes() == 11 * MiB
        store.delete_volume("v" + "2" * 32)
        store.delete_snapshot("s" + "1" * 32)
        assert store.allocated_bytes() == 4 * MiB
        with pytest.raises(sqlite3.IntegrityError):
            store.insert_volume(volume_row("v" + "1" * 32), with_project_id=False)
        assert store.allocated_bytes() == 4 * MiB  # the failed insert changed nothing
    finally:
        store.close()


def test_project_ids_are_unique_and_survive_reopening(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    try:
        got = [
            store.insert_volume(volume_row(f"v{i:032x}"), with_project_id=True).project_id
            for i in range(5)
        ]
        assert got == list(range(FIRST_PROJECT_ID, FIRST_PROJECT_ID + 5))
        plain = store.insert_volume(volume_row("v" + "f" * 32), with_project_id=False)
        assert plain.project_id is None
        store.delete_volume(f"v{1:032x}")  # a hole in the middle
    finally:
        store.close()
    store = Store(tmp_path / "state.db")
    try:
        more = [
            store.insert_volume(volume_row(f"v{i:032x}"), with_project_id=True).project_id
            for i in range(10, 13)
        ]
        in_use = [r.project_id for r in store.volumes() if r.project_id is not None]
        assert len(in_use) == len(set(in_use)) == 7
        assert not set(more) & set(got)
    finally:
        store.close()


def test_rows_round_trip(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    try:
        source = ContentSource(SourceKind.SNAPSHOT, "s" + "a" * 32 + "@n")
        row = volume_row(
            "v" + "3" * 32, parameters=Parameters({"a": "b"}), source=source, state=State.CREATING
        )
        store.insert_volume(row, with_project_id=False)
        store.set_published(row.local_id, frozenset({"n2", "n1"}))
        store.set_volume_state(row.local_id, State.READY)
        got = store.volume(row.local_id)
        assert got is not None
        assert got.source == source and dict(got.parameters) == {"a": "b"}
        assert got.published == {"n1", "n2"} and got.state is State.READY
        assert [r.local_id for r in store.volumes(State.CREATING)] == []
        assert store.volume("v" + "4" * 32) is None
    finally:
        store.close()


# --- create, idempotency, ALREADY_EXISTS ------------------------------------------------------


def test_create_is_idempotent_and_the_id_comes_from_the_name(open_backend: _Opener) -> None:
    backend = open_backend()
    first = backend.create_volume(spec("pvc-a", 3 * MiB + 4096))
    assert first.id == ids.volume_id_for("pvc-a", NODE)
    assert first.capacity_bytes == 3 * MiB + 4096
    assert first.fs_type == backend.supported_fs_types()[0]
    assert first.context[SIZE_ENFORCED_KEY] == "false"
    again = backend.create_volume(spec("pvc-a", 3 * MiB + 4096, fs_type=first.fs_type))
    assert again == first
    assert backend.get_volume(first.id) == first
    assert [v.id for v in backend.list_volumes()] == [first.id]
    path = open_backend.root / "volumes" / local(first.id)
    assert path.is_dir() and (os.stat(path).st_mode & 0o777) == 0o777


def test_an_existing_volume_is_returned_as_it_is_and_says_what_differs(
    open_backend: _Opener,
) -> None:
    """Whether it answers a request is VolumeSpec.check_existing's to say (the servicers ask it
    first); the row carries all it compares."""
    backend = open_backend()
    volume = backend.create_volume(spec("pvc-a", 4 * MiB))
    found = backend.get_volume(volume.id)
    assert found == volume
    fs_type = volume.fs_type
    snap = backend.create_snapshot("snap", volume.id, {})
    for other, field in (
        (spec("pvc-a", 8 * MiB, fs_type=fs_type), "capacity is 4194304 bytes"),
        (spec("pvc-a", 4 * MiB, AccessType.BLOCK), "access type is mount, not block"),
        (
            spec("pvc-a", 4 * MiB, fs_type=fs_type, parameters={"wipe": "x"}),
            "parameters are {}, not {'wipe': 'x'}",
        ),
        (
            spec(
                "pvc-a",
                4 * MiB,
                fs_type=fs_type,
                source=ContentSource(SourceKind.SNAPSHOT, snap.id),
            ),
            "content source is none",
        ),
    ):
        with pytest.raises(AlreadyExists, match=re.escape(field)):
            dataclasses.replace(other, required_bytes=other.capacity_bytes).check_existing(found)
        assert backend.create_volume(other) == volume  # trusted: nothing made or changed
    assert len(backend.list_volumes()) == 1


def test_an_expanded_volume_still_answers_its_original_request(open_backend: _Opener) -> None:
    backend = open_backend()
    volume = backend.create_volume(spec("pvc-a", 4 * MiB))
    backend.expand_volume(volume.id, 8 * MiB)
    again = backend.create_volume(spec("pvc-a", 4 * MiB))
    assert again.id == volume.id and again.capacity_bytes == 8 * MiB


def test_bad_input_changes_nothing(open_backend: _Opener) -> None:
    backend = open_backend()
    with pytest.raises(InvalidArgument, match="unknown parameters \\['speed'\\]"):
        backend.validate_parameters({"speed": "fast"})
    with pytest.raises(InvalidArgument, match="is not possible"):
        backend.create_volume(spec("pvc-a", fs_type=other_fs_type(backend)))
    with pytest.raises(InvalidArgument, match="block volume"):
        backend.create_volume(spec("pvc-a", access=AccessType.BLOCK, fs_type="ext4"))
    with pytest.raises(InvalidArgument):
        backend.validate_parameters({"anything": "x"})
    with pytest.raises(InvalidArgument):
        backend.create_snapshot("s", ids.volume_id_for("x", NODE), {"k": "v"})
    with pytest.raises(NotFound):
        backend.create_volume(
            spec(
                "pvc-b", source=ContentSource(SourceKind.SNAPSHOT, ids.snapshot_id_for("no", NODE))
            )
        )
    with pytest.raises(NotFound):
        backend.create_volume(
            spec("pvc-b", source=ContentSource(SourceKind.VOLUME, ids.volume_id_for("no", NODE)))
        )
    assert backend.list_volumes() == []
    assert storage(open_backend.root) == []
    assert backend._store.allocated_bytes() == 0
    assert backend.validate_parameters({}) == {}


def test_sizes_round_up_to_whole_blocks(open_backend: _Opener) -> None:
    backend = open_backend()
    assert backend.round_size(1, Parameters()) == 4096
    assert backend.round_size(0, Parameters()) == 4096
    assert backend.round_size(4096, Parameters()) == 4096
    assert backend.round_size(4097, Parameters()) == 8192
    block = backend.create_volume(
        spec("blk", backend.round_size(5000, Parameters()), AccessType.BLOCK)
    )
    image = open_backend.root / "volumes" / local(block.id) / IMAGE_NAME
    assert block.capacity_bytes == image.stat().st_size == 8192
    assert block.fs_type == "" and block.context[SIZE_ENFORCED_KEY] == "true"


def test_the_backend_trusts_what_the_service_edge_decided(
    open_backend: _Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Creating, counting capacity and expanding validate nothing again and allocate exactly
    the size given (the edge rounded it)."""
    backend = open_backend()
    wanted = spec("pvc-a", 4 * MiB, AccessType.BLOCK, parameters={"wipeOnDelete": "true"})

    def validate(parameters: Mapping[str, str]) -> None:
        raise AssertionError("validated again")

    monkeypatch.setattr(backend, "validate_parameters", validate)
    volume = backend.create_volume(wanted)
    assert volume.parameters == {"wipeOnDelete": "true"}
    assert backend.capacity(wanted.parameters) == 60 * MiB
    grown = backend.expand_volume(volume.id, 6 * MiB)
    image = open_backend.root / "volumes" / local(volume.id) / IMAGE_NAME
    assert grown.capacity_bytes == image.stat().st_size == 6 * MiB


# --- capacity --------------------------------------------------------------------------------


def test_capacity_accounts_volumes_and_snapshots(open_backend: _Opener) -> None:
    backend = open_backend(capacity=10 * MiB)
    assert backend.capacity(Parameters()) == 10 * MiB
    a = backend.create_volume(spec("a", 6 * MiB))
    assert backend.capacity(Parameters()) == 4 * MiB
    with pytest.raises(ResourceExhausted, match="4194304 bytes available"):
        backend.create_volume(spec("b", 6 * MiB))
    with pytest.raises(ResourceExhausted):
        backend.create_snapshot("snap", a.id, {})
    with pytest.raises(ResourceExhausted):
        backend.expand_volume(a.id, 12 * MiB)
    assert backend.get_volume(a.id) == a  # nothing changed
    assert storage(open_backend.root) == [f"volumes/{local(a.id)}"]
    backend.create_volume(spec("b", 4 * MiB))
    assert backend.capacity(Parameters()) == 0
    backend.delete_volume(a.id)
    assert backend.capacity(Parameters()) == 6 * MiB
    # the total is kept across restarts
    assert open_backend(capacity=10 * MiB).capacity(Parameters()) == 6 * MiB


def test_without_a_configured_capacity_the_filesystem_is_the_limit(open_backend: _Opener) -> None:
    backend = open_backend(capacity=None)
    room = fsinfo.usage(open_backend.root)
    assert 0 < backend.capacity(Parameters()) <= room.available_bytes
    with pytest.raises(ResourceExhausted):
        backend.create_volume(spec("huge", room.total_bytes + MiB))
    assert storage(open_backend.root) == []


# --- crash recovery --------------------------------------------------------------------------


def test_a_create_killed_half_way_is_rolled_back_at_restart_and_redone_by_its_retry(
    open_backend: _Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = open_backend()
    built = Volumes.build

    def killed_after_building(self: Volumes, row: VolumeRow, source: object) -> None:
        built(self, row, source)  # type: ignore[arg-type]
        (backend._layout.volume(row.local_id) / "half-copied").write_text("junk")
        raise Killed

    monkeypatch.setattr(Volumes, "build", killed_after_building)
    with pytest.raises(Killed):
        backend.create_volume(spec("pvc-a", 4 * MiB))
    monkeypatch.undo()

    backend = open_backend()  # the restart
    volume_id = ids.volume_id_for("pvc-a", NODE)
    assert backend._store.volume(local(volume_id)) is None  # nobody was given it: rolled back
    assert not (open_backend.root / "volumes" / local(volume_id)).exists()
    assert backend.get_volume(volume_id) is None
    assert backend.list_volumes() == []
    # nothing reserved for a retry that may never come
    assert backend.capacity(Parameters()) == 64 * MiB
    volume = backend.create_volume(spec("pvc-a", 4 * MiB))
    assert volume.id == volume_id
    assert list((open_backend.root / "volumes" / local(volume_id)).iterdir()) == []
    assert backend.capacity(Parameters()) == 60 * MiB


def test_an_unfinished_create_gives_way_to_a_changed_request(
    open_backend: _Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = open_backend()
    monkeypatch.setattr(Volumes, "build", lambda *a: (_ for _ in ()).throw(Killed))
    with pytest.raises(Killed):
        backend.create_volume(spec("pvc-a", 4 * MiB))
    monkeypatch.undo()
    volume = open_backend().create_volume(spec("pvc-a", 8 * MiB, AccessType.BLOCK))
    assert volume.capacity_bytes == 8 * MiB and volume.access_type is AccessType.BLOCK
    assert open_backend.current is not None
    assert open_backend.current.capacity(Parameters()) == 56 * MiB


def test_a_delete_killed_half_way_is_finished_at_start(
    open_backend: _Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = open_backend()
    volume = backend.create_volume(spec("pvc-a", 4 * MiB))
    snap = backend.create_snapshot("snap-a", volume.id, {})
    monkeypatch.setattr(Volumes, "finish_delete", lambda *a: (_ for _ in ()).throw(Killed))
    monkeypatch.setattr(Snapshots, "finish_delete", lambda *a: (_ for _ in ()).throw(Killed))
    with pytest.raises(Killed):
        backend.delete_volume(volume.id)
    with pytest.raises(Killed):
        backend.delete_snapshot(snap.id)
    monkeypatch.undo()
    deleting = backend._store.volume(local(volume.id))
    assert deleting is not None and deleting.state is State.DELETING
    assert backend.get_volume(volume.id) is None  # already gone for the CO

    backend = open_backend()
    assert backend._store.snapshot(local(snap.id)) is None
    assert backend.wait_for_background(10)  # volume deletions finish in the background
    assert backend._store.volume(local(volume.id)) is None
    assert storage(open_backend.root) == []
    assert backend.capacity(Parameters()) == 64 * MiB


def _interrupt_a_wiping_delete(
    open_backend: _Opener, monkeypatch: pytest.MonkeyPatch, name: str
) -> tuple[str, Path]:
    """A wipeOnDelete volume with data whose DeleteVolume was killed inside the wipe."""
    backend = open_backend()
    volume = backend.create_volume(spec(name, 8 * MiB, parameters={"wipeOnDelete": "true"}))
    data = open_backend.root / "volumes" / local(volume.id) / "data"
    data.write_bytes(b"secret" * 1000)
    monkeypatch.setattr(extents, "wipe", lambda *a: (_ for _ in ()).throw(Killed))
    with pytest.raises(Killed):
        backend.delete_volume(volume.id)
    monkeypatch.undo()
    return volume.id, data


def test_an_interrupted_wipe_is_finished_in_the_background_and_its_retry_waits_for_it(
    open_backend: _Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    volume_id, data = _interrupt_a_wiping_delete(open_backend, monkeypatch, "pvc-w")
    wiping, release = threading.Event(), threading.Event()
    wipe = extents.wipe

    def slow_wipe(path: Path, stop: threading.Event | None = None) -> None:
        wiping.set()
        assert release.wait(10)
        wipe(path, stop)

    monkeypatch.setattr(extents, "wipe", slow_wipe)
    backend = open_backend()  # returns while the wipe still runs
    assert wiping.wait(10)
    assert backend.health() is None
    # Until the storage is gone: its capacity stays counted, a retry of the deletion and a
    # create of the same name answer ABORTED (in progress), the volume is gone for the CO.
    assert backend.capacity(Parameters()) == 56 * MiB
    with pytest.raises(Aborted, match="being deleted"):
        backend.delete_volume(volume_id)
    with pytest.raises(Aborted, match="being deleted"):
        backend.create_volume(spec("pvc-w", 8 * MiB))
    assert backend.get_volume(volume_id) is None and data.exists()
    release.set()
    assert backend.wait_for_background(10)
    backend.delete_volume(volume_id)  # the retry, now OK
    assert not data.parent.exists()
    assert backend._store.volume(local(volume_id)) is None
    assert backend.capacity(Parameters()) == 64 * MiB


def test_a_backend_closed_during_a_background_wipe_leaves_it_to_the_next_start(
    open_backend: _Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    volume_id, data = _interrupt_a_wiping_delete(open_backend, monkeypatch, "pvc-c")
    wipe = extents.wipe
    wiping = threading.Event()

    def wipe_until_stopped(path: Path, stop: threading.Event | None = None) -> None:
        wiping.set()
        assert stop is not None and stop.wait(10)
        wipe(path, stop)

    monkeypatch.setattr(extents, "wipe", wipe_until_stopped)
    open_backend()
    assert wiping.wait(10)
    open_backend.close()  # stops the wipe at its next chunk
    store = Store(open_backend.root / "state.db")
    try:
        row = store.volume(local(volume_id))
        assert row is not None and row.state is State.DELETING
    finally:
        store.close()
    assert data.read_bytes() == b"secret" * 1000
    monkeypatch.undo()
    backend = open_backend()
    assert backend.wait_for_background(10)
    assert backend._store.volume(local(volume_id)) is None and not data.parent.exists()
    assert backend.capacity(Parameters()) == 64 * MiB


def test_leaked_storage_is_removed_at_start_and_foreign_files_are_left(
    open_backend: _Opener,
) -> None:
    backend = open_backend()
    kept = backend.create_volume(spec("kept", 4 * MiB))
    open_backend.close()
    root = open_backend.root
    leaked_dir = root / "volumes" / ("v" + "a" * 32)
    leaked_dir.mkdir()
    (leaked_dir / "data").write_text("x")
    leaked_block = root / "volumes" / ("v" + "b" * 32)
    leaked_block.mkdir()
    (leaked_block / IMAGE_NAME).write_bytes(b"\0" * 4096)
    leaked_snap = root / "snapshots" / ("s" + "c" * 32)
    leaked_snap.mkdir()
    foreign = root / "volumes" / "lost+found"
    foreign.mkdir()

    open_backend()
    assert not leaked_dir.exists() and not leaked_block.exists() and not leaked_snap.exists()
    assert foreign.is_dir()
    assert (root / "volumes" / local(kept.id)).is_dir()


def test_a_lost_database_is_not_mistaken_for_leaked_storage(open_backend: _Opener) -> None:
    backend = open_backend()
    volume = backend.create_volume(spec("pvc-a", 4 * MiB))
    (open_backend.root / "volumes" / local(volume.id) / "precious").write_text("data")
    open_backend.close()
    for name in ("state.db", "state.db-wal", "state.db-shm"):
        (open_backend.root / name).unlink(missing_ok=True)
    with pytest.raises(RuntimeError, match="state database was lost"):
        open_backend()
    assert (open_backend.root / "volumes" / local(volume.id) / "precious").read_text() == "data"


def test_a_failed_copy_is_rolled_back(open_backend: _Opener, runner: FailingRunner) -> None:
    backend = open_backend()
    source = backend.create_volume(spec("src", 4 * MiB))
    (open_backend.root / "volumes" / local(source.id) / "f").write_text("x")
    before = storage(open_backend.root)
    runner.fail.add("cp")
    with pytest.raises(Internal, match="injected failure"):
        backend.create_volume(
            spec("clone", 4 * MiB, source=ContentSource(SourceKind.VOLUME, source.id))
        )
    with pytest.raises(Internal):
        backend.create_snapshot("snap", source.id, {})
    assert storage(open_backend.root) == before
    assert backend._store.volume(local(ids.volume_id_for("clone", NODE))) is None
    assert backend.list_snapshots() == []
    assert backend.capacity(Parameters()) == 60 * MiB
    runner.fail.clear()
    clone = backend.create_volume(
        spec("clone", 4 * MiB, source=ContentSource(SourceKind.VOLUME, source.id))
    )
    assert (open_backend.root / "volumes" / local(clone.id) / "f").read_text() == "x"


# --- snapshots and content sources ------------------------------------------------------------


def test_snapshot_names_and_sources(open_backend: _Opener) -> None:
    backend = open_backend()
    a = backend.create_volume(spec("a", 4 * MiB))
    b = backend.create_volume(spec("b", 4 * MiB))
    snap = backend.create_snapshot("snap", a.id, {})
    assert snap.id == ids.snapshot_id_for("snap", NODE)
    assert snap.size_bytes == 4 * MiB and snap.source_volume_id == a.id and snap.ready
    assert backend.create_snapshot("snap", a.id, {}) == snap
    with pytest.raises(AlreadyExists, match="of volume"):
        backend.create_snapshot("snap", b.id, {})
    with pytest.raises(NotFound):
        backend.create_snapshot("other", ids.volume_id_for("missing", NODE), {})
    with pytest.raises(NotFound):
        backend.create_snapshot("other", "v" + "0" * 32 + "@another-node", {})
    assert backend.list_snapshots() == [snap]
    assert backend.get_snapshot(snap.id) == snap
    backend.delete_volume(a.id)  # snapshots are independent copies
    assert backend.get_snapshot(snap.id) == snap
    restored = backend.create_volume(
        spec("r", 4 * MiB, source=ContentSource(SourceKind.SNAPSHOT, snap.id))
    )
    assert restored.content_source == ContentSource(SourceKind.SNAPSHOT, snap.id)
    backend.delete_snapshot(snap.id)
    backend.delete_snapshot(snap.id)
    assert backend.get_snapshot(snap.id) is None


def test_content_sources_must_be_of_the_same_access_type(open_backend: _Opener) -> None:
    """(That a source fits the size asked for is services/sizing.py's to say, before.)"""
    backend = open_backend()
    a = backend.create_volume(spec("a", 8 * MiB))
    snap = backend.create_snapshot("snap", a.id, {})
    with pytest.raises(InvalidArgument, match="mount snapshot"):
        backend.create_volume(
            spec(
                "blk", 8 * MiB, AccessType.BLOCK, source=ContentSource(SourceKind.SNAPSHOT, snap.id)
            )
        )
    assert [v.id for v in backend.list_volumes()] == [a.id]


def test_directory_content_is_copied_for_snapshot_restore_and_clone(open_backend: _Opener) -> None:
    backend = open_backend()
    a = backend.create_volume(spec("a", 4 * MiB))
    data = open_backend.root / "volumes" / local(a.id)
    (data / "sub").mkdir()
    (data / "sub" / "f").write_bytes(b"version 1")
    os.chmod(data / "sub" / "f", 0o640)
    os.symlink("/etc/hostname", data / "link")
    snap = backend.create_snapshot("snap", a.id, {})
    (data / "sub" / "f").write_bytes(b"version 2")
    restored = backend.create_volume(
        spec("r", 4 * MiB, source=ContentSource(SourceKind.SNAPSHOT, snap.id))
    )
    clone = backend.create_volume(spec("c", 4 * MiB, source=ContentSource(SourceKind.VOLUME, a.id)))
    r = open_backend.root / "volumes" / local(restored.id)
    c = open_backend.root / "volumes" / local(clone.id)
    assert (r / "sub" / "f").read_bytes() == b"version 1"
    assert (c / "sub" / "f").read_bytes() == b"version 2"
    assert os.stat(r / "sub" / "f").st_mode & 0o777 == 0o640
    assert os.readlink(r / "link") == "/etc/hostname" and (r / "link").is_symlink()


# --- ids, publishing, conditions, health -----------------------------------------------------


def test_ids_of_other_nodes_or_malformed_ids_name_nothing(open_backend: _Opener) -> None:
    backend = open_backend()
    volume = backend.create_volume(spec("a", 4 * MiB))
    foreign = local(volume.id) + "@other-node"
    for bad in (foreign, "", "v123", local(volume.id), f"{local(volume.id)}@../x", "../volumes"):
        assert backend.get_volume(bad) is None
        backend.delete_volume(bad)
        backend.detach(bad)
        backend.refresh_attachment(bad)
        backend.delete_snapshot(bad)
        assert backend.get_snapshot(bad) is None
        for call in (backend.attach, backend.volume_condition):
            with pytest.raises(NotFound):
                call(bad)
        with pytest.raises(NotFound):
            backend.expand_volume(bad, 8 * MiB)
        with pytest.raises(NotFound):
            backend.set_published(bad, NODE, True)
    assert backend.get_volume(volume.id) == volume
    with pytest.raises(Internal):
        backend._layout.volume("../../etc")
    with pytest.raises(Internal):
        backend._layout.snapshot("s" + "0" * 31 + "/")


def test_published_nodes_are_recorded_and_block_deletion(open_backend: _Opener) -> None:
    backend = open_backend()
    volume = backend.create_volume(spec("a", 4 * MiB))
    backend.set_published(volume.id, "node-x", True)
    backend.set_published(volume.id, "node-x", True)
    published = backend.get_volume(volume.id)
    assert published is not None and published.published_nodes == {"node-x"}
    with pytest.raises(FailedPrecondition, match="still published"):
        backend.delete_volume(volume.id)
    published = open_backend().get_volume(volume.id)  # survives a restart
    assert published is not None and published.published_nodes == {"node-x"}
    assert open_backend.current is not None
    open_backend.current.set_published(volume.id, "node-x", False)
    open_backend.current.delete_volume(volume.id)
    assert storage(open_backend.root) == []


def test_volume_condition_reports_missing_storage(open_backend: _Opener) -> None:
    backend = open_backend()
    d = backend.create_volume(spec("d", 4 * MiB))
    b = backend.create_volume(spec("b", 4 * MiB, AccessType.BLOCK))
    assert not backend.volume_condition(d.id).abnormal
    assert not backend.volume_condition(b.id).abnormal
    os.rmdir(open_backend.root / "volumes" / local(d.id))
    (open_backend.root / "volumes" / local(b.id) / IMAGE_NAME).unlink()
    cond = backend.volume_condition(d.id)
    assert cond.abnormal and "backing directory" in cond.message and "missing" in cond.message
    cond = backend.volume_condition(b.id)
    assert cond.abnormal and "backing image" in cond.message
    with pytest.raises(FailedPrecondition, match="missing"):
        backend.attach(d.id)


def test_health(open_backend: _Opener) -> None:
    backend = open_backend()
    assert backend.health() is None
    assert backend.max_volumes_per_node == 0
    os.rmdir(open_backend.root / "snapshots")
    assert "snapshots is missing" in (backend.health() or "")


def test_a_directory_volume_has_nothing_to_attach(open_backend: _Opener) -> None:
    backend = open_backend()
    volume = backend.create_volume(spec("d", 4 * MiB))
    attachment = backend.attach(volume.id)
    assert attachment.path == str(open_backend.root.resolve() / "volumes" / local(volume.id))
    backend.detach(volume.id)
    backend.refresh_attachment(volume.id)
    assert backend.attach(volume.id) == attachment


# --- quota bookkeeping (real XFS quotas: tests/vm/test_hostpath_quota.py) ----------------------


class FakeQuota:
    def __init__(self, mountpoint: str, device: str = "") -> None:
        self.calls: list[tuple[object, ...]] = []
        FakeQuota.last = self

    last: FakeQuota

    def assign(self, directory: Path, project_id: int, stopping: object = None) -> None:
        self.calls.append(("assign", directory.name, project_id))

    def in_use(self, project_id: int) -> bool:
        return False

    def usage(self, project_id: int) -> ProjectUsage:
        return ProjectUsage(0, 0, 0)  # no limit yet: a start applies it

    def set_limit(self, project_id: int, hard_bytes: int) -> None:
        self.calls.append(("limit", project_id, hard_bytes))


def test_quota_calls_follow_the_volume(
    open_backend: _Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits_mod, "enforcement_problem", lambda mount, state_of: None)
    monkeypatch.setattr(limits_mod, "ProjectQuota", FakeQuota)
    monkeypatch.setattr(limits_mod, "project_of", lambda path: (0, False))
    backend = open_backend()
    quota = FakeQuota.last
    volume = backend.create_volume(spec("d", 4 * MiB))
    block = backend.create_volume(spec("b", 4 * MiB, AccessType.BLOCK))
    row = backend._store.volume(local(volume.id))
    assert row is not None and row.project_id == FIRST_PROJECT_ID
    pid = row.project_id
    assert volume.context[SIZE_ENFORCED_KEY] == "true"
    assert block.context[SIZE_ENFORCED_KEY] == "true"
    assert quota.calls == [("assign", local(volume.id), pid), ("limit", pid, 4 * MiB)]
    backend.expand_volume(volume.id, 6 * MiB)
    assert quota.calls[-1] == ("limit", pid, 6 * MiB)
    cond = backend.volume_condition(volume.id)
    assert cond.abnormal and "not applied" in cond.message

    backend = open_backend()  # at start, a volume without its project gets it back
    assert backend.wait_for_background(10)
    assert FakeQuota.last.calls == [("assign", local(volume.id), pid), ("limit", pid, 6 * MiB)]
    backend.delete_volume(volume.id)
    assert FakeQuota.last.calls[-1] == ("limit", pid, 0)
