"""The lvm backend's decisions and error paths, with a fake command runner.

These tests prove what the backend asks lvm2 to do and how it reads lvm2's answers and
failures; that lvm2 really does it is proven in the real-kernel VM lane (tests/vm).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from csi_driver import ids
from csi_driver.backends.lvm import tags as lvtags
from csi_driver.backends.lvm.backend import LvmBackend
from csi_driver.backends.lvm.lvm2 import csi_error, parse_fullreport
from csi_driver.config import Config, parse_endpoint
from csi_driver.config.device_classes import (
    DeviceClass,
    DeviceClassError,
    load_device_classes,
    parse_device_classes,
)
from csi_driver.errors import CsiError
from csi_driver.model import (
    AccessMode,
    AccessType,
    Capability,
    ContentSource,
    SourceKind,
    VolumeSpec,
)
from csi_driver.services import sizing
from csi_driver.services.ephemeral import EphemeralVolumes
from csi_driver.system.runner import (
    CANCELLED,
    DEADLINE_EXCEEDED,
    CancelToken,
    CommandError,
    CommandResult,
    bound_to,
    current_token,
)

MiB = 1 << 20
GiB = 1 << 30
EXTENT = 4 * MiB
NODE = "n1"


# --- a fake lvm2 -------------------------------------------------------------------------------


@dataclass
class FakeLvm:
    """Answers ``lvm fullreport`` from its state and applies lvcreate/lvremove/lvextend to it.
    ``fail`` maps a program to the CommandError it raises."""

    vg_size: int = 10 * GiB
    vg_free: int = 8 * GiB
    lvs: dict[str, dict[str, str]] = field(default_factory=dict)
    calls: list[list[str]] = field(default_factory=list)
    #: the environment each call added, in the order of calls
    envs: list[dict[str, str]] = field(default_factory=list)
    fail: dict[str, CommandError] = field(default_factory=dict)
    vg_exists: bool = True

    def add_pool(self, name: str = "pool", size: int = 2 * GiB) -> None:
        self.lvs[name] = self._lv(name, size, attr="twi-aotz--", layout="thin,pool")

    @staticmethod
    def _lv(
        name: str, size: int, *, attr: str, layout: str, pool: str = "", tags: str = ""
    ) -> dict[str, str]:
        return {
            "lv_name": name,
            "lv_size": str(size),
            "lv_tags": tags,
            "lv_attr": attr,
            "lv_layout": layout,
            "pool_lv": pool,
            "origin": "",
            "lv_path": f"/dev/vg0/{name}",
            "lv_dm_path": f"/dev/mapper/vg0-{name}",
            "data_percent": "10.00" if "pool" in layout else "",
            "lv_health_status": "",
        }

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 0,
        check: bool = True,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> CommandResult:
        argv = list(argv)
        self.calls.append(argv)
        self.envs.append(dict(env or {}))
        program = argv[0]
        if program in self.fail:
            raise self.fail[program]
        if argv[:2] == ["lvm", "fullreport"]:
            return self._report(argv)
        if program == "lvcreate":
            self._create(argv)
        elif program == "lvremove":
            self.lvs.pop(argv[-1].split("/")[1])
        elif program == "lvchange":
            lv = self.lvs[argv[-1].split("/")[1]]
            tags = set(filter(None, lv["lv_tags"].split(",")))
            tags |= {argv[i + 1] for i, a in enumerate(argv) if a == "--addtag"}
            tags -= {argv[i + 1] for i, a in enumerate(argv) if a == "--deltag"}
            lv["lv_tags"] = ",".join(sorted(tags))
        elif program == "lvextend":
            name = argv[-1].split("/")[1]
            self.lvs[name]["lv_size"] = argv[argv.index("--size") + 1].rstrip("b")
        return CommandResult(tuple(argv), 0, "", "", 0.0)

    def _report(self, argv: list[str]) -> CommandResult:
        if not self.vg_exists:
            stderr = '  Volume group "vg0" not found\n  Cannot process volume group vg0\n'
            return CommandResult(tuple(argv), 5, '{"report": []}', stderr, 0.0)
        vg = {
            "vg_name": "vg0",
            "vg_size": str(self.vg_size),
            "vg_free": str(self.vg_free),
            "vg_extent_size": str(EXTENT),
            "pv_count": "2",
        }
        doc = {"report": [{"vg": [vg], "lv": list(self.lvs.values())}]}
        return CommandResult(tuple(argv), 0, json.dumps(doc), "", 0.0)

    def _create(self, argv: list[str]) -> None:
        name = argv[argv.index("--name") + 1]
        tags = ",".join(argv[i + 1] for i, a in enumerate(argv) if a == "--addtag")
        if "--thin" in argv:
            size = int(argv[argv.index("--virtualsize") + 1].rstrip("b"))
            pool = argv[argv.index("--thin") + 1].split("/")[1]
            self.lvs[name] = self._lv(
                name, size, attr="Vwi-a-tz--", layout="thin,sparse", pool=pool, tags=tags
            )
        elif "--snapshot" in argv:
            origin = self.lvs[argv[-1].split("/")[1]]
            self.lvs[name] = {
                **origin,
                "lv_name": name,
                "lv_tags": tags,
                "origin": origin["lv_name"],
            }
        else:
            size = int(argv[argv.index("--size") + 1].rstrip("b"))
            self.lvs[name] = self._lv(name, size, attr="-wi-a-----", layout="linear", tags=tags)
            self.vg_free -= size

    def commands(self) -> list[str]:
        return [c[0] if c[0] != "lvm" else "fullreport" for c in self.calls]


THIN = DeviceClass("thin", "vg0", thin_pool="pool", default=True)
THICK = DeviceClass("thick", "vg0")


@pytest.fixture
def lvm() -> FakeLvm:
    fake = FakeLvm()
    fake.add_pool()
    return fake


@pytest.fixture
def backend(lvm: FakeLvm) -> LvmBackend:
    b = LvmBackend([THIN, THICK], NODE, lvm, udev_sync=False)
    lvm.calls.clear()
    return b


def spec(backend: LvmBackend, name: str = "pvc-1", size: int = 100 * MiB, **kw: Any) -> VolumeSpec:
    """A CreateVolume as the service edge hands it over: the parameters validated once, the
    size rounded (services/sizing.py); the backend trusts both."""
    parameters = backend.validate_parameters(kw.pop("parameters", {}))
    return VolumeSpec(
        name=name,
        capacity_bytes=sizing.create_size(backend, parameters, size),
        access_type=kw.pop("access_type", AccessType.MOUNT),
        fs_type=kw.pop("fs_type", "ext4"),
        parameters=parameters,
        required_bytes=size,
        **kw,
    )


def code(exc: pytest.ExceptionInfo[CsiError]) -> grpc.StatusCode:
    return exc.value.code


# --- device classes ----------------------------------------------------------------------------


def test_device_classes_from_json_file(tmp_path: Path) -> None:
    path = tmp_path / "lvm.json"
    path.write_text(
        json.dumps(
            {
                "deviceClasses": [
                    {
                        "name": "fast",
                        "volumeGroup": "nvme",
                        "thinPool": "p0",
                        "default": True,
                        "overprovisionRatio": 4,
                        "reservedBytes": "1Gi",
                    },
                    {"name": "bulk", "volumeGroup": "hdd", "lvType": "raid1", "mirrors": 2},
                ]
            }
        )
    )
    fast, bulk = load_device_classes(path, None)
    assert (fast.volume_group, fast.thin_pool, fast.default_lv_type) == ("nvme", "p0", "thin")
    assert fast.overprovision_ratio == 4.0 and fast.reserved_bytes == GiB
    assert (bulk.default_lv_type, bulk.mirrors, bulk.default) == ("raid1", 2, False)


def test_device_classes_from_yaml_and_from_a_single_vg(tmp_path: Path) -> None:
    path = tmp_path / "lvm.yaml"
    path.write_text("deviceClasses:\n  - name: only\n    volumeGroup: vg1\n")
    (only,) = load_device_classes(path, None)
    assert only.default and only.default_lv_type == "linear"
    (single,) = load_device_classes(None, "vg2")
    assert (single.name, single.volume_group, single.default) == ("default", "vg2", True)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"deviceClasses": []}, "empty"),
        ({"classes": []}, "deviceClasses"),
        (
            {
                "deviceClasses": [
                    {"name": "a", "volumeGroup": "v"},
                    {"name": "b", "volumeGroup": "v"},
                ]
            },
            "exactly one",
        ),
        (
            {
                "deviceClasses": [
                    {"name": "a", "volumeGroup": "v", "default": True},
                    {"name": "a", "volumeGroup": "w", "default": False},
                ]
            },
            "unique",
        ),
        ({"deviceClasses": [{"name": "a", "volumeGroup": "v", "size": 1}]}, "unknown keys"),
        ({"deviceClasses": [{"name": "a", "volumeGroup": "../etc"}]}, "not a valid lvm2 name"),
        ({"deviceClasses": [{"name": "a", "volumeGroup": "-v"}]}, "not a valid lvm2 name"),
        ({"deviceClasses": [{"name": "A b", "volumeGroup": "v"}]}, "DNS label"),
        ({"deviceClasses": [{"name": "a", "volumeGroup": "v", "lvType": "thin"}]}, "thinPool"),
        (
            {"deviceClasses": [{"name": "a", "volumeGroup": "v", "overprovisionRatio": 2}]},
            "thinPool",
        ),
        ({"deviceClasses": [{"name": "a", "volumeGroup": "v", "lvType": "raid5"}]}, "lvType"),
        (
            {"deviceClasses": [{"name": "a", "volumeGroup": "v", "stripeSize": "3k"}]},
            "power of two",
        ),
    ],
)
def test_bad_device_classes_are_refused_with_the_reason(doc: object, message: str) -> None:
    with pytest.raises(DeviceClassError, match=message):
        parse_device_classes(doc)


# --- tags and reports --------------------------------------------------------------------------


def test_tags_round_trip_and_encode_unsafe_names() -> None:
    meta = lvtags.Meta(
        kind="volume",
        name="a name/with ünicode",
        access_type=AccessType.BLOCK,
        parameters={"deviceClass": "thin", "lvType": "thin"},
        source_local="s" + "0" * 32,
        created_ns=123,
        published=frozenset({"node-a"}),
    )
    tags = lvtags.encode(meta)
    assert all(lvtags_ok(t) for t in tags)
    assert lvtags.decode(tags) == meta
    assert lvtags.decode([t for t in tags if t != lvtags.OWNER]) is None  # not ours
    assert lvtags.decode([lvtags.OWNER, "nlc.kind=volume"]) is None  # incomplete
    with pytest.raises(ValueError):
        lvtags.encode(lvtags.Meta(kind="volume", name="x", parameters={"k": "a b"}))


def lvtags_ok(tag: str) -> bool:
    from csi_driver.backends.lvm.lvm2 import TAG

    return bool(TAG.match(tag))


def test_fullreport_is_parsed_per_volume_group(lvm: FakeLvm) -> None:
    groups = parse_fullreport(lvm._report(["lvm", "fullreport"]).stdout)
    vg = groups["vg0"]
    assert (vg.size_bytes, vg.free_bytes, vg.extent_bytes, vg.pv_count) == (
        10 * GiB,
        8 * GiB,
        EXTENT,
        2,
    )
    assert vg.lvs["pool"].is_thin_pool and vg.lvs["pool"].data_percent == 10.0
    with pytest.raises(CsiError, match="cannot parse"):
        parse_fullreport('{"report": [{"vg": [{}]}]}')


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            CommandError(
                ["lvcreate"],
                5,
                stderr='  Volume group "vg0" has insufficient free space (3 extents): 25 required.',
            ),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
        (
            CommandError(
                ["lvcreate"],
                5,
                stderr='  Volume group "vg9" not found\n  Cannot process volume group vg9',
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
        (
            CommandError(["lvremove"], 5, stderr="  Logical volume vg0/v1 in use."),
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
        (
            CommandError(["lvcreate"], 5, stderr='  Logical Volume "v1" already exists in group'),
            grpc.StatusCode.ALREADY_EXISTS,
        ),
        (CommandError(["lvcreate"], None, timed_out=True), grpc.StatusCode.DEADLINE_EXCEEDED),
        (CommandError(["lvcreate"], None, not_found=True), grpc.StatusCode.UNAVAILABLE),
        (CommandError(["lvcreate"], None, cancelled=CANCELLED), grpc.StatusCode.CANCELLED),
        (
            CommandError(["lvcreate"], None, cancelled=DEADLINE_EXCEEDED),
            grpc.StatusCode.DEADLINE_EXCEEDED,
        ),
        (
            CommandError(["lvcreate"], 3, stderr="  Internal error: something odd"),
            grpc.StatusCode.INTERNAL,
        ),
    ],
    ids=[
        "no-space",
        "vg-missing",
        "in-use",
        "exists",
        "timeout",
        "no-lvm2",
        "cancelled",
        "deadline",
        "other",
    ],
)
def test_lvm2_failures_become_csi_codes(error: CommandError, expected: grpc.StatusCode) -> None:
    mapped = csi_error(error, "create logical volume vg0/v1")
    assert mapped.code == expected
    assert "create logical volume vg0/v1" in mapped.message


# --- parameters --------------------------------------------------------------------------------


def test_parameters_are_normalised_with_the_class_defaults(backend: LvmBackend) -> None:
    assert dict(backend.validate_parameters({})) == {"deviceClass": "thin", "lvType": "thin"}
    assert dict(
        backend.validate_parameters(
            {"deviceClass": "thick", "lvType": "striped", "stripeSize": "64Ki"}
        )
    ) == {"deviceClass": "thick", "lvType": "striped", "stripes": "2", "stripeSize": "65536"}
    assert dict(backend.validate_parameters({"lvType": "raid1", "wipeOnDelete": "False"})) == {
        "deviceClass": "thin",
        "lvType": "raid1",
        "mirrors": "1",
    }


@pytest.mark.parametrize(
    "params",
    [
        {"deviceClass": "nope"},
        {"lvType": "raid5"},
        {"deviceClass": "thick", "lvType": "thin"},
        {"stripes": "2"},
        {"lvType": "striped", "stripes": "1"},
        {"lvType": "striped", "stripeSize": "3000"},
        {"lvType": "raid1", "mirrors": "9"},
        {"mirrors": "1"},
        {"fsType": "btrfs"},
        {"wipeOnDelete": "yes"},
        {"size": "1Gi"},
    ],
)
def test_bad_parameters_are_invalid_and_touch_nothing(
    backend: LvmBackend, lvm: FakeLvm, params: dict[str, str]
) -> None:
    with pytest.raises(CsiError) as exc:
        backend.create_volume(spec(backend, parameters=params))
    assert code(exc) == grpc.StatusCode.INVALID_ARGUMENT
    assert "lvcreate" not in lvm.commands()


# --- creating ----------------------------------------------------------------------------------


def test_with_udev_sync_udev_makes_the_device_nodes(lvm: FakeLvm) -> None:
    backend = LvmBackend([THIN, THICK], NODE, lvm, udev_sync=True)
    backend.create_volume(spec(backend, size=100 * MiB))
    create = next(call for call in lvm.calls if call[0] == "lvcreate")
    assert "--noudevsync" not in create
    assert lvm.envs and all(env == {} for env in lvm.envs)


def test_thin_create_is_one_report_and_one_lvcreate(backend: LvmBackend, lvm: FakeLvm) -> None:
    volume = backend.create_volume(spec(backend, size=100 * MiB + 1))
    assert lvm.commands() == ["fullreport", "lvcreate"]
    create = lvm.calls[1]
    assert create[create.index("--virtualsize") + 1] == f"{104 * MiB}b"  # whole extents
    assert create[create.index("--thin") + 1] == "vg0/pool"
    assert "--noudevsync" in create
    # Without udev sync lvm2 makes the device nodes itself, whatever its lvm.conf says.
    assert all(env == {"DM_DISABLE_UDEV": "1"} for env in lvm.envs)
    assert volume.capacity_bytes == 104 * MiB
    assert volume.id == f"{create[create.index('--name') + 1]}@{NODE}"
    assert backend.get_volume(volume.id) == volume
    # the same request again: found, nothing created
    lvm.calls.clear()
    assert backend.create_volume(spec(backend, size=100 * MiB + 1)) == volume
    assert lvm.commands() == ["fullreport"]


def test_striped_and_raid1_ask_lvm2_for_them(backend: LvmBackend, lvm: FakeLvm) -> None:
    backend.create_volume(
        spec(
            backend,
            "s",
            parameters={
                "deviceClass": "thick",
                "lvType": "striped",
                "stripes": "3",
                "stripeSize": "128Ki",
            },
        )
    )
    create = lvm.calls[-1]
    assert create[create.index("--type") + 1] == "striped"
    assert create[create.index("--stripes") + 1] == "3"
    assert create[create.index("--stripesize") + 1] == "128k"
    assert int(create[create.index("--size") + 1].rstrip("b")) % (3 * EXTENT) == 0
    assert create[-1] == "vg0" and "--wipesignatures" in create
    backend.create_volume(
        spec(backend, "r", parameters={"deviceClass": "thick", "lvType": "raid1"})
    )
    create = lvm.calls[-1]
    assert create[create.index("--type") + 1] == "raid1"
    assert create[create.index("--mirrors") + 1] == "1"


def test_an_existing_volume_is_returned_as_it_is_and_says_what_differs(
    backend: LvmBackend, lvm: FakeLvm
) -> None:
    """Whether it answers a request is VolumeSpec.check_existing's to say (the servicers ask it
    first); the LV's tags carry all it compares."""
    volume = backend.create_volume(spec(backend, size=100 * MiB))
    found = backend.get_volume(volume.id)
    assert found == volume
    spec(backend, size=100 * MiB).check_existing(found)
    for other, difference in (
        (spec(backend, size=200 * MiB), "capacity is 104857600 bytes"),
        (spec(backend, access_type=AccessType.BLOCK, fs_type=""), "access type is mount"),
        (spec(backend, fs_type="xfs"), "fs_type is 'ext4'"),
        (spec(backend, parameters={"lvType": "linear"}), "'lvType': 'thin'"),
    ):
        with pytest.raises(CsiError, match=difference) as exc:
            other.check_existing(found)
        assert code(exc) == grpc.StatusCode.ALREADY_EXISTS
        lvm.calls.clear()
        assert backend.create_volume(other) == volume  # trusted: nothing made or changed
        assert lvm.commands() == ["fullreport"]


