"""One operation per volume at a time: a second concurrent one gets ABORTED, as the spec asks."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from csi_driver.errors import Aborted


def path_key(path: str) -> str:
    """The lock key of a staging or target path: two operations on one path never overlap,
    whichever volumes they name."""
    return f"path:{path}"


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


class BlockingKeyLocks:
    """Blocking per-key locks, taken in a fixed order so two holders cannot deadlock.

    Backends use them to serialise work on one volume or snapshot among their own callers
    (the servicers already answer a second concurrent request with ABORTED)."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextlib.contextmanager
    def hold(self, *keys: str) -> Iterator[None]:
        taken: list[tuple[str, threading.Lock]] = []
        try:
            for key in sorted({k for k in keys if k}):
                with self._mutex:
                    lock, users = self._locks.get(key, (threading.Lock(), 0))
                    self._locks[key] = (lock, users + 1)
                try:
                    lock.acquire()
                except BaseException:
                    self._forget(key)
                    raise
                taken.append((key, lock))
            yield
        finally:
            for key, lock in reversed(taken):
                lock.release()
                self._forget(key)

    def _forget(self, key: str) -> None:
        with self._mutex:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)
