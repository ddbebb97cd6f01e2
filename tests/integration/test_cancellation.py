"""A cancelled or timed-out RPC takes its external commands with it, through a real driver.

The slow command is real: CreateVolume of a clone of a directory volume holding tens of
thousands of files runs ``cp -a`` for seconds. The client gives up (a short deadline, or a
cancel); the driver must kill the copy at once, answer DEADLINE_EXCEEDED or CANCELLED (as its
metrics record), release the volume's lock, and the CO's retry must build the clone in full.
"""

from __future__ import annotations

import os
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_driver.proto import csi_pb2
from testkit.driver_process import Csi, DriverProcess, csi_stubs
from testkit.ports import free_port
from tests.requests import mount_cap

pytestmark = pytest.mark.root

MiB = 1 << 20
FILES = 60_000
MODE = csi_pb2.VolumeCapability.AccessMode


def create_request(name: str, source: str = "") -> csi_pb2.CreateVolumeRequest:
    req = csi_pb2.CreateVolumeRequest(
        name=name,
        capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB),
        volume_capabilities=[mount_cap()],
    )
    if source:
        req.volume_content_source.volume.volume_id = source
    return req


def copies_running(root: Path) -> list[int]:
    """Pids of ``cp`` processes working under ``root``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if argv[0] == b"cp" and state != "Z" and any(str(root).encode() in a for a in argv):
            pids.append(int(entry.name))
    return pids


class CopyWatcher:
    """Notes when a ``cp`` under the root was last seen running."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.seen: set[int] = set()
        self.last_seen = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            pids = copies_running(self.root)
            if pids:
                self.seen.update(pids)
                self.last_seen = time.monotonic()
            time.sleep(0.01)

    def __enter__(self) -> CopyWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def wait_until_gone(self, limit: float) -> float:
        """Seconds from now until no copy runs; fails after ``limit``."""
        start = time.monotonic()
        while copies_running(self.root):
            assert time.monotonic() - start < limit, (
                f"cp still running {limit}s after the RPC ended: {copies_running(self.root)}"
            )
            time.sleep(0.01)
        return time.monotonic() - start


@pytest.fixture
def metered(workdir: Path) -> Iterator[tuple[DriverProcess, Csi]]:
    driver = DriverProcess(workdir, metrics_port=free_port(), log_level="info")
    try:
        driver.start()
        with csi_stubs(driver.target) as csi:
            yield driver, csi
    finally:
        driver.stop()
    assert all(code == 0 for code in driver.exits), driver.log_tail()


def slow_source(csi: Csi, root: Path) -> str:
    """A directory volume whose copy takes seconds: tens of thousands of (empty) files."""
    reply = csi.controller.CreateVolume(create_request("slow-source"))
    vid = str(reply.volume.volume_id)
    data = root / "volumes" / vid.partition("@")[0] / "many"
    data.mkdir()
    for i in range(FILES):
        os.close(os.open(data / f"f{i:05d}", os.O_CREAT | os.O_WRONLY, 0o644))
    return vid


def retry_until_done(csi: Csi, req: csi_pb2.CreateVolumeRequest) -> tuple[str, float]:
    """The CO's retry right after giving up: (volume id, seconds answered ABORTED)."""
    start = time.monotonic()
    while True:
        attempt = time.monotonic()
        try:
            reply = csi.controller.CreateVolume(req, timeout=120)
            return str(reply.volume.volume_id), attempt - start
        except grpc.RpcError as exc:
            assert exc.code() is grpc.StatusCode.ABORTED, f"{exc.code()}: {exc.details()}"
            assert time.monotonic() - start < 30, "the retry stays ABORTED"
            time.sleep(0.05)


def rpc_codes(driver: DriverProcess, method: str) -> dict[str, float]:
    """Counts of ``method`` per status code, from the driver's /metrics."""
    url = f"http://127.0.0.1:{driver.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    codes: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("csi_driver_rpc_total{") and f'method="{method}"' in line:
            code = line.split('code="', 1)[1].split('"', 1)[0]
            codes[code] = codes.get(code, 0) + float(line.rsplit(" ", 1)[1])
    return codes


def check_clone(root: Path, clone: str) -> None:
    copied = root / "volumes" / clone.partition("@")[0] / "many"
    assert len(os.listdir(copied)) == FILES, "the retried clone is incomplete"


def test_a_deadline_kills_the_copy_and_the_retry_completes(
    metered: tuple[DriverProcess, Csi],
) -> None:
    driver, csi = metered
    source = slow_source(csi, driver.root)
    req = create_request("clone-deadline", source)
    with CopyWatcher(driver.root) as watcher:
        with pytest.raises(grpc.RpcError) as exc:
            csi.controller.CreateVolume(req, timeout=0.5)
        assert exc.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        took = watcher.wait_until_gone(limit=1.0)
    assert watcher.seen, "the copy never ran: the test proves nothing"
    print(f"\ndeadline -> cp gone: {took * 1000:.0f} ms")
    clone, aborted_for = retry_until_done(csi, req)
    assert aborted_for < 2.0, f"the volume stayed locked {aborted_for:.1f}s after the deadline"
    check_clone(driver.root, clone)
    assert rpc_codes(driver, "CreateVolume").get("DEADLINE_EXCEEDED") == 1
    csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=clone))
    csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=source))


def test_a_cancelled_rpc_kills_the_copy_and_the_retry_completes(
    metered: tuple[DriverProcess, Csi],
) -> None:
    driver, csi = metered
    source = slow_source(csi, driver.root)
    req = create_request("clone-cancel", source)
    with CopyWatcher(driver.root) as watcher:
        call = csi.controller.CreateVolume.future(req, timeout=120)
        deadline = time.monotonic() + 10
        while not watcher.seen:
            assert time.monotonic() < deadline, "the copy never started"
            time.sleep(0.01)
        call.cancel()
        took = watcher.wait_until_gone(limit=1.0)
    print(f"\ncancel -> cp gone: {took * 1000:.0f} ms")
    assert call.cancelled()
    clone, aborted_for = retry_until_done(csi, req)
    assert aborted_for < 2.0, f"the volume stayed locked {aborted_for:.1f}s after the cancel"
    check_clone(driver.root, clone)
    deadline = time.monotonic() + 5
    while rpc_codes(driver, "CreateVolume").get("CANCELLED") != 1:
        assert time.monotonic() < deadline, rpc_codes(driver, "CreateVolume")
        time.sleep(0.05)
    csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=clone))
    csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=source))