def test_thin_capacity_honours_ratio_and_reserve(lvm: FakeLvm) -> None:
    cls = DeviceClass(
        "thin",
        "vg0",
        thin_pool="pool",
        default=True,
        overprovision_ratio=2.0,
        reserved_bytes=GiB // 2,
    )
    backend = LvmBackend([cls], NODE, lvm)
    assert backend.capacity(backend.validate_parameters({})) == 3 * GiB  # (2 GiB - 0.5 GiB) * 2
    backend.create_volume(spec(backend, size=GiB))
    assert backend.capacity(backend.validate_parameters({})) == 2 * GiB
    lvm.calls.clear()
    with pytest.raises(CsiError) as exc:
        backend.create_volume(spec(backend, "big", size=3 * GiB))
    assert code(exc) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "2147483648 bytes available" in exc.value.message
    assert "lvcreate" not in lvm.commands()


def test_thick_capacity_is_vg_free_space_per_leg(backend: LvmBackend, lvm: FakeLvm) -> None:
    assert backend.capacity(backend.validate_parameters({"deviceClass": "thick"})) == 8 * GiB
    assert (
        backend.capacity(backend.validate_parameters({"deviceClass": "thick", "lvType": "raid1"}))
        == 4 * GiB - EXTENT
    )


def test_lvm2_no_space_is_resource_exhausted(backend: LvmBackend, lvm: FakeLvm) -> None:
    lvm.fail["lvcreate"] = CommandError(
        ["lvcreate"], 5, stderr="  Insufficient suitable allocatable extents for logical volume"
    )
    with pytest.raises(CsiError) as exc:
        backend.create_volume(spec(backend, parameters={"deviceClass": "thick"}))
    assert code(exc) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "Insufficient suitable allocatable extents" in exc.value.message


