"""List tokens for ListVolumes and ListSnapshots.

A token names the last id of the previous page, not an offset: the next page starts after that
id in sorted order, so deleting or adding entries between calls never repeats an entry and
never skips one that was there all along. Tokens are opaque to the CO (urlsafe base64 of a
versioned text) and checked strictly: anything this driver did not issue is ABORTED, the code
the spec gives for an invalid ``starting_token``. A hand-made token that passes the checks can
only choose where a listing starts, which reveals nothing the full listing would not.

The backends list after an id (:func:`csi_driver.backends.base.listed_after`'s rule), so a
page costs what the backend needs to find that id and read the page (for hostpath, a walk
along the primary key), not a read of every volume.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from csi_driver import ids
from csi_driver.errors import Aborted, InvalidArgument

T = TypeVar("T")

_VERSION = "v1"
_MAX_TOKEN_LENGTH = 512


def encode_token(kind: str, last_id: str) -> str:
    raw = f"{_VERSION}:{kind}:{last_id}".encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_token(token: str, kind: str) -> str:
    """The last id a token names; ABORTED for anything that is not a token of ``kind``."""
    invalid = Aborted(
        f"starting_token {token[:64]!r} was not issued by this driver for this listing;"
        " start the listing again without a token"
    )
    if len(token) > _MAX_TOKEN_LENGTH:
        raise invalid
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("utf-8")
    except (binascii.Error, ValueError):
        raise invalid from None
    version, _, rest = raw.partition(":")
    token_kind, _, last_id = rest.partition(":")
    if version != _VERSION or token_kind != kind or ids.parse(last_id, kind) is None:
        raise invalid
    # The encoding must round-trip, so one id has exactly one token.
    if encode_token(kind, last_id) != token:
        raise invalid
    return last_id


def check_max_entries(max_entries: int) -> int:
    if max_entries < 0:
        raise InvalidArgument(f"max_entries must not be negative, got {max_entries}")
    return max_entries


#: entries in one reply at most, whatever ``max_entries`` asks (0 included): a reply must fit
#: in the 4 MiB a gRPC client accepts by default (the sidecars keep that default), and a call
#: must not read every row of a large node. The spec lets a page be shorter than asked, with a
#: token for the rest; the sidecars follow tokens.
MAX_PAGE_ENTRIES = 4096
#: serialized bytes of the entries of one reply at most (entries carry volume contexts)
MAX_PAGE_BYTES = 2 << 20


class _Sized(Protocol):
    def ByteSize(self) -> int: ...  # protobuf spells it so


E = TypeVar("E", bound=_Sized)


def page(
    list_after: Callable[[str, int], Sequence[T]],
    key: Callable[[T], str],
    kind: str,
    max_entries: int,
    starting_token: str,
    reply_entry: Callable[[T], E],
) -> tuple[list[E], str]:
    """One page of reply entries and the token for the next one ("" after the last page).

    ``list_after(after, limit)`` answers by :func:`listed_after`'s rule (a backend's
    ``list_volumes`` or ``list_snapshots``). It is asked for one entry more than a page, which
    says whether another page follows without a second call. ``reply_entry`` makes an entry of
    the reply; the page ends early, with a token, where :data:`MAX_PAGE_BYTES` would be passed.
    ``kind`` is the id kind ("v" or "s"); a volume token is not accepted for snapshots.
    """
    check_max_entries(max_entries)
    size = min(max_entries, MAX_PAGE_ENTRIES) if max_entries > 0 else MAX_PAGE_ENTRIES
    after = decode_token(starting_token, kind) if starting_token else ""
    items = list(list_after(after, size + 1))
    more = len(items) > size
    del items[size:]
    entries: list[E] = []
    total = 0
    for item in items:
        entry = reply_entry(item)
        total += entry.ByteSize() + 8  # and its tag and length in the reply
        if total > MAX_PAGE_BYTES and entries:
            return entries, encode_token(kind, key(items[len(entries) - 1]))
        entries.append(entry)
    return entries, encode_token(kind, key(items[-1])) if more else ""
