"""Volume conditions of the lvm backend on a real kernel: LVs removed, deactivated and a thin
pool filled behind the driver's back, an ext4 error injected, and what NodeGetVolumeStats,
ControllerGetVolume and ListVolumes then say; and the chart's thin pool alert, in a real
Prometheus scraping the driver while the pool fills.

Runs only inside the real-kernel VM lane, with the node helper of test_lvm_backend.py but a
driver of its own: started with ``--lvm-thin-pool-threshold`` a few percent above what the
lane's thin pool holds at the start, so that a write of a few dozen MiB crosses it. Every test
puts back what it broke in a ``finally``; the ``workdir`` fixture fails it for a leaked mount
or LV.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_driver.proto import csi_pb2

if os.environ.get("CSI_VM_LANE") != "1":
    pytest.skip("runs inside the real-kernel VM: scripts/test-vm.sh", allow_module_level=True)

from testkit.driver_process import Csi
from testkit.ports import free_port
from testkit.prometheus import Alert, Prometheus, render_rules
from tests.requests import rpc_code
from tests.vm.test_lvm_backend import (
    THINPOOL,
    UDEV,
    VG,
    LvmDriver,
    MiB,
    Node,
    csi,  # noqa: F401
    device_classes,
    lv_of,
    lvs,
    node,  # noqa: F401
    running,
    sh,
    workdir,  # noqa: F401
    write_random,
)

pytestmark = pytest.mark.vm

#: percent above the pool's use at the start at which this module's driver calls it too full
MARGIN = 3


def pool_percent() -> tuple[float, float, int]:
    """(data %, metadata %, size in bytes) of the lane's thin pool, as lvm2 says."""
    pool = lvs("lv_size", "data_percent", "metadata_percent")[THINPOOL]
    return float(pool["data_percent"]), float(pool["metadata_percent"]), int(pool["lv_size"])


@pytest.fixture(scope="module")
def threshold() -> int:
    data, metadata, _ = pool_percent()
    return math.floor(max(data, metadata)) + MARGIN


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory, threshold: int) -> Iterator[LvmDriver]:
    base = Path(os.path.realpath(tmp_path_factory.mktemp("lvm-health")))
    d = LvmDriver(
        base,
        node_id="vm-node",
        classes=device_classes(base),
        # /metrics is scraped only by the pool test's Prometheus: a scrape runs a report of its
        # own, which would count in the first test
        metrics_port=free_port(),
        extra_args=[
            "--kubelet-dir",
            os.path.realpath(tmp_path_factory.getbasetemp()),
            "--lvm-thin-pool-threshold",
            str(threshold),
        ],
    )
    with running(d):
        yield d


def node_condition(stubs: Csi, vid: str, path: str) -> csi_pb2.VolumeCondition:
    reply = stubs.node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=path)
    )
    assert reply.usage, "a reply without usage is dropped by the kubelet, condition and all"
    condition: csi_pb2.VolumeCondition = reply.volume_condition
    return condition


def controller_conditions(stubs: Csi, vid: str) -> list[csi_pb2.VolumeCondition]:
    got = stubs.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=vid))
    listed = stubs.controller.ListVolumes(csi_pb2.ListVolumesRequest())
    entries = [e.status.volume_condition for e in listed.entries if e.volume.volume_id == vid]
    assert len(entries) == 1
    return [got.status.volume_condition, entries[0]]


def lvm_reports(lvm_driver: LvmDriver) -> int:
    """lvm2 reports the driver ran so far, from its (debug) log of every command."""
    lines = lvm_driver.log.read_text(errors="replace").splitlines()
    return sum(1 for line in lines if "command finished" in line and "fullreport" in line)


def udev(*argv: str) -> list[str]:
    return [*argv, *([] if UDEV else ["--noudevsync"])]


def forget_publication(helper: Node, target: str) -> None:
    """Unmount a publication by hand (the driver rightly refuses to unmount what is no longer
    its volume's) and drop it from the node helper's books."""
    subprocess.run(["umount", target], capture_output=True, timeout=60, check=False)
    Path(target).unlink(missing_ok=True)
    helper.published.pop(target, None)


