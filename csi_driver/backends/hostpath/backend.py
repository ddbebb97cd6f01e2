"""Volumes as directories (mount access) or sparse image files (block access) under one root.

Layout under the root::

    state.db            SQLite: the only record of what exists (see store.py)
    volumes/<local id>/           a mount volume: the directory pods see
    volumes/<local id>/disk.img   a block volume: a sparse image, attached to a loop device
    snapshots/<local id>/         a snapshot: a full copy of the volume's directory tree, or
                                  disk.img, a copy of its image (reflinked where possible)

A local id is the part of a volume or snapshot id before ``@`` (``v`` or ``s`` and 32 hex
digits). It is the only thing a path is ever built from, and it is checked against that
grammar first, so no id can name a path outside the root.

Crash safety: every change is written to the database before the storage is touched.
Creating inserts a ``creating`` row, builds the storage and marks the row ``ready``; a retry
finds the unfinished row, clears it away and builds again from scratch (nothing of an
unfinished volume was ever handed out). Deleting marks the row ``deleting``, removes the
storage, then removes the row. At start the backend rolls back every ``creating`` row (the
CO's retry creates the volume afresh) and
removes storage that no row describes (left by a kill between creating storage and writing
its row, which cannot happen in this order, or by a kill inside a removal). A root whose
database is missing but whose storage is not is refused: its volumes are not leftovers.
Every ``deleting`` volume row is finished in a background thread instead, so that the driver
serves at once however much data a ``wipeOnDelete`` has left to overwrite: until a row is
gone its volume's capacity stays counted and a retry of its DeleteVolume answers ABORTED
(deletion in progress); a kill in the middle leaves the row, and the next start goes on.
A deletion, once its row says ``deleting``, runs to its end even when the RPC that asked for
it is cancelled: a wipe redone from the start by every retry might never finish. Anything
else a cancelled RPC leaves as a kill would: its commands are killed, no further one starts
(a creation's row stays ``creating``), and the retry or the next start finishes the work.

Sizes: a volume is exactly as big as it is asked to be (whole blocks, as ``round_size`` told
the caller). Its size is accounted against the capacity (the configured one, else the size
of the root's filesystem) and against the free space of the filesystem. A directory volume's
size is enforced only when the root is on XFS mounted with ``prjquota``: each directory gets
an XFS project with a hard limit of its size. Elsewhere sizes are accounted, not enforced;
every volume's context says which (:data:`SIZE_ENFORCED_KEY`). Block volumes are as big as
their image, so their size is always enforced.

Filesystem type: a directory volume lives on the root's own filesystem, so the only fs_type
a mount volume may ask for is that one (or none). Block volumes carry no filesystem here.

Operations on one volume or snapshot are serialised by the callers (the servicers' per-id
locks) and again here; what all volumes share (the capacity, project ids) is guarded here.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from csi_driver import bounded, ids
from csi_driver.backends import mutable
from csi_driver.backends.hostpath.store import SnapshotRow, State, Store, VolumeRow
from csi_driver.errors import (
    Aborted,
    AlreadyExists,
    CsiError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from csi_driver.locks import BlockingKeyLocks
from csi_driver.model import (
    AccessType,
    Attachment,
    AttachmentKind,
    ContentSource,
    Parameters,
    Snapshot,
    SourceKind,
    Volume,
    VolumeCondition,
    VolumeSpec,
    frozen_map,
)
from csi_driver.system import fsinfo
from csi_driver.system.fsinfo import FsInfoError
from csi_driver.system.loop import LoopError, Loops
from csi_driver.system.quota import (
    QuotaError,
    XfsProjectQuota,
    enforces_project_quota,
    project_of,
    quotable_path,
)
from csi_driver.system.runner import CommandError, Runner, bound_to
from csi_driver.units import round_up

log = logging.getLogger(__name__)

#: StorageClass parameters this backend accepts (key -> what it means); any other key is a
#: mistake worth reporting. wipeOnDelete is also a mutable parameter (ControllerModifyVolume).
PARAMETERS: Mapping[str, str] = MappingProxyType(
    {
        mutable.WIPE_ON_DELETE: "true: overwrite every byte the volume holds with zeros before"
        " its files are removed (default false)",
    }
)
WIPE_CHUNK = 1 << 20

#: volume context key: "true" when the volume cannot grow past its size, "false" when its
#: size is only accounted (a directory on a filesystem without project quotas)
SIZE_ENFORCED_KEY = "hostpath.nodelocal.csi.dev/size-enforced"

#: sizes are whole filesystem blocks
ALLOCATION_UNIT = 4096
IMAGE_NAME = "disk.img"
#: a new directory volume is writable by any user in the pod (as kubelet's emptyDir is);
#: the root and its subdirectories are private to the driver, so no host user reaches it
VOLUME_DIR_MODE = 0o777
PRIVATE_DIR_MODE = 0o700
IMAGE_MODE = 0o600

_VOLUME_LOCAL = re.compile(r"\Av[0-9a-f]{32}\Z")
_SNAPSHOT_LOCAL = re.compile(r"\As[0-9a-f]{32}\Z")


@dataclass(frozen=True)
class _Source:
    """A validated content source: where its data is and what it is."""

    source: ContentSource
    data: Path  # the directory or image to copy from


class _Stopped(Exception):
    """A background deletion ended early because the backend is closing."""


@contextlib.contextmanager
def _system_errors(what: str) -> Iterator[None]:
    """Failures of the host turned into CSI codes: no space is RESOURCE_EXHAUSTED, the rest
    INTERNAL with the cause."""
    try:
        yield
    except CsiError:
        raise
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceExhausted(f"cannot {what}: {exc.strerror}") from exc
        raise Internal(f"cannot {what}: {exc}") from exc
    except CommandError as exc:
        text = (exc.stderr or "").lower()
        if "no space left" in text or "quota exceeded" in text:
            raise ResourceExhausted(f"cannot {what}: {exc}") from exc
        raise Internal(f"cannot {what}: {exc}") from exc
    except (LoopError, QuotaError, FsInfoError) as exc:
        raise Internal(f"cannot {what}: {exc}") from exc


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _is_real_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


class HostPathBackend:
    """The :class:`~csi_driver.backends.base.Backend` for directories and loop-backed images."""

    max_volumes_per_node = 0

    def __init__(
        self, root: Path, capacity_bytes: int | None, node_id: str, runner: Runner
    ) -> None:
        if capacity_bytes is not None and capacity_bytes <= 0:
            raise ValueError(f"hostpath capacity must be positive, got {capacity_bytes}")
        root.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
        self.root = Path(os.path.realpath(root))
        self._capacity = capacity_bytes
        self._node = node_id
        self._runner = runner
        self._loops = Loops(runner)
        self._keys = BlockingKeyLocks()
        self._alloc = threading.Lock()
        self._volumes_dir = self.root / "volumes"
        self._snapshots_dir = self.root / "snapshots"
        #: interrupted deletions the background thread still owns (local ids)
        self._finishing: set[str] = set()
        self._finishing_lock = threading.Lock()
        self._stopping = threading.Event()
        self._background: threading.Thread | None = None
        self._store = Store(self.root / "state.db")
        try:
            self._check_state_matches_storage()
            for directory in (self._volumes_dir, self._snapshots_dir):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(directory, PRIVATE_DIR_MODE)
                if not _is_real_dir(directory):
                    raise RuntimeError(f"{directory} must be a directory, not a link or file")
            mount = fsinfo.mount_of(self.root)
            self._fs_type = mount.fs_type
            self._quota = self._project_quota(mount.mount_point, enforces_project_quota(mount))
            self._recover()
            self._start_finishing_deletions()
        except BaseException:
            self._store.close()
            raise

    def close(self) -> None:
        """Release the database (and the root, for another backend object); a background
        deletion stops at its next chunk and is finished by the next start."""
        self._stopping.set()
        if self._background is not None:
            self._background.join()
        self._store.close()

    def wait_for_background(self, timeout: float | None = None) -> bool:
        """Wait until the interrupted deletions found at start are finished; False on timeout."""
        if self._background is not None:
            self._background.join(timeout)
            return not self._background.is_alive()
        return True

    # --- start-up ----------------------------------------------------------------------------

    def _check_state_matches_storage(self) -> None:
        if not self._store.created:
            return
        found = [
            entry.name
            for directory in (self._volumes_dir, self._snapshots_dir)
            if directory.is_dir()
            for entry in os.scandir(directory)
        ]
        if found:
            raise RuntimeError(
                f"{self._store.path} did not exist but {len(found)} volumes or snapshots do"
                f" (e.g. {found[0]}); the state database was lost. Restore it, or move"
                f" {self._volumes_dir} and {self._snapshots_dir} away to start empty; nothing"
                " was changed"
            )

    def _project_quota(self, mountpoint: str, enforced: bool) -> XfsProjectQuota | None:
        if enforced and quotable_path(self._volumes_dir):
            log.info(
                "directory volume sizes are enforced with XFS project quotas",
                extra={"root": str(self.root), "mountpoint": mountpoint},
            )
            return XfsProjectQuota(self._runner, mountpoint)
        why = (
            f"its path {str(self._volumes_dir)!r} holds characters xfs_quota cannot take"
            if enforced
            else f"it is on {self._fs_type} without enforced project quotas (XFS mounted with"
            " prjquota would enforce them)"
        )
        log.warning(
            f"directory volume sizes under {self.root} are accounted but not enforced: {why}"
        )
        return None

    def _recover(self) -> None:
        """Finish what a killed predecessor left half done; O(volumes), once per start."""
        # One volume that cannot be cleaned up must not keep the driver (and every other
        # volume) down: it is logged and left for the next start or DeleteVolume. Interrupted
        # volume deletions are left to _start_finishing_deletions.
        for snap in self._store.snapshots(State.DELETING):
            log.info("finishing an interrupted snapshot deletion", extra={"local": snap.local_id})
            self._logged(functools.partial(self._finish_snapshot_delete, snap))
        # An unfinished creation was never handed to anyone (CreateVolume did not answer), and
        # a retry rebuilds it from scratch anyway: roll it back, so a create that is never
        # retried holds no storage and no capacity.
        for row in self._store.volumes(State.CREATING):
            log.info("rolling back an interrupted volume creation", extra={"local": row.local_id})
            self._logged(functools.partial(self._finish_volume_delete, row))
        for snap in self._store.snapshots(State.CREATING):
            log.info("rolling back an interrupted snapshot", extra={"local": snap.local_id})
            self._logged(functools.partial(self._finish_snapshot_delete, snap))
        volumes = {row.local_id: row for row in self._store.volumes()}
        self._sweep(self._volumes_dir, _VOLUME_LOCAL, set(volumes))
        self._sweep(
            self._snapshots_dir, _SNAPSHOT_LOCAL, {s.local_id for s in self._store.snapshots()}
        )
        if self._quota is not None:
            for row in volumes.values():
                if row.state is State.READY and row.access_type is AccessType.MOUNT:
                    self._ensure_quota(row)

    def _start_finishing_deletions(self) -> None:
        rows = self._store.volumes(State.DELETING)
        if not rows:
            return
        self._finishing.update(row.local_id for row in rows)
        self._background = threading.Thread(
            target=self._finish_deletions,
            args=([row.local_id for row in rows],),
            name="hostpath-interrupted-deletions",
            daemon=True,
        )
        self._background.start()

    def _finish_deletions(self, locals_: list[str]) -> None:
        for local in locals_:
            try:
                if self._stopping.is_set():
                    return
                with self._keys.hold(local):
                    row = self._store.volume(local)
                    if row is None or row.state is not State.DELETING:
                        continue
                    log.info("finishing an interrupted volume deletion", extra={"local": local})
                    self._logged(functools.partial(self._finish_volume_delete, row, self._stopping))
                    if self._store.volume(local) is None:
                        log.info("finished an interrupted volume deletion", extra={"local": local})
            except _Stopped:
                log.info(
                    "interrupted volume deletion left for the next start", extra={"local": local}
                )
                return
            except Exception:
                log.exception(
                    "cannot finish an interrupted volume deletion; the next start or a retry"
                    " of its DeleteVolume will",
                    extra={"local": local},
                )
            finally:
                with self._finishing_lock:
                    self._finishing.discard(local)

    def _refuse_while_finishing(self, local: str) -> None:
        with self._finishing_lock:
            busy = local in self._finishing
        if busy:
            raise Aborted(
                f"volume {local}@{self._node} is being deleted: the driver is finishing a deletion"
                " that a restart interrupted; retry later"
            )

    def _sweep(self, directory: Path, grammar: re.Pattern[str], known: set[str]) -> None:
        for entry in os.scandir(directory):
            if entry.name in known:
                continue
            path = directory / entry.name
            if not grammar.match(entry.name):
                log.warning(f"leaving {path} alone: not created by this driver")
                continue
            log.warning(f"removing {path}: storage without a volume or snapshot (leaked)")
            self._logged(functools.partial(self._remove_leaked, path))

    def _remove_leaked(self, path: Path) -> None:
        with _system_errors(f"remove leaked storage {path}"):
            image = self._data(path, AccessType.BLOCK)
            if image is not None:
                self._loops.detach_all(image)
            fsinfo.remove_tree(self._runner, path)

    @staticmethod
    def _logged(action: Callable[[], None]) -> None:
        try:
            action()
        except CsiError as exc:
            log.error(f"start-up clean-up failed, will retry at the next start: {exc}")

    def _ensure_quota(self, row: VolumeRow) -> None:
        """Give a directory volume its project and limit if it lacks them (a root remounted
        with prjquota after the volume was made)."""
        assert self._quota is not None and row.project_id is not None
        path = self._volume_path(row.local_id)
        if not _is_real_dir(path):
            return
        try:
            if project_of(path) == (row.project_id, True):
                return
            log.info(f"applying the size limit of {row.local_id} (project {row.project_id})")
            self._quota.assign(path, row.project_id)
            self._quota.set_limit(row.project_id, row.capacity_bytes)
        except QuotaError as exc:
            log.error(f"cannot apply the size limit of {row.local_id}: {exc}")

    # --- paths -------------------------------------------------------------------------------

    def _volume_path(self, local: str) -> Path:
        if not _VOLUME_LOCAL.match(local):
            raise Internal(f"refusing a path for malformed volume id part {local!r}")
        return self._volumes_dir / local

    def _snapshot_path(self, local: str) -> Path:
        if not _SNAPSHOT_LOCAL.match(local):
            raise Internal(f"refusing a path for malformed snapshot id part {local!r}")
        return self._snapshots_dir / local

    @staticmethod
    def _data(base: Path, access_type: AccessType) -> Path | None:
        """The directory itself, or the image inside it; None unless that is really there.
        Nothing on the way is a symlink, so acting on the answer never leaves the root."""
        if not _is_real_dir(base):
            return None
        if access_type is AccessType.MOUNT:
            return base
        image = base / IMAGE_NAME
        return image if _is_real_file(image) else None

    def _image(self, local: str) -> Path | None:
        return self._data(self._volume_path(local), AccessType.BLOCK)

    def _local(self, value: str, kind: str) -> str | None:
        """The local part of an id of this node's kind ``kind``; None for anything else."""
        parsed = ids.parse(value, kind)
        if parsed is None or parsed.node_id != self._node:
            return None
        return parsed.local

    # --- conversion --------------------------------------------------------------------------

    def _to_volume(self, row: VolumeRow) -> Volume:
        enforced = row.access_type is AccessType.BLOCK or self._quota is not None
        return Volume(
            id=f"{row.local_id}@{self._node}",
            name=row.name,
            capacity_bytes=row.capacity_bytes,
            access_type=row.access_type,
            fs_type=row.fs_type,
            node_id=self._node,
            parameters=row.parameters,
            content_source=row.source,
            context=frozen_map({SIZE_ENFORCED_KEY: "true" if enforced else "false"}),
            published_nodes=row.published,
        )

    def _to_snapshot(self, row: SnapshotRow) -> Snapshot:
        return Snapshot(
            id=f"{row.local_id}@{self._node}",
            name=row.name,
            source_volume_id=row.source_volume_id,
            size_bytes=row.size_bytes,
            creation_time_ns=row.created_ns,
            ready=True,
        )

    # --- simple answers ----------------------------------------------------------------------

    def health(self) -> str | None:
        if not _is_real_dir(self.root):
            return f"hostpath root {self.root} is missing"
        for directory in (self._volumes_dir, self._snapshots_dir):
            if not _is_real_dir(directory):
                return f"{directory} is missing"
        if not os.access(self.root, os.W_OK) or not os.access(self._volumes_dir, os.W_OK):
            return f"hostpath root {self.root} is not writable"
        try:
            self._store.ping()
        except Exception as exc:
            return f"state database {self._store.path} cannot be read: {exc}"
        return None

    def validate_parameters(self, parameters: Mapping[str, str]) -> Parameters:
        unknown = sorted(set(parameters) - set(PARAMETERS))
        if unknown:
            accepted = f"it accepts {sorted(PARAMETERS)}" if PARAMETERS else "it takes none"
            raise InvalidArgument(
                f"unknown parameters {unknown} for the hostpath backend; {accepted}"
            )
        return Parameters(mutable.apply({}, mutable.validate_mutable(parameters, "hostpath")))

    def validate_mutable_parameters(self, parameters: Mapping[str, str]) -> Mapping[str, str]:
        return mutable.validate_mutable(parameters, "hostpath")

    def modify_volume(self, volume_id: str, changes: Mapping[str, str]) -> Volume:
        row = self._ready_volume(volume_id)
        with self._keys.hold(row.local_id):
            row = self._ready_volume(volume_id)
            wanted = mutable.apply(row.parameters, changes)
            if wanted != dict(row.parameters):
                self._store.set_volume_parameters(row.local_id, wanted)
                log.info(
                    "modified volume", extra={"volume_id": volume_id, "changes": dict(changes)}
                )
            return self._to_volume(self._ready_volume(volume_id))

    def supported_fs_types(self) -> Sequence[str]:
        return [self._fs_type]

    def round_size(self, size_bytes: int, parameters: Parameters) -> int:
        return max(ALLOCATION_UNIT, round_up(size_bytes, ALLOCATION_UNIT))

    def capacity(self, parameters: Parameters) -> int:
        with self._alloc:
            return self._available()

    def _available(self) -> int:
        """Bytes a new allocation may take: the capacity not promised to anything yet, and
        never more than is free on the filesystem. Called under ``_alloc``."""
        with _system_errors(f"read the free space of {self.root}"):
            room = fsinfo.space(self.root)
        budget = self._capacity if self._capacity is not None else room.total_bytes
        return max(0, min(budget - self._store.allocated_bytes(), room.free_bytes))

    def _reserve(self, size: int, what: str) -> None:
        available = self._available()
        if size > available:
            raise ResourceExhausted(
                f"not enough room for {what} of {size} bytes: {available} bytes available"
                f" under {self.root}"
            )

    # --- volumes -----------------------------------------------------------------------------

    def get_volume(self, volume_id: str) -> Volume | None:
        local = self._local(volume_id, "v")
        row = self._store.volume(local) if local else None
        return self._to_volume(row) if row and row.state is State.READY else None

    def list_volumes(self) -> Sequence[Volume]:
        return [self._to_volume(r) for r in self._store.volumes(State.READY)]

    def _ready_volume(self, volume_id: str) -> VolumeRow:
        local = self._local(volume_id, "v")
        row = self._store.volume(local) if local else None
        if row is None or row.state is not State.READY:
            raise NotFound(f"volume {volume_id!r} does not exist")
        return row

    def _fs_type_for(self, spec: VolumeSpec) -> str:
        if spec.access_type is AccessType.BLOCK:
            if spec.fs_type:
                raise InvalidArgument(
                    f"fs_type {spec.fs_type!r} makes no sense for a block volume; leave it empty"
                )
            return ""
        if spec.fs_type not in ("", self._fs_type):
            raise InvalidArgument(
                f"fs_type {spec.fs_type!r} is not possible: a hostpath volume is a directory on"
                f" the {self._fs_type} filesystem of {self.root}; ask for {self._fs_type!r} or"
                " leave fs_type empty"
            )
        return self._fs_type

    def create_volume(self, spec: VolumeSpec) -> Volume:
        wanted = VolumeRow(
            local_id=ids.volume_id_for(spec.name, self._node).partition("@")[0],
            name=spec.name,
            state=State.CREATING,
            capacity_bytes=spec.capacity_bytes,
            access_type=spec.access_type,
            fs_type=self._fs_type_for(spec),
            parameters=spec.parameters,
            source=spec.content_source,
            created_ns=time.time_ns(),
        )
        source_local = self._source_local(spec.content_source)
        self._refuse_while_finishing(wanted.local_id)
        with self._keys.hold(wanted.local_id, source_local):
            row = self._store.volume(wanted.local_id)
            if row is not None and row.state is State.READY:
                return self._to_volume(row)  # the caller found that it answers the request
            if row is not None:
                # A volume being deleted, or an unfinished one nobody was ever given: clear
                # it away and start afresh (a retry rebuilds from scratch anyway).
                with bound_to(None):
                    self._finish_volume_delete(row)
            source = self._check_source(spec.content_source, wanted)
            with self._alloc:
                self._reserve(wanted.capacity_bytes, f"volume {spec.name!r}")
                row = self._store.insert_volume(
                    wanted, with_project_id=wanted.access_type is AccessType.MOUNT
                )
            try:
                with _system_errors(f"create volume {spec.name!r}"):
                    self._build_volume(row, source)
            except Exception:
                self._undo(lambda: self._finish_volume_delete(row), f"volume {spec.name!r}")
                raise
            self._store.set_volume_state(row.local_id, State.READY)
            ready = self._store.volume(row.local_id)
            assert ready is not None
            log.info(
                "created volume",
                extra={"volume_id": f"{row.local_id}@{self._node}", "bytes": row.capacity_bytes},
            )
            return self._to_volume(ready)

    @staticmethod
    def _undo(action: Callable[[], None], what: str) -> None:
        try:
            action()
        except Exception:
            log.exception(
                f"cannot roll back the failed creation of {what}; a retry or a restart cleans it up"
            )

    def _source_local(self, source: ContentSource | None) -> str:
        if source is None:
            return ""
        kind = "s" if source.kind is SourceKind.SNAPSHOT else "v"
        return self._local(source.id, kind) or ""

    def _check_source(self, source: ContentSource | None, wanted: VolumeRow) -> _Source | None:
        if source is None:
            return None
        what = source.kind.value
        local = self._source_local(source)
        if source.kind is SourceKind.SNAPSHOT:
            snap = self._store.snapshot(local) if local else None
            if snap is None or snap.state is not State.READY:
                raise NotFound(f"source snapshot {source.id!r} does not exist")
            access, base = snap.access_type, self._snapshot_path(local)
        else:
            vol = self._store.volume(local) if local else None
            if vol is None or vol.state is not State.READY:
                raise NotFound(f"source volume {source.id!r} does not exist")
            access, base = vol.access_type, self._volume_path(local)
        if access is not wanted.access_type:
            raise InvalidArgument(
                f"source {what} {source.id!r} is a {access.value} {what}; a"
                f" {wanted.access_type.value} volume cannot be made from it"
            )
        data = self._data(base, access)
        if data is None:
            raise FailedPrecondition(f"the data of source {what} {source.id!r} ({base}) is missing")
        return _Source(source, data)

    def _build_volume(self, row: VolumeRow, source: _Source | None) -> None:
        path = self._volume_path(row.local_id)
        # Leftovers of an earlier attempt were never handed out: start from nothing.
        fsinfo.remove_tree(self._runner, path)
        if row.access_type is AccessType.MOUNT:
            os.mkdir(path, PRIVATE_DIR_MODE)
            os.chmod(path, VOLUME_DIR_MODE)
            if self._quota is not None and row.project_id is not None:
                self._quota.assign(path, row.project_id)
                self._quota.set_limit(row.project_id, row.capacity_bytes)
            if source is not None:
                fsinfo.copy_tree(self._runner, source.data, path)
                fsinfo.sync_filesystem(path)
            fsinfo.fsync_path(path)
        else:
            os.mkdir(path, PRIVATE_DIR_MODE)
            image = path / IMAGE_NAME
            if source is not None:
                fsinfo.copy_file(self._runner, source.data, image)
            else:
                fd = os.open(
                    image,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    IMAGE_MODE,
                )
                os.close(fd)
            self._grow_image(image, row.capacity_bytes)
            fsinfo.fsync_path(path)
        fsinfo.fsync_path(self._volumes_dir)

    @staticmethod
    def _grow_image(image: Path, size: int) -> None:
        """Make the image at least ``size`` bytes (holes, no data written); never shrink."""
        fd = os.open(image, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise Internal(f"{image} is not a regular file")
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)

    def delete_volume(self, volume_id: str) -> None:
        local = self._local(volume_id, "v")
        if local is None:
            return
        self._refuse_while_finishing(local)
        with self._keys.hold(local):
            row = self._store.volume(local)
            if row is None:
                path = self._volume_path(local)
                if os.path.lexists(path):
                    log.warning(f"removing {path}: storage without a volume (leaked)")
                    self._remove_leaked(path)
                return
            if row.state is not State.DELETING:
                if row.published:
                    raise FailedPrecondition(
                        f"volume {volume_id!r} is still published to {sorted(row.published)};"
                        " unpublish it first"
                    )
                self._refuse_if_in_use(row)
                self._store.set_volume_state(local, State.DELETING)
            with bound_to(None):  # a deletion once begun is finished: see the module docstring
                self._finish_volume_delete(row)
        log.info("deleted volume", extra={"volume_id": volume_id})

    def _refuse_if_in_use(self, row: VolumeRow) -> None:
        """Deleting a volume that is mounted somewhere would pull the data from under it."""
        path = self._volume_path(row.local_id)
        attached: list[str] = []
        with _system_errors(f"find out whether volume {row.local_id} is in use"):
            if row.access_type is AccessType.MOUNT:
                used = fsinfo.mounts_showing(path) if _is_real_dir(path) else []
            else:
                image = self._image(row.local_id)
                devices = self._loops.devices_for(image) if image else []
                used = [
                    m
                    for dev in devices
                    for m in fsinfo.mounts_of_device(dev.name) + fsinfo.mounts_showing(dev.name)
                ]
                # Block volumes are staged without a mount: the loop device attached for the
                # stage is all that shows it (one on its way out, autoclear, is not).
                attached = [dev.name for dev in devices if not dev.autoclear]
        where = f"mounted at {bounded.listing(used)}" if used else ""
        if not where and attached:
            where = f"staged on this node as {bounded.listing(attached)}"
        if where:
            raise FailedPrecondition(
                f"volume {row.local_id}@{self._node} is still in use, {where};"
                " unpublish and unstage it first"
            )

    def _finish_volume_delete(self, row: VolumeRow, stop: threading.Event | None = None) -> None:
        """Remove the storage, then the row. ``stop`` ends a wipe early (raising _Stopped), for a
        closing backend."""
        path = self._volume_path(row.local_id)
        with _system_errors(f"delete volume {row.local_id}"):
            image = self._image(row.local_id)
            if image is not None:
                self._loops.detach_all(image)
            if row.parameters.get(mutable.WIPE_ON_DELETE) == "true" and _is_real_dir(path):
                self._wipe(path, stop)
            fsinfo.remove_tree(self._runner, path)
            if self._quota is not None and row.project_id is not None:
                try:
                    self._quota.set_limit(row.project_id, 0)
                except QuotaError as exc:
                    log.warning(f"cannot clear the quota of project {row.project_id}: {exc}")
            fsinfo.fsync_path(self._volumes_dir)
        self._store.delete_volume(row.local_id)

    @staticmethod
    def _wipe(path: Path, stop: threading.Event | None = None) -> None:
        """Overwrite the data of every regular file under ``path`` with zeros, in place (only
        the extents that hold data: holes stay holes), and flush it to the disk. Symlinks are
        never followed: a link a pod left in its volume cannot point the wipe elsewhere."""
        zeros = bytes(WIPE_CHUNK)
        for directory, _, files in os.walk(path, followlinks=False):
            for name in files:
                try:
                    fd = os.open(
                        os.path.join(directory, name),
                        os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                    )
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENXIO, errno.ENOENT):
                        continue  # a symlink, a socket or fifo, or already gone
                    raise
                try:
                    if not stat.S_ISREG(os.fstat(fd).st_mode):
                        continue
                    end = os.fstat(fd).st_size
                    offset = 0
                    while offset < end:
                        try:
                            offset = os.lseek(fd, offset, os.SEEK_DATA)
                            hole = os.lseek(fd, offset, os.SEEK_HOLE)
                        except OSError as exc:
                            if exc.errno == errno.ENXIO:
                                break  # no data past offset
                            raise
                        while offset < hole:
                            if stop is not None and stop.is_set():
                                raise _Stopped
                            offset += os.pwrite(fd, zeros[: min(WIPE_CHUNK, hole - offset)], offset)
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def expand_volume(self, volume_id: str, size_bytes: int) -> Volume:
        row = self._ready_volume(volume_id)
        with self._keys.hold(row.local_id):
            row = self._ready_volume(volume_id)
            if size_bytes <= row.capacity_bytes:
                return self._to_volume(row)
            path = self._volume_path(row.local_id)
            with self._alloc, _system_errors(f"expand volume {volume_id!r}"):
                self._reserve(size_bytes - row.capacity_bytes, f"growing volume {volume_id!r}")
                # Storage first: a kill before the row is updated leaves a retry to do it all
                # again, which is harmless; the other order would lose the growth.
                if row.access_type is AccessType.BLOCK:
                    image = self._image(row.local_id)
                    if image is None:
                        raise FailedPrecondition(
                            f"the image {path / IMAGE_NAME} of {volume_id!r} is missing"
                        )
                    self._grow_image(image, size_bytes)
                elif self._quota is not None and row.project_id is not None:
                    self._quota.set_limit(row.project_id, size_bytes)
                self._store.set_volume_capacity(row.local_id, size_bytes)
            log.info("expanded volume", extra={"volume_id": volume_id, "bytes": size_bytes})
            return self._to_volume(self._ready_volume(volume_id))

    def set_published(self, volume_id: str, node_id: str, published: bool) -> None:
        row = self._ready_volume(volume_id)
        with self._keys.hold(row.local_id):
            row = self._ready_volume(volume_id)
            nodes = row.published | {node_id} if published else row.published - {node_id}
            if nodes != row.published:
                self._store.set_published(row.local_id, nodes)

    def volume_condition(self, volume_id: str) -> VolumeCondition:
        row = self._ready_volume(volume_id)
        path = self._volume_path(row.local_id)
        if row.access_type is AccessType.MOUNT:
            if not _is_real_dir(path):
                return VolumeCondition(True, f"backing directory {path} is missing")
            if self._quota is not None and row.project_id is not None:
                try:
                    project = project_of(path)
                except QuotaError as exc:
                    return VolumeCondition(True, str(exc))
                if project != (row.project_id, True):
                    return VolumeCondition(
                        True, f"the size limit of {path} is not applied (project {project[0]})"
                    )
            return VolumeCondition.healthy()
        image = self._image(row.local_id)
        if image is None:
            return VolumeCondition(True, f"backing image {path / IMAGE_NAME} is missing")
        size = os.lstat(image).st_size
        if size < row.capacity_bytes:
            return VolumeCondition(
                True, f"backing image {image} has {size} bytes, less than {row.capacity_bytes}"
            )
        return VolumeCondition.healthy()

    # --- snapshots ---------------------------------------------------------------------------

    def get_snapshot(self, snapshot_id: str) -> Snapshot | None:
        local = self._local(snapshot_id, "s")
        row = self._store.snapshot(local) if local else None
        return self._to_snapshot(row) if row and row.state is State.READY else None

    def list_snapshots(self) -> Sequence[Snapshot]:
        return [self._to_snapshot(r) for r in self._store.snapshots(State.READY)]

    def create_snapshot(
        self, name: str, source_volume_id: str, parameters: Mapping[str, str]
    ) -> Snapshot:
        self.validate_parameters(parameters)
        if not name:
            raise InvalidArgument("a snapshot needs a name")
        local = ids.snapshot_id_for(name, self._node).partition("@")[0]
        source_local = self._local(source_volume_id, "v") or ""
        with self._keys.hold(local, source_local):
            row = self._store.snapshot(local)
            if row is not None:
                same = row.source_volume_id == source_volume_id and row.name == name
                if row.state is State.READY:
                    if not same:
                        raise AlreadyExists(
                            f"snapshot {name!r} already exists, of volume"
                            f" {row.source_volume_id!r}, not {source_volume_id!r}"
                        )
                    return self._to_snapshot(row)
                if row.state is State.DELETING or not same:
                    self._finish_snapshot_delete(row)
                    row = None
            source = self._store.volume(source_local) if source_local else None
            if source is None or source.state is not State.READY:
                raise NotFound(f"source volume {source_volume_id!r} does not exist")
            data = self._data(self._volume_path(source.local_id), source.access_type)
            if data is None:
                raise FailedPrecondition(f"the data of volume {source_volume_id!r} is missing")
            if row is None:
                row = SnapshotRow(
                    local_id=local,
                    name=name,
                    state=State.CREATING,
                    source_volume_id=source_volume_id,
                    access_type=source.access_type,
                    size_bytes=source.capacity_bytes,
                    created_ns=time.time_ns(),
                )
                with self._alloc:
                    self._reserve(row.size_bytes, f"snapshot {name!r}")
                    self._store.insert_snapshot(row)
            try:
                with _system_errors(f"create snapshot {name!r}"):
                    self._build_snapshot(row, data)
            except Exception:
                failed = row
                self._undo(lambda: self._finish_snapshot_delete(failed), f"snapshot {name!r}")
                raise
            self._store.set_snapshot_state(local, State.READY)
            ready = self._store.snapshot(local)
            assert ready is not None
            log.info("created snapshot", extra={"snapshot_id": f"{local}@{self._node}"})
            return self._to_snapshot(ready)

    def _build_snapshot(self, row: SnapshotRow, data: Path) -> None:
        path = self._snapshot_path(row.local_id)
        fsinfo.remove_tree(self._runner, path)
        os.mkdir(path, PRIVATE_DIR_MODE)
        if row.access_type is AccessType.MOUNT:
            fsinfo.copy_tree(self._runner, data, path)
        else:
            fsinfo.copy_file(self._runner, data, path / IMAGE_NAME)
        fsinfo.sync_filesystem(path)
        fsinfo.fsync_path(path)
        fsinfo.fsync_path(self._snapshots_dir)

    def delete_snapshot(self, snapshot_id: str) -> None:
        local = self._local(snapshot_id, "s")
        if local is None:
            return
        with self._keys.hold(local):
            row = self._store.snapshot(local)
            if row is None:
                path = self._snapshot_path(local)
                if os.path.lexists(path):
                    with _system_errors(f"remove {path}"):
                        fsinfo.remove_tree(self._runner, path)
                return
            if row.state is not State.DELETING:
                self._store.set_snapshot_state(local, State.DELETING)
            with bound_to(None):
                self._finish_snapshot_delete(row)
        log.info("deleted snapshot", extra={"snapshot_id": snapshot_id})

    def _finish_snapshot_delete(self, row: SnapshotRow) -> None:
        path = self._snapshot_path(row.local_id)
        with _system_errors(f"delete snapshot {row.local_id}"):
            fsinfo.remove_tree(self._runner, path)
            fsinfo.fsync_path(self._snapshots_dir)
        self._store.delete_snapshot(row.local_id)

    # --- node side ---------------------------------------------------------------------------

    def attach(self, volume_id: str) -> Attachment:
        row = self._ready_volume(volume_id)
        path = self._volume_path(row.local_id)
        if row.access_type is AccessType.MOUNT:
            if not _is_real_dir(path):
                raise FailedPrecondition(f"backing directory {path} of {volume_id!r} is missing")
            return Attachment(AttachmentKind.DIRECTORY, str(path))
        image = self._image(row.local_id)
        if image is None:
            raise FailedPrecondition(
                f"backing image {path / IMAGE_NAME} of {volume_id!r} is missing"
            )
        with self._keys.hold(row.local_id), _system_errors(f"attach {image}"):
            return Attachment(AttachmentKind.BLOCK_DEVICE, self._loops.attach(image))

    def locate(self, volume_id: str) -> Attachment | None:
        local = self._local(volume_id, "v")
        row = self._store.volume(local) if local else None
        if row is None:
            return None
        if row.access_type is AccessType.MOUNT:
            return Attachment(AttachmentKind.DIRECTORY, str(self._volume_path(row.local_id)))
        image = self._image(row.local_id)
        if image is None:
            return None
        with _system_errors(f"look up the loop device of {image}"):
            devices = [d for d in self._loops.devices_for(image) if not d.autoclear]
        # the same device attach() hands out (one being detached lazily is not it)
        return Attachment(AttachmentKind.BLOCK_DEVICE, devices[0].name) if devices else None

    def detach(self, volume_id: str) -> None:
        local = self._local(volume_id, "v")
        row = self._store.volume(local) if local else None
        if row is None or row.access_type is not AccessType.BLOCK:
            return
        image = self._image(row.local_id)
        if image is None:
            return
        with self._keys.hold(row.local_id), _system_errors(f"detach {image}"):
            self._loops.detach_all(image)

    def refresh_attachment(self, volume_id: str) -> None:
        local = self._local(volume_id, "v")
        row = self._store.volume(local) if local else None
        if row is None or row.access_type is not AccessType.BLOCK:
            return
        image = self._image(row.local_id)
        if image is None:
            return
        with self._keys.hold(row.local_id), _system_errors(f"resize the loop device of {image}"):
            self._loops.refresh(image)
