"""Volumes as LVM logical volumes, carved from the volume groups of the device classes.

The volume group is the only record: an LV named after the volume's local id (``v`` and 32 hex
digits, from the CSI name) carries its metadata in tags (tags.py), written by the same lvcreate
that makes it. Nothing else is stored, so nothing can drift, and a driver killed at any point
finds on restart exactly the volumes lvm2 has: lvm2 commits a new LV with its tags atomically,
and a retried CreateVolume or DeleteVolume finds the LV (or its absence) and finishes.

Per operation the backend reads the volume groups once (``lvm fullreport``: every LV and tag of
every class's VG in one call) and then runs only the commands that change something:

==========================  =========================================================
CreateVolume                report, lvcreate (+ lvextend when a clone must grow)
DeleteVolume                report, lvremove (+ blkdiscard with ``wipeOnDelete``)
ControllerExpandVolume      report, lvextend
CreateSnapshot              report, lvcreate --snapshot
NodeStageVolume (attach)    report (+ lvchange -ay when the LV is inactive)
==========================  =========================================================

Thin volumes are snapshotted and cloned as thin snapshots (no copy, no space reserved). A
thick LV (linear, striped, raid1) cannot be snapshotted without reserving space up front and
copying on every write, so that is refused with FAILED_PRECONDITION.

New volumes never show an earlier tenant's data: thick LVs are created with their signatures
wiped and first 4 KiB zeroed (``lvcreate -W y -Z y``); thin LVs read zeros where nothing was
written. ``wipeOnDelete: "true"`` also discards (thin) or zeroes (thick) an LV before removal.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from types import MappingProxyType

from csi_driver import bounded, ids
from csi_driver.backends import mutable
from csi_driver.backends.lvm import tags as lvtags
from csi_driver.backends.lvm.lvm2 import LogicalVolume, Lvm2, VolumeGroup
from csi_driver.config.device_classes import (
    LV_TYPES,
    MAX_MIRRORS,
    MAX_STRIPES,
    DeviceClass,
    DeviceClassError,
    parse_stripe_size,
)
from csi_driver.errors import (
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
from csi_driver.system.mounter import MOUNTINFO
from csi_driver.system.runner import CommandError, Runner, bound_to
from csi_driver.units import MiB, round_up

log = logging.getLogger(__name__)

#: StorageClass parameters this backend accepts (a closed set; see docs/lvm.md)
PARAMETERS: Mapping[str, str] = MappingProxyType(
    {
        "deviceClass": "device class to allocate from (default: the class marked default)",
        "fsType": "filesystem of a mount volume: ext4 or xfs (same as csi.storage.k8s.io/fstype)",
        "lvType": "linear, striped, raid1 or thin (default: thin with a thin pool, else linear)",
        "stripes": "striped: number of stripes, 2 or more (default 2)",
        "stripeSize": "striped: stripe size, a power of two of at least 4Ki (default lvm2's)",
        "mirrors": "raid1: number of extra copies, 1 to 4 (default 1)",
        "wipeOnDelete": "true: discard (thin) or zero (thick) the LV before removing it",
    }
)
FS_TYPES = ("ext4", "xfs")
#: lvm2's default extent size, used only until a report says what the VG really has
DEFAULT_EXTENT = 4 * MiB
#: how long Probe trusts its last look at the volume groups
HEALTH_TTL = 30.0
WIPE_TIMEOUT = 3600.0

CONTEXT_PREFIX = "lvm.nodelocal.csi.dev/"


class LvmBackend:
    """The :class:`~csi_driver.backends.base.Backend` for LVM logical volumes."""

    max_volumes_per_node = 0

    def __init__(
        self,
        classes: Sequence[DeviceClass],
        node_id: str,
        runner: Runner,
        *,
        udev_sync: bool = True,
        mountinfo: str = MOUNTINFO,
    ) -> None:
        # configuration made sure there is exactly one default (config/device_classes.py)
        self._classes = {c.name: c for c in classes}
        self._default = next(c for c in classes if c.default)
        self._vgs = sorted({c.volume_group for c in classes})
        self._node = node_id
        self._runner = runner
        self._lvm = Lvm2(runner, udev_sync=udev_sync)
        self._mountinfo = mountinfo
        self._keys = BlockingKeyLocks()
        self._alloc = threading.Lock()
        self._extents: dict[str, int] = {}
        self._health: tuple[float, str | None] = (0.0, None)
        self._health_lock = threading.Lock()
        try:
            problems = self._class_problems(self._report())
        except CsiError as exc:
            problems = [str(exc)]
        for problem in problems:
            log.error(f"lvm backend not ready: {problem}")
        if not problems:
            log.info(
                "lvm backend ready",
                extra={"classes": sorted(self._classes), "volume_groups": self._vgs},
            )

    # --- reading the volume groups -----------------------------------------------------------

    def _report(self) -> dict[str, VolumeGroup]:
        groups = self._lvm.report(self._vgs)
        for vg in groups.values():
            if vg.extent_bytes > 0:
                self._extents[vg.name] = vg.extent_bytes
        return groups

    def _class_problems(self, groups: Mapping[str, VolumeGroup]) -> list[str]:
        problems = []
        for cls in self._classes.values():
            vg = groups.get(cls.volume_group)
            if vg is None:
                problems.append(
                    f"volume group {cls.volume_group!r} of device class {cls.name!r} does not"
                    f" exist on node {self._node}"
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

    def _made(
        self, groups: Mapping[str, VolumeGroup], local: str
    ) -> tuple[LogicalVolume, lvtags.Meta] | None:
        """:meth:`_find`, but not a clone still being made (``nlc.grow``): that is no volume
        until CreateVolume's retry finishes it; only that retry and DeleteVolume see it."""
        found = self._find(groups, local)
        return found if found and not found[1].unfinished(found[0].size_bytes) else None

    def _find(
        self, groups: Mapping[str, VolumeGroup], local: str
    ) -> tuple[LogicalVolume, lvtags.Meta] | None:
        """Our LV named ``local`` in any class's VG, with its metadata."""
        kind = "volume" if local.startswith("v") else "snapshot"
        for name in self._vgs:
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

    def _ours(
        self, groups: Mapping[str, VolumeGroup], kind: str
    ) -> list[tuple[LogicalVolume, lvtags.Meta]]:
        out = []
        for name in self._vgs:
            vg = groups.get(name)
            for lv in vg.lvs.values() if vg else ():
                if not lvtags.is_local_id(lv.name) or lv.name[0] != kind[0]:
                    continue
                meta = lvtags.decode(lv.tags)
                if meta is not None and meta.kind == kind:
                    out.append((lv, meta))
        return sorted(out, key=lambda item: item[0].name)

    def _local(self, value: str, kind: str) -> str | None:
        parsed = ids.parse(value, kind)
        if parsed is None or parsed.node_id != self._node:
            return None
        return parsed.local

    def _id(self, local: str) -> str:
        return f"{local}@{self._node}"

    def _class_of(self, lv: LogicalVolume, meta: lvtags.Meta) -> DeviceClass:
        cls = self._classes.get(meta.parameters.get("deviceClass", ""))
        if cls is not None and cls.volume_group == lv.vg:
            return cls
        for cls in self._classes.values():
            if cls.volume_group == lv.vg and (cls.thin_pool == lv.pool or not lv.pool):
                return cls
        raise FailedPrecondition(
            f"logical volume {lv.vg}/{lv.name} belongs to no configured device class"
        )

    # --- conversion --------------------------------------------------------------------------

    def _to_volume(self, lv: LogicalVolume, meta: lvtags.Meta) -> Volume:
        source = meta.source
        if source is not None:
            source = ContentSource(source.kind, self._id(source.id))
        context = {
            CONTEXT_PREFIX + "volume-group": lv.vg,
            CONTEXT_PREFIX + "logical-volume": lv.name,
        }
        if "deviceClass" in meta.parameters:
            context[CONTEXT_PREFIX + "device-class"] = meta.parameters["deviceClass"]
        return Volume(
            id=self._id(lv.name),
            name=meta.name,
            capacity_bytes=lv.size_bytes,
            access_type=meta.access_type,
            fs_type=meta.fs_type,
            node_id=self._node,
            parameters=Parameters(meta.parameters),
            content_source=source,
            context=frozen_map(context),
            published_nodes=meta.published,
        )

    def _to_snapshot(self, lv: LogicalVolume, meta: lvtags.Meta) -> Snapshot:
        return Snapshot(
            id=self._id(lv.name),
            name=meta.name,
            source_volume_id=self._id(meta.source_local),
            size_bytes=lv.size_bytes,
            creation_time_ns=meta.created_ns,
            ready=True,
        )

    # --- simple answers ----------------------------------------------------------------------

    def health(self) -> str | None:
        with self._health_lock:
            checked, reason = self._health
            if time.monotonic() - checked < HEALTH_TTL and checked:
                return reason
            try:
                problems = self._class_problems(self._report())
                reason = "; ".join(problems) or None
            except CsiError as exc:
                reason = str(exc)
            self._health = (time.monotonic(), reason)
            return reason

    def validate_parameters(self, parameters: Mapping[str, str]) -> Parameters:
        unknown = sorted(set(parameters) - set(PARAMETERS))
        if unknown:
            raise InvalidArgument(
                f"unknown parameters {unknown} for the lvm backend; it accepts {sorted(PARAMETERS)}"
            )
        cls = self._class_for(parameters, InvalidArgument)
        lv_type = parameters.get("lvType", cls.default_lv_type)
        if lv_type not in LV_TYPES:
            raise InvalidArgument(f"lvType {lv_type!r} is not one of {list(LV_TYPES)}")
        if lv_type == "thin" and not cls.thin_pool:
            raise InvalidArgument(
                f"lvType thin needs a device class with a thinPool, not {cls.name!r}"
            )
        out = {"deviceClass": cls.name, "lvType": lv_type}
        if lv_type == "striped":
            stripes = parameters.get("stripes", str(cls.stripes or 2))
            if not stripes.isdigit() or not 2 <= int(stripes) <= MAX_STRIPES:
                raise InvalidArgument(f"stripes must be an integer from 2 to {MAX_STRIPES}")
            out["stripes"] = str(int(stripes))
            stripe = parameters.get("stripeSize") or (
                str(cls.stripe_bytes) if cls.stripe_bytes else ""
            )
            if stripe:
                try:
                    out["stripeSize"] = str(parse_stripe_size(stripe, "stripeSize"))
                except DeviceClassError as exc:
                    raise InvalidArgument(str(exc)) from exc
        elif "stripes" in parameters or "stripeSize" in parameters:
            raise InvalidArgument("stripes and stripeSize apply only to lvType striped")
        if lv_type == "raid1":
            mirrors = parameters.get("mirrors", str(cls.mirrors or 1))
            if not mirrors.isdigit() or not 1 <= int(mirrors) <= MAX_MIRRORS:
                raise InvalidArgument(f"mirrors must be an integer from 1 to {MAX_MIRRORS}")
            out["mirrors"] = str(int(mirrors))
        elif "mirrors" in parameters:
            raise InvalidArgument("mirrors applies only to lvType raid1")
        if "fsType" in parameters:
            if parameters["fsType"] not in FS_TYPES:
                raise InvalidArgument(f"fsType must be one of {list(FS_TYPES)}")
            out["fsType"] = parameters["fsType"]
        changes = mutable.validate_mutable(
            {k: v for k, v in parameters.items() if k in mutable.MUTABLE_PARAMETERS}, "lvm"
        )
        return Parameters(mutable.apply(out, changes))

    def validate_mutable_parameters(self, parameters: Mapping[str, str]) -> Mapping[str, str]:
        return mutable.validate_mutable(parameters, "lvm")

    def modify_volume(self, volume_id: str, changes: Mapping[str, str]) -> Volume:
        with self._keys.hold(self._volume_local(volume_id)):
            lv, meta = self._found_volume(self._report(), volume_id)
            wanted = mutable.apply(meta.parameters, changes)
            if wanted == dict(meta.parameters):
                return self._to_volume(lv, meta)
            old = set(lvtags.encode(meta))
            meta = lvtags.Meta(**{**meta.__dict__, "parameters": wanted})
            new = set(lvtags.encode(meta))
            self._lvm.change_tags(lv.vg, lv.name, add=sorted(new - old), remove=sorted(old - new))
            log.info("modified volume", extra={"volume_id": volume_id, "changes": dict(changes)})
            return self._to_volume(lv, meta)

    def supported_fs_types(self) -> Sequence[str]:
        return FS_TYPES

    def _unit(self, cls: DeviceClass, parameters: Mapping[str, str]) -> int:
        extent = self._extents.get(cls.volume_group, DEFAULT_EXTENT)
        if parameters.get("lvType") == "striped":
            return extent * int(parameters.get("stripes", "2"))
        return extent

    def _class_for(
        self, parameters: Mapping[str, str], missing: type[CsiError] = FailedPrecondition
    ) -> DeviceClass:
        """The device class parameters name (the default when they name none). A request
        naming an unknown one is INVALID_ARGUMENT; a volume whose class has been taken out of
        the configuration since is FAILED_PRECONDITION."""
        name = parameters.get("deviceClass", self._default.name)
        cls = self._classes.get(name)
        if cls is None:
            raise missing(
                f"deviceClass {name!r} is not configured on node {self._node}; known:"
                f" {sorted(self._classes)}"
            )
        return cls

    def round_size(self, size_bytes: int, parameters: Parameters) -> int:
        unit = self._unit(self._class_for(parameters), parameters)
        return max(unit, round_up(size_bytes, unit))

    def capacity(self, parameters: Parameters) -> int:
        cls = self._class_for(parameters)
        vg = self._report().get(cls.volume_group)
        return 0 if vg is None else self._available(vg, cls, parameters)

    @staticmethod
    def _legs(parameters: Mapping[str, str]) -> int:
        return int(parameters.get("mirrors", "0")) + 1 if parameters["lvType"] == "raid1" else 1

    def _available(self, vg: VolumeGroup, cls: DeviceClass, p: Mapping[str, str]) -> int:
        """Bytes a new volume with parameters ``p`` may still get in this class."""
        if p["lvType"] == "thin":
            pool = vg.lvs.get(cls.thin_pool)
            if pool is None or not pool.is_thin_pool:
                return 0
            promised = sum(
                lv.size_bytes for lv in vg.lvs.values() if lv.is_thin and lv.pool == cls.thin_pool
            )
            budget = int((pool.size_bytes - cls.reserved_bytes) * cls.overprovision_ratio)
            return max(0, budget - promised)
        free = vg.free_bytes - cls.reserved_bytes
        legs = self._legs(p)
        if legs > 1:
            # every leg also needs a metadata extent
            free = free // legs - vg.extent_bytes
        unit = self._unit(cls, p)
        return max(0, free // unit * unit)

    def _check_room(
        self, vg: VolumeGroup, cls: DeviceClass, p: Mapping[str, str], size: int, what: str
    ) -> None:
        available = self._available(vg, cls, p)
        if size > available:
            where = (
                f"thin pool {vg.name}/{cls.thin_pool}" if p["lvType"] == "thin" else f"VG {vg.name}"
            )
            raise ResourceExhausted(
                f"not enough room for {what} of {size} bytes in device class {cls.name!r}:"
                f" {available} bytes available in {where}"
            )

    # --- volumes -----------------------------------------------------------------------------

    def get_volume(self, volume_id: str) -> Volume | None:
        """The volume, or None; a clone still being made is not a volume yet (CreateVolume's
        retry finishes it)."""
        local = self._local(volume_id, "v")
        found = self._made(self._report(), local) if local else None
        return self._to_volume(*found) if found else None

    def list_volumes(self) -> Sequence[Volume]:
        return [
            self._to_volume(lv, meta)
            for lv, meta in self._ours(self._report(), "volume")
            if not meta.unfinished(lv.size_bytes)
        ]

    def _volume_local(self, volume_id: str) -> str:
        local = self._local(volume_id, "v")
        if local is None:
            raise NotFound(f"volume {volume_id!r} does not exist")
        return local

    def _found_volume(
        self, groups: Mapping[str, VolumeGroup], volume_id: str
    ) -> tuple[LogicalVolume, lvtags.Meta]:
        found = self._made(groups, self._volume_local(volume_id))
        if found is None:
            raise NotFound(f"volume {volume_id!r} does not exist")
        return found

    def _fs_type_for(self, spec: VolumeSpec, p: Mapping[str, str]) -> str:
        if spec.access_type is AccessType.BLOCK:
            if spec.fs_type:
                raise InvalidArgument(
                    f"fs_type {spec.fs_type!r} makes no sense for a block volume; leave it empty"
                )
            return ""
        fs = spec.fs_type or p.get("fsType") or FS_TYPES[0]
        if fs not in FS_TYPES:
            raise InvalidArgument(f"fs_type {fs!r} is not supported; use one of {list(FS_TYPES)}")
        if p.get("fsType", fs) != fs:
            raise InvalidArgument(
                f"the capability asks for fs_type {fs!r} but the parameter fsType says"
                f" {p['fsType']!r}"
            )
        return fs

    def create_volume(self, spec: VolumeSpec) -> Volume:
        p, size = spec.parameters, spec.capacity_bytes
        cls = self._class_for(p)
        fs = self._fs_type_for(spec, p)
        local = ids.volume_id_for(spec.name, self._node).partition("@")[0]
        source_local = ""
        if spec.content_source is not None:
            kind = "s" if spec.content_source.kind is SourceKind.SNAPSHOT else "v"
            source_local = self._local(spec.content_source.id, kind) or ""
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
        with self._keys.hold(local, source_local), self._alloc:
            groups = self._report()
            existing = self._find(groups, local)
            if existing is not None and existing[1].unfinished(existing[0].size_bytes):
                lv, meta = existing  # a clone a kill left between lvcreate and lvextend
                self._lvm.extend(lv.vg, lv.name, meta.grow_to)
                existing = self._find(self._report(), local)
            if existing is not None:
                return self._to_volume(*existing)  # the caller found that it answers the request
            vg = groups.get(cls.volume_group)
            if vg is None:
                raise FailedPrecondition(
                    f"volume group {cls.volume_group!r} of device class {cls.name!r} does not"
                    f" exist on node {self._node}"
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
                extra={"volume_id": self._id(local), "vg": vg.name, "bytes": size},
            )
            # What lvcreate made, without another report: lvm2 sizes are whole extents (and
            # stripes), and the size came from round_size.
            return self._to_volume(self._new_lv(vg.name, local, size), meta)

    @staticmethod
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
        what = f"source {meta.source.kind.value} {self._id(meta.source_local)!r}"
        found = self._made(groups, meta.source_local)
        if found is None:
            raise NotFound(f"{what} does not exist")
        src, src_meta = found
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

    def delete_volume(self, volume_id: str) -> None:
        local = self._local(volume_id, "v")
        if local is None:
            return
        with self._keys.hold(local):
            found = self._find(self._report(), local)
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
        device = self._device(lv) if lv.active else ""
        used: list[str] = []
        if device and os.path.exists(device):
            try:
                used = fsinfo.mounts_of_device(device, self._mountinfo)
                used += fsinfo.mounts_showing(device, self._mountinfo)
            except FsInfoError as exc:
                raise Internal(
                    f"cannot find out whether volume {volume_id!r} is in use: {exc}"
                ) from exc
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
        device = self._device(lv)
        argv = (
            ["blkdiscard", "--force", device]
            if lv.is_thin
            else ["blkdiscard", "--force", "--zeroout", device]
        )
        try:
            self._runner.run(argv, timeout=WIPE_TIMEOUT)
        except CommandError as exc:
            raise Internal(f"cannot wipe {lv.vg}/{lv.name} before deleting it: {exc}") from exc
        log.info("wiped logical volume", extra={"lv": f"{lv.vg}/{lv.name}", "argv": argv})

    def expand_volume(self, volume_id: str, size_bytes: int) -> Volume:
        with self._keys.hold(self._volume_local(volume_id)), self._alloc:
            groups = self._report()
            lv, meta = self._found_volume(groups, volume_id)
            if size_bytes <= lv.size_bytes:
                return self._to_volume(lv, meta)
            p = meta.parameters
            if "lvType" not in p:
                p = {**p, "lvType": "thin" if lv.is_thin else "linear"}
            cls = self._class_of(lv, meta)
            self._check_room(
                groups[lv.vg], cls, p, size_bytes - lv.size_bytes, f"growing volume {volume_id!r}"
            )
            self._lvm.extend(lv.vg, lv.name, size_bytes)
            log.info("expanded volume", extra={"volume_id": volume_id, "bytes": size_bytes})
            return self._to_volume(LogicalVolume(**{**lv.__dict__, "size_bytes": size_bytes}), meta)

    def set_published(self, volume_id: str, node_id: str, published: bool) -> None:
        with self._keys.hold(self._volume_local(volume_id)):
            lv, meta = self._found_volume(self._report(), volume_id)
            if (node_id in meta.published) == published:
                return
            tag = lvtags.published_tag(node_id)
            if published:
                self._lvm.change_tags(lv.vg, lv.name, add=[tag])
            else:
                self._lvm.change_tags(lv.vg, lv.name, remove=[tag])

    def volume_condition(self, volume_id: str) -> VolumeCondition:
        groups = self._report()
        local = self._local(volume_id, "v")
        found = self._find(groups, local) if local else None
        if found is None:
            return VolumeCondition(True, f"logical volume of {volume_id!r} is missing")
        lv, _ = found
        where = f"logical volume {lv.vg}/{lv.name}"
        if not lv.active:
            return VolumeCondition(True, f"{where} is not active")
        if lv.health:
            return VolumeCondition(True, f"lvm2 reports {where} as {lv.health!r}")
        if lv.is_thin:
            pool = groups[lv.vg].lvs.get(lv.pool)
            if pool is not None and (pool.data_percent or 0) >= 100:
                return VolumeCondition(
                    True, f"thin pool {lv.vg}/{lv.pool} of {where} is full; writes fail"
                )
        if not os.path.exists(self._device(lv)):
            return VolumeCondition(True, f"the device node of {where} is missing")
        return VolumeCondition.healthy()

    # --- snapshots ---------------------------------------------------------------------------

    def get_snapshot(self, snapshot_id: str) -> Snapshot | None:
        local = self._local(snapshot_id, "s")
        found = self._find(self._report(), local) if local else None
        return self._to_snapshot(*found) if found else None

    def list_snapshots(self) -> Sequence[Snapshot]:
        return [self._to_snapshot(lv, m) for lv, m in self._ours(self._report(), "snapshot")]

    def create_snapshot(
        self, name: str, source_volume_id: str, parameters: Mapping[str, str]
    ) -> Snapshot:
        if parameters:
            raise InvalidArgument(
                f"unknown snapshot parameters {sorted(parameters)}; the lvm backend takes none"
            )
        if not name:
            raise InvalidArgument("a snapshot needs a name")
        local = ids.snapshot_id_for(name, self._node).partition("@")[0]
        source_local = self._local(source_volume_id, "v") or ""
        with self._keys.hold(local, source_local):
            groups = self._report()
            existing = self._find(groups, local)
            if existing is not None:
                lv, meta = existing
                if meta.name != name or meta.source_local != source_local:
                    raise AlreadyExists(
                        f"snapshot {name!r} already exists, of volume"
                        f" {self._id(meta.source_local)!r}, not {source_volume_id!r}"
                    )
                return self._to_snapshot(lv, meta)
            found = self._made(groups, source_local) if source_local else None
            if found is None:
                raise NotFound(f"source volume {source_volume_id!r} does not exist")
            src, src_meta = found
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
            self._lvm.snapshot(src.vg, src.name, local, lvtags.encode(meta))
            log.info("created snapshot", extra={"snapshot_id": self._id(local)})
            snap = LogicalVolume(
                **{**src.__dict__, "name": local, "origin": src.name, "attr": "Vwi---tz-k"}
            )
            return self._to_snapshot(snap, meta)

    def delete_snapshot(self, snapshot_id: str) -> None:
        local = self._local(snapshot_id, "s")
        if local is None:
            return
        with self._keys.hold(local):
            found = self._find(self._report(), local)
            if found is None:
                return
            lv, _ = found
            self._lvm.remove(lv.vg, lv.name)
        log.info("deleted snapshot", extra={"snapshot_id": snapshot_id})

    # --- node side ---------------------------------------------------------------------------

    @staticmethod
    def _device(lv: LogicalVolume) -> str:
        """The LV's device node: /dev/VG/LV when that link exists, else /dev/mapper/..."""
        if lv.path and os.path.exists(lv.path):
            return lv.path
        return lv.dm_path or lv.path

    def attach(self, volume_id: str) -> Attachment:
        with self._keys.hold(self._volume_local(volume_id)):
            lv, _ = self._found_volume(self._report(), volume_id)
            if not lv.active or not os.path.exists(self._device(lv)):
                self._lvm.activate(lv.vg, lv.name)
                lv, _ = self._found_volume(self._report(), volume_id)
            device = self._device(lv)
            if not os.path.exists(device):
                raise Internal(
                    f"logical volume {lv.vg}/{lv.name} is active but {device} does not exist"
                    " (with udev synchronisation off, lvm2 must be allowed to create device"
                    " nodes: activation/udev_rules = 0 in lvm.conf)"
                )
            return Attachment(AttachmentKind.BLOCK_DEVICE, device)

    def locate(self, volume_id: str) -> Attachment | None:
        with self._keys.hold(self._volume_local(volume_id)):
            lv, _ = self._found_volume(self._report(), volume_id)
        return Attachment(AttachmentKind.BLOCK_DEVICE, self._device(lv)) if lv.active else None

    def detach(self, volume_id: str) -> None:
        """LVs stay active between stages (activation is cheap to keep, slow to repeat)."""

    def refresh_attachment(self, volume_id: str) -> None:
        """lvextend resizes the device-mapper device itself; nothing to refresh."""