def test_healthy_volumes_are_normal_and_cost_one_report(
    node: Node,  # noqa: F811
    csi: Csi,  # noqa: F811
    driver: LvmDriver,
) -> None:
    thin = node.create("health-thin", 32 * MiB).volume_id
    thick = node.create("health-thick", 16 * MiB, params={"deviceClass": "thick"}).volume_id
    node.create("health-idle", 16 * MiB)
    target = node.use(thin, "health-pod")
    before = lvm_reports(driver)
    condition = node_condition(csi, thin, target)
    assert lvm_reports(driver) - before == 1, "NodeGetVolumeStats: one lvm2 report"
    assert not condition.abnormal and len(condition.message) < 40, condition
    before = lvm_reports(driver)
    listed = csi.controller.ListVolumes(csi_pb2.ListVolumesRequest())
    assert lvm_reports(driver) - before == 1, "ListVolumes with conditions: one lvm2 report"
    assert len(listed.entries) >= 3
    for vid in (thin, thick):
        for c in controller_conditions(csi, vid):
            assert not c.abnormal and c.message == condition.message


def test_a_removed_logical_volume_is_missing_on_the_node(
    node: Node,  # noqa: F811
    csi: Csi,  # noqa: F811
) -> None:
    vid = node.create("health-gone", 16 * MiB, block=True).volume_id
    target = node.use(vid, "gone-pod")
    assert not node_condition(csi, vid, target).abnormal
    sh(*udev("lvremove", "-f", "-y"), f"{VG}/{lv_of(vid)}")
    try:
        condition = node_condition(csi, vid, target)
        assert condition.abnormal, condition
        assert f"logical volume {lv_of(vid)} is missing from volume group(s) {VG}" in (
            condition.message
        )
        # LV tags are the only record: the controller has no volume left to call abnormal,
        # and says so as the spec wants (external-health-monitor reports it as not found)
        assert (
            rpc_code(
                lambda: csi.controller.ControllerGetVolume(
                    csi_pb2.ControllerGetVolumeRequest(volume_id=vid)
                )
            )
            == grpc.StatusCode.NOT_FOUND
        )
    finally:
        forget_publication(node, target)
        node.staged.pop(vid, None)
        node.delete(vid)  # idempotent: the LV is gone already


def test_an_inactive_logical_volume_is_abnormal_on_the_node_and_in_the_controller(
    node: Node,  # noqa: F811
    csi: Csi,  # noqa: F811
) -> None:
    vid = node.create("health-off", 16 * MiB, block=True).volume_id
    target = node.use(vid, "off-pod")
    sh(*udev("lvchange", "-an"), f"{VG}/{lv_of(vid)}")
    try:
        condition = node_condition(csi, vid, target)
        assert condition.abnormal, condition
        assert f"logical volume {VG}/{lv_of(vid)} is inactive" in condition.message
        assert f"lvchange -ay {VG}/{lv_of(vid)}" in condition.message
        for c in controller_conditions(csi, vid):
            assert (c.abnormal, c.message) == (True, condition.message)
    finally:
        forget_publication(node, target)
        sh(*udev("lvchange", "-ay"), f"{VG}/{lv_of(vid)}")
    for c in controller_conditions(csi, vid):
        assert not c.abnormal


