"""Facts remembered for the length of one RPC, and no longer.

One call often asks the same question twice: NodeUnpublishVolume looks the volume up and then
locates its device, CreateVolume checks the room and then looks for an earlier attempt. Each
answer from lvm2 is a process that scans every disk. Within one call (on the worker thread that
runs it) an answer may be reused as long as nothing changed since it was read; between calls
nothing is reused, so a volume removed by hand is seen by the very next call.

``call()`` opens the memo (the server wraps every RPC in it); ``current()`` is the open memo, or
None outside a call (health checks, metrics), where callers read afresh. What a remembered answer
says may also change without a command that knows of the memo: a mount or an unmount changes
whether a device is open. Whatever makes such a change calls ``forget()``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

_local = threading.local()


@contextlib.contextmanager
def call() -> Iterator[dict[Any, Any]]:
    """A fresh memo for the call run on this thread; dropped when the call ends."""
    memo: dict[Any, Any] = {}
    outer = current()
    _local.memo = memo
    try:
        yield memo
    finally:
        _local.memo = outer


def current() -> dict[Any, Any] | None:
    return getattr(_local, "memo", None)


def forget() -> None:
    """This call changed something a remembered answer may describe: drop every answer."""
    memo = current()
    if memo is not None:
        memo.clear()


def in_call(function: Any, *args: Any) -> Any:
    """``function(*args)`` with a memo of its own (for a thread pool's submit)."""
    with call():
        return function(*args)
