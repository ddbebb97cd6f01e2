"""The hostpath backend's state: one SQLite database, the only record of what exists.

Every volume and snapshot is a row that moves through ``creating`` -> ``ready`` ->
``deleting`` -> (gone). A row is written, and committed with a full fsync, before the
storage it describes is touched, so after a kill at any point the database says what was
under way and the backend can finish it (see ``backend.py``).

Commits are grouped: SQLite writes a transaction to its write-ahead log without syncing it
(``synchronous=NORMAL``), and the write that committed it returns only once an ``fsync`` of
the log that began after the commit has ended (:class:`_GroupSync`). Writers that commit
while one sync is running share the next one, so concurrent requests pay one sync between
them instead of one each, and none returns before its change is on disk. (Under NORMAL
SQLite itself syncs the log before every checkpoint and the database after it, so a
checkpoint never loses what the log held.) A failed sync may have dropped written pages:
from then on every write fails until the driver is restarted.

Every lookup is by primary key or an index, so one operation costs the same with ten volumes
or ten thousand. The bytes allocated to volumes and snapshots are kept in a one-row table by
triggers, inside the same transaction as the change, so a capacity check does not add up
every row and the total cannot drift from the rows it sums.

The database is opened once per backend; one connection is shared by the backend's threads
under a lock (SQLite calls take microseconds; no copy or command runs under it). A lock file
next to the database keeps a second driver process away from the same root.
"""

from __future__ import annotations

import enum
import fcntl
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from csi_driver.model import AccessType, ContentSource, Parameters, SourceKind
from csi_driver.system.failure import SystemFailure

SCHEMA_VERSION = 1
#: project ids are handed out from here up; small numbers are left to the host's admin
FIRST_PROJECT_ID = 1_000_000
#: the kubelet's own project ids (its fsquota for emptyDir: counted up from 2**20 + 1) are
#: stepped over: after FIRST_PROJECT_ID's 48,577 ids the next ones come from 2**31 up
KUBELET_PROJECT_IDS = range(2**20 + 1, 2**31)
#: ids in use on the filesystem skipped at most, one allocation
MAX_PROJECT_ID_SKIPS = 1000

_SCHEMA = """
CREATE TABLE volumes (
    local_id        TEXT PRIMARY KEY,
    name            TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('creating', 'ready', 'deleting')),
    capacity_bytes  INTEGER NOT NULL CHECK (capacity_bytes > 0),
    access_type     TEXT NOT NULL CHECK (access_type IN ('mount', 'block')),
    fs_type         TEXT NOT NULL,
    parameters      TEXT NOT NULL,
    source_kind     TEXT CHECK (source_kind IN ('snapshot', 'volume')),
    source_id       TEXT,
    project_id      INTEGER UNIQUE,
    published       TEXT NOT NULL DEFAULT '[]',
    created_ns      INTEGER NOT NULL
);
CREATE INDEX volumes_state ON volumes (state);

CREATE TABLE snapshots (
    local_id          TEXT PRIMARY KEY,
    name              TEXT NOT NULL,
    state             TEXT NOT NULL CHECK (state IN ('creating', 'ready', 'deleting')),
    source_volume_id  TEXT NOT NULL,
    access_type       TEXT NOT NULL CHECK (access_type IN ('mount', 'block')),
    size_bytes        INTEGER NOT NULL CHECK (size_bytes > 0),
    created_ns        INTEGER NOT NULL
);
CREATE INDEX snapshots_state ON snapshots (state);

CREATE TABLE allocated (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    bytes  INTEGER NOT NULL
);
INSERT INTO allocated VALUES (1, 0);

CREATE TRIGGER volumes_insert AFTER INSERT ON volumes BEGIN
    UPDATE allocated SET bytes = bytes + NEW.capacity_bytes WHERE id = 1;
END;
CREATE TRIGGER volumes_delete AFTER DELETE ON volumes BEGIN
    UPDATE allocated SET bytes = bytes - OLD.capacity_bytes WHERE id = 1;
END;
CREATE TRIGGER volumes_resize AFTER UPDATE OF capacity_bytes ON volumes BEGIN
    UPDATE allocated SET bytes = bytes - OLD.capacity_bytes + NEW.capacity_bytes WHERE id = 1;
END;
CREATE TRIGGER snapshots_insert AFTER INSERT ON snapshots BEGIN
    UPDATE allocated SET bytes = bytes + NEW.size_bytes WHERE id = 1;
END;
CREATE TRIGGER snapshots_delete AFTER DELETE ON snapshots BEGIN
    UPDATE allocated SET bytes = bytes - OLD.size_bytes WHERE id = 1;
END;
"""

