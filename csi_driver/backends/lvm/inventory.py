"""What the volume groups hold for this driver, and what every part of the backend shares.

Every operation starts from one report of all the classes' VGs (:meth:`Inventory.report`,
through :meth:`Lvm2.report` and its per-RPC memo) and finds its LVs in it here: an LV is ours
when it has a driver's name (``v``/``s`` and 32 hex digits) and our tags, and it is a volume
only once it is finished (a clone a kill left before its lvextend is not). The volumes, the
snapshots and the node side (volumes.py, snapshots.py, attachments.py) each work on one
:class:`Inventory`, with its per-id locks and the allocation lock held while space is counted
and taken.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator, Mapping, Sequence

from csi_driver import ids
from csi_driver.backends.lvm import capacity
from csi_driver.backends.lvm import tags as lvtags
from csi_driver.backends.lvm.lvm2 import LogicalVolume, Lvm2, VolumeGroup
from csi_driver.config.device_classes import DeviceClass
from csi_driver.errors import CsiError, FailedPrecondition, NotFound
from csi_driver.locks import BlockingKeyLocks
from csi_driver.model import ContentSource, Parameters, Snapshot, Volume, frozen_map
from csi_driver.system.runner import Runner

log = logging.getLogger(__name__)

CONTEXT_PREFIX = "lvm.nodelocal.csi.dev/"

#: the LVs of one report: ours, with their decoded tags
Found = tuple[LogicalVolume, lvtags.Meta]


def device_node(lv: LogicalVolume) -> str:
    """The LV's device node: /dev/VG/LV when that link exists, else /dev/mapper/..."""
    if lv.path and os.path.exists(lv.path):
        return lv.path
    return lv.dm_path or lv.path