def test_missing_volume_group_is_failed_precondition_and_not_ready(lvm: FakeLvm) -> None:
    lvm.vg_exists = False
    backend = LvmBackend([THIN], NODE, lvm)
    assert "volume group 'vg0'" in (backend.health() or "")
    with pytest.raises(CsiError) as exc:
        backend.create_volume(spec(backend))
    assert code(exc) == grpc.StatusCode.FAILED_PRECONDITION
    assert backend.capacity(backend.validate_parameters({})) == 0


def test_lvm2_timeout_is_deadline_exceeded(backend: LvmBackend, lvm: FakeLvm) -> None:
    lvm.fail["lvcreate"] = CommandError(["lvcreate"], None, timed_out=True)
    with pytest.raises(CsiError) as exc:
        backend.create_volume(spec(backend))
    assert code(exc) == grpc.StatusCode.DEADLINE_EXCEEDED


# --- snapshots, clones, deletion, expansion ----------------------------------------------------


def test_thick_volume_snapshot_is_failed_precondition(backend: LvmBackend, lvm: FakeLvm) -> None:
    volume = backend.create_volume(spec(backend, parameters={"deviceClass": "thick"}))
    lvm.calls.clear()
    with pytest.raises(CsiError) as exc:
        backend.create_snapshot("snap", volume.id, {})
    assert code(exc) == grpc.StatusCode.FAILED_PRECONDITION
    assert "thin" in exc.value.message
    assert lvm.commands() == ["fullreport"]


