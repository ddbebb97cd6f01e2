"""What a start finds of a killed predecessor, and how it is finished (the crash model is in
backend.py): a lost database refused, unfinished creations rolled back, interrupted snapshot
deletions finished, storage no row describes removed; then, each in a background thread,
size limits applied (a root remounted with ``prjquota``, an assignment cut short) and
interrupted volume deletions finished.

Applying a limit walks the volume's whole tree, whose size its tenant chose: done before the
driver serves, it could hold a start past its liveness probe. So it runs in the background,
one volume at a time under that volume's lock (an RPC on it waits meanwhile), and until a
volume's turn is over its condition is abnormal and says why (limits.py).

One volume that cannot be cleaned up must not keep the driver (and every other volume)
down: it is logged and left for the next start or its DeleteVolume.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path

from csi_driver.backends.hostpath.layout import SNAPSHOT_LOCAL, VOLUME_LOCAL, Layout
from csi_driver.backends.hostpath.limits import DirectoryLimits
from csi_driver.backends.hostpath.root import Root
from csi_driver.backends.hostpath.snapshots import Snapshots
from csi_driver.backends.hostpath.store import State, Store
from csi_driver.backends.hostpath.volumes import Volumes
from csi_driver.errors import CsiError
from csi_driver.model import AccessType
from csi_driver.system import extents

log = logging.getLogger(__name__)


def check_state_matches_storage(store: Store, layout: Layout) -> None:
    """A database created just now over existing storage means the database was lost: its
    volumes are not leftovers, so the start is refused with nothing changed."""
    if not store.created:
        return
    found = [
        entry.name
        for directory in (layout.volumes_dir, layout.snapshots_dir)
        if directory.is_dir()
        for entry in os.scandir(directory)
    ]
    if found:
        raise RuntimeError(
            f"{store.path} did not exist but {len(found)} volumes or snapshots do"
            f" (e.g. {found[0]}); the state database was lost. Restore it, or move"
            f" {layout.volumes_dir} and {layout.snapshots_dir} away to start"
            " empty; nothing was changed"
        )


def _logged(action: Callable[[], None]) -> None:
    try:
        action()
    except CsiError as exc:
        log.error(f"start-up clean-up failed, will retry at the next start: {exc}")


class Recovery:
    """The start-up work of one root, and the background thread it may leave running."""

    def __init__(
        self, root: Root, volumes: Volumes, snapshots: Snapshots, limits: DirectoryLimits
    ) -> None:
        self._root = root
        self._store = root.store
        self._layout = root.layout
        self._volumes = volumes
        self._snapshots = snapshots
        self._limits = limits
        self._stopping = threading.Event()
        self._background: threading.Thread | None = None
        self._applying: threading.Thread | None = None
        self._to_limit: list[str] = []

    def run(self) -> None:
        """Finish what a killed predecessor left half done; O(volumes), once per start.
        Interrupted volume deletions are left to :meth:`start_finishing_deletions`."""
        for snap in self._store.snapshots(State.DELETING):
            log.info("finishing an interrupted snapshot deletion", extra={"local": snap.local_id})
            _logged(functools.partial(self._snapshots.finish_delete, snap))
        # An unfinished creation was never handed to anyone (CreateVolume did not answer), and
        # a retry rebuilds it from scratch anyway: roll it back, so a create that is never
        # retried holds no storage and no capacity.
        for row in self._store.volumes(State.CREATING):
            log.info("rolling back an interrupted volume creation", extra={"local": row.local_id})
            _logged(functools.partial(self._volumes.finish_delete, row))
        for snap in self._store.snapshots(State.CREATING):
            log.info("rolling back an interrupted snapshot", extra={"local": snap.local_id})
            _logged(functools.partial(self._snapshots.finish_delete, snap))
        volumes = {row.local_id: row for row in self._store.volumes()}
        self._sweep(self._layout.volumes_dir, VOLUME_LOCAL, set(volumes))
        self._sweep(
            self._layout.snapshots_dir,
            SNAPSHOT_LOCAL,
            {s.local_id for s in self._store.snapshots()},
        )
        if self._limits.enforced:
            self._to_limit = [
                row.local_id
                for row in volumes.values()
                if row.state is State.READY and row.access_type is AccessType.MOUNT
            ]
            self._limits.will_ensure(self._to_limit)

    def _sweep(self, directory: Path, grammar: re.Pattern[str], known: set[str]) -> None:
        for entry in os.scandir(directory):
            if entry.name in known:
                continue
            path = directory / entry.name
            if not grammar.match(entry.name):
                log.warning(f"leaving {path} alone: not created by this driver")
                continue
            log.warning(f"removing {path}: storage without a volume or snapshot (leaked)")
            _logged(functools.partial(self._volumes.remove_leaked, path))

    # --- size limits, in the background ------------------------------------------------------

    def start_applying_limits(self) -> None:
        """Apply the limits of the volumes :meth:`run` found, in a background thread."""
        if not self._to_limit:
            return
        self._applying = threading.Thread(
            target=self._apply_limits,
            args=(self._to_limit,),
            name="hostpath-size-limits",
            daemon=True,
        )
        self._applying.start()

    def _apply_limits(self, locals_: list[str]) -> None:
        for local in locals_:
            try:
                if self._stopping.is_set():
                    return  # the next start applies what is left
                with self._root.keys.hold(local):
                    row = self._store.volume(local)
                    if row is not None and row.state is State.READY:
                        self._limits.ensure(self._layout.volume(local), row, self._stopping.is_set)
            except Exception:
                log.exception("cannot apply a size limit", extra={"local": local})
            finally:
                self._limits.ensured(local)

    # --- interrupted volume deletions, in the background -------------------------------------

    def start_finishing_deletions(self) -> None:
        rows = self._store.volumes(State.DELETING)
        if not rows:
            return
        locals_ = [row.local_id for row in rows]
        self._root.hand_to_background(locals_)
        self._background = threading.Thread(
            target=self._finish_deletions,
            args=(locals_,),
            name="hostpath-interrupted-deletions",
            daemon=True,
        )
        self._background.start()

    def _finish_deletions(self, locals_: list[str]) -> None:
        for local in locals_:
            try:
                if self._stopping.is_set():
                    return
                with self._root.keys.hold(local):
                    row = self._store.volume(local)
                    if row is None or row.state is not State.DELETING:
                        continue
                    log.info("finishing an interrupted volume deletion", extra={"local": local})
                    _logged(functools.partial(self._volumes.finish_delete, row, self._stopping))
                    if self._store.volume(local) is None:
                        log.info("finished an interrupted volume deletion", extra={"local": local})
            except extents.Stopped:
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
                self._root.background_done(local)

    def stop(self) -> None:
        """Stop a background deletion at its next chunk and an assignment of a project within
        a few hundred entries (the next start finishes both)."""
        self._stopping.set()
        for thread in (self._applying, self._background):
            if thread is not None:
                thread.join()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the size limits and the interrupted deletions found at start are
        done; False on timeout."""
        for thread in (self._applying, self._background):
            if thread is not None:
                thread.join(timeout)
                if thread.is_alive():
                    return False
        return True
