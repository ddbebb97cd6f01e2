"""Volume and snapshot metadata kept in LV tags, so the volume group is the only record.

An LV belongs to this driver when its name is a local id (``v`` or ``s`` and 32 hex digits,
derived from the CSI name, see csi_driver/ids.py) and it carries :data:`OWNER`. Everything
else the driver needs to answer for it is a tag ``nlc.<key>=<value>``:

=================  ======================================================================
``nlc.kind``       ``volume`` or ``snapshot``
``nlc.name``       the CSI name when it is made of tag-safe characters, else
``nlc.namex``      the CSI name as UTF-8 in hex
``nlc.access``     ``mount`` or ``block`` (of a snapshot: of its volume)
``nlc.fs``         the filesystem a mount volume is formatted with at first stage
``nlc.p.<key>``    a StorageClass parameter, normalised (device class, lvType, ...)
``nlc.src``        the local id of the volume's content source or of a snapshot's volume
``nlc.ct``         creation time, nanoseconds since the epoch
``nlc.grow``       of a clone bigger than its source: the size it is made for, in bytes;
                   smaller than that, it is still being made (the retry extends it)
``nlc.pub``        a node the volume is published to (ControllerPublishVolume), one each
=================  ======================================================================

All tags are written by the one lvcreate that makes the LV, so a volume never exists without
its metadata. Parameter keys and values are checked against a strict grammar before they are
ever turned into a tag.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from csi_driver.model import AccessType, ContentSource, SourceKind

OWNER = "nodelocal-csi"
PREFIX = "nlc."

_SAFE_NAME = re.compile(r"\A[A-Za-z0-9_+.\-]{1,200}\Z")
_SAFE_VALUE = re.compile(r"\A[A-Za-z0-9_+.\-]{1,200}\Z")
_LOCAL = re.compile(r"\A[vs][0-9a-f]{32}\Z")


def is_local_id(name: str) -> bool:
    return bool(_LOCAL.match(name))


@dataclass(frozen=True)
class Meta:
    """What the tags of one of our LVs say."""

    kind: str  # "volume" or "snapshot"
    name: str
    access_type: AccessType = AccessType.MOUNT
    fs_type: str = ""
    parameters: Mapping[str, str] = field(default_factory=dict)
    source_local: str = ""  # "v..." or "s..." (a volume's content source, a snapshot's origin)
    created_ns: int = 0
    published: frozenset[str] = frozenset()
    grow_to: int = 0  # a clone's size once made, when it exceeds its source's

    def unfinished(self, size_bytes: int) -> bool:
        """True for a clone that has not reached the size it is made for (a kill came
        between its lvcreate and its lvextend)."""
        return size_bytes < self.grow_to

    @property
    def source(self) -> ContentSource | None:
        """The content source, as a local id; the backend adds the node."""
        if self.kind != "volume" or not self.source_local:
            return None
        kind = SourceKind.SNAPSHOT if self.source_local.startswith("s") else SourceKind.VOLUME
        return ContentSource(kind, self.source_local)


def encode(meta: Meta) -> list[str]:
    """The tags for ``meta``. Raises ValueError for anything that cannot be a tag (callers
    validate parameters first, so that is a bug, not bad input)."""
    tags = [OWNER, f"{PREFIX}kind={meta.kind}"]
    if _SAFE_NAME.match(meta.name):
        tags.append(f"{PREFIX}name={meta.name}")
    else:
        tags.append(f"{PREFIX}namex={meta.name.encode('utf-8').hex()}")
    tags.append(f"{PREFIX}access={meta.access_type.value}")
    if meta.fs_type:
        tags.append(f"{PREFIX}fs={_checked(meta.fs_type)}")
    if meta.kind == "volume":
        for key in sorted(meta.parameters):
            tags.append(f"{PREFIX}p.{_checked(key)}={_checked(meta.parameters[key])}")
    if meta.source_local:
        if not _LOCAL.match(meta.source_local):
            raise ValueError(f"malformed source {meta.source_local!r}")
        tags.append(f"{PREFIX}src={meta.source_local}")
    tags.append(f"{PREFIX}ct={int(meta.created_ns)}")
    if meta.grow_to:
        tags.append(f"{PREFIX}grow={int(meta.grow_to)}")
    for node in sorted(meta.published):
        tags.append(published_tag(node))
    return tags


def published_tag(node_id: str) -> str:
    return f"{PREFIX}pub={_checked(node_id)}"


def _checked(value: str) -> str:
    if not _SAFE_VALUE.match(value):
        raise ValueError(f"{value!r} cannot be stored in an LV tag")
    return value


def decode(tags: Iterable[str]) -> Meta | None:
    """The metadata in ``tags``; None unless the LV is ours and its tags are complete."""
    tags = set(tags)
    if OWNER not in tags:
        return None
    values: dict[str, str] = {}
    parameters: dict[str, str] = {}
    published: set[str] = set()
    for tag in tags:
        if not tag.startswith(PREFIX) or "=" not in tag:
            continue
        key, _, value = tag[len(PREFIX) :].partition("=")
        if key.startswith("p."):
            parameters[key[2:]] = value
        elif key == "pub":
            published.add(value)
        else:
            values[key] = value
    kind = values.get("kind")
    if kind not in ("volume", "snapshot"):
        return None
    if "name" in values:
        name = values["name"]
    elif "namex" in values:
        try:
            name = bytes.fromhex(values["namex"]).decode("utf-8")
        except ValueError:
            return None
    else:
        return None
    try:
        access = AccessType(values.get("access", "mount"))
        created = int(values.get("ct", "0"))
        grow_to = int(values.get("grow", "0"))
    except ValueError:
        return None
    source = values.get("src", "")
    if source and not _LOCAL.match(source):
        return None
    return Meta(
        kind=kind,
        name=name,
        access_type=access,
        fs_type=values.get("fs", ""),
        parameters=parameters,
        source_local=source,
        created_ns=created,
        published=frozenset(published),
        grow_to=grow_to,
    )
