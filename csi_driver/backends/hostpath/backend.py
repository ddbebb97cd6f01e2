"""Volumes as directories (mount access) or sparse image files (block access) under one root.

This module is the facade that wires the parts of one root, each in its own module: where
things live and the id grammar that keeps every path inside the root (layout.py), the
database (store.py), what the parts share (root.py: locks, capacity, ids), the volumes
(volumes.py), the snapshots (snapshots.py), the size limits of directory volumes
(limits.py), the loop devices of the node side (attachments.py), the start-up recovery
(recovery.py) and the storage report of the metrics (report.py). Byte work on the data
(growing an image, wiping) is in :mod:`csi_driver.system.extents`.

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
size is enforced only where the root's filesystem enforces project quotas (XFS, or ext4 with
the project and quota features, mounted with ``prjquota``: limits.py): each directory gets a
project with a hard limit of its size (at start, limits a volume lacks are applied in the
background, the volume abnormal until then: recovery.py). Elsewhere sizes are accounted, not
enforced; every volume's context says which (:data:`SIZE_ENFORCED_KEY`). Block volumes are as
big as their image, so their size is always enforced.

Filesystem type: a directory volume lives on the root's own filesystem, so the only fs_type
a mount volume may ask for is that one (or none). Block volumes carry no filesystem here.

Operations on one volume or snapshot are serialised by the callers (the servicers' per-id
locks) and again by the backend (root.py's locks); what all volumes share (the capacity,
project ids) is guarded there too.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

from csi_driver.backends import mutable
from csi_driver.backends.hostpath.attachments import Attachments
from csi_driver.backends.hostpath.layout import PRIVATE_DIR_MODE, Layout, is_real_dir
from csi_driver.backends.hostpath.limits import DirectoryLimits
from csi_driver.backends.hostpath.recovery import Recovery, check_state_matches_storage
from csi_driver.backends.hostpath.report import storage_report
from csi_driver.backends.hostpath.root import Root
from csi_driver.backends.hostpath.snapshots import Snapshots
from csi_driver.backends.hostpath.store import Store
from csi_driver.backends.hostpath.volumes import SIZE_ENFORCED_KEY, Volumes
from csi_driver.errors import InvalidArgument
from csi_driver.model import (
    AccessType,
    Attachment,
    Parameters,
    Snapshot,
    StorageReport,
    Usage,
    Volume,
    VolumeCondition,
    VolumeSpec,
)
from csi_driver.system import fsinfo
from csi_driver.system.cgroup_io import CgroupIo
from csi_driver.system.runner import Runner
from csi_driver.system_errors import system_errors
from csi_driver.units import round_up

log = logging.getLogger(__name__)

__all__ = ["ALLOCATION_UNIT", "PARAMETERS", "SIZE_ENFORCED_KEY", "HostPathBackend"]

#: StorageClass parameters this backend accepts (key -> what it means); any other key is a
#: mistake worth reporting. wipeOnDelete is also a mutable parameter (ControllerModifyVolume).
PARAMETERS: Mapping[str, str] = MappingProxyType(
    {
        mutable.WIPE_ON_DELETE: "true: overwrite every byte the volume holds with zeros before"
        " its files are removed (default false)",
        **{
            k: "block volumes only: an IO limit (docs/io-limits.md)"
            for k in mutable.IO_LIMIT_PARAMETERS
        },
    }
)

#: sizes are whole filesystem blocks
ALLOCATION_UNIT = 4096


class HostPathBackend:
    """The :class:`~csi_driver.backends.base.Backend` for directories and loop-backed images."""

    max_volumes_per_node = 0

    def __init__(
        self,
        root: Path,
        capacity_bytes: int | None,
        node_id: str,
        runner: Runner,
        *,
        cgroup: CgroupIo | None = None,
    ) -> None:
        #: where IO limits would be enforced; a block volume with limits needs it (mutable.py)
        self._cgroup = cgroup or CgroupIo()
        if capacity_bytes is not None and capacity_bytes <= 0:
            raise ValueError(f"hostpath capacity must be positive, got {capacity_bytes}")
        root.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
        self.root = Path(os.path.realpath(root))
        self._layout = Layout(self.root)
        self._store = store = Store(self._layout.database)
        self._root = Root(self._layout, capacity_bytes, node_id, runner, store)
        try:
            check_state_matches_storage(store, self._layout)
            for directory in (self._layout.volumes_dir, self._layout.snapshots_dir):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(directory, PRIVATE_DIR_MODE)
                if not is_real_dir(directory):
                    raise RuntimeError(f"{directory} must be a directory, not a link or file")
            mount = fsinfo.mount_of(self.root)
            limits = DirectoryLimits.of(self.root, mount)
            self._limits = limits
            self._volumes = Volumes(self._root, limits, mount.fs_type)
            self._snapshots = Snapshots(self._root)
            self._attachments = Attachments(self._root, self._volumes)
            self._recovery = Recovery(self._root, self._volumes, self._snapshots, limits)
            self._recovery.run()
            self._recovery.start_applying_limits()
            self._recovery.start_finishing_deletions()
        except BaseException:
            store.close()
            raise

    def close(self) -> None:
        """Release the database (and the root, for another backend object); a background
        deletion stops at its next chunk and is finished by the next start."""
        self._recovery.stop()
        self._store.close()

    def wait_for_background(self, timeout: float | None = None) -> bool:
        """Wait until the size limits and the interrupted deletions found at start are done;
        False on timeout."""
        return self._recovery.wait(timeout)

    # --- simple answers ----------------------------------------------------------------------

    def health(self) -> str | None:
        if not is_real_dir(self.root):
            return f"hostpath root {self.root} is missing"
        for directory in (self._layout.volumes_dir, self._layout.snapshots_dir):
            if not is_real_dir(directory):
                return f"{directory} is missing"
        if not os.access(self.root, os.W_OK) or not os.access(self._layout.volumes_dir, os.W_OK):
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

    def supported_fs_types(self) -> Sequence[str]:
        return [self._volumes.fs_type]

    def round_size(self, size_bytes: int, parameters: Parameters) -> int:
        return max(ALLOCATION_UNIT, round_up(size_bytes, ALLOCATION_UNIT))

    def capacity(self, parameters: Parameters) -> int:
        with self._root.alloc:
            return self._root.available()

    def storage_report(self, max_volumes: int) -> StorageReport:
        return storage_report(self._root, self._limits.enforced, max_volumes)

    # --- volumes -----------------------------------------------------------------------------

    def get_volume(self, volume_id: str) -> Volume | None:
        return self._volumes.get(volume_id)

    def list_volumes(self, after: str = "", limit: int = 0) -> Sequence[Volume]:
        return self._volumes.ready_after(after, limit)

    def create_volume(self, spec: VolumeSpec) -> Volume:
        directory = spec.access_type is AccessType.MOUNT
        mutable.check_io_limits(spec.parameters, self._cgroup.problem(), directory=directory)
        return self._volumes.create(spec)

    def delete_volume(self, volume_id: str) -> None:
        self._volumes.delete(volume_id)

    def expand_volume(self, volume_id: str, size_bytes: int) -> Volume:
        return self._volumes.expand(volume_id, size_bytes)

    def modify_volume(self, volume_id: str, changes: Mapping[str, str]) -> Volume:
        row = self._volumes.ready(volume_id)
        directory = row.access_type is AccessType.MOUNT
        mutable.check_io_limits(changes, self._cgroup.problem(), directory=directory)
        return self._volumes.modify(volume_id, changes)

    def set_published(self, volume_id: str, node_id: str, published: bool) -> None:
        self._volumes.set_published(volume_id, node_id, published)

    def volume_condition(self, volume_id: str) -> VolumeCondition:
        return self._volumes.condition(volume_id)

    def volume_usage(self, volume_id: str) -> Usage | None:
        """A directory volume's usage from its project quota, or from a walk (limits.py)."""
        row = self._volumes.ready(volume_id)
        if row.access_type is not AccessType.MOUNT:
            return None
        path = self._layout.volume(row.local_id)
        with system_errors(f"read the usage of volume {volume_id!r}"):
            return self._limits.usage(path, row)

    # --- snapshots ---------------------------------------------------------------------------

    def get_snapshot(self, snapshot_id: str) -> Snapshot | None:
        return self._snapshots.get(snapshot_id)

    def list_snapshots(self, after: str = "", limit: int = 0) -> Sequence[Snapshot]:
        return self._snapshots.ready_after(after, limit)

    def create_snapshot(
        self, name: str, source_volume_id: str, parameters: Mapping[str, str]
    ) -> Snapshot:
        self.validate_parameters(parameters)
        return self._snapshots.create(name, source_volume_id)

    def delete_snapshot(self, snapshot_id: str) -> None:
        self._snapshots.delete(snapshot_id)

    # --- node side ---------------------------------------------------------------------------

    def attach(self, volume_id: str) -> Attachment:
        return self._attachments.attach(volume_id)

    def locate(self, volume_id: str) -> Attachment | None:
        return self._attachments.locate(volume_id)

    def detach(self, volume_id: str) -> None:
        self._attachments.detach(volume_id)

    def refresh_attachment(self, volume_id: str) -> None:
        self._attachments.refresh(volume_id)
