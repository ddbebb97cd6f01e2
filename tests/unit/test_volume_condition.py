"""The rules of a volume's condition, one test each: the lvm backend's (on a fake lvm2, as the
other lvm unit tests), the node's look at a mounted filesystem (on a sysfs tree laid out as
the kernel lays it out), the threshold option, and the bound on messages. That real parts
trip them is proven in tests/integration/test_volume_health.py (hostpath, mounts, loop
devices) and tests/vm/test_lvm_health.py (lvm2, a thin pool, a real kernel)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from csi_driver import callmemo, model
from csi_driver.backends.lvm.backend import LvmBackend
from csi_driver.cli import parse_config
from csi_driver.config import DEFAULT_THIN_POOL_THRESHOLD, LvmConfig
from csi_driver.services.convert import CONDITION_MESSAGE_BYTES, condition_to_pb
from csi_driver.system import fshealth
from csi_driver.system.mounter import MountInfo
from csi_driver.system.quota import ProjectQuota, QuotaError
from tests.unit.test_lvm import NODE, THICK, THIN, FakeLvm, spec


@pytest.fixture
def lvm() -> FakeLvm:
    fake = FakeLvm()
    fake.add_pool()
    return fake


def made(backend: LvmBackend, lvm: FakeLvm, tmp_path: Path, **kw: object) -> str:
    """A volume whose device node exists (a file stands in for it)."""
    volume = backend.create_volume(spec(backend, **kw))  # type: ignore[arg-type]
    local = volume.id.split("@")[0]
    node = tmp_path / local
    node.touch()
    lvm.lvs[local]["lv_path"] = str(node)
    return volume.id


def thin_backend(lvm: FakeLvm, threshold: float = DEFAULT_THIN_POOL_THRESHOLD) -> LvmBackend:
    return LvmBackend([THIN, THICK], NODE, lvm, udev_sync=False, thin_pool_threshold=threshold)


# --- lvm ---------------------------------------------------------------------------------------


def test_a_healthy_thin_volume_is_normal(lvm: FakeLvm, tmp_path: Path) -> None:
    backend = thin_backend(lvm)
    vid = made(backend, lvm, tmp_path)
    condition = backend.volume_condition(vid)
    assert not condition.abnormal and len(condition.message) < 40


def test_a_removed_logical_volume_is_missing(lvm: FakeLvm, tmp_path: Path) -> None:
    backend = thin_backend(lvm)
    vid = made(backend, lvm, tmp_path)
    del lvm.lvs[vid.split("@")[0]]
    condition = backend.volume_condition(vid)
    assert condition.abnormal
    assert "is missing from volume group(s) vg0" in condition.message
    assert "delete the volume" in condition.message


def test_an_inactive_logical_volume_says_how_to_activate_it(lvm: FakeLvm, tmp_path: Path) -> None:
    backend = thin_backend(lvm)
    vid = made(backend, lvm, tmp_path, parameters={"deviceClass": "thick"})
    local = vid.split("@")[0]
    lvm.lvs[local]["lv_attr"] = "-wi-------"
    condition = backend.volume_condition(vid)
    assert condition.abnormal
    assert f"vg0/{local} is inactive" in condition.message
    assert f"lvchange -ay vg0/{local}" in condition.message


@pytest.mark.parametrize(
    ("data", "metadata", "threshold", "expected"),
    [
        ("89.99", "10.00", 90, None),
        ("90.00", "10.00", 90, "thin pool vg0/pool is 90.0% full (data), at or above the 90%"),
        ("40.00", "95.50", 90, "thin pool vg0/pool is 95.5% full (metadata)"),
        ("60.00", "10.00", 50, "at or above the 50% threshold"),
        ("100.00", "10.00", 99.5, "thin pool vg0/pool is full (data 100.0%): writes to its"),
        ("100.00", "10.00", 100, "thin pool vg0/pool is full (data 100.0%)"),
        ("50.00", "100.00", 100, "lvextend --poolmetadatasize +SIZE vg0/pool"),
    ],
)
def test_a_thin_pool_at_its_threshold_or_full_makes_its_volumes_abnormal(
    lvm: FakeLvm,
    tmp_path: Path,
    data: str,
    metadata: str,
    threshold: float,
    expected: str | None,
) -> None:
    backend = thin_backend(lvm, threshold)
    vid = made(backend, lvm, tmp_path)
    lvm.lvs["pool"]["data_percent"] = data
    lvm.lvs["pool"]["metadata_percent"] = metadata
    condition = backend.volume_condition(vid)
    if expected is None:
        assert not condition.abnormal, condition
    else:
        assert condition.abnormal and expected in condition.message, condition
        assert f"vg0/{vid.split('@')[0]} is in it" in condition.message


def test_a_thick_volume_does_not_care_about_the_thin_pool(lvm: FakeLvm, tmp_path: Path) -> None:
    backend = thin_backend(lvm)
    vid = made(backend, lvm, tmp_path, parameters={"deviceClass": "thick"})
    lvm.lvs["pool"]["data_percent"] = "100.00"
    assert not backend.volume_condition(vid).abnormal


def test_a_listing_with_conditions_costs_one_lvm2_report(lvm: FakeLvm, tmp_path: Path) -> None:
    """ListVolumes asks for every volume's condition: one report for the page and all of them."""
    backend = thin_backend(lvm)
    for n in range(5):
        made(backend, lvm, tmp_path, name=f"pvc-{n}")
    lvm.calls.clear()
    with callmemo.call():
        volumes = backend.list_volumes()
        conditions = [backend.volume_condition(v.id) for v in volumes]
    assert len(conditions) == 5 and not any(c.abnormal for c in conditions)
    assert lvm.commands() == ["fullreport"]


