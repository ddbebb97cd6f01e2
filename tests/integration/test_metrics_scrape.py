"""A scrape of a real hostpath driver over HTTP: the storage gauges say what its root holds, the
process metrics are there, and the RPC counters still count."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_driver.proto import csi_pb2
from testkit.driver_process import Csi, DriverProcess, Samples, csi_stubs
from testkit.driver_process import sample as one
from testkit.ports import free_port
from tests.chart.exported_metrics import DRIVER_METRICS, PROCESS_METRICS, series_names
from tests.requests import create_request

CAPACITY = 1 << 30
SIZES = (4 << 20, 8 << 20, 12 << 20)


def scrape(driver: DriverProcess) -> Samples:
    return driver.scrape()


@pytest.fixture
def metered(workdir: Path) -> Iterator[tuple[DriverProcess, Csi]]:
    driver = DriverProcess(
        workdir,
        metrics_port=free_port(),
        log_level="info",
        extra_args=["--hostpath-capacity", str(CAPACITY)],
    )
    try:
        driver.start()
        with csi_stubs(driver.target) as csi:
            yield driver, csi
    finally:
        driver.stop()
    assert all(code == 0 for code in driver.exits), driver.log_tail()


def test_a_scrape_shows_the_hostpath_root(metered: tuple[DriverProcess, Csi]) -> None:
    driver, csi = metered
    for i, size in enumerate(SIZES):
        csi.controller.CreateVolume(create_request(f"metrics-{i}", size=size))
    page = scrape(driver)
    assert one(page, "csi_driver_capacity_size_bytes", device_class="hostpath") == CAPACITY
    assert one(page, "csi_driver_capacity_allocated_bytes", device_class="hostpath") == sum(SIZES)
    assert one(page, "csi_driver_volumes", device_class="hostpath") == 3
    assert one(page, "csi_driver_snapshots", device_class="hostpath") == 0
    available = one(page, "csi_driver_capacity_available_bytes", device_class="hostpath")
    assert available <= CAPACITY - sum(SIZES)
    assert one(page, "csi_driver_ready") == 1
    assert one(page, "process_resident_memory_bytes") > 0
    assert one(page, "csi_driver_rpc_total", method="CreateVolume", code="OK") == 3
    # sizes are accounted, not enforced, on this host's root: no volume can be told apart
    assert not any(name == "csi_driver_volume_used_bytes" for name, _ in page)


def test_getcapacity_and_the_gauge_agree(metered: tuple[DriverProcess, Csi]) -> None:
    driver, csi = metered
    csi.controller.CreateVolume(create_request("metrics-a", size=16 << 20))
    answer = csi.controller.GetCapacity(csi_pb2.GetCapacityRequest()).available_capacity
    page = scrape(driver)
    gauge = one(page, "csi_driver_capacity_available_bytes", device_class="hostpath")
    # the filesystem under the root may move a little between the two reads
    assert abs(gauge - answer) <= 1 << 20
    assert one(page, "csi_driver_rpc_total", method="GetCapacity", code="OK") == 1


def test_every_scraped_family_is_in_the_charts_contract(
    metered: tuple[DriverProcess, Csi],
) -> None:
    """The dashboard and the alerts are checked against tests/chart/exported_metrics.py; this
    checks that list against what a running driver really exports, both ways (the per-volume
    and thin-pool series need a backend that shows them: the VM lane's scrape has those)."""
    driver, csi = metered
    csi.controller.CreateVolume(create_request("metrics-contract", size=4 << 20))
    csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="v-none@it-node"))
    scraped = {name for name, _ in scrape(driver)}
    contract = series_names()
    assert sorted(n for n in scraped if n not in contract and not n.startswith("python_")) == []
    hostpath_cannot_show = {
        "csi_driver_thinpool_data_used_ratio",
        "csi_driver_thinpool_metadata_used_ratio",
        "csi_driver_volume_capacity_bytes",
        "csi_driver_volume_used_bytes",
        "csi_driver_volume_inodes",
        "csi_driver_volume_inodes_used",
        "up",
        # a counter shows once something was counted; a hostpath directory volume's create
        # and delete run no external command
        "csi_driver_command_total",
        "csi_driver_command_duration_seconds",
    }
    wanted = {m.name for m in (*DRIVER_METRICS, *PROCESS_METRICS)} - hostpath_cannot_show
    missing = {m for m in wanted if not any(s == m or s.startswith(m + "_") for s in scraped)}
    assert sorted(missing) == []
