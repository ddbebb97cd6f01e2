"""Stopping the reconcilers' threads (csi_driver/reconcile/periodic.py): all are asked at once
and waited for within one shared bound, so shutdown stays inside the Pod's termination grace
period whatever a round is doing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from csi_driver.reconcile.periodic import Periodic, stop_all


def test_stop_all_signals_every_thread_then_waits_once() -> None:
    release = threading.Event()
    stopped: list[str] = []

    def busy() -> None:
        release.wait(10)

    def ended(name: str) -> Callable[[], None]:
        return lambda: stopped.append(name)

    try:
        periodics = [Periodic(name, 0.01, busy, on_stop=ended(name)) for name in ("a", "b", "c")]
        for p in periodics:
            p.start()
        time.sleep(0.05)  # each is inside a round that will not end by itself soon
        t0 = time.monotonic()
        left = stop_all(periodics, 0.3)
        took = time.monotonic() - t0
        assert left == ["a", "b", "c"]
        assert took < 0.6, f"the wait is shared, not per thread: {took:.2f}s"
    finally:
        release.set()
    for p in periodics:
        assert p.join(2.0)
    assert sorted(stopped) == ["a", "b", "c"], "each ends after its round, without another"


def test_a_failing_round_does_not_end_the_thread() -> None:
    calls: list[int] = []

    def step() -> None:
        calls.append(1)
        raise RuntimeError("boom")

    p = Periodic("x", 0.01, step)
    p.start()
    deadline = time.monotonic() + 2
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stop_all([p], 1.0) == []
    assert len(calls) >= 3