def test_snapshot_and_restore_use_thin_snapshots(backend: LvmBackend, lvm: FakeLvm) -> None:
    volume = backend.create_volume(spec(backend, size=64 * MiB))
    snap = backend.create_snapshot("snap", volume.id, {})
    create = lvm.calls[-1]
    assert "--snapshot" in create and create[-1] == f"vg0/{volume.id.partition('@')[0]}"
    assert create[create.index("--setactivationskip") + 1] == "y"
    assert snap.size_bytes == 64 * MiB and snap.source_volume_id == volume.id
    assert backend.list_snapshots() == [snap]
    lvm.calls.clear()
    restored = backend.create_volume(
        spec(
            backend,
            "restored",
            size=128 * MiB,
            content_source=ContentSource(SourceKind.SNAPSHOT, snap.id),
        )
    )
    assert lvm.commands() == ["fullreport", "lvcreate", "lvextend"]
    assert "--ignoreactivationskip" in lvm.calls[1]
    assert restored.capacity_bytes == 128 * MiB
    assert restored.content_source == ContentSource(SourceKind.SNAPSHOT, snap.id)
    with pytest.raises(CsiError) as exc:
        backend.create_snapshot("snap", restored.id, {})
    assert code(exc) == grpc.StatusCode.ALREADY_EXISTS


