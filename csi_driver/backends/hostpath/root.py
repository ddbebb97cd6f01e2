"""What every part of one hostpath root shares: its paths, its database, the host tools, the
per-id locks, the capacity accounting, and which ids are this node's.

The volumes, the snapshots, the node-side attachments and the start-up recovery each work on
one :class:`Root`; the backend facade makes it and hands it to each. What all volumes share
(the capacity, the set of deletions the background thread still owns) is guarded here, so
that no part can account for space or take a volume away without the others seeing it.
"""

from __future__ import annotations

import threading

from csi_driver import ids
from csi_driver.backends.hostpath.layout import Layout
from csi_driver.backends.hostpath.store import Store
from csi_driver.errors import Aborted, ResourceExhausted
from csi_driver.locks import BlockingKeyLocks
from csi_driver.model import Usage
from csi_driver.system import fsinfo
from csi_driver.system.loop import Loops
from csi_driver.system.runner import Runner
from csi_driver.system_errors import system_errors


class Root:
    """One root (its layout already resolved: no symlink in it) and what its parts share."""

    def __init__(
        self,
        layout: Layout,
        capacity_bytes: int | None,
        node_id: str,
        runner: Runner,
        store: Store,
    ) -> None:
        self.path = layout.root
        self.node = node_id
        self.runner = runner
        self.loops = Loops(runner)
        self.layout = layout
        self.store = store
        self.keys = BlockingKeyLocks()
        #: held while space is counted and promised (see :meth:`reserve`)
        self.alloc = threading.Lock()
        self._capacity = capacity_bytes
        #: interrupted deletions the background thread still owns (local ids)
        self._finishing: set[str] = set()
        self._finishing_lock = threading.Lock()

    # --- ids ---------------------------------------------------------------------------------

    def local(self, value: str, kind: str) -> str | None:
        """The local part of an id of this node's kind ``kind``; None for anything else."""
        return ids.local_of(value, kind, self.node)

    def id_of(self, local: str) -> str:
        return ids.id_of(local, self.node)

    # --- capacity ----------------------------------------------------------------------------

    def available(self) -> int:
        """Bytes a new allocation may take: the capacity not promised to anything yet, and
        never more than is free on the filesystem. Called under :attr:`alloc`."""
        with system_errors(f"read the free space of {self.path}"):
            room = fsinfo.usage(self.path)
        return self.available_in(room, self.store.allocated_bytes())

    def available_in(self, room: Usage, allocated: int) -> int:
        """:meth:`available`'s rule, given the root filesystem's usage ``room`` and the bytes
        ``allocated`` so far, both read already (the storage report reads them once)."""
        return max(0, min(self.budget(room) - allocated, room.available_bytes))

    def budget(self, room: Usage) -> int:
        """The bytes volumes and snapshots may be promised in all: the configured capacity,
        else the size of the root's filesystem (``room``: its usage)."""
        return self._capacity if self._capacity is not None else room.total_bytes

    def reserve(self, size: int, what: str) -> None:
        """RESOURCE_EXHAUSTED unless ``size`` more bytes fit; called under :attr:`alloc`, with
        the row that takes the space written before the lock is let go."""
        available = self.available()
        if size > available:
            raise ResourceExhausted(
                f"not enough room for {what} of {size} bytes: {available} bytes available"
                f" under {self.path}"
            )

    # --- deletions finished in the background ------------------------------------------------

    def hand_to_background(self, locals_: list[str]) -> None:
        with self._finishing_lock:
            self._finishing.update(locals_)

    def background_done(self, local: str) -> None:
        with self._finishing_lock:
            self._finishing.discard(local)

    def refuse_while_finishing(self, local: str) -> None:
        """ABORTED while the background thread owns the deletion of volume ``local``."""
        with self._finishing_lock:
            busy = local in self._finishing
        if busy:
            raise Aborted(
                f"volume {self.id_of(local)} is being deleted: the driver is finishing a"
                " deletion that a restart interrupted; retry later"
            )
