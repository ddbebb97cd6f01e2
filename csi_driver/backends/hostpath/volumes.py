"""The volumes of one hostpath root: create (empty, or from a volume or snapshot), delete,
expand, modify, and what a volume looks like to the rest of the driver.

The order of each change (row first, then storage; see the crash model in backend.py) is kept
here; the start-up recovery (recovery.py) finishes what a kill left, with the same
:meth:`Volumes.finish_delete` a retry uses.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from csi_driver import bounded, callmemo, ids
from csi_driver.backends import mutable
from csi_driver.backends.base import listed_after, local_range
from csi_driver.backends.hostpath.layout import (
    IMAGE_MODE,
    IMAGE_NAME,
    PRIVATE_DIR_MODE,
    VOLUME_DIR_MODE,
    is_real_dir,
)
from csi_driver.backends.hostpath.limits import DirectoryLimits
from csi_driver.backends.hostpath.root import Root
from csi_driver.backends.hostpath.store import State, VolumeRow
from csi_driver.errors import FailedPrecondition, InvalidArgument, NotFound
from csi_driver.model import (
    AccessType,
    ContentSource,
    SourceKind,
    Volume,
    VolumeCondition,
    VolumeSpec,
    frozen_map,
)
from csi_driver.system import extents, fsinfo
from csi_driver.system.runner import bound_to
from csi_driver.system_errors import system_errors

log = logging.getLogger(__name__)

#: volume context key: "true" when the volume cannot grow past its size, "false" when its
#: size is only accounted (a directory on a filesystem without project quotas)
SIZE_ENFORCED_KEY = "hostpath.nodelocal.csi.dev/size-enforced"


#: the call memo's key for the rows this call listed (read-only calls: ListVolumes); a
#: condition of one of them needs no second read of its row
_LISTED = "hostpath.listed-volume-rows"


@dataclass(frozen=True)
class _Source:
    """A validated content source: where its data is and what it is."""

    source: ContentSource
    data: Path  # the directory or image to copy from


def undo(action: Callable[[], None], what: str) -> None:
    """Roll back a failed creation; a failure to do so is logged (a retry or restart cleans)."""
    try:
        action()
    except Exception:
        log.exception(
            f"cannot roll back the failed creation of {what}; a retry or a restart cleans it up"
        )


#: what a condition adds when a volume's storage is gone
_GONE = (
    ": it was removed outside the driver and its data is lost unless restored from a backup;"
    " delete the volume"
)


class Volumes:
    """Directory volumes and block volumes (sparse images) under one root."""

    def __init__(self, root: Root, limits: DirectoryLimits, fs_type: str) -> None:
        self._root = root
        self._store = root.store
        self._layout = root.layout
        self._limits = limits
        #: the root's filesystem, the only one a directory volume can have
        self.fs_type = fs_type

    # --- reading -----------------------------------------------------------------------------

    def to_volume(self, row: VolumeRow) -> Volume:
        enforced = row.access_type is AccessType.BLOCK or self._limits.enforced
        return Volume(
            id=self._root.id_of(row.local_id),
            name=row.name,
            capacity_bytes=row.capacity_bytes,
            access_type=row.access_type,
            fs_type=row.fs_type,
            node_id=self._root.node,
            parameters=row.parameters,
            content_source=row.source,
            context=frozen_map({SIZE_ENFORCED_KEY: "true" if enforced else "false"}),
            published_nodes=row.published,
        )

    def get(self, volume_id: str) -> Volume | None:
        local = self._root.local(volume_id, "v")
        row = self._store.volume(local) if local else None
        return self.to_volume(row) if row and row.state is State.READY else None

    def ready_after(self, after: str, limit: int) -> list[Volume]:
        """Ready volumes by :func:`listed_after`'s rule, read along the primary key: a page
        converts its own rows and at most one more (the one at the bound), not every row."""
        start, count = local_range(after, "v", limit)
        rows = self._store.volumes(State.READY, start=start, limit=count)
        memo = callmemo.current()
        if memo is not None:  # ListVolumes asks each listed volume's condition next
            memo[_LISTED] = {r.local_id: r for r in rows}
        return listed_after((self.to_volume(r) for r in rows), lambda v: v.id, after, limit)

    def ready(self, volume_id: str) -> VolumeRow:
        local = self._root.local(volume_id, "v")
        row = self._store.volume(local) if local else None
        if row is None or row.state is not State.READY:
            raise NotFound(f"volume {volume_id!r} does not exist")
        return row

    def condition(self, volume_id: str) -> VolumeCondition:
        """The volume's storage as it is now. In a listing, from the row the listing read; an
        abnormal answer is checked again against the row as it is now, so that a volume deleted
        (or expanded) since the listing is not reported as broken."""
        memo = callmemo.current()
        listed = memo.get(_LISTED) if memo is not None else None
        local = self._root.local(volume_id, "v") if listed else None
        row = listed.get(local) if listed and local else None
        if row is None:
            return self._condition_of(self.ready(volume_id))
        condition = self._condition_of(row)
        if not condition.abnormal:
            return condition
        current = self._store.volume(row.local_id)
        if current is None or current.state is not State.READY:
            return VolumeCondition.healthy()  # deleted since it was listed: nothing broke
        return self._condition_of(current)

    def _condition_of(self, row: VolumeRow) -> VolumeCondition:
        path = self._layout.volume(row.local_id)
        if row.access_type is AccessType.MOUNT:
            if not is_real_dir(path):
                return VolumeCondition(True, f"backing directory {path} is missing{_GONE}")
            problem = self._limits.problem(path, row)
            return VolumeCondition(True, problem) if problem else VolumeCondition.healthy()
        image = self._layout.image(row.local_id)
        if image is None:
            return VolumeCondition(True, f"backing image {path / IMAGE_NAME} is missing{_GONE}")
        size = os.lstat(image).st_size
        if size < row.capacity_bytes:
            return VolumeCondition(
                True,
                f"backing image {image} has {size} bytes, less than {row.capacity_bytes}: it was"
                " truncated outside the driver; expand the volume or restore the image",
            )
        return VolumeCondition.healthy()

    # --- creating ----------------------------------------------------------------------------

    def _fs_type_for(self, spec: VolumeSpec) -> str:
        if spec.access_type is AccessType.BLOCK:
            if spec.fs_type:
                raise InvalidArgument(
                    f"fs_type {spec.fs_type!r} makes no sense for a block volume; leave it empty"
                )
            return ""
        if spec.fs_type not in ("", self.fs_type):
            raise InvalidArgument(
                f"fs_type {spec.fs_type!r} is not possible: a hostpath volume is a directory on"
                f" the {self.fs_type} filesystem of {self._root.path}; ask for {self.fs_type!r}"
                " or leave fs_type empty"
            )
        return self.fs_type

    def create(self, spec: VolumeSpec) -> Volume:
        wanted = VolumeRow(
            local_id=ids.volume_id_for(spec.name, self._root.node).partition("@")[0],
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
        self._root.refuse_while_finishing(wanted.local_id)
        with self._root.keys.hold(wanted.local_id, source_local):
            row = self._store.volume(wanted.local_id)
            if row is not None and row.state is State.READY:
                return self.to_volume(row)  # the caller found that it answers the request
            if row is not None:
                # A volume being deleted, or an unfinished one nobody was ever given: clear
                # it away and start afresh (a retry rebuilds from scratch anyway).
                with bound_to(None):
                    self.finish_delete(row)
            source = self._check_source(spec.content_source, wanted)
            with self._root.alloc:
                self._root.reserve(wanted.capacity_bytes, f"volume {spec.name!r}")
                row = self._store.insert_volume(
                    wanted,
                    with_project_id=wanted.access_type is AccessType.MOUNT,
                    durable=False,
                    project_taken=self._limits.project_taken,
                )
            # the row on disk before the storage is touched; other creates need not wait
            self._store.make_durable()
            try:
                with system_errors(f"create volume {spec.name!r}"):
                    self.build(row, source)
            except Exception:
                undo(lambda: self.finish_delete(row), f"volume {spec.name!r}")
                raise
            self._store.set_volume_state(row.local_id, State.READY)
            ready = replace(row, state=State.READY)  # the row as stored (held under its lock)
            log.info(
                "created volume",
                extra={"volume_id": self._root.id_of(row.local_id), "bytes": row.capacity_bytes},
            )
            return self.to_volume(ready)

    def _source_local(self, source: ContentSource | None) -> str:
        if source is None:
            return ""
        kind = "s" if source.kind is SourceKind.SNAPSHOT else "v"
        return self._root.local(source.id, kind) or ""

    def _check_source(self, source: ContentSource | None, wanted: VolumeRow) -> _Source | None:
        if source is None:
            return None
        what = source.kind.value
        local = self._source_local(source)
        if source.kind is SourceKind.SNAPSHOT:
            snap = self._store.snapshot(local) if local else None
            if snap is None or snap.state is not State.READY:
                raise NotFound(f"source snapshot {source.id!r} does not exist")
            access, base = snap.access_type, self._layout.snapshot(local)
        else:
            vol = self._store.volume(local) if local else None
            if vol is None or vol.state is not State.READY:
                raise NotFound(f"source volume {source.id!r} does not exist")
            access, base = vol.access_type, self._layout.volume(local)
        if access is not wanted.access_type:
            raise InvalidArgument(
                f"source {what} {source.id!r} is a {access.value} {what}; a"
                f" {wanted.access_type.value} volume cannot be made from it"
            )
        data = self._layout.data(base, access)
        if data is None:
            raise FailedPrecondition(f"the data of source {what} {source.id!r} ({base}) is missing")
        return _Source(source, data)

    def build(self, row: VolumeRow, source: _Source | None) -> None:
        """Make the storage of ``row`` (its row says ``creating``), from ``source`` if any."""
        path = self._layout.volume(row.local_id)
        runner = self._root.runner
        # Leftovers of an earlier attempt were never handed out: start from nothing.
        fsinfo.remove_tree(path)
        os.mkdir(path, PRIVATE_DIR_MODE)
        if row.access_type is AccessType.MOUNT:
            os.chmod(path, VOLUME_DIR_MODE)
            self._limits.apply(path, row)
            if source is not None:
                fsinfo.copy_tree(runner, source.data, path)
                fsinfo.sync_filesystem(path)
        else:
            image = path / IMAGE_NAME
            if source is not None:
                fsinfo.copy_file(runner, source.data, image)
            else:
                extents.create_image(image, IMAGE_MODE)
            extents.grow_image(image, row.capacity_bytes)
        fsinfo.fsync_path(path)
        fsinfo.fsync_path(self._layout.volumes_dir)

    # --- deleting ----------------------------------------------------------------------------

    def delete(self, volume_id: str) -> None:
        local = self._root.local(volume_id, "v")
        if local is None:
            return
        self._root.refuse_while_finishing(local)
        with self._root.keys.hold(local):
            row = self._store.volume(local)
            if row is None:
                path = self._layout.volume(local)
                if os.path.lexists(path):
                    log.warning(f"removing {path}: storage without a volume (leaked)")
                    self.remove_leaked(path)
                return
            if row.state is not State.DELETING:
                if row.published:
                    raise FailedPrecondition(
                        f"volume {volume_id!r} is still published to {sorted(row.published)};"
                        " unpublish it first"
                    )
                self._refuse_if_in_use(row)
                self._store.set_volume_state(local, State.DELETING)
            with bound_to(None):  # a deletion once begun is finished: see backend.py
                self.finish_delete(row)
        log.info("deleted volume", extra={"volume_id": volume_id})

    def _refuse_if_in_use(self, row: VolumeRow) -> None:
        """Deleting a volume that is mounted somewhere would pull the data from under it."""
        path = self._layout.volume(row.local_id)
        attached: list[str] = []
        with system_errors(f"find out whether volume {row.local_id} is in use"):
            if row.access_type is AccessType.MOUNT:
                used = fsinfo.mounts_showing(path) if is_real_dir(path) else []
            else:
                image = self._layout.image(row.local_id)
                devices = self._root.loops.devices_for(image) if image else []
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
                f"volume {self._root.id_of(row.local_id)} is still in use, {where};"
                " unpublish and unstage it first"
            )

    def finish_delete(self, row: VolumeRow, stop: threading.Event | None = None) -> None:
        """Remove the storage, then the row. ``stop`` ends a wipe early (raising
        :class:`~csi_driver.system.extents.Stopped`), for a closing backend."""
        path = self._layout.volume(row.local_id)
        with system_errors(f"delete volume {row.local_id}"):
            image = self._layout.image(row.local_id)
            if image is not None:
                self._root.loops.detach_all(image)
            if row.parameters.get(mutable.WIPE_ON_DELETE) == "true" and is_real_dir(path):
                extents.wipe(path, stop)
            fsinfo.remove_tree(path)
            self._limits.clear(row)
            fsinfo.fsync_path(self._layout.volumes_dir)
        self._store.delete_volume(row.local_id)

    def remove_leaked(self, path: Path) -> None:
        """Remove storage that no row describes (a volume's or a snapshot's directory)."""
        with system_errors(f"remove leaked storage {path}"):
            image = self._layout.data(path, AccessType.BLOCK)
            if image is not None:
                self._root.loops.detach_all(image)
            fsinfo.remove_tree(path)

    # --- changing ----------------------------------------------------------------------------

    def expand(self, volume_id: str, size_bytes: int) -> Volume:
        row = self.ready(volume_id)
        with self._root.keys.hold(row.local_id):
            row = self.ready(volume_id)
            if size_bytes <= row.capacity_bytes:
                return self.to_volume(row)
            path = self._layout.volume(row.local_id)
            with self._root.alloc, system_errors(f"expand volume {volume_id!r}"):
                self._root.reserve(size_bytes - row.capacity_bytes, f"growing volume {volume_id!r}")
                # Storage first: a kill before the row is updated leaves a retry to do it all
                # again, which is harmless; the other order would lose the growth.
                if row.access_type is AccessType.BLOCK:
                    image = self._layout.image(row.local_id)
                    if image is None:
                        raise FailedPrecondition(
                            f"the image {path / IMAGE_NAME} of {volume_id!r} is missing"
                        )
                    extents.grow_image(image, size_bytes)
                else:
                    self._limits.resize(row, size_bytes)
                self._store.set_volume_capacity(row.local_id, size_bytes)
            log.info("expanded volume", extra={"volume_id": volume_id, "bytes": size_bytes})
            return self.to_volume(self.ready(volume_id))

    def modify(self, volume_id: str, changes: Mapping[str, str]) -> Volume:
        row = self.ready(volume_id)
        with self._root.keys.hold(row.local_id):
            row = self.ready(volume_id)
            wanted = mutable.apply(row.parameters, changes)
            if wanted != dict(row.parameters):
                self._store.set_volume_parameters(row.local_id, wanted)
                log.info(
                    "modified volume", extra={"volume_id": volume_id, "changes": dict(changes)}
                )
            return self.to_volume(self.ready(volume_id))

    def set_published(self, volume_id: str, node_id: str, published: bool) -> None:
        row = self.ready(volume_id)
        with self._root.keys.hold(row.local_id):
            row = self.ready(volume_id)
            nodes = row.published | {node_id} if published else row.published - {node_id}
            if nodes != row.published:
                self._store.set_published(row.local_id, nodes)