def test_a_clone_killed_before_its_growth_is_finished_by_the_retry(
    backend: LvmBackend, lvm: FakeLvm
) -> None:
    """A clone bigger than its source is lvcreate then lvextend; a kill between the two leaves
    a smaller clone. It is no volume until grown (never listed, snapshotted or cloned), and
    the CreateVolume retry grows it instead of refusing it as a mismatch."""
    volume = backend.create_volume(spec(backend, size=64 * MiB))
    snap = backend.create_snapshot("snap", volume.id, {})
    request = spec(
        backend, "grown", size=128 * MiB, content_source=ContentSource(SourceKind.SNAPSHOT, snap.id)
    )
    lvm.fail["lvextend"] = CommandError(["lvextend"], 137, "", "killed")
    with pytest.raises(CsiError):
        backend.create_volume(request)
    del lvm.fail["lvextend"]
    clone_id = ids.volume_id_for("grown", NODE)
    assert clone_id.partition("@")[0] in lvm.lvs  # the smaller clone is there
    assert backend.get_volume(clone_id) is None
    assert [v.id for v in backend.list_volumes()] == [volume.id]
    with pytest.raises(CsiError) as exc:
        backend.create_snapshot("of-unfinished", clone_id, {})
    assert code(exc) == grpc.StatusCode.NOT_FOUND
    lvm.calls.clear()
    grown = backend.create_volume(request)
    assert lvm.commands() == ["fullreport", "lvextend", "fullreport"]
    assert grown.id == clone_id and grown.capacity_bytes == 128 * MiB
    assert backend.get_volume(clone_id) == grown
    # grown past what it was made for later (ControllerExpandVolume): still a finished volume
    backend.expand_volume(clone_id, 256 * MiB)
    assert backend.get_volume(clone_id) is not None


