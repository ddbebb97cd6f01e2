"""The snapshots of one hostpath root: a full copy of a volume's directory tree, or of its
image (reflinked where the filesystem can), made durable before the snapshot is ready.

A snapshot follows the volumes' crash model (backend.py): its row says ``creating`` while it
is copied and ``deleting`` while it is removed, and what a kill leaves is finished by the
retry or at the next start (recovery.py), with the same :meth:`Snapshots.finish_delete`.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from csi_driver import ids
from csi_driver.backends.base import listed_after, local_range
from csi_driver.backends.hostpath.layout import IMAGE_NAME, PRIVATE_DIR_MODE
from csi_driver.backends.hostpath.root import Root
from csi_driver.backends.hostpath.store import SnapshotRow, State
from csi_driver.backends.hostpath.volumes import undo
from csi_driver.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from csi_driver.model import AccessType, Snapshot
from csi_driver.system import fsinfo
from csi_driver.system.runner import bound_to
from csi_driver.system_errors import system_errors

log = logging.getLogger(__name__)


class Snapshots:
    """Snapshots of the volumes under one root."""

    def __init__(self, root: Root) -> None:
        self._root = root
        self._store = root.store
        self._layout = root.layout

    def to_snapshot(self, row: SnapshotRow) -> Snapshot:
        return Snapshot(
            id=self._root.id_of(row.local_id),
            name=row.name,
            source_volume_id=row.source_volume_id,
            size_bytes=row.size_bytes,
            creation_time_ns=row.created_ns,
            ready=True,
        )

    def get(self, snapshot_id: str) -> Snapshot | None:
        local = self._root.local(snapshot_id, "s")
        row = self._store.snapshot(local) if local else None
        return self.to_snapshot(row) if row and row.state is State.READY else None

    def ready_after(self, after: str, limit: int) -> list[Snapshot]:
        """Ready snapshots by :func:`listed_after`'s rule, a page at the cost of its own rows
        (as :meth:`Volumes.ready_after`)."""
        start, count = local_range(after, "s", limit)
        rows = self._store.snapshots(State.READY, start=start, limit=count)
        return listed_after((self.to_snapshot(r) for r in rows), lambda s: s.id, after, limit)

    def create(self, name: str, source_volume_id: str) -> Snapshot:
        """Snapshot the volume ``source_volume_id`` (its parameters already validated)."""
        if not name:
            raise InvalidArgument("a snapshot needs a name")
        local = ids.snapshot_id_for(name, self._root.node).partition("@")[0]
        source_local = self._root.local(source_volume_id, "v") or ""
        with self._root.keys.hold(local, source_local):
            row = self._store.snapshot(local)
            if row is not None:
                same = row.source_volume_id == source_volume_id and row.name == name
                if row.state is State.READY:
                    if not same:
                        raise AlreadyExists(
                            f"snapshot {name!r} already exists, of volume"
                            f" {row.source_volume_id!r}, not {source_volume_id!r}"
                        )
                    return self.to_snapshot(row)
                if row.state is State.DELETING or not same:
                    self.finish_delete(row)
                    row = None
            source = self._store.volume(source_local) if source_local else None
            if source is None or source.state is not State.READY:
                raise NotFound(f"source volume {source_volume_id!r} does not exist")
            data = self._layout.data(self._layout.volume(source.local_id), source.access_type)
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
                with self._root.alloc:
                    self._root.reserve(row.size_bytes, f"snapshot {name!r}")
                    self._store.insert_snapshot(row)
            try:
                with system_errors(f"create snapshot {name!r}"):
                    self._build(row, data)
            except Exception:
                failed = row
                undo(lambda: self.finish_delete(failed), f"snapshot {name!r}")
                raise
            self._store.set_snapshot_state(local, State.READY)
            ready = self._store.snapshot(local)
            assert ready is not None
            log.info("created snapshot", extra={"snapshot_id": self._root.id_of(local)})
            return self.to_snapshot(ready)

    def _build(self, row: SnapshotRow, data: Path) -> None:
        path = self._layout.snapshot(row.local_id)
        runner = self._root.runner
        fsinfo.remove_tree(path)
        os.mkdir(path, PRIVATE_DIR_MODE)
        if row.access_type is AccessType.MOUNT:
            fsinfo.copy_tree(runner, data, path)
        else:
            fsinfo.copy_file(runner, data, path / IMAGE_NAME)
        fsinfo.sync_filesystem(path)
        fsinfo.fsync_path(path)
        fsinfo.fsync_path(self._layout.snapshots_dir)

    def delete(self, snapshot_id: str) -> None:
        local = self._root.local(snapshot_id, "s")
        if local is None:
            return
        with self._root.keys.hold(local):
            row = self._store.snapshot(local)
            if row is None:
                path = self._layout.snapshot(local)
                if os.path.lexists(path):
                    with system_errors(f"remove {path}"):
                        fsinfo.remove_tree(path)
                return
            if row.state is not State.DELETING:
                self._store.set_snapshot_state(local, State.DELETING)
            with bound_to(None):
                self.finish_delete(row)
        log.info("deleted snapshot", extra={"snapshot_id": snapshot_id})

    def finish_delete(self, row: SnapshotRow) -> None:
        """Remove the copy, then the row."""
        path = self._layout.snapshot(row.local_id)
        with system_errors(f"delete snapshot {row.local_id}"):
            fsinfo.remove_tree(path)
            fsinfo.fsync_path(self._layout.snapshots_dir)
        self._store.delete_snapshot(row.local_id)