class Inventory:
    """The device classes of this node, the LVs of their VGs that are ours, and the locks."""

    def __init__(
        self,
        classes: Sequence[DeviceClass],
        node_id: str,
        runner: Runner,
        lvm: Lvm2,
        mountinfo: str,
    ) -> None:
        # configuration made sure there is exactly one default (config/device_classes.py)
        self.classes = {c.name: c for c in classes}
        self.default = next(c for c in classes if c.default)
        self.vgs = sorted({c.volume_group for c in classes})
        self.node = node_id
        self.runner = runner
        self.lvm = lvm
        self.mountinfo = mountinfo
        self.keys = BlockingKeyLocks()
        #: held while space is counted and taken
        self.alloc = threading.Lock()
        self._extents: dict[str, int] = {}

    # --- reading the volume groups -----------------------------------------------------------

    def report(self) -> dict[str, VolumeGroup]:
        groups = self.lvm.report(self.vgs)
        for vg in groups.values():
            if vg.extent_bytes > 0:
                self._extents[vg.name] = vg.extent_bytes
        return groups

    def extent(self, cls: DeviceClass) -> int:
        """The extent size of the class's VG, as the last report said."""
        return self._extents.get(cls.volume_group, capacity.DEFAULT_EXTENT)

    def class_problems(self, groups: Mapping[str, VolumeGroup]) -> list[str]:
        problems = []
        for cls in self.classes.values():
            vg = groups.get(cls.volume_group)
            if vg is None:
                problems.append(
                    f"volume group {cls.volume_group!r} of device class {cls.name!r} does not"
                    f" exist on node {self.node}"
                )
                continue
            if cls.thin_pool:
                pool = vg.lvs.get(cls.thin_pool)
                if pool is None or not pool.is_thin_pool:
                    problems.append(
                        f"thin pool {cls.volume_group}/{cls.thin_pool} of device class"
                        f" {cls.name!r} does not exist"
                    )
        return problems

    # --- our logical volumes -----------------------------------------------------------------

    def made(self, groups: Mapping[str, VolumeGroup], local: str) -> Found | None:
        """:meth:`find`, but not a clone still being made (``nlc.grow``): that is no volume
        until CreateVolume's retry finishes it; only that retry and DeleteVolume see it."""
        found = self.find(groups, local)
        return found if found and not found[1].unfinished(found[0].size_bytes) else None

    def find(self, groups: Mapping[str, VolumeGroup], local: str) -> Found | None:
        """Our LV named ``local`` in any class's VG, with its metadata."""
        kind = "volume" if local.startswith("v") else "snapshot"
        for name in self.vgs:
            vg = groups.get(name)
            lv = vg.lvs.get(local) if vg else None
            if lv is None:
                continue
            meta = lvtags.decode(lv.tags)
            if meta is None or meta.kind != kind:
                log.warning(f"{name}/{local} has a driver's name but not its tags; leaving it")
                continue
            return lv, meta
        return None

    def ours(self, groups: Mapping[str, VolumeGroup], kind: str) -> list[Found]:
        out = []
        for name in self.vgs:
            vg = groups.get(name)
            for lv in vg.lvs.values() if vg else ():
                if not lvtags.is_local_id(lv.name) or lv.name[0] != kind[0]:
                    continue
                meta = lvtags.decode(lv.tags)
                if meta is not None and meta.kind == kind:
                    out.append((lv, meta))
        return sorted(out, key=lambda item: item[0].name)

    def local(self, value: str, kind: str) -> str | None:
        """The LV name of an id of this node's kind ``kind``; None for anything else."""
        return ids.local_of(value, kind, self.node)

    def id_of(self, local: str) -> str:
        return ids.id_of(local, self.node)

    @contextlib.contextmanager
    def held(self, value: str, kind: str) -> Iterator[Found | None]:
        """Our LV of id ``value`` (of ``kind``, any state) under its lock; None, without a
        report, when ``value`` is no id of this node's: nothing there to delete."""
        local = self.local(value, kind)
        if local is None:
            yield None
            return
        with self.keys.hold(local):
            yield self.find(self.report(), local)

    def source(self, groups: Mapping[str, VolumeGroup], local: str, what: str) -> Found:
        """The finished volume or snapshot ``local`` that a snapshot or clone is made from;
        NOT_FOUND (``what`` names it) when there is none."""
        found = self.made(groups, local) if local else None
        if found is None:
            raise NotFound(f"{what} does not exist")
        return found

    def volume_local(self, volume_id: str) -> str:
        local = self.local(volume_id, "v")
        if local is None:
            raise NotFound(f"volume {volume_id!r} does not exist")
        return local

    def found_volume(self, groups: Mapping[str, VolumeGroup], volume_id: str) -> Found:
        found = self.made(groups, self.volume_local(volume_id))
        if found is None:
            raise NotFound(f"volume {volume_id!r} does not exist")
        return found

    # --- device classes ----------------------------------------------------------------------

    def class_of(self, lv: LogicalVolume, meta: lvtags.Meta) -> DeviceClass:
        cls = self.classes.get(meta.parameters.get("deviceClass", ""))
        if cls is not None and cls.volume_group == lv.vg:
            return cls
        for cls in self.classes.values():
            if cls.volume_group == lv.vg and (cls.thin_pool == lv.pool or not lv.pool):
                return cls
        raise FailedPrecondition(
            f"logical volume {lv.vg}/{lv.name} belongs to no configured device class"
        )

    def class_for(
        self, parameters: Mapping[str, str], missing: type[CsiError] = FailedPrecondition
    ) -> DeviceClass:
        """The device class parameters name (the default when they name none). A request
        naming an unknown one is INVALID_ARGUMENT; a volume whose class has been taken out of
        the configuration since is FAILED_PRECONDITION."""
        name = parameters.get("deviceClass", self.default.name)
        cls = self.classes.get(name)
        if cls is None:
            raise missing(
                f"deviceClass {name!r} is not configured on node {self.node}; known:"
                f" {sorted(self.classes)}"
            )
        return cls

    # --- what the rest of the driver sees ----------------------------------------------------

    def to_volume(self, lv: LogicalVolume, meta: lvtags.Meta) -> Volume:
        source = meta.source
        if source is not None:
            source = ContentSource(source.kind, self.id_of(source.id))
        context = {
            CONTEXT_PREFIX + "volume-group": lv.vg,
            CONTEXT_PREFIX + "logical-volume": lv.name,
        }
        if "deviceClass" in meta.parameters:
            context[CONTEXT_PREFIX + "device-class"] = meta.parameters["deviceClass"]
        return Volume(
            id=self.id_of(lv.name),
            name=meta.name,
            capacity_bytes=lv.size_bytes,
            access_type=meta.access_type,
            fs_type=meta.fs_type,
            node_id=self.node,
            parameters=Parameters(meta.parameters),
            content_source=source,
            context=frozen_map(context),
            published_nodes=meta.published,
        )

    def to_snapshot(self, lv: LogicalVolume, meta: lvtags.Meta) -> Snapshot:
        return Snapshot(
            id=self.id_of(lv.name),
            name=meta.name,
            source_volume_id=self.id_of(meta.source_local),
            size_bytes=lv.size_bytes,
            creation_time_ns=meta.created_ns,
            ready=True,
        )