# --- the threshold option ----------------------------------------------------------------------

LVM_ARGS = ["--backend", "lvm", "--lvm-volume-group", "vg0", "--node-id", "n"]


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        ([], {}, 90.0),
        (["--lvm-thin-pool-threshold", "85"], {}, 85.0),
        (["--lvm-thin-pool-threshold", "97.5%"], {}, 97.5),
        ([], {"CSI_DRIVER_LVM_THIN_POOL_THRESHOLD": "80"}, 80.0),
        (["--lvm-thin-pool-threshold", "100"], {}, 100.0),
    ],
)
def test_the_thin_pool_threshold_is_parsed_once(
    argv: list[str], env: dict[str, str], expected: float
) -> None:
    cfg = parse_config([*LVM_ARGS, *argv], env=env)
    assert cfg.lvm is not None and cfg.lvm.thin_pool_threshold == expected


@pytest.mark.parametrize("value", ["0", "-5", "100.1", "nan", "ninety", ""])
def test_a_bad_thin_pool_threshold_is_refused_at_start(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_config([*LVM_ARGS, "--lvm-thin-pool-threshold", value], env={})
    assert "threshold" in capsys.readouterr().err


def test_the_config_itself_refuses_a_bad_threshold() -> None:
    with pytest.raises(ValueError, match="above 0 and at most 100"):
        LvmConfig(device_classes=(THIN,), thin_pool_threshold=0)


# --- a mounted filesystem, as the node sees it -------------------------------------------------


def mount(fs_type: str = "ext4", super_options: tuple[str, ...] = ("rw",)) -> MountInfo:
    return MountInfo(
        mount_id=40,
        parent_id=1,
        major=253,
        minor=3,
        root="/",
        mount_point="/var/lib/kubelet/x/globalmount",
        options=("rw", "relatime"),
        optional=(),
        fs_type=fs_type,
        source="/dev/mapper/vg0-v1",
        super_options=super_options,
    )


def sysfs(tmp_path: Path, errors: str | None) -> str:
    """/sys/dev/block/253:3 -> .../block/dm-3, and /sys/fs/ext4/dm-3/errors_count."""
    root = tmp_path / "sys"
    (root / "devices/virtual/block/dm-3").mkdir(parents=True)
    (root / "dev/block").mkdir(parents=True)
    (root / "dev/block/253:3").symlink_to("../../devices/virtual/block/dm-3")
    if errors is not None:
        (root / "fs/ext4/dm-3").mkdir(parents=True)
        (root / "fs/ext4/dm-3/errors_count").write_text(errors + "\n")
    return str(root)


def test_a_clean_writable_filesystem_has_no_fault(tmp_path: Path) -> None:
    assert fshealth.fault(mount(), sysfs(tmp_path, "0")) is None
    assert fshealth.fault(mount("xfs"), sysfs(tmp_path / "x", None)) is None


@pytest.mark.parametrize("options", [("ro",), ("rw", "errors=remount-ro", "emergency_ro")])
def test_a_filesystem_stopped_after_an_error_is_read_only(
    tmp_path: Path, options: tuple[str, ...]
) -> None:
    fault = fshealth.fault(mount(super_options=options), sysfs(tmp_path, "0"))
    assert fault is not None
    assert "ext4 filesystem on /dev/mapper/vg0-v1 is read-only" in fault
    assert "kernel log" in fault


def test_a_filesystem_mounted_read_only_on_purpose_is_not_a_fault(tmp_path: Path) -> None:
    """Staged with the ``ro`` mount flag: read-only in the mount and in the superblock."""
    on_purpose = dataclasses.replace(mount(super_options=("ro",)), options=("ro", "relatime"))
    assert fshealth.fault(on_purpose, sysfs(tmp_path, "0")) is None


def test_ext4_errors_are_reported_from_sysfs(tmp_path: Path) -> None:
    fault = fshealth.fault(mount(), sysfs(tmp_path, "3"))
    assert fault is not None and "has recorded 3 error(s)" in fault


def test_an_unreadable_error_count_is_no_error(tmp_path: Path) -> None:
    assert fshealth.ext4_error_count(253, 3, sysfs(tmp_path, None)) == 0
    assert fshealth.ext4_error_count(253, 3, str(tmp_path / "nothing")) == 0
    assert fshealth.ext4_error_count(253, 3, sysfs(tmp_path / "g", "garbage")) == 0


# --- what reaches the CO -----------------------------------------------------------------------


def test_a_condition_message_is_bounded() -> None:
    long = model.VolumeCondition(True, "x" * 100_000)
    message = condition_to_pb(long).message
    assert message.startswith("xxx") and len(message.encode()) <= CONDITION_MESSAGE_BYTES


def test_a_project_usage_that_cannot_be_read_is_an_error_that_names_the_device() -> None:
    """The over-the-limit rule reads a project's usage with quotactl(2) (proven on XFS in
    tests/vm/test_hostpath_quota.py); here only its failures, which leave a volume normal."""
    with pytest.raises(QuotaError, match="device of /srv is not known"):
        ProjectQuota("/srv").usage(7)
    with pytest.raises(QuotaError, match="usage of project 7 on /nonexistent/dev") as exc:
        ProjectQuota("/srv", "/nonexistent/dev").usage(7)
    assert exc.value.errno is not None
