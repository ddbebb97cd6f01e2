"""The volumes: create (empty, or as a thin clone of a volume or snapshot), delete, expand,
modify, publish, and their condition.

Each change is one lvm2 command after one report (the table in backend.py), so a kill leaves
the LV or its absence and the retry finishes; the one two-step change, a clone that must grow,
records its target size in the clone's tags (``nlc.grow``) and the retry extends it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence

from csi_driver import bounded, ids
from csi_driver.backends import mutable
from csi_driver.backends.lvm import capacity
from csi_driver.backends.lvm import tags as lvtags
from csi_driver.backends.lvm.inventory import Inventory, device_node
from csi_driver.backends.lvm.lvm2 import LogicalVolume, VolumeGroup
from csi_driver.backends.lvm.parameters import fs_type_for
from csi_driver.config.device_classes import DeviceClass
from csi_driver.errors import FailedPrecondition, InvalidArgument, NotFound
from csi_driver.model import SourceKind, Volume, VolumeCondition, VolumeSpec
from csi_driver.system import fsinfo
from csi_driver.system.runner import bound_to
from csi_driver.system_errors import system_errors

log = logging.getLogger(__name__)

WIPE_TIMEOUT = 3600.0


def _new_lv(vg: str, name: str, size: int) -> LogicalVolume:
    return LogicalVolume(
        vg=vg,
        name=name,
        size_bytes=size,
        tags=frozenset(),
        attr="",
        layout="",
        pool="",
        origin="",
        path=f"/dev/{vg}/{name}",
        dm_path="",
        data_percent=None,
        health="",
    )


class Volumes:
    """The volumes in the VGs of the device classes."""

    def __init__(self, inventory: Inventory, thin_pool_threshold: float) -> None:
        self._inv = inventory
        self._lvm = inventory.lvm
        self._threshold = thin_pool_threshold

    def get(self, volume_id: str) -> Volume | None:
        """The volume, or None; a clone still being made is not a volume yet (CreateVolume's
        retry finishes it)."""
        local = self._inv.local(volume_id, "v")
        found = self._inv.made(self._inv.report(), local) if local else None
        return self._inv.to_volume(*found) if found else None

    def all_ready(self) -> Sequence[Volume]:
        return [
            self._inv.to_volume(lv, meta)
            for lv, meta in self._inv.ours(self._inv.report(), "volume")
            if not meta.unfinished(lv.size_bytes)
        ]

    # --- create ------------------------------------------------------------------------------

    def create(self, spec: VolumeSpec) -> Volume:
        inv = self._inv
        p, size = spec.parameters, spec.capacity_bytes
        cls = inv.class_for(p)
        fs = fs_type_for(spec, p)
        local = ids.volume_id_for(spec.name, inv.node).partition("@")[0]
        source_local = ""
        if spec.content_source is not None:
            kind = "s" if spec.content_source.kind is SourceKind.SNAPSHOT else "v"
            source_local = inv.local(spec.content_source.id, kind) or ""
            if not source_local:
                raise NotFound(
                    f"source {spec.content_source.kind.value} {spec.content_source.id!r} does"
                    " not exist on this node"
                )
        meta = lvtags.Meta(
            kind="volume",
            name=spec.name,
            access_type=spec.access_type,
            fs_type=fs,
            parameters=dict(p),
            source_local=source_local,
            created_ns=time.time_ns(),
        )
        with inv.keys.hold(local, source_local), inv.alloc:
            groups = inv.report()
            existing = inv.find(groups, local)
            if existing is not None and existing[1].unfinished(existing[0].size_bytes):
                lv, meta = existing  # a clone a kill left between lvcreate and lvextend
                self._lvm.extend(lv.vg, lv.name, meta.grow_to)
                existing = inv.find(inv.report(), local)
            if existing is not None:
                return inv.to_volume(*existing)  # the caller found that it answers the request
            vg = groups.get(cls.volume_group)
            if vg is None:
                raise FailedPrecondition(
                    f"volume group {cls.volume_group!r} of device class {cls.name!r} does not"
                    f" exist on node {inv.node}"
                )
            if source_local:
                self._clone(groups, vg, cls, p, local, size, meta)
            else:
                self._check_room(vg, cls, p, size, f"volume {spec.name!r}")
                self._lvm.create(
                    vg.name,
                    local,
                    size,
                    lvtags.encode(meta),
                    thin_pool=cls.thin_pool if p["lvType"] == "thin" else "",
                    lv_type={"linear": "linear", "striped": "striped", "raid1": "raid1"}.get(
                        p["lvType"], ""
                    ),
                    stripes=int(p.get("stripes", "0")),
                    stripe_kib=int(p.get("stripeSize", "0")) // 1024,
                    mirrors=int(p.get("mirrors", "0")),
                )
            log.info(
                "created volume",
                extra={"volume_id": inv.id_of(local), "vg": vg.name, "bytes": size},
            )
            # What lvcreate made, without another report: lvm2 sizes are whole extents (and
            # stripes), and the size came from round_size.
            return inv.to_volume(_new_lv(vg.name, local, size), meta)

    def _check_room(
        self, vg: VolumeGroup, cls: DeviceClass, p: Mapping[str, str], size: int, what: str
    ) -> None:
        capacity.check_room(vg, cls, p, size, what, self._inv.extent(cls))

    def _clone(
        self,
        groups: Mapping[str, VolumeGroup],
        vg: VolumeGroup,
        cls: DeviceClass,
        p: Mapping[str, str],
        local: str,
        size: int,
        meta: lvtags.Meta,
    ) -> None:
        assert meta.source is not None
        what = f"source {meta.source.kind.value} {self._inv.id_of(meta.source_local)!r}"
        src, src_meta = self._inv.source(groups, meta.source_local, what)
        if not src.is_thin:
            raise FailedPrecondition(
                f"{what} is a thick logical volume ({src.layout}); only thin volumes can be"
                " cloned (as thin snapshots): use a device class with a thinPool"
            )
        if p["lvType"] != "thin" or src.vg != vg.name or src.pool != cls.thin_pool:
            raise InvalidArgument(
                f"{what} is in thin pool {src.vg}/{src.pool}; a clone shares its source's blocks"
                f" and must be a thin volume of the same pool (device class {cls.name!r} gives"
                f" lvType {p['lvType']} in {vg.name}/{cls.thin_pool or '-'})"
            )
        if src_meta.access_type is not meta.access_type:
            raise InvalidArgument(
                f"{what} holds a {src_meta.access_type.value} volume; a"
                f" {meta.access_type.value} volume cannot be made from it"
            )
        if src_meta.fs_type and meta.fs_type and src_meta.fs_type != meta.fs_type:
            raise InvalidArgument(
                f"{what} holds an {src_meta.fs_type} filesystem, not {meta.fs_type}"
            )
        self._check_room(vg, cls, p, size, f"volume {meta.name!r}")
        if size > src.size_bytes:
            # recorded with the clone, so a kill before the lvextend is finished by the retry
            meta = dataclasses.replace(meta, grow_to=size)
        self._lvm.clone(vg.name, src.name, local, lvtags.encode(meta))
        if size > src.size_bytes:
            self._lvm.extend(vg.name, local, size)

    # --- delete ------------------------------------------------------------------------------

    def delete(self, volume_id: str) -> None:
        with self._inv.held(volume_id, "v") as found:
            if found is None:
                return
            lv, meta = found
            if meta.published:
                raise FailedPrecondition(
                    f"volume {volume_id!r} is still published to {sorted(meta.published)};"
                    " unpublish it first"
                )
            self._refuse_if_in_use(volume_id, lv)
            # Once begun, a wipe runs to its end even if the RPC is cancelled: redone from the
            # start by every retry, a long one might never finish.
            with bound_to(None):
                if meta.parameters.get(mutable.WIPE_ON_DELETE) == "true":
                    self._wipe(lv)
                self._lvm.remove(lv.vg, lv.name)
        log.info("deleted volume", extra={"volume_id": volume_id})

    def _refuse_if_in_use(self, volume_id: str, lv: LogicalVolume) -> None:
        """An LV that is open, mounted, or whose device node is bind-mounted somewhere (a
        published block volume: a bind mount does not open the device, so lvremove would not
        refuse it) is still in use on this node; deleting it would pull it from under a pod."""
        device = device_node(lv) if lv.active else ""
        mountinfo = self._inv.mountinfo
        used: list[str] = []
        if device and os.path.exists(device):
            with system_errors(f"find out whether volume {volume_id!r} is in use"):
                used = fsinfo.mounts_of_device(device, mountinfo)
                used += fsinfo.mounts_showing(device, mountinfo)
        if used:
            raise FailedPrecondition(
                f"volume {volume_id!r} ({lv.vg}/{lv.name}) is still in use, mounted at"
                f" {bounded.listing(sorted(set(used)))}; unpublish and unstage it first"
            )
        if lv.open:
            raise FailedPrecondition(
                f"volume {volume_id!r} ({lv.vg}/{lv.name}) is open, mounted or in use;"
                " unpublish and unstage it first"
            )

    def _wipe(self, lv: LogicalVolume) -> None:
        """Discard a thin LV (its blocks go back to the pool and read as zeros) or zero a thick
        one, so no later tenant of the same extents can read the data."""
        if not lv.active:
            self._lvm.activate(lv.vg, lv.name)
        device = device_node(lv)
        argv = (
            ["blkdiscard", "--force", device]
            if lv.is_thin
            else ["blkdiscard", "--force", "--zeroout", device]
        )
        with system_errors(f"wipe {lv.vg}/{lv.name} before deleting it"):
            self._inv.runner.run(argv, timeout=WIPE_TIMEOUT)
        log.info("wiped logical volume", extra={"lv": f"{lv.vg}/{lv.name}", "argv": argv})

    # --- changes to an existing volume -------------------------------------------------------

    def expand(self, volume_id: str, size_bytes: int) -> Volume:
        inv = self._inv
        with inv.keys.hold(inv.volume_local(volume_id)), inv.alloc:
            groups = inv.report()
            lv, meta = inv.found_volume(groups, volume_id)
            if size_bytes <= lv.size_bytes:
                return inv.to_volume(lv, meta)
            p = meta.parameters
            if "lvType" not in p:
                p = {**p, "lvType": "thin" if lv.is_thin else "linear"}
            cls = inv.class_of(lv, meta)
            self._check_room(
                groups[lv.vg], cls, p, size_bytes - lv.size_bytes, f"growing volume {volume_id!r}"
            )
            self._lvm.extend(lv.vg, lv.name, size_bytes)
            log.info("expanded volume", extra={"volume_id": volume_id, "bytes": size_bytes})
            return inv.to_volume(LogicalVolume(**{**lv.__dict__, "size_bytes": size_bytes}), meta)

    def modify(self, volume_id: str, changes: Mapping[str, str]) -> Volume:
        inv = self._inv
        with inv.keys.hold(inv.volume_local(volume_id)):
            lv, meta = inv.found_volume(inv.report(), volume_id)
            wanted = mutable.apply(meta.parameters, changes)
            if wanted == dict(meta.parameters):
                return inv.to_volume(lv, meta)
            old = set(lvtags.encode(meta))
            meta = lvtags.Meta(**{**meta.__dict__, "parameters": wanted})
            new = set(lvtags.encode(meta))
            self._lvm.change_tags(lv.vg, lv.name, add=sorted(new - old), remove=sorted(old - new))
            log.info("modified volume", extra={"volume_id": volume_id, "changes": dict(changes)})
            return inv.to_volume(lv, meta)

    def set_published(self, volume_id: str, node_id: str, published: bool) -> None:
        inv = self._inv
        with inv.keys.hold(inv.volume_local(volume_id)):
            lv, meta = inv.found_volume(inv.report(), volume_id)
            if (node_id in meta.published) == published:
                return
            tag = lvtags.published_tag(node_id)
            if published:
                self._lvm.change_tags(lv.vg, lv.name, add=[tag])
            else:
                self._lvm.change_tags(lv.vg, lv.name, remove=[tag])

    def condition(self, volume_id: str) -> VolumeCondition:
        """The one rule for the condition of an LV, on the node (NodeGetVolumeStats) and in
        the controller's listings alike; one report, shared through the call memo."""
        groups = self._inv.report()
        local = self._inv.local(volume_id, "v")
        found = self._inv.find(groups, local) if local else None
        if found is None:
            return VolumeCondition(
                True,
                f"logical volume {local or volume_id} is missing from volume group(s)"
                f" {bounded.listing(self._inv.vgs)}: it was removed or renamed outside the driver;"
                " restore it (vgcfgrestore from /etc/lvm/archive) or delete the volume",
            )
        lv, _ = found
        where = f"logical volume {lv.vg}/{lv.name}"
        if not lv.active:
            return VolumeCondition(
                True,
                f"{where} is inactive (deactivated outside the driver); activate it with"
                f" 'lvchange -ay {lv.vg}/{lv.name}' or stage the volume again",
            )
        if lv.health:
            return VolumeCondition(
                True, f"lvm2 reports {where} as {lv.health!r}; see 'lvs -a {lv.vg}' and lvmraid(7)"
            )
        pool = groups[lv.vg].lvs.get(lv.pool) if lv.is_thin else None
        problem = pool_problem(pool, self._threshold) if pool is not None else None
        if problem:
            return VolumeCondition(True, f"{problem} ({where} is in it)")
        if not os.path.exists(device_node(lv)):
            return VolumeCondition(
                True,
                f"the device node of {where} is missing; run 'udevadm trigger' or"
                f" 'vgmknodes {lv.vg}'",
            )
        return VolumeCondition.healthy()


def pool_problem(pool: LogicalVolume, threshold: float) -> str | None:
    """What is wrong with a thin pool's room, if anything: full (data or metadata at 100%:
    writes to its volumes fail or the pool turns read-only) or at or above ``threshold``
    percent. Both measures, because a pool runs out of either."""
    name = f"{pool.vg}/{pool.name}"
    used = {"data": pool.data_percent or 0.0, "metadata": pool.metadata_percent or 0.0}
    part, percent = max(used.items(), key=lambda item: item[1])
    grow = "--poolmetadatasize" if part == "metadata" else "-L"
    if percent >= 100:
        return (
            f"thin pool {name} is full ({part} {percent:.1f}%): writes to its volumes fail;"
            f" extend it ('lvextend {grow} +SIZE {name}') or free space in its volumes (fstrim)"
        )
    if percent >= threshold:
        return (
            f"thin pool {name} is {percent:.1f}% full ({part}), at or above the"
            f" {threshold:g}% threshold; extend it ('lvextend {grow} +SIZE {name}') before"
            " writes to its volumes fail"
        )
    return None