def test_a_thin_pool_past_the_threshold_makes_its_volumes_abnormal(
    node: Node,  # noqa: F811
    csi: Csi,  # noqa: F811
    driver: LvmDriver,
    threshold: int,
    tmp_path: Path,
) -> None:
    """The driver's conditions, and the chart's thin pool alert in a real Prometheus scraping
    the driver (its warning threshold set to the module's, as an operator would set it)."""
    data, _, size = pool_percent()
    assert data < threshold, f"the pool is at {data}% already; the module's threshold {threshold}"
    limits = {"warning": threshold / 100, "critical": 0.995}
    rules = render_rules(
        tmp_path / "rules.yml",
        values={"thinPoolData": limits, "thinPoolMetadata": limits},
    )
    # under emulation, and beside csi-sanity, a scrape (an lvm2 report) takes seconds
    prometheus = Prometheus(
        tmp_path / "prometheus",
        rules,
        {f"127.0.0.1:{driver.metrics_port}": "vm-node"},
        interval="5s",
    )
    with prometheus:
        assert not pool_alerts(prometheus.firing_after_scrapes(timeout=180))
        _fill_and_check_conditions(node, csi, threshold, data, size)
        ratio = 'csi_driver_thinpool_data_used_ratio{device_class="thin"}'
        firing = pool_alerts(
            prometheus.firing_after_scrapes(f"{ratio} > {threshold / 100}", timeout=180)
        )
        health = prometheus.rule_health()
    assert set(health.values()) == {"ok"}, health
    assert list(firing) == ["NodelocalCSIThinPoolDataFilling"], firing
    (alert,) = firing["NodelocalCSIThinPoolDataFilling"]
    assert alert.labels["severity"] == "warning"
    assert (alert.labels["device_class"], alert.labels["node"]) == ("thin", "vm-node")
    assert alert.value == pytest.approx(pool_percent()[0] / 100, abs=0.01)


def any_percent(message: str) -> str:
    return re.sub(r"\d+(\.\d+)?% full", "N% full", message)


def pool_alerts(firing: dict[str, list[Alert]]) -> dict[str, list[Alert]]:
    return {name: alerts for name, alerts in firing.items() if "ThinPool" in name}


def _fill_and_check_conditions(
    helper: Node, stubs: Csi, threshold: int, data: float, size: int
) -> None:
    fill = math.ceil((threshold + 1 - data) / 100 * size / MiB) * MiB
    vid = helper.create("health-fill", fill + 64 * MiB).volume_id
    other = helper.create("health-bystander", 16 * MiB).volume_id
    thick = helper.create("health-thick-by", 16 * MiB, params={"deviceClass": "thick"}).volume_id
    target = helper.use(vid, "fill-pod")
    assert not node_condition(stubs, vid, target).abnormal
    write_random(Path(target) / "fill", fill, "fill the pool")
    os.sync()
    data_now, _, _ = pool_percent()
    assert data_now >= threshold, f"the pool is at {data_now}% after writing {fill} bytes"

    condition = node_condition(stubs, vid, target)
    assert condition.abnormal, condition
    assert f"thin pool {VG}/{THINPOOL} is " in condition.message
    assert f"% full (data), at or above the {threshold}% threshold" in condition.message
    assert f"lvextend -L +SIZE {VG}/{THINPOOL}" in condition.message
    # the controller says the same (one rule), and of every thin volume in the pool; the pool
    # may have grown by a tenth of a percent in between (ext4's lazy writes)
    for c in controller_conditions(stubs, vid):
        assert (c.abnormal, any_percent(c.message)) == (True, any_percent(condition.message))
    for c in controller_conditions(stubs, other):
        assert c.abnormal and f"thin pool {VG}/{THINPOOL} is " in c.message
    for c in controller_conditions(stubs, thick):
        assert not c.abnormal
    # deleting the data and the volume brings the pool back under the threshold (cleanup)


def test_an_ext4_error_makes_the_volume_abnormal_on_the_node(
    node: Node,  # noqa: F811
    csi: Csi,  # noqa: F811
) -> None:
    vid = node.create("health-ext4", 32 * MiB).volume_id
    target = node.use(vid, "ext4-pod")
    assert not node_condition(csi, vid, target).abnormal
    st = os.stat(target)
    name = os.path.basename(
        os.readlink(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    )
    trigger = Path(f"/sys/fs/ext4/{name}/trigger_fs_error")
    assert trigger.exists(), f"this kernel has no {trigger}"
    trigger.write_text("1")
    condition = node_condition(csi, vid, target)
    assert condition.abnormal, condition
    assert "the ext4 filesystem on" in condition.message
    assert "error(s) since it was last checked" in condition.message or (
        "is read-only" in condition.message
    )
    assert "e2fsck" in condition.message
    # the LV is fine: only the node, which sees the filesystem, calls it abnormal
    for c in controller_conditions(csi, vid):
        assert not c.abnormal
