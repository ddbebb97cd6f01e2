"""The snapshots: thin snapshots of thin volumes, made by one lvcreate that writes their tags.

A thick LV (linear, striped, raid1) cannot be snapshotted without reserving space up front and
copying on every write, so that is refused with FAILED_PRECONDITION. A snapshot is a thin LV
that lvm2 skips on activation (``k`` in its attributes); a volume restored from it is a thin
snapshot of it in turn (volumes.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

from csi_driver import ids
from csi_driver.backends.lvm import tags as lvtags
from csi_driver.backends.lvm.inventory import Inventory
from csi_driver.backends.lvm.lvm2 import LogicalVolume
from csi_driver.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from csi_driver.model import Snapshot

log = logging.getLogger(__name__)


class Snapshots:
    """The snapshots in the VGs of the device classes."""

    def __init__(self, inventory: Inventory) -> None:
        self._inv = inventory

    def get(self, snapshot_id: str) -> Snapshot | None:
        local = self._inv.local(snapshot_id, "s")
        found = self._inv.find(self._inv.report(), local) if local else None
        return self._inv.to_snapshot(*found) if found else None

    def all(self) -> Sequence[Snapshot]:
        inv = self._inv
        return [inv.to_snapshot(lv, m) for lv, m in inv.ours(inv.report(), "snapshot")]

    def create(self, name: str, source_volume_id: str, parameters: Mapping[str, str]) -> Snapshot:
        inv = self._inv
        if parameters:
            raise InvalidArgument(
                f"unknown snapshot parameters {sorted(parameters)}; the lvm backend takes none"
            )
        if not name:
            raise InvalidArgument("a snapshot needs a name")
        local = ids.snapshot_id_for(name, inv.node).partition("@")[0]
        source_local = inv.local(source_volume_id, "v") or ""
        with inv.keys.hold(local, source_local):
            groups = inv.report()
            existing = inv.find(groups, local)
            if existing is not None:
                lv, meta = existing
                if meta.name != name or meta.source_local != source_local:
                    raise AlreadyExists(
                        f"snapshot {name!r} already exists, of volume"
                        f" {inv.id_of(meta.source_local)!r}, not {source_volume_id!r}"
                    )
                return inv.to_snapshot(lv, meta)
            src, src_meta = inv.source(groups, source_local, f"source volume {source_volume_id!r}")
            if not src.is_thin:
                raise FailedPrecondition(
                    f"volume {source_volume_id!r} is a thick logical volume ({src.layout});"
                    " lvm2 can snapshot it only by reserving space up front and copying on every"
                    " write, so only thin volumes are snapshotted: use a device class with a"
                    " thinPool"
                )
            meta = lvtags.Meta(
                kind="snapshot",
                name=name,
                access_type=src_meta.access_type,
                fs_type=src_meta.fs_type,
                source_local=source_local,
                created_ns=time.time_ns(),
            )
            inv.lvm.snapshot(src.vg, src.name, local, lvtags.encode(meta))
            log.info("created snapshot", extra={"snapshot_id": inv.id_of(local)})
            snap = LogicalVolume(
                **{**src.__dict__, "name": local, "origin": src.name, "attr": "Vwi---tz-k"}
            )
            return inv.to_snapshot(snap, meta)

    def delete(self, snapshot_id: str) -> None:
        with self._inv.held(snapshot_id, "s") as found:
            if found is None:
                return
            lv, _ = found
            self._inv.lvm.remove(lv.vg, lv.name)
        log.info("deleted snapshot", extra={"snapshot_id": snapshot_id})
