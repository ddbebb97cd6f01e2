"""The storage gauges: what a scrape shows for a backend's report, the cache that keeps a scrape
cheap, and what a failing backend leaves in the page."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from csi_driver.backends.hostpath.backend import HostPathBackend
from csi_driver.backends.lvm.backend import LvmBackend
from csi_driver.metrics import Metrics
from csi_driver.model import ClassCapacity, StorageReport, Usage, VolumeStat
from csi_driver.storage_metrics import StorageCollector
from csi_driver.system.runner import SubprocessRunner
from testkit.driver_process import Samples, parse_samples
from testkit.driver_process import sample as one
from tests.unit.test_lvm import NODE, THICK, THIN, FakeLvm, GiB, MiB, spec


def samples(metrics: Metrics) -> Samples:
    """Every sample of one scrape, by name and labels."""
    return parse_samples(metrics.render())


class FakeBackend:
    """A storage report on demand, counting the calls; ``fail`` makes the next ones raise."""

    def __init__(self, report: StorageReport) -> None:
        self.report = report
        self.calls = 0
        self.fail: Exception | None = None
        self.gate: threading.Event | None = None

    def storage_report(self, max_volumes: int) -> StorageReport:
        self.calls += 1
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail is not None:
            raise self.fail
        return self.report


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


REPORT = StorageReport(
    classes=(
        ClassCapacity("thin", 2 * GiB, GiB, 3 * GiB, GiB, 3, 1, 0.5, 0.125),
        ClassCapacity("thick", 10 * GiB, 8 * GiB, 2 * GiB, 8 * GiB, 2, 0),
    ),
    volumes=(VolumeStat("v1@n1", Usage(GiB, 100 * MiB, GiB - 100 * MiB, 1000, 10, 990)),),
    volumes_skipped=2,
)


def served(backend: FakeBackend, health: str | None = None, **kw: float) -> tuple[Metrics, Clock]:
    metrics, clock = Metrics(), Clock()
    metrics.add_collector(
        StorageCollector(backend.storage_report, lambda: health, clock=clock, **kw)  # type: ignore[arg-type]
    )
    return metrics, clock


def test_a_scrape_shows_every_class_and_volume_with_its_labels() -> None:
    metrics, _ = served(FakeBackend(REPORT))
    page = samples(metrics)
    assert one(page, "csi_driver_capacity_size_bytes", device_class="thin") == 2 * GiB
    assert one(page, "csi_driver_capacity_free_bytes", device_class="thick") == 8 * GiB
    assert one(page, "csi_driver_capacity_allocated_bytes", device_class="thin") == 3 * GiB
    assert one(page, "csi_driver_capacity_available_bytes", device_class="thin") == GiB
    assert one(page, "csi_driver_volumes", device_class="thick") == 2
    assert one(page, "csi_driver_snapshots", device_class="thin") == 1
    assert one(page, "csi_driver_thinpool_data_used_ratio", device_class="thin") == 0.5
    assert one(page, "csi_driver_thinpool_metadata_used_ratio", device_class="thin") == 0.125
    # a thick class has no pool: no ratio rather than a made-up 0
    assert ("csi_driver_thinpool_data_used_ratio", (("device_class", "thick"),)) not in page
    assert one(page, "csi_driver_volume_capacity_bytes", volume_id="v1@n1") == GiB
    assert one(page, "csi_driver_volume_used_bytes", volume_id="v1@n1") == 100 * MiB
    assert one(page, "csi_driver_volume_inodes", volume_id="v1@n1") == 1000
    assert one(page, "csi_driver_volume_inodes_used", volume_id="v1@n1") == 10
    assert one(page, "csi_driver_volume_stats_skipped") == 2
    assert one(page, "csi_driver_ready") == 1
    assert "process_resident_memory_bytes" in {name for name, _ in page}


def test_scrapes_within_the_ttl_share_one_report() -> None:
    backend = FakeBackend(REPORT)
    metrics, clock = served(backend, ttl=5.0)
    samples(metrics)
    clock.now += 4.0
    samples(metrics)
    assert backend.calls == 1
    clock.now += 2.0
    samples(metrics)
    assert backend.calls == 2


def test_concurrent_scrapes_share_the_refresh_in_flight() -> None:
    backend = FakeBackend(REPORT)
    backend.gate = threading.Event()
    metrics, _ = served(backend)
    pages: list[Samples] = []
    threads = [threading.Thread(target=lambda: pages.append(samples(metrics))) for _ in range(4)]
    for t in threads:
        t.start()
    backend.gate.set()
    for t in threads:
        t.join(30)
    assert len(pages) == 4 and backend.calls == 1
    assert all(one(p, "csi_driver_volumes", device_class="thin") == 3 for p in pages)


def test_a_failing_backend_leaves_the_storage_out_and_keeps_the_rest() -> None:
    backend = FakeBackend(REPORT)
    backend.fail = RuntimeError("lvm2 is gone")
    metrics, _ = served(backend)
    metrics.observe_rpc("Probe", "OK", 0.01)
    page = samples(metrics)
    names = {name for name, _ in page}
    assert not any(n.startswith("csi_driver_capacity") for n in names)
    assert one(page, "csi_driver_storage_report_errors_total") == 1
    assert one(page, "csi_driver_rpc_total", method="Probe", code="OK") == 1
    # the backend failed, the health check did not: readiness is its answer
    assert one(page, "csi_driver_ready") == 1


def test_a_report_that_does_not_come_in_time_does_not_hold_the_scrape() -> None:
    backend = FakeBackend(REPORT)
    backend.gate = threading.Event()
    metrics, _ = served(backend, timeout=0.2)
    try:
        page = samples(metrics)
        assert one(page, "csi_driver_ready") == 0
        assert not any(n.startswith("csi_driver_volumes") for n, _ in page)
    finally:
        backend.gate.set()


def test_not_ready_is_zero() -> None:
    metrics, _ = served(FakeBackend(REPORT), health="volume group vg0 is missing")
    assert one(samples(metrics), "csi_driver_ready") == 0


# --- the backends' reports ---------------------------------------------------------------------


def test_lvm_report_follows_getcapacity_and_the_pool() -> None:
    lvm = FakeLvm()
    lvm.add_pool()
    lvm.lvs["pool"]["metadata_percent"] = "2.50"
    backend = LvmBackend([THIN, THICK], NODE, lvm, udev_sync=False, mountinfo="/dev/null")
    backend.create_volume(spec(backend, "a", GiB))
    backend.create_volume(spec(backend, "b", 512 * MiB))
    backend.create_volume(spec(backend, "c", 256 * MiB, parameters={"deviceClass": "thick"}))
    lvm.calls.clear()
    report = backend.storage_report(10)
    assert lvm.commands() == ["fullreport"]
    by_class = {c.device_class: c for c in report.classes}
    thin, thick = by_class["thin"], by_class["thick"]
    assert (thin.size_bytes, thin.volumes, thin.allocated_bytes) == (2 * GiB, 2, GiB + 512 * MiB)
    assert thin.data_used_ratio == pytest.approx(0.10)
    assert thin.metadata_used_ratio == pytest.approx(0.025)
    assert thin.free_bytes == 2 * GiB - round(2 * GiB * 0.10)
    assert thin.available_bytes == backend.capacity(backend.validate_parameters({}))
    assert (thick.size_bytes, thick.free_bytes, thick.volumes) == (10 * GiB, 8 * GiB - 256 * MiB, 1)
    assert thick.allocated_bytes == 256 * MiB
    assert thick.data_used_ratio is None
    assert thick.available_bytes == backend.capacity(
        backend.validate_parameters({"deviceClass": "thick"})
    )
    assert report.volumes == ()  # nothing is mounted


def test_hostpath_report_counts_the_root(tmp_path: Path) -> None:
    backend = HostPathBackend(tmp_path / "root", 4 * GiB, NODE, SubprocessRunner())
    try:
        for name in ("a", "b"):
            backend.create_volume(spec(backend, name, 64 * MiB, fs_type=""))  # type: ignore[arg-type]
        report = backend.storage_report(10)
        (root,) = report.classes
        assert root.device_class == "hostpath"
        assert (root.size_bytes, root.allocated_bytes, root.volumes) == (4 * GiB, 128 * MiB, 2)
        assert root.available_bytes == backend.capacity(backend.validate_parameters({}))
    finally:
        backend.close()


def test_a_scrape_of_other_families_runs_no_report() -> None:
    backend = FakeBackend(REPORT)
    metrics, _ = served(backend)
    metrics.observe_command("lvs", 0.1, True)
    page = metrics.render(["csi_driver_command_total"])
    assert backend.calls == 0
    names = {s.name for f in text_string_to_metric_families(page) for s in f.samples}
    assert names == {"csi_driver_command_total"}
    ready = metrics.render(["csi_driver_ready"])
    assert backend.calls == 1 and "csi_driver_ready 1.0" in ready