def test_published_or_open_volume_is_not_deleted(backend: LvmBackend, lvm: FakeLvm) -> None:
    volume = backend.create_volume(spec(backend))
    backend.set_published(volume.id, "n1", True)
    with pytest.raises(CsiError) as exc:
        backend.delete_volume(volume.id)
    assert code(exc) == grpc.StatusCode.FAILED_PRECONDITION
    backend.set_published(volume.id, "n1", False)
    name = volume.id.partition("@")[0]
    lvm.lvs[name]["lv_attr"] = "Vwi-aotz--"
    with pytest.raises(CsiError) as exc:
        backend.delete_volume(volume.id)
    assert code(exc) == grpc.StatusCode.FAILED_PRECONDITION
    assert "lvremove" not in lvm.commands()
    lvm.lvs[name]["lv_attr"] = "Vwi-a-tz--"
    lvm.calls.clear()
    backend.delete_volume(volume.id)
    assert lvm.commands() == ["fullreport", "lvremove"]
    backend.delete_volume(volume.id)  # again: nothing to do, not an error
    backend.delete_volume("v" + "0" * 32 + "@other-node")  # another node's: not ours, no call
    assert lvm.commands()[-1] == "fullreport"


def test_a_bind_mounted_device_node_keeps_its_volume(
    backend: LvmBackend, lvm: FakeLvm, tmp_path: Path
) -> None:
    """A published block volume is a bind mount of the LV's device node: it does not open the
    device, so lvremove would not refuse; the mount table does."""
    volume = backend.create_volume(spec(backend, access_type=AccessType.BLOCK, fs_type=""))
    name = volume.id.partition("@")[0]
    device = tmp_path / "dm-7"  # stands for /dev/dm-7
    device.touch()
    lvm.lvs[name]["lv_path"] = str(device)
    st = os.stat(device)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    target = "/var/lib/kubelet/plugins/kubernetes.io/csi/volumeDevices/publish/pvc-1/" + "p" * 300
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        f"1 0 {dev} / / rw - ext4 /dev/vda rw\n2 1 {dev} {device} {target} rw - ext4 /dev/vda rw\n"
    )
    in_use = LvmBackend([THIN, THICK], NODE, lvm, udev_sync=False, mountinfo=str(mountinfo))
    lvm.calls.clear()
    with pytest.raises(CsiError) as exc:
        in_use.delete_volume(volume.id)
    assert code(exc) == grpc.StatusCode.FAILED_PRECONDITION
    assert "still in use, mounted at /var/lib/kubelet/plugins" in exc.value.message
    assert len(exc.value.message) < 400  # the 350-character target is cut
    assert "lvremove" not in lvm.commands() and name in lvm.lvs
    mountinfo.write_text(f"1 0 {dev} / / rw - ext4 /dev/vda rw\n")  # unpublished
    in_use.delete_volume(volume.id)
    assert name not in lvm.lvs


