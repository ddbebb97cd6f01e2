"""lvm2 through its command line: JSON reports in bytes, argument lists, one runner.

Everything the lvm backend learns about volume groups comes from one ``lvm fullreport`` call
(every VG, LV and its tags at once), so an operation costs one report plus the commands that
change something. lvm2 calls cost ~100 ms each on real nodes; every call goes through the
project's runner, which counts and times it.

Errors: :func:`failure` reads what a failed lvm2 command means from its stderr (no space, VG
missing, LV in use, timeout), keeping lvm2's own words for the message; :func:`csi_error` hands
that to the driver's one translation into CSI codes (:mod:`csi_driver.system_errors`).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from csi_driver import callmemo
from csi_driver.errors import CsiError, Internal
from csi_driver.system.failure import Reason, SystemFailure
from csi_driver.system.runner import CommandError, Runner
from csi_driver.system_errors import to_csi

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
    "metadata_percent",
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
    #: a thin pool's metadata use in percent (None for other LVs)
    metadata_percent: float | None = None

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
                    metadata_percent=_percent(lv.get("metadata_percent", "")),
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


def failure(exc: CommandError) -> SystemFailure:
    """What a failed lvm2 command means, read from lvm2's own words (LC_ALL=C): no space, VG
    missing, LV exists or is in use; a command stopped, out of time or not there is said so."""
    detail = " ".join(line.strip() for line in exc.stderr.strip().splitlines()[-3:])
    lower = exc.stderr.lower()
    if exc.reason is Reason.TIMED_OUT:
        return SystemFailure(
            f"{exc.argv[0]} did not finish in time; the operation may still complete",
            reason=Reason.TIMED_OUT,
        )
    if exc.reason is Reason.UNUSABLE:
        return SystemFailure(
            f"lvm2 is not installed ({exc.argv[0]} not found)", reason=Reason.UNUSABLE
        )
    if exc.reason in (Reason.CANCELLED, Reason.DEADLINE):
        return exc
    if any(s in lower for s in _NO_SPACE):
        return SystemFailure(f"not enough space: {detail}", reason=Reason.NO_SPACE)
    if all(s in lower for s in _VG_MISSING) and "logical volume" not in lower:
        return SystemFailure(f"the volume group is missing: {detail}", reason=Reason.WRONG_STATE)
    if "already exists" in lower:
        return SystemFailure(detail, reason=Reason.EXISTS)
    if any(s in lower for s in _IN_USE):
        return SystemFailure(f"the logical volume is in use: {detail}", reason=Reason.IN_USE)
    return exc


def csi_error(exc: CommandError, what: str) -> CsiError:
    """The CSI error for a failed lvm2 command; ``what`` says what was being done."""
    return to_csi(failure(exc), what)


class Lvm2:
    """The lvm2 commands the backend needs. ``udev_sync=False`` (lvm2 cannot wait for udev, e.g.
    a container without the host's IPC namespace, or a VM without udevd) adds ``--noudevsync``
    to every command that creates or removes device nodes and runs every command with
    ``DM_DISABLE_UDEV=1``: lvm2 then makes the nodes in /dev itself, whatever its lvm.conf says.
    Left to udev without waiting for it (a stock configuration, ``udev_rules = 1``), a node may
    not exist yet when lvm2 wipes the start of a new thick volume ("Failed to wipe start of new
    LV"), and never does where no udev runs. The price: udev's rules skip these devices (no
    /dev/disk/by-id links for them); ``udev_sync=True`` keeps udev in charge."""

    def __init__(self, runner: Runner, *, udev_sync: bool = True) -> None:
        self._runner = runner
        self._udev = () if udev_sync else ("--noudevsync",)
        self._env = None if udev_sync else {"DM_DISABLE_UDEV": "1"}
        #: counts the changes begun through this object: a report read before the count moved
        #: may be stale, so a call's memo keeps it only while the count stands still
        self._changes = 0
        self._changes_lock = threading.Lock()

    def _run(self, argv: Sequence[str], what: str, timeout: float = CHANGE_TIMEOUT) -> str:
        """A command that changes the volume groups."""
        self._count_change()
        try:
            return self._runner.run(list(argv), timeout=timeout, env=self._env).stdout
        except CommandError as exc:
            raise csi_error(exc, what) from exc
        finally:
            self._count_change()  # also a failed or killed change may have changed something

    def _count_change(self) -> None:
        with self._changes_lock:
            self._changes += 1

    # --- reading ---------------------------------------------------------------------------

    def report(self, vgs: Iterable[str]) -> dict[str, VolumeGroup]:
        """Every named VG with all its LVs, in one call. A missing VG is simply absent.

        Within one RPC (``callmemo``) the answer is read once and reused until a change
        begins through this object, in this call or another."""
        names = sorted(set(vgs))
        memo = callmemo.current()
        key = ("lvm report", tuple(names))
        changes = self._changes
        if memo is not None and key in memo and memo[key][0] == changes:
            return dict(memo[key][1])
        groups = self._read_report(names)
        if memo is not None:
            memo[key] = (changes, groups)
        return dict(groups)

    def _read_report(self, names: list[str]) -> dict[str, VolumeGroup]:
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
            result = self._runner.run(argv, timeout=REPORT_TIMEOUT, check=False, env=self._env)
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
