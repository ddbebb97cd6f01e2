"""Shared fixtures for the host integration lane: the real driver process on a unix socket.

Every test here runs as root against real mounts and loop devices. Not being root is a
failure, not a skip: this lane exists to exercise exactly those.

Fixtures
--------
``workdir``
    A fresh short directory under /tmp (unix socket paths must stay under 108 bytes). Its
    finaliser unmounts everything below it and detaches every loop device backed by a file
    below it, and then FAILS the test if anything had to be cleaned up that way (a leak), so
    leaks are seen rather than silently swept away.
``driver``
    A running ``python -m csi_driver`` (standalone mode, hostpath backend rooted at
    ``workdir/root``, socket ``workdir/csi.sock``, node id :data:`NODE_ID`). ``driver.restart()``
    stops it with SIGTERM and starts it again on the same socket and root;
    ``driver.log_tail()`` helps failure messages. Stopped in the finaliser.
``csi``
    Stubs over a channel to ``driver``: ``csi.identity``, ``csi.controller``, ``csi.node``;
    they survive a restart of the driver (gRPC reconnects).
``vols``
    Volumes made, staged and published through ``csi`` as the kubelet would
    (``tests/integration/test_node.py`` ``Volumes``), all undone at the end.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from testkit.driver_process import Csi, DriverProcess, clean_up_host, csi_stubs, mounts_under

if TYPE_CHECKING:
    from tests.integration.test_node import Volumes

NODE_ID = "it-node"


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the integration lane needs root (real mounts and loop devices); run as root")


@pytest.fixture
def workdir() -> Iterator[Path]:
    require_root()
    path = Path(tempfile.mkdtemp(prefix="csi-it-", dir="/tmp"))
    leaks: list[str] = []
    try:
        yield path
    finally:
        leaks = clean_up_host(str(path))
        if not mounts_under(str(path)):
            shutil.rmtree(path, ignore_errors=True)
    assert not leaks, f"left behind by the test or the driver: {leaks}"


@pytest.fixture
def driver(workdir: Path) -> Iterator[DriverProcess]:
    d = DriverProcess(workdir)
    try:
        d.start()
        yield d
    finally:
        d.stop()
    bad = [code for code in d.exits if code != 0]
    assert not bad, f"driver exited with {bad} on SIGTERM:\n" + d.log_tail()


@pytest.fixture
def csi(driver: DriverProcess) -> Iterator[Csi]:
    with csi_stubs(driver.target) as stubs:
        yield stubs


@pytest.fixture
def vols(csi: Csi, workdir: Path, driver: DriverProcess) -> Iterator[Volumes]:
    """Volumes driven through the node RPCs as the kubelet would (tests/integration/test_node.py
    ``Volumes``), all undone through the driver at the end; a failed undo fails the test."""
    from tests.integration.test_node import Volumes

    v = Volumes(csi, workdir)
    try:
        yield v
    finally:
        errors = v.teardown()
    assert not errors, "teardown through the driver failed:\n" + "\n".join(errors)
