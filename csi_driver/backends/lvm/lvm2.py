"""lvm2 through its command line: JSON reports in bytes, argument lists, one runner.

Everything the lvm backend learns about volume groups comes from one ``lvm fullreport`` call
(every VG, LV and its tags at once), so an operation costs one report plus the commands that
change something. lvm2 calls cost ~100 ms each on real nodes; every call goes through the
project's runner, which counts and times it.

Errors: :func:`csi_error` turns a failed lvm2 command into the CSI code its stderr means (no
space, VG missing, LV in use, timeout) with lvm2's own words in the message.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import grpc

from csi_driver.errors import (
    AlreadyExists,
    CsiError,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    ResourceExhausted,
    Unavailable,
)
from csi_driver.system.runner import DEADLINE_EXCEEDED, CommandError, Runner

#: lvm2 metadata commits can wait on locks held by other lvm2 commands on a busy node
CHANGE_TIMEOUT = 120.0
REPORT_TIMEOUT = 60.0

_VG_FIELDS = ("vg_name", "vg_size", "vg_free", "vg_extent_size", "pv_count")
_LV_FIELDS = (
    "lv_name",
    "lv_size",
    "lv_tags",
    "lv_attr",
    "lv_layout",
    "pool_lv",
    "origin",
    "lv_path",
    "lv_dm_path",
    "data_percent",
    "lv_health_status",
)

#: lvm2 object names: what lvcreate accepts and nothing that could be read as an option or path
#: LV tags: lvm2 accepts these characters (lvm(8), "Tags")
TAG = re.compile(r"\A[A-Za-z0-9_+.\-/=!:&#]{1,1024}\Z")


@dataclass(frozen=True)
class LogicalVolume:
    vg: str
    name: str
    size_bytes: int
    tags: frozenset[str]
    attr: str
    layout: str
    pool: str
    origin: str
    path: str
    dm_path: str
    data_percent: float | None
    health: str

    @property
    def is_thin_pool(self) -> bool:
        return self.attr[:1] == "t"

    @property
    def is_thin(self) -> bool:
        return self.attr[:1] == "V"

    @property
    def active(self) -> bool:
        return self.attr[4:5] == "a"

    @property
    def open(self) -> bool:
        return self.attr[5:6] == "o"

    @property
    def skips_activation(self) -> bool:
        return self.attr[9:10] == "k"

    @property
    def device(self) -> str:
        """The device node to use: the /dev/VG/LV link, else the device-mapper node."""
        return self.path or self.dm_path


@dataclass(frozen=True)
class VolumeGroup:
    name: str
    size_bytes: int
    free_bytes: int
    extent_bytes: int
    pv_count: int
    lvs: Mapping[str, LogicalVolume] = field(default_factory=dict)


def _int(value: str) -> int:
    return int(value.strip() or 0)


def _percent(value: str) -> float | None:
    value = value.strip()
    return float(value) if value else None


def parse_fullreport(text: str) -> dict[str, VolumeGroup]:
    """``lvm fullreport --reportformat json --units b --nosuffix`` output, per VG."""
    try:
        doc = json.loads(text)
        groups: dict[str, VolumeGroup] = {}
        for part in doc["report"]:
            vgs = part.get("vg") or []
            if not vgs:
                continue
            vg = vgs[0]
            name = vg["vg_name"]
            lvs = {}
            for lv in part.get("lv") or []:
                tags = frozenset(t for t in lv.get("lv_tags", "").split(",") if t)
                lvs[lv["lv_name"]] = LogicalVolume(
                    vg=name,
                    name=lv["lv_name"],
                    size_bytes=_int(lv["lv_size"]),
                    tags=tags,
                    attr=lv.get("lv_attr", ""),
                    layout=lv.get("lv_layout", ""),
                    pool=lv.get("pool_lv", "").strip("[]"),
                    origin=lv.get("origin", "").strip("[]"),
                    path=lv.get("lv_path", ""),
                    dm_path=lv.get("lv_dm_path", ""),
                    data_percent=_percent(lv.get("data_percent", "")),
                    health=lv.get("lv_health_status", ""),
                )
            groups[name] = VolumeGroup(
                name=name,
                size_bytes=_int(vg["vg_size"]),
                free_bytes=_int(vg["vg_free"]),
                extent_bytes=_int(vg["vg_extent_size"]),
                pv_count=_int(vg["pv_count"]),
                lvs=lvs,
            )
        return groups
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise Internal(f"cannot parse the lvm2 report: {exc}") from exc


# stderr fragments of lvm2 (LC_ALL=C) and what they mean
_NO_SPACE = ("insufficient free space", "insufficient suitable", "not enough free", "no space")
_VG_MISSING = ("volume group", "not found")
_IN_USE = ("in use", "is open", "contains a filesystem in use")


def csi_error(exc: CommandError, what: str) -> CsiError:
    """The CSI error for a failed lvm2 command; ``what`` says what was being done."""
    detail = " ".join(line.strip() for line in exc.stderr.strip().splitlines()[-3:])
    lower = exc.stderr.lower()
    if exc.cancelled:
        # the RPC was called off: the command was killed, as a kill of the driver would
        code = (
            grpc.StatusCode.DEADLINE_EXCEEDED
            if exc.cancelled == DEADLINE_EXCEEDED
            else grpc.StatusCode.CANCELLED
        )
        return CsiError(f"cannot {what}: {exc}; retry it", code)
    if exc.timed_out:
        return DeadlineExceeded(
            f"cannot {what}: {exc.argv[0]} did not finish in time; the operation may still"
            " complete, retry it"
        )
    if exc.not_found:
        return Unavailable(f"cannot {what}: lvm2 is not installed ({exc.argv[0]} not found)")
    if any(s in lower for s in _NO_SPACE):
        return ResourceExhausted(f"cannot {what}: not enough space: {detail}")
    if all(s in lower for s in _VG_MISSING) and "logical volume" not in lower:
        return FailedPrecondition(f"cannot {what}: the volume group is missing: {detail}")
    if "already exists" in lower:
        return AlreadyExists(f"cannot {what}: {detail}")
    if any(s in lower for s in _IN_USE):
        return FailedPrecondition(f"cannot {what}: the logical volume is in use: {detail}")
    return Internal(f"cannot {what}: {exc}")


class Lvm2:
    """The lvm2 commands the backend needs. ``udev_sync=False`` adds ``--noudevsync`` to every
    command that creates or removes device nodes (no udev, e.g. a container without the host's
    IPC namespace, or a VM without udevd)."""

    def __init__(self, runner: Runner, *, udev_sync: bool = True) -> None:
        self._runner = runner
        self._udev = () if udev_sync else ("--noudevsync",)

    def _run(self, argv: Sequence[str], what: str, timeout: float = CHANGE_TIMEOUT) -> str:
        try:
            return self._runner.run(list(argv), timeout=timeout).stdout
        except CommandError as exc:
            raise csi_error(exc, what) from exc

    # --- reading ---------------------------------------------------------------------------

    def report(self, vgs: Iterable[str]) -> dict[str, VolumeGroup]:
        """Every named VG with all its LVs, in one call. A missing VG is simply absent."""
        names = sorted(set(vgs))
        argv = [
            "lvm",
            "fullreport",
            "--reportformat",
            "json",
            "--units",
            "b",
            "--nosuffix",
            "--configreport",
            "vg",
            "-o",
            ",".join(_VG_FIELDS),
            "--configreport",
            "lv",
            "-o",
            ",".join(_LV_FIELDS),
            "--configreport",
            "pv",
            "-o",
            "pv_name",
            "--configreport",
            "pvseg",
            "-o",
            "pvseg_start",
            "--configreport",
            "seg",
            "-o",
            "seg_start",
            *names,
        ]
        try:
            result = self._runner.run(argv, timeout=REPORT_TIMEOUT, check=False)
        except CommandError as exc:
            raise csi_error(exc, "read the volume groups") from exc
        groups = parse_fullreport(result.stdout) if result.stdout.strip() else {}
        if result.returncode != 0 and not groups:
            missing = all(s in result.stderr.lower() for s in _VG_MISSING)
            if not missing:
                raise csi_error(
                    CommandError(argv, result.returncode, result.stdout, result.stderr),
                    "read the volume groups",
                )
        return groups

    # --- changing --------------------------------------------------------------------------

    def create(
        self,
        vg: str,
        name: str,
        size_bytes: int,
        tags: Sequence[str],
        *,
        thin_pool: str = "",
        lv_type: str = "",
        stripes: int = 0,
        stripe_kib: int = 0,
        mirrors: int = 0,
    ) -> None:
        """A new LV, active, with its first bytes zeroed and every known signature wiped."""
        argv = ["lvcreate", "--yes", *self._udev, "--name", name]
        argv += [a for tag in tags for a in ("--addtag", tag)]
        if thin_pool:
            argv += ["--virtualsize", f"{size_bytes}b", "--thin", f"{vg}/{thin_pool}"]
        else:
            argv += ["--size", f"{size_bytes}b", "--wipesignatures", "y", "--zero", "y"]
            if lv_type:
                argv += ["--type", lv_type]
            if stripes:
                argv += ["--stripes", str(stripes)]
            if stripe_kib:
                argv += ["--stripesize", f"{stripe_kib}k"]
            if mirrors:
                argv += ["--mirrors", str(mirrors)]
            argv.append(vg)
        self._run(argv, f"create logical volume {vg}/{name}")

    def snapshot(self, vg: str, origin: str, name: str, tags: Sequence[str]) -> None:
        """A thin snapshot of a thin LV. It gets the activation-skip flag, as lvm2 gives every
        thin snapshot, so it never activates by accident; activate with ``ignore_skip``."""
        argv = ["lvcreate", "--yes", *self._udev, "--snapshot", "--name", name]
        argv += ["--setactivationskip", "y"]
        argv += [a for tag in tags for a in ("--addtag", tag)]
        argv.append(f"{vg}/{origin}")
        self._run(argv, f"snapshot {vg}/{origin} as {name}")

    def clone(self, vg: str, origin: str, name: str, tags: Sequence[str]) -> None:
        """A writable thin snapshot used as a volume: no activation skip, active at once."""
        argv = ["lvcreate", "--yes", *self._udev, "--snapshot", "--name", name]
        argv += ["--setactivationskip", "n", "--activate", "y", "--ignoreactivationskip"]
        argv += [a for tag in tags for a in ("--addtag", tag)]
        argv.append(f"{vg}/{origin}")
        self._run(argv, f"clone {vg}/{origin} as {name}")

    def extend(self, vg: str, name: str, size_bytes: int) -> None:
        argv = ["lvextend", "--yes", *self._udev, "--size", f"{size_bytes}b", f"{vg}/{name}"]
        self._run(argv, f"extend logical volume {vg}/{name}")

    def remove(self, vg: str, name: str) -> None:
        argv = ["lvremove", "--yes", "--force", *self._udev, f"{vg}/{name}"]
        self._run(argv, f"remove logical volume {vg}/{name}")

    def activate(self, vg: str, name: str) -> None:
        argv = ["lvchange", *self._udev, "--activate", "y", "--ignoreactivationskip"]
        self._run([*argv, f"{vg}/{name}"], f"activate logical volume {vg}/{name}")

    def change_tags(
        self, vg: str, name: str, add: Sequence[str] = (), remove: Sequence[str] = ()
    ) -> None:
        argv = ["lvchange"]
        argv += [a for tag in add for a in ("--addtag", tag)]
        argv += [a for tag in remove for a in ("--deltag", tag)]
        self._run([*argv, f"{vg}/{name}"], f"change the tags of {vg}/{name}")
