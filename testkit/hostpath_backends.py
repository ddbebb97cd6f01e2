"""HostPath backends opened in-process on one root, one after another, for tests that call the
backend directly (no gRPC): opening a new one closes the last, as a driver restart would."""

from __future__ import annotations

from pathlib import Path

from csi_driver.backends.hostpath.backend import HostPathBackend
from csi_driver.system.runner import SubprocessRunner


class Backends:
    """Backends on ``root`` for node ``node``; ``capacity`` (None: the filesystem's free space)
    is what :meth:`open` uses unless told otherwise. What is left at the end is each test
    suite's business (its own ``teardown``)."""

    def __init__(self, root: Path, node: str, capacity: int | None = None) -> None:
        self.root = root
        self.node = node
        self.capacity = capacity
        self.current: HostPathBackend | None = None

    def open(self, capacity: int | None = None) -> HostPathBackend:
        """A new backend (the last one closed), with ``capacity`` bytes if given."""
        self.close()
        size = capacity if capacity is not None else self.capacity
        self.current = HostPathBackend(self.root, size, self.node, SubprocessRunner())
        return self.current

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None
