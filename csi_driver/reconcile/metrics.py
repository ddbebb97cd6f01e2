"""The reconcilers' metrics, registered in the driver's registry only when a reconciler runs
(a driver with both off exports none of them). The two counters are registered once per
registry (:class:`ReconcileCounters`) and shared by every reconciler, each writing its own
``reconciler`` label through a :class:`ReconcileMetrics` view."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class ReconcileCounters:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.actions = Counter(
            "csi_driver_reconcile_actions_total",
            "What the reconcilers did: report, delete_pvc, delete_pv, delete_volume, skip,"
            " api_error.",
            ("reconciler", "action"),
            registry=registry,
        )
        self.runs = Counter(
            "csi_driver_reconcile_runs_total",
            "Reconciler rounds, by result: ok, api_error (nothing done), not_leader, held"
            " (too many nodes gone at once: nothing done).",
            ("reconciler", "result"),
            registry=registry,
        )


class ReconcileMetrics:
    """One reconciler's view of the shared counters."""

    def __init__(self, counters: ReconcileCounters, reconciler: str) -> None:
        self.reconciler = reconciler
        self._counters = counters

    def action(self, action: str, n: int = 1) -> None:
        self._counters.actions.labels(self.reconciler, action).inc(n)

    def run(self, result: str) -> None:
        self._counters.runs.labels(self.reconciler, result).inc()


def gauge(registry: CollectorRegistry, name: str, help_text: str) -> Gauge:
    return Gauge(name, help_text, registry=registry)


__all__ = ["ReconcileCounters", "ReconcileMetrics", "gauge"]
