"""One operation per volume at a time: a second concurrent one gets ABORTED, as the spec asks."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from csi_driver.errors import Aborted


class KeyLocks:
    """Non-blocking locks keyed by strings (volume ids, names, snapshot ids)."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._held: set[str] = set()

    @contextmanager
    def hold(self, *keys: str) -> Iterator[None]:
        wanted = {k for k in keys if k}
        with self._mutex:
            busy = sorted(wanted & self._held)
            if busy:
                raise Aborted(f"an operation on {busy[0]!r} is already in progress; retry later")
            self._held |= wanted
        try:
            yield
        finally:
            with self._mutex:
                self._held -= wanted

    def is_held(self, key: str) -> bool:
        with self._mutex:
            return key in self._held