_MIGRATIONS: dict[int, str] = {}  # version reached -> SQL from the version before


class State(enum.Enum):
    CREATING = "creating"
    READY = "ready"
    DELETING = "deleting"


class StoreError(SystemFailure):
    """The database cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class VolumeRow:
    local_id: str
    name: str
    state: State
    capacity_bytes: int
    access_type: AccessType
    fs_type: str
    #: what the backend's validate_parameters returned, with any mutable changes since
    parameters: Parameters = field(default_factory=Parameters)
    source: ContentSource | None = None
    project_id: int | None = None
    published: frozenset[str] = frozenset()
    created_ns: int = 0


@dataclass(frozen=True)
class SnapshotRow:
    local_id: str
    name: str
    state: State
    source_volume_id: str
    access_type: AccessType
    size_bytes: int
    created_ns: int


_SELECT_VOLUMES = (
    "SELECT local_id, name, state, capacity_bytes, access_type, fs_type, parameters,"
    " source_kind, source_id, project_id, published, created_ns FROM volumes"
)
_SELECT_SNAPSHOTS = (
    "SELECT local_id, name, state, source_volume_id, access_type, size_bytes, created_ns"
    " FROM snapshots"
)
_INSERT_VOLUME = (
    "INSERT INTO volumes (local_id, name, state, capacity_bytes, access_type, fs_type,"
    " parameters, source_kind, source_id, project_id, published, created_ns)"
    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
)
_INSERT_SNAPSHOT = (
    "INSERT INTO snapshots (local_id, name, state, source_volume_id, access_type,"
    " size_bytes, created_ns) VALUES (?,?,?,?,?,?,?)"
)


def _free_project_id(candidate: int, taken: Callable[[int], bool] | None) -> int:
    start = candidate
    for _ in range(MAX_PROJECT_ID_SKIPS):
        if candidate in KUBELET_PROJECT_IDS:
            candidate = KUBELET_PROJECT_IDS.stop
        if candidate > 2**32 - 2:
            break
        if taken is None or not taken(candidate):
            return candidate
        candidate += 1
    raise StoreError(
        f"no free project id: {MAX_PROJECT_ID_SKIPS} ids from {start} are in use on the"
        " filesystem (by another root on it, or set by hand); free some or use another one"
    )


def _volume(row: tuple[object, ...]) -> VolumeRow:
    (local_id, name, state, capacity, access, fs_type, params, kind, src, pid, pub, created) = row
    source = ContentSource(SourceKind(str(kind)), str(src)) if kind is not None else None
    return VolumeRow(
        local_id=str(local_id),
        name=str(name),
        state=State(state),
        capacity_bytes=int(str(capacity)),
        access_type=AccessType(access),
        fs_type=str(fs_type),
        parameters=Parameters(json.loads(str(params))),
        source=source,
        project_id=None if pid is None else int(str(pid)),
        published=frozenset(json.loads(str(pub))),
        created_ns=int(str(created)),
    )


def _snapshot(row: tuple[object, ...]) -> SnapshotRow:
    local_id, name, state, source, access, size, created = row
    return SnapshotRow(
        local_id=str(local_id),
        name=str(name),
        state=State(state),
        source_volume_id=str(source),
        access_type=AccessType(access),
        size_bytes=int(str(size)),
        created_ns=int(str(created)),
    )


def _in_local_order(state: State | None, start: str, limit: int) -> tuple[str, tuple[object, ...]]:
    """The WHERE, ORDER BY and LIMIT of a listing in local-id order, with its arguments.

    A page (a ``start`` or a ``limit``) walks the primary key from ``start`` and stops after
    ``limit`` rows, so it costs its own rows whatever the table holds. ``+state`` is what keeps
    it there: on ``state = ?`` SQLite prefers the state index, which reads every row of that
    state and sorts them all before returning the first. Without a page, the state index is
    the right plan (recovery reads the few ``creating`` or ``deleting`` rows that way).
    """
    paged = bool(start or limit)
    where: list[str] = []
    args: list[object] = []
    if state is not None:
        where.append("+state = ?" if paged else "state = ?")
        args.append(state.value)
    if start:
        where.append("local_id >= ?")
        args.append(start)
    sql = (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY local_id"
    if limit > 0:
        sql += " LIMIT ?"
        args.append(limit)
    return sql, tuple(args)


class Store:
    """Rows of volumes and snapshots. Open once per root; :meth:`close` releases it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._commits = 0  # write transactions committed, the tickets of _GroupSync
        self._sync: _GroupSync | None = None  # none while the schema is set up (FULL)
        self._lock_fd = self._take_process_lock(path.with_name(path.name + ".lock"))
        #: True when this open created the database (an existing root with no database
        #: has lost its state: the backend must not take its storage for leftovers)
        self.created = False
        try:
            self._db = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=30.0
            )
        except BaseException:
            os.close(self._lock_fd)
            raise
        try:
            self._setup()
            self._sync = _GroupSync(self._open_log(), lambda: self._commits)
            self._db.execute("PRAGMA synchronous=NORMAL")
        except BaseException:
            self._db.close()
            os.close(self._lock_fd)
            raise

    def _open_log(self) -> int:
        """A descriptor of the write-ahead log, for :class:`_GroupSync` (the log exists while
        the connection is open, and its entry in the directory is made durable here)."""
        wal = self.path.with_name(self.path.name + "-wal")
        try:
            fd = os.open(wal, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            directory = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as exc:
            raise StoreError(f"cannot open the write-ahead log {wal}: {exc.strerror}") from exc
        return fd

    @staticmethod
    def _take_process_lock(path: Path) -> int:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(
                f"{path} is locked: another driver process uses this hostpath root; only one"
                " may run per root"
            ) from None
        return fd

    def _setup(self) -> None:
        db = self._db
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()
        if mode is None or str(mode[0]).lower() != "wal":
            raise StoreError(f"{self.path}: cannot switch SQLite to WAL mode (got {mode})")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        with self._transaction() as cur:
            version = int(cur.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} has schema version {version}, newer than this driver's"
                    f" {SCHEMA_VERSION}; run a driver at least as new as the one that wrote it"
                )
            if version == 0:
                self.created = True
                cur.executescript_in_transaction(_SCHEMA)
            else:
                for target in range(version + 1, SCHEMA_VERSION + 1):
                    cur.executescript_in_transaction(_MIGRATIONS[target])
            cur.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()
            if self._sync is not None:
                self._sync.close()
            os.close(self._lock_fd)

    def make_durable(self) -> None:
        """Return once every transaction committed so far is on disk."""
        if self._sync is not None:
            self._sync.wait(self._commits)

    @contextmanager
    def _transaction(self, *, durable: bool = True) -> Iterator[_Cursor]:
        """One write transaction, on disk when the block is left (see the module's doc)
        unless ``durable`` is false (then see :meth:`make_durable`)."""
        sync = self._sync
        if sync is not None:
            sync.check()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield _Cursor(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            self._commits += 1
            ticket = self._commits
        if sync is not None and durable:
            sync.wait(ticket)  # outside the lock: others commit meanwhile and share a sync

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        with self._lock:
            return list(self._db.execute(sql, args).fetchall())

    def ping(self) -> None:
        """The database answers, and no sync of its log has failed (after one, every write
        fails: the driver must be restarted, so its health says so)."""
        if self._sync is not None:
            self._sync.check()
        self._query("SELECT 1")

    def count_volumes(self, state: State) -> int:
        """Volume rows in ``state``, from the state index (no row read)."""
        rows = self._query("SELECT COUNT(*) FROM volumes WHERE state = ?", (state.value,))
        return int(str(rows[0][0]))

    def count_snapshots(self, state: State) -> int:
        rows = self._query("SELECT COUNT(*) FROM snapshots WHERE state = ?", (state.value,))
        return int(str(rows[0][0]))

    # --- volumes ---------------------------------------------------------------------------

    def volume(self, local_id: str) -> VolumeRow | None:
        rows = self._query(_SELECT_VOLUMES + " WHERE local_id = ?", (local_id,))
        return _volume(rows[0]) if rows else None

    def volumes(
        self, state: State | None = None, *, start: str = "", limit: int = 0
    ) -> list[VolumeRow]:
        """Rows in local-id order from ``start`` (inclusive), at most ``limit`` (0 = all)."""
        where, args = _in_local_order(state, start, limit)
        return [_volume(r) for r in self._query(_SELECT_VOLUMES + where, args)]

    def insert_volume(
        self,
        row: VolumeRow,
        *,
        with_project_id: bool,
        durable: bool = True,
        project_taken: Callable[[int], bool] | None = None,
    ) -> VolumeRow:
        """Insert a new row; with ``with_project_id`` it gets a project id no other volume
        has (one past the highest in use: an index lookup, not a scan), outside the
        kubelet's ids, and not one ``project_taken`` says the filesystem uses already
        (another root on it, the admin). With ``durable`` false it returns once committed
        (seen by every later read), and the caller calls :meth:`make_durable` before it
        acts on the row: outside a lock it holds, say."""
        with self._transaction(durable=durable) as cur:
            project_id = None
            if with_project_id:
                top = cur.execute("SELECT MAX(project_id) FROM volumes").fetchone()[0]
                project_id = _free_project_id(
                    FIRST_PROJECT_ID if top is None else int(top) + 1, project_taken
                )
            cur.execute(
                _INSERT_VOLUME,
                (
                    row.local_id,
                    row.name,
                    row.state.value,
                    row.capacity_bytes,
                    row.access_type.value,
                    row.fs_type,
                    json.dumps(dict(row.parameters), sort_keys=True),
                    row.source.kind.value if row.source else None,
                    row.source.id if row.source else None,
                    project_id,
                    json.dumps(sorted(row.published)),
                    row.created_ns,
                ),
            )
        stored = self.volume(row.local_id)
        assert stored is not None
        return stored

    def set_volume_state(self, local_id: str, state: State) -> None:
        with self._transaction() as cur:
            cur.execute("UPDATE volumes SET state = ? WHERE local_id = ?", (state.value, local_id))

    def set_volume_capacity(self, local_id: str, capacity_bytes: int) -> None:
        with self._transaction() as cur:
            cur.execute(
                "UPDATE volumes SET capacity_bytes = ? WHERE local_id = ?",
                (capacity_bytes, local_id),
            )

    def set_volume_parameters(self, local_id: str, parameters: Mapping[str, str]) -> None:
        with self._transaction() as cur:
            cur.execute(
                "UPDATE volumes SET parameters = ? WHERE local_id = ?",
                (json.dumps(dict(parameters), sort_keys=True), local_id),
            )

    def set_published(self, local_id: str, nodes: frozenset[str]) -> None:
        with self._transaction() as cur:
            cur.execute(
                "UPDATE volumes SET published = ? WHERE local_id = ?",
                (json.dumps(sorted(nodes)), local_id),
            )

    def delete_volume(self, local_id: str) -> None:
        with self._transaction() as cur:
            cur.execute("DELETE FROM volumes WHERE local_id = ?", (local_id,))

    # --- snapshots -------------------------------------------------------------------------

    def snapshot(self, local_id: str) -> SnapshotRow | None:
        rows = self._query(_SELECT_SNAPSHOTS + " WHERE local_id = ?", (local_id,))
        return _snapshot(rows[0]) if rows else None

    def snapshots(
        self, state: State | None = None, *, start: str = "", limit: int = 0
    ) -> list[SnapshotRow]:
        """Rows in local-id order from ``start`` (inclusive), at most ``limit`` (0 = all)."""
        where, args = _in_local_order(state, start, limit)
        return [_snapshot(r) for r in self._query(_SELECT_SNAPSHOTS + where, args)]

    def insert_snapshot(self, row: SnapshotRow) -> None:
        with self._transaction() as cur:
            cur.execute(
                _INSERT_SNAPSHOT,
                (
                    row.local_id,
                    row.name,
                    row.state.value,
                    row.source_volume_id,
                    row.access_type.value,
                    row.size_bytes,
                    row.created_ns,
                ),
            )

    def set_snapshot_state(self, local_id: str, state: State) -> None:
        with self._transaction() as cur:
            cur.execute(
                "UPDATE snapshots SET state = ? WHERE local_id = ?", (state.value, local_id)
            )

    def delete_snapshot(self, local_id: str) -> None:
        with self._transaction() as cur:
            cur.execute("DELETE FROM snapshots WHERE local_id = ?", (local_id,))

    # --- totals ----------------------------------------------------------------------------

    def allocated_bytes(self) -> int:
        """Bytes promised to volumes and snapshots in any state."""
        return int(str(self._query("SELECT bytes FROM allocated WHERE id = 1")[0][0]))


class _GroupSync:
    """Group commit: makes commits durable with as few syncs of the log as can be.

    A commit gets a ticket (the count of commits so far, taken as it ends); :meth:`wait`
    returns once a sync that began after that commit has ended. One waiter at a time syncs,
    covering every commit finished when it began; the others wait for it and then for the
    next sync if theirs came too late for this one."""

    def __init__(self, log_fd: int, committed: Callable[[], int]) -> None:
        self._fd, self._committed = log_fd, committed
        self._cond = threading.Condition(threading.Lock())
        self._synced = 0  # every commit up to this ticket is on disk
        self._syncing = False
        self._failure: str | None = None

    def check(self) -> None:
        if self._failure is not None:
            raise StoreError(self._failure)

    def wait(self, ticket: int) -> None:
        with self._cond:
            while self._synced < ticket:
                self.check()
                if self._syncing:
                    self._cond.wait()
                    continue
                self._syncing = True
                covered = self._committed()  # each of these commits has been written
                self._cond.release()
                try:
                    os.fsync(self._fd)
                    error = None
                except OSError as exc:
                    error = exc
                finally:
                    self._cond.acquire()
                    self._syncing = False
                    self._cond.notify_all()
                if error is not None:
                    self._failure = (
                        f"syncing the state database failed ({error.strerror}); what it"
                        " holds since may be lost: restart the driver"
                    )
                    self.check()
                self._synced = max(self._synced, covered)

    def close(self) -> None:
        os.close(self._fd)


class _Cursor:
    """The connection inside one transaction (``executescript`` would commit it)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def execute(self, sql: str, args: tuple[object, ...] = ()) -> sqlite3.Cursor:
        return self._db.execute(sql, args)

    def executescript_in_transaction(self, script: str) -> None:
        for statement in _statements(script):
            self._db.execute(statement)


def _statements(script: str) -> Iterator[str]:
    """Split a schema script into statements (trigger bodies hold ';' and end in 'END;')."""
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            if buffer.strip():
                yield buffer.strip()
            buffer = ""
    if buffer.strip():
        raise StoreError(f"incomplete SQL statement in the schema: {buffer.strip()[:80]!r}")
