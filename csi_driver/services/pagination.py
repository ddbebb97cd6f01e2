"""List tokens for ListVolumes and ListSnapshots.

A token names the last id of the previous page, not an offset: the next page starts after that
id in sorted order, so deleting or adding entries between calls never repeats an entry and
never skips one that was there all along. Tokens are opaque to the CO (urlsafe base64 of a
versioned text) and checked strictly: anything this driver did not issue is ABORTED, the code
the spec gives for an invalid ``starting_token``. A hand-made token that passes the checks can
only choose where a listing starts, which reveals nothing the full listing would not.
"""

from __future__ import annotations

import base64
import binascii
import bisect
from collections.abc import Callable, Sequence
from typing import TypeVar

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


def paginate(
    items: Sequence[T],
    key: Callable[[T], str],
    kind: str,
    max_entries: int,
    starting_token: str,
) -> tuple[list[T], str]:
    """One page of ``items`` and the token for the next one ("" when this is the last page).

    ``kind`` is the id kind ("v" or "s"); a volume token is not accepted for snapshots.
    """
    check_max_entries(max_entries)
    ordered = sorted(items, key=key)
    start = 0
    if starting_token:
        last_id = decode_token(starting_token, kind)
        start = bisect.bisect_right([key(i) for i in ordered], last_id)
    end = len(ordered) if max_entries == 0 else min(len(ordered), start + max_entries)
    page = list(ordered[start:end])
    next_token = encode_token(kind, key(page[-1])) if page and end < len(ordered) else ""
    return page, next_token
