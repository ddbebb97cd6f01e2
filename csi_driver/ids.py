"""Volume and snapshot ids: deterministic from the CSI name, carrying the owning node.

An id is ``<kind><32 hex>@<node id>``: ``v...`` for volumes, ``s...`` for snapshots. The hex
part is derived from the CSI name, so a retried CreateVolume after a crash lands on the same
storage; the node part lets a controller that sees no storage (``--mode controller``) tell
which node a volume lives on. Ids are untrusted input and parsed strictly: nothing that does
not match the grammar ever reaches a backend.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from csi_driver.bounded import echo
from csi_driver.errors import InvalidArgument, NotFound

# \A and \Z, not ^ and $: "$" also matches before a final newline, and "<id>\n" is no id.
NODE_ID_RE = re.compile(r"\A[A-Za-z0-9]([A-Za-z0-9._-]{0,126}[A-Za-z0-9])?\Z")
_ID_RE = re.compile(r"([vs])([0-9a-f]{32})@(.+)")
MAX_ID_LENGTH = 192


@dataclass(frozen=True)
class ParsedId:
    kind: str  # "v" or "s"
    local: str  # "<kind><32 hex>", safe as a file or LV name
    node_id: str

    def __str__(self) -> str:
        return f"{self.local}@{self.node_id}"


def check_node_id(value: str) -> str:
    """The one rule for a node id (the driver's --node-id, and the node part of every id)."""
    if not NODE_ID_RE.fullmatch(value or ""):
        raise ValueError(
            f"node id {echo(value)}: use 1-128 letters, digits, '.', '_' or '-', starting and"
            " ending with a letter or digit"
        )
    return value


def _digest(name: str) -> str:
    import hashlib  # here, not at the top: importing it sets up OpenSSL digests (start-up time)

    return hashlib.sha256(name.encode("utf-8")).hexdigest()[:32]


def volume_id_for(name: str, node_id: str) -> str:
    return f"v{_digest(name)}@{node_id}"


def snapshot_id_for(name: str, node_id: str) -> str:
    return f"s{_digest(name)}@{node_id}"


def parse(value: str, kind: str) -> ParsedId | None:
    """The parsed id, or None when ``value`` is not an id of ``kind`` of this driver."""
    if not value or len(value) > MAX_ID_LENGTH:
        return None
    m = _ID_RE.fullmatch(value)
    if m is None or m.group(1) != kind or not NODE_ID_RE.fullmatch(m.group(3)):
        return None
    return ParsedId(kind, m.group(1) + m.group(2), m.group(3))


def local_of(value: str, kind: str, node_id: str) -> str | None:
    """The local part (``<kind><32 hex>``, the name of the storage) of ``value`` when it is an
    id of ``kind`` on node ``node_id``; None for anything else, which this node does not hold."""
    parsed = parse(value, kind)
    if parsed is None or parsed.node_id != node_id:
        return None
    return parsed.local


def id_of(local: str, node_id: str) -> str:
    """The id of this node's storage named ``local``: the inverse of :func:`local_of`."""
    return f"{local}@{node_id}"


def _reject_unsafe(value: str, field: str) -> None:
    if "\x00" in value or "/" in value or ".." in value or len(value) > MAX_ID_LENGTH:
        raise InvalidArgument(
            f"{field} is malformed: it must not contain NUL, '/' or '..' and must be at most"
            f" {MAX_ID_LENGTH} characters"
        )


def _require(value: str, field: str, kind: str, noun: str) -> ParsedId:
    """Parse an id of ``kind`` from a request. An empty id is INVALID_ARGUMENT; a well-formed
    string that is not one of ours cannot name an existing ``noun``, so it is NOT_FOUND."""
    if not value:
        raise InvalidArgument(f"{field} is required")
    _reject_unsafe(value, field)
    parsed = parse(value, kind)
    if parsed is None:
        raise NotFound(f"{noun} {echo(value)} does not exist")
    return parsed


def require_volume_id(value: str, field: str = "volume_id") -> ParsedId:
    return _require(value, field, "v", "volume")


def require_snapshot_id(value: str, field: str = "snapshot_id") -> ParsedId:
    return _require(value, field, "s", "snapshot")