def test_a_wipe_once_begun_outlives_its_cancelled_request(
    backend: LvmBackend, lvm: FakeLvm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed by the cancelled RPC, a long wipe would start again from nothing on every retry;
    so the wipe and the removal after it are not bound to the RPC."""
    volume = backend.create_volume(spec(backend, parameters={"wipeOnDelete": "true"}))
    seen: list[tuple[str, CancelToken | None]] = []
    fake_run = lvm.run

    def recording(argv: Sequence[str], **kw: Any) -> CommandResult:
        seen.append((argv[0], current_token()))
        return fake_run(argv, **kw)

    monkeypatch.setattr(lvm, "run", recording)
    token = CancelToken()
    token.cancel()
    with bound_to(token):
        backend.delete_volume(volume.id)
    assert [(program, t is None) for program, t in seen] == [
        ("lvm", False),
        ("blkdiscard", True),
        ("lvremove", True),
    ]


def test_foreign_logical_volumes_are_invisible(backend: LvmBackend, lvm: FakeLvm) -> None:
    name = "v" + "1" * 32
    lvm.lvs[name] = FakeLvm._lv(name, GiB, attr="-wi-a-----", layout="linear", tags="other")
    assert backend.get_volume(f"{name}@{NODE}") is None
    assert backend.list_volumes() == []
    backend.delete_volume(f"{name}@{NODE}")
    assert name in lvm.lvs


def test_expand_is_one_report_and_one_lvextend(backend: LvmBackend, lvm: FakeLvm) -> None:
    volume = backend.create_volume(spec(backend, size=64 * MiB))
    lvm.calls.clear()
    grown = backend.expand_volume(volume.id, 100 * MiB)
    assert lvm.commands() == ["fullreport", "lvextend"]
    assert grown.capacity_bytes == 100 * MiB
    lvm.calls.clear()
    assert backend.expand_volume(volume.id, 80 * MiB).capacity_bytes == 100 * MiB
    assert lvm.commands() == ["fullreport"]
    with pytest.raises(CsiError) as exc:
        backend.expand_volume(volume.id, 100 * GiB)
    assert code(exc) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_the_backend_trusts_what_the_service_edge_decided(
    backend: LvmBackend, lvm: FakeLvm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parameters are validated once, at the edge: creating, sizing, counting capacity and
    expanding never validate them again (nor round a size again)."""
    thick = spec(backend, size=64 * MiB, parameters={"deviceClass": "thick"})

    def validate(parameters: Mapping[str, str]) -> None:
        raise AssertionError("validated again")

    monkeypatch.setattr(backend, "validate_parameters", validate)
    assert backend.round_size(MiB, thick.parameters) == EXTENT
    assert backend.capacity(thick.parameters) == 8 * GiB
    volume = backend.create_volume(thick)
    assert volume.capacity_bytes == 64 * MiB
    grown = backend.expand_volume(volume.id, 96 * MiB)
    assert grown.capacity_bytes == 96 * MiB
    extend = lvm.calls[-1]
    assert extend[0] == "lvextend" and extend[extend.index("--size") + 1] == f"{96 * MiB}b"


def test_a_volume_of_a_class_no_longer_configured_cannot_be_sized(
    backend: LvmBackend, lvm: FakeLvm
) -> None:
    volume = backend.create_volume(spec(backend, parameters={"deviceClass": "thick"}))
    only_thin = LvmBackend([THIN], NODE, lvm, udev_sync=False)
    found = only_thin.get_volume(volume.id)
    assert found is not None
    with pytest.raises(CsiError) as exc:
        only_thin.round_size(200 * MiB, found.parameters)
    assert code(exc) == grpc.StatusCode.FAILED_PRECONDITION
    assert "deviceClass 'thick' is not configured" in exc.value.message


# --- inline ephemeral volumes ------------------------------------------------------------------


def ephemeral_spec(backend: LvmBackend, fs_type: str, attributes: dict[str, str]) -> VolumeSpec:
    config = Config(endpoint=parse_endpoint("unix:///tmp/csi.sock"), node_id=NODE)
    ephemeral = EphemeralVolumes(cast(Any, None), config, backend, "/tmp/state")
    cap = Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER, fs_type=fs_type)
    context = {"csi.storage.k8s.io/ephemeral": "true", "size": "64Mi", **attributes}
    return ephemeral.spec("csi-0123abcd", cap, context)


