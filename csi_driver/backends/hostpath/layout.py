"""Where a hostpath volume or snapshot lives under the root, and what is really there.

Layout under the root::

    state.db                      SQLite: the only record of what exists (see store.py)
    volumes/<local id>/           a mount volume: the directory pods see
    volumes/<local id>/disk.img   a block volume: a sparse image, attached to a loop device
    snapshots/<local id>/         a snapshot: a full copy of the volume's directory tree, or
                                  disk.img, a copy of its image (reflinked where possible)

A local id is the part of a volume or snapshot id before ``@`` (``v`` or ``s`` and 32 hex
digits). It is the only thing a path is ever built from, and it is checked against that
grammar first, so no id can name a path outside the root. Nothing on the way to what
:meth:`Layout.data` answers is a symlink, so acting on the answer never leaves the root.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from csi_driver.errors import Internal
from csi_driver.model import AccessType

IMAGE_NAME = "disk.img"
#: a new directory volume is writable by any user in the pod (as kubelet's emptyDir is);
#: the root and its subdirectories are private to the driver, so no host user reaches it
VOLUME_DIR_MODE = 0o777
PRIVATE_DIR_MODE = 0o700
IMAGE_MODE = 0o600

VOLUME_LOCAL = re.compile(r"\Av[0-9a-f]{32}\Z")
SNAPSHOT_LOCAL = re.compile(r"\As[0-9a-f]{32}\Z")


def is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def is_real_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


class Layout:
    """The paths of one root (already resolved: no symlink in it)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.volumes_dir = root / "volumes"
        self.snapshots_dir = root / "snapshots"
        self.database = root / "state.db"

    def volume(self, local: str) -> Path:
        if not VOLUME_LOCAL.match(local):
            raise Internal(f"refusing a path for malformed volume id part {local!r}")
        return self.volumes_dir / local

    def snapshot(self, local: str) -> Path:
        if not SNAPSHOT_LOCAL.match(local):
            raise Internal(f"refusing a path for malformed snapshot id part {local!r}")
        return self.snapshots_dir / local

    @staticmethod
    def data(base: Path, access_type: AccessType) -> Path | None:
        """The directory itself, or the image inside it; None unless that is really there."""
        if not is_real_dir(base):
            return None
        if access_type is AccessType.MOUNT:
            return base
        image = base / IMAGE_NAME
        return image if is_real_file(image) else None

    def image(self, local: str) -> Path | None:
        """The image of block volume ``local``, if it is really there."""
        return self.data(self.volume(local), AccessType.BLOCK)
