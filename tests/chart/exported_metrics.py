"""The metrics the driver exports: one list, which the chart's dashboard and alerts are checked
against (tests/chart/test_monitoring.py) and which a scrape of a running driver can be compared
with.

A metric here is a family as the driver registers it; ``series_names()`` expands it into the
sample names a scrape shows (a histogram's ``_bucket``, ``_sum`` and ``_count``). ``up`` is not
the driver's: Prometheus writes it for every target it scrapes, so alerts on a missing target use
it. Labels listed are the driver's own; the PodMonitor adds the target labels in
``TARGET_LABELS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True)
class Metric:
    name: str
    kind: Kind
    labels: tuple[str, ...]
    meaning: str


_CLASS = ("device_class",)
_VOLUME = ("volume_id",)

DRIVER_METRICS: tuple[Metric, ...] = (
    Metric("csi_driver_rpc_total", "counter", ("method", "code"), "CSI calls by gRPC code name"),
    Metric("csi_driver_rpc_duration_seconds", "histogram", ("method",), "CSI call latency"),
    Metric(
        "csi_driver_command_total",
        "counter",
        ("program", "result"),
        "external programs run, result ok or error",
    ),
    Metric(
        "csi_driver_command_duration_seconds", "histogram", ("program",), "external program time"
    ),
    Metric("csi_driver_capacity_size_bytes", "gauge", _CLASS, "size of the class's storage"),
    Metric("csi_driver_capacity_free_bytes", "gauge", _CLASS, "not yet allocated"),
    Metric("csi_driver_capacity_allocated_bytes", "gauge", _CLASS, "promised to volumes"),
    Metric("csi_driver_capacity_available_bytes", "gauge", _CLASS, "what a new volume may get"),
    Metric("csi_driver_volumes", "gauge", _CLASS, "volumes of the class on the node"),
    Metric("csi_driver_snapshots", "gauge", _CLASS, "snapshots of the class on the node"),
    Metric("csi_driver_thinpool_data_used_ratio", "gauge", _CLASS, "thin pool data, 0..1"),
    Metric("csi_driver_thinpool_metadata_used_ratio", "gauge", _CLASS, "thin pool metadata, 0..1"),
    Metric("csi_driver_ready", "gauge", (), "1 when the backend is usable, else 0"),
    Metric("csi_driver_volume_capacity_bytes", "gauge", _VOLUME, "a volume's filesystem size"),
    Metric("csi_driver_volume_used_bytes", "gauge", _VOLUME, "bytes used in a volume"),
    Metric("csi_driver_volume_inodes", "gauge", _VOLUME, "a volume's inodes"),
    Metric("csi_driver_volume_inodes_used", "gauge", _VOLUME, "inodes used in a volume"),
    Metric("csi_driver_volume_stats_skipped", "gauge", (), "volumes left out of the last report"),
    Metric(
        "csi_driver_storage_report_errors_total",
        "counter",
        (),
        "storage reports that failed or came too late",
    ),
)

# The reconcilers' (docs/operations.md): registered only where a reconciler runs, so a default
# scrape shows none of them.
RECONCILE_METRICS: tuple[Metric, ...] = (
    Metric(
        "csi_driver_reconcile_runs_total", "counter", ("reconciler", "result"), "rounds by result"
    ),
    Metric(
        "csi_driver_reconcile_actions_total",
        "counter",
        ("reconciler", "action"),
        "what the reconcilers did",
    ),
    Metric("csi_driver_reconcile_leader", "gauge", (), "1 while this replica leads"),
    Metric("csi_driver_lost_node_volumes", "gauge", (), "PVs whose Node is gone"),
    Metric("csi_driver_orphan_volumes", "gauge", (), "volumes no PV names"),
    Metric("csi_driver_orphan_bytes", "gauge", (), "capacity of those volumes"),
)

# prometheus-client's process collector (Linux): present in every scrape of the driver.
PROCESS_METRICS: tuple[Metric, ...] = (
    Metric("process_resident_memory_bytes", "gauge", (), "resident memory"),
    Metric("process_virtual_memory_bytes", "gauge", (), "virtual memory"),
    Metric("process_cpu_seconds_total", "counter", (), "user and system CPU time"),
    Metric("process_open_fds", "gauge", (), "open file descriptors"),
    Metric("process_max_fds", "gauge", (), "file descriptor limit"),
    Metric("process_start_time_seconds", "gauge", (), "start time, seconds since the epoch"),
)

# Written by Prometheus itself for each scrape target.
SCRAPE_METRICS: tuple[Metric, ...] = (Metric("up", "gauge", (), "1 when the last scrape worked"),)

# Labels every scraped series carries: Prometheus' own and the PodMonitor's relabelling.
TARGET_LABELS: frozenset[str] = frozenset(
    {"job", "instance", "namespace", "pod", "container", "endpoint", "node"}
)

# Sample names each kind shows in the exposition format.
_SUFFIXES: dict[Kind, tuple[str, ...]] = {
    "counter": ("",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
}


def all_metrics() -> tuple[Metric, ...]:
    return DRIVER_METRICS + RECONCILE_METRICS + PROCESS_METRICS + SCRAPE_METRICS


def series_names() -> frozenset[str]:
    """Every sample name a query may name: the driver's, the process collector's, and ``up``."""
    return frozenset(m.name + s for m in all_metrics() for s in _SUFFIXES[m.kind])


def labels_of(series: str) -> frozenset[str]:
    """The labels a sample of ``series`` carries (``le`` on histogram buckets)."""
    for m in all_metrics():
        for suffix in _SUFFIXES[m.kind]:
            if m.name + suffix == series:
                extra = {"le"} if suffix == "_bucket" else set()
                return frozenset(m.labels) | extra | TARGET_LABELS
    raise KeyError(series)