@pytest.mark.parametrize(("fs_type", "expected"), [("", "xfs"), ("xfs", "xfs")])
def test_an_inline_volume_takes_its_filesystem_from_its_attributes(
    backend: LvmBackend, fs_type: str, expected: str
) -> None:
    """fsType given only as a volume attribute (not in the capability) is honoured, as the
    StorageClass parameter is for CreateVolume."""
    volume = backend.create_volume(ephemeral_spec(backend, fs_type, {"fsType": "xfs"}))
    assert volume.fs_type == expected


def test_an_inline_volume_without_a_filesystem_gets_the_default(backend: LvmBackend) -> None:
    assert backend.create_volume(ephemeral_spec(backend, "", {})).fs_type == "ext4"


@pytest.mark.parametrize(
    ("fs_type", "attributes", "message"),
    [
        ("", {"fsType": "btrfs"}, "fsType 'btrfs' is not supported"),
        ("", {"fsType": "x" * 5000}, "(5000 bytes)"),
        ("ext4", {"fsType": "xfs"}, "fs_type 'ext4' but the parameter fsType says 'xfs'"),
        ("btrfs", {}, "fs_type 'btrfs' is not supported"),
    ],
)
def test_an_inline_volume_with_a_filesystem_it_cannot_have_is_invalid(
    backend: LvmBackend, lvm: FakeLvm, fs_type: str, attributes: dict[str, str], message: str
) -> None:
    with pytest.raises(CsiError, match=re.escape(message)) as exc:
        backend.create_volume(ephemeral_spec(backend, fs_type, attributes))
    assert code(exc) == grpc.StatusCode.INVALID_ARGUMENT
    assert "lvcreate" not in lvm.commands()


def test_list_pages_are_cut_from_one_report(backend: LvmBackend, lvm: FakeLvm) -> None:
    """A page is what follows an id, in id order; lvm2 reports every LV at once, so each page
    is one report."""
    volumes = sorted(
        backend.create_volume(spec(backend, f"pvc-{i}", size=64 * MiB)).id for i in range(5)
    )
    snaps = sorted(backend.create_snapshot(f"snap-{i}", volumes[i], {}).id for i in range(3))
    lvm.calls.clear()
    assert [v.id for v in backend.list_volumes(volumes[1], 2)] == volumes[2:4]
    assert [v.id for v in backend.list_volumes(volumes[3])] == volumes[4:]
    assert [v.id for v in backend.list_volumes()] == volumes
    assert [s.id for s in backend.list_snapshots(snaps[0], 1)] == snaps[1:2]
    assert lvm.commands() == ["fullreport"] * 4
