"""A reconciler's round, run every interval on a thread of its own until the driver stops.
A round that raises is logged and the next one runs anyway: a reconciler never takes the
driver down."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from csi_driver.kubeapi import TIMEOUT

log = logging.getLogger(__name__)

#: how long shutdown waits for all reconcilers together: a round in the middle of an API call
#: ends within one request timeout (kubeapi.TIMEOUT), and the threads are daemons, so one that
#: has not ended by then dies with the process
STOP_SECONDS = 5.0


class Periodic:
    def __init__(
        self,
        name: str,
        interval: float,
        step: Callable[[], None],
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.interval = interval
        self._step = step
        self._on_stop = on_stop
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except Exception:
                log.exception("reconciler round failed", extra={"reconciler": self.name})
            self._stop.wait(self.interval)
        if self._on_stop is not None:
            try:
                self._on_stop()
            except Exception:
                log.exception("reconciler stop failed", extra={"reconciler": self.name})

    def signal(self) -> None:
        """Ask the thread to end after its current round (see :func:`stop_all`)."""
        self._stop.set()

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the thread; whether it ended."""
        if self._thread is not None:
            self._thread.join(max(timeout, 0.0))
            return not self._thread.is_alive()
        return True

    def stop(self, timeout: float = STOP_SECONDS) -> None:
        stop_all([self], timeout)


#: complete listings further apart than :func:`stale_after` restart every grace period
STALE_ROUNDS = 3


def stale_after(interval: float) -> float:
    """How long after the end of the last complete listing a round may start before what was
    seen then counts as stale: a few intervals, plus one API request's timeout, so that a slow
    API (which the listing itself waits out) is not taken for a gap."""
    return STALE_ROUNDS * interval + TIMEOUT


def stop_all(periodics: Iterable[Periodic], timeout: float = STOP_SECONDS) -> list[str]:
    """Signal every one first, then wait for them all within one shared ``timeout``; the
    names of those still running."""
    periodics = list(periodics)
    for periodic in periodics:
        periodic.signal()
    deadline = time.monotonic() + timeout
    return [p.name for p in periodics if not p.join(deadline - time.monotonic())]


__all__ = ["STALE_ROUNDS", "STOP_SECONDS", "Periodic", "stale_after", "stop_all"]
