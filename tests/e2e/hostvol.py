"""Looking at the driver's volumes from the node's side (the tests run on the node, as root)."""

from __future__ import annotations

import os
from pathlib import Path


def files_named(root: Path, name: str) -> list[Path]:
    """Every file called name below root: markers written through a pod's volume land in the
    volume's directory on the node (the hostpath backend's mount volumes are directories)."""
    found = []
    for dirpath, _dirs, files in os.walk(root):
        if name in files:
            found.append(Path(dirpath) / name)
    return found
