"""Storage gauges computed when Prometheus scrapes: capacity per device class, thin pool use,
volume counts, per-volume usage, and whether the driver is ready.

Computed at scrape time, not on a timer, so an idle driver does no work and a scrape sees the
storage as it is. But a scrape must stay cheap and bounded however often and however many
scrapers come: one refresh (the health check and ``Backend.storage_report`` in one call memo,
so at most one lvm2 report between them) is shared by every scrape that arrives while it runs,
its answer is reused for ``ttl`` seconds, and a scrape waits for it at most ``timeout``
seconds. A refresh that fails or does not answer in time leaves the storage families out of
that scrape (an absent series, not a stale number a dashboard would trust), exports
``csi_driver_ready 0`` and counts ``csi_driver_storage_report_errors_total``; the RPC,
command and process metrics are exported as always. A refresh still running when its scrape
gave up keeps going, on a daemon thread, and its answer serves the next scrape.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from csi_driver import callmemo
from csi_driver.model import StorageReport

log = logging.getLogger(__name__)

#: how long one refresh serves later scrapes
TTL = 5.0
#: how long a scrape waits for a refresh
TIMEOUT = 10.0
#: per-volume series of one scrape at most (each volume has four)
MAX_VOLUMES = 10_000


@dataclass(frozen=True)
class Reading:
    """One refresh: whether the driver was ready, and the storage (None when it could not be
    read)."""

    ready: bool
    report: StorageReport | None


class SharedRefresh:
    """``read()`` at most once per ``ttl`` seconds, run on a thread of its own: callers that
    arrive while it runs share its answer, and none waits longer than ``timeout``."""

    def __init__(
        self,
        read: Callable[[], Reading],
        *,
        ttl: float = TTL,
        timeout: float = TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read, self._ttl, self._timeout, self._clock = read, ttl, timeout, clock
        self._lock = threading.Lock()
        self._future: Future[Reading] | None = None
        self._done_at = 0.0

    def get(self) -> Reading | None:
        """The latest reading, or None when it failed or did not come within ``timeout``."""
        with self._lock:
            future = self._future
            stale = future is None or (future.done() and self._clock() - self._done_at >= self._ttl)
            if stale:
                future = self._future = Future()
                threading.Thread(
                    target=self._run, args=(future,), name="storage-report", daemon=True
                ).start()
        assert future is not None
        try:
            return future.result(self._timeout)
        except TimeoutError:
            log.warning(f"the storage report did not come within {self._timeout:g} s")
        except Exception as exc:
            log.warning(f"cannot read the storage for the metrics: {exc}")
        return None

    def _run(self, future: Future[Reading]) -> None:
        try:
            reading = self._read()
        except BaseException as exc:
            with self._lock:
                self._done_at = self._clock()
            future.set_exception(exc)
            return
        with self._lock:
            self._done_at = self._clock()
        future.set_result(reading)


class StorageCollector(Collector):
    """The storage families of a backend, and ``csi_driver_ready`` (docs/metrics.md)."""

    def __init__(
        self,
        report: Callable[[int], StorageReport],
        health: Callable[[], str | None],
        *,
        ttl: float = TTL,
        timeout: float = TIMEOUT,
        max_volumes: int = MAX_VOLUMES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._report, self._health, self._max_volumes = report, health, max_volumes
        self._refresh = SharedRefresh(self._read, ttl=ttl, timeout=timeout, clock=clock)
        self._errors = 0
        self._errors_lock = threading.Lock()

    def describe(self) -> Iterable[Metric]:
        """The families, without values: registering runs no report, and a scrape that asks
        for other families only (``/metrics?name[]=...``) runs none either."""
        yield GaugeMetricFamily("csi_driver_ready", "")
        yield CounterMetricFamily("csi_driver_storage_report_errors", "")
        for name, _, _ in (*_CLASS_GAUGES, *_VOLUME_GAUGES):
            yield GaugeMetricFamily(f"csi_driver_{name}", "")
        yield GaugeMetricFamily("csi_driver_volume_stats_skipped", "")

    def _read(self) -> Reading:
        """The health check and the storage report in one call memo: both read the volume
        groups from the same lvm2 report."""
        with callmemo.call():
            try:
                ready = self._health() is None
            except Exception as exc:
                log.warning(f"the health check failed: {exc}")
                ready = False
            try:
                report: StorageReport | None = self._report(self._max_volumes)
            except Exception as exc:
                log.warning(f"cannot read the storage for the metrics: {exc}")
                self._count_error()
                report = None
        return Reading(ready, report)

    def _count_error(self) -> None:
        with self._errors_lock:
            self._errors += 1

    def collect(self) -> Iterable[Metric]:
        reading = self._refresh.get()
        if reading is None:
            self._count_error()
        ready = GaugeMetricFamily(
            "csi_driver_ready", "1 when the driver's health check (/healthz, Probe) passes."
        )
        ready.add_metric([], 1.0 if reading is not None and reading.ready else 0.0)
        yield ready
        yield CounterMetricFamily(
            "csi_driver_storage_report_errors",
            "Storage reports that failed, and scrapes that gave up waiting for one.",
            value=self._errors,
        )
        if reading is not None and reading.report is not None:
            yield from _storage_families(reading.report)


_CLASS_GAUGES = (
    ("capacity_size_bytes", "size_bytes", "Bytes the class may hold: its VG, thin pool or root."),
    ("capacity_free_bytes", "free_bytes", "Bytes of the class's storage not used yet."),
    ("capacity_allocated_bytes", "allocated_bytes", "Bytes promised to volumes and snapshots."),
    ("capacity_available_bytes", "available_bytes", "Bytes GetCapacity answers for the class."),
    ("volumes", "volumes", "Volumes of the class."),
    ("snapshots", "snapshots", "Snapshots of the class."),
    ("thinpool_data_used_ratio", "data_used_ratio", "Thin pool data in use, 0..1."),
    ("thinpool_metadata_used_ratio", "metadata_used_ratio", "Thin pool metadata in use, 0..1."),
)

_VOLUME_GAUGES = (
    ("volume_capacity_bytes", "total_bytes", "Bytes the volume's filesystem holds."),
    ("volume_used_bytes", "used_bytes", "Bytes used on the volume's filesystem."),
    ("volume_inodes", "total_inodes", "Inodes of the volume's filesystem."),
    ("volume_inodes_used", "used_inodes", "Inodes used on the volume's filesystem."),
)


def _storage_families(report: StorageReport) -> Iterable[Metric]:
    for name, field, text in _CLASS_GAUGES:
        family = GaugeMetricFamily(f"csi_driver_{name}", text, labels=["device_class"])
        for cls in report.classes:
            value = getattr(cls, field)
            if value is not None:
                family.add_metric([cls.device_class], float(value))
        yield family
    for name, field, text in _VOLUME_GAUGES:
        family = GaugeMetricFamily(f"csi_driver_{name}", text, labels=["volume_id"])
        for stat in report.volumes:
            family.add_metric([stat.volume_id], float(getattr(stat.usage, field)))
        yield family
    yield GaugeMetricFamily(
        "csi_driver_volume_stats_skipped",
        "Volumes left out of the per-volume series of the last report: past the bound of"
        " volumes per scrape, or unreadable.",
        value=report.volumes_skipped,
    )


__all__ = ["MAX_VOLUMES", "TIMEOUT", "TTL", "Reading", "SharedRefresh", "StorageCollector"]
