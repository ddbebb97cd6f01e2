"""Bounds on what the driver says back about its input: error messages and log lines.

Every field of a request is untrusted and may be a megabyte long. Quoted whole, a 17 KB
parameter value pushed an error message past gRPC's 16 KiB metadata limit (a client on gRPC's
C core then saw RESOURCE_EXHAUSTED instead of the INVALID_ARGUMENT that was sent), and 1 MB
fields became 1 MB log lines. So a value quoted in a message goes through :func:`echo`, every
status message through :func:`cap_message` (in the interceptor, where errors become
statuses), and everything logged through :func:`loggable`. Each says how long the original
was, so a cut value is never mistaken for the whole.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

ECHO_CHARS = 100  # of a value quoted in a message: its repr is at most ~420 characters
STATUS_MESSAGE_BYTES = 2048  # percent-encoded, still far below gRPC's metadata limits
LOG_STRING_CHARS = 256
LOG_KEY_CHARS = 64
LOG_ENTRIES = 32  # of one map or list
LOG_BUDGET = 4096  # characters of one logged structure, all strings and entries together


def size_of(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def echo(value: object) -> str:
    """``repr(value)`` for a message, cut: ``'aaaa…' (17000 bytes)``."""
    if not isinstance(value, str):
        value = str(value)
    if len(value) <= ECHO_CHARS:
        return repr(value)
    return f"{value[:ECHO_CHARS] + '…'!r} ({size_of(value)} bytes)"


def cut(text: str, limit: int = LOG_STRING_CHARS) -> str:
    """``text`` whole when it is short, else its head, an ellipsis and its length."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({size_of(text)} bytes)"


def listing(items: Sequence[str], most: int = 3, width: int = 160) -> str:
    """Paths or flags for a message, bounded however many and however long they are: the
    first ``most`` in order, each cut to ``width`` characters, and how many more there are."""
    shown = [cut(item, width) for item in sorted(items)[:most]]
    more = len(items) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def cap_message(message: str, limit: int = STATUS_MESSAGE_BYTES) -> str:
    """A status message of at most ``limit`` UTF-8 bytes."""
    data = message.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return message
    suffix = f"… (message cut, {len(data)} bytes in all)"
    head = data[: limit - size_of(suffix)].decode("utf-8", "ignore")
    return head + suffix


class _Walk:
    def __init__(self, budget: int, string_chars: int) -> None:
        self.left = budget
        self.string_chars = string_chars

    def text(self, value: str, limit: int) -> str:
        out = cut(value, max(min(limit, self.left), 16))
        self.left -= len(out) + 4
        return out

    def value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value, self.string_chars)
        if value is None or isinstance(value, bool | int | float):
            self.left -= 8
            return value
        if isinstance(value, bytes | bytearray):
            self.left -= 16
            return f"<{len(value)} bytes>"
        if isinstance(value, Mapping):
            out: dict[str, Any] = {}
            for n, (key, item) in enumerate(value.items()):
                if n == LOG_ENTRIES or self.left <= 0:
                    out["…"] = f"{len(value) - n} more entries"
                    break
                out[self.text(str(key), LOG_KEY_CHARS)] = self.value(item)
            return out
        if isinstance(value, list | tuple | set | frozenset):
            items = list(value)
            kept = []
            for n, item in enumerate(items):
                if n == LOG_ENTRIES or self.left <= 0:
                    kept.append(f"… {len(items) - n} more items")
                    break
                kept.append(self.value(item))
            return kept
        return self.text(str(value), self.string_chars)


def loggable(value: Any, budget: int = LOG_BUDGET, string_chars: int = LOG_STRING_CHARS) -> Any:
    """A bounded copy of a structure of maps, lists, strings and scalars, for a log line:
    each string cut to ``string_chars``, each map and list to :data:`LOG_ENTRIES` entries, and
    all of it to about ``budget`` characters (what is past the budget is left out, and said)."""
    return _Walk(budget, string_chars).value(value)
