"""The usage of a directory volume where no project quota counts it, for real, as root: the
bounded walk over a real tree with a tmpfs and a bind mount inside (neither crossed),
symlinks (never followed), its bound, its cache; and NodeGetVolumeStats of the real driver on
this host (no quotas here), which shows the volume's own usage against its capacity rather
than the whole filesystem's.

Everything mounted here is below the lane's ``workdir``, whose finaliser fails the test on a
mount left behind; the tests unmount in their own ``finally`` first.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_driver.proto import csi_pb2
from csi_driver.system.usage_walk import Bounds, WalkCache, measure
from testkit.driver_process import DriverProcess
from tests.integration.test_node import Volumes, find_backing_directory
from tests.requests import mount_cap


def sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout


def du(path: Path) -> tuple[int, int]:
    """(allocated bytes, inodes) of ``path`` by du(1), not crossing into other filesystems."""
    size = int(sh("du", "-s", "-x", "-B1", str(path)).split()[0])
    inodes = int(sh("du", "-s", "-x", "--inodes", str(path)).split()[0])
    return size, inodes


@pytest.fixture
def volume_tree(workdir: Path) -> Iterator[Path]:
    """A volume-like tree with files, links, a tmpfs and a bind mount inside; unmounted after."""
    top = workdir / "vol"
    (top / "data" / "deep").mkdir(parents=True)
    (top / "data" / "deep" / "a").write_bytes(os.urandom(2 << 20))
    (top / "data" / "b").write_bytes(os.urandom(5000))
    with open(top / "sparse", "wb") as f:
        f.truncate(1 << 30)
    os.link(top / "data" / "b", top / "b-again")
    outside = workdir / "outside"
    outside.mkdir()
    (outside / "big").write_bytes(os.urandom(4 << 20))
    (top / "to-outside").symlink_to(outside)
    (top / "to-big").symlink_to(outside / "big")
    (top / "tmp").mkdir()
    (top / "bound").mkdir()
    mounted: list[Path] = []
    try:
        sh("mount", "-t", "tmpfs", "-o", "size=16m", "walk-test", str(top / "tmp"))
        mounted.append(top / "tmp")
        (top / "tmp" / "on-tmpfs").write_bytes(os.urandom(3 << 20))
        yield top
    finally:
        for m in reversed([*mounted, top / "bound"]):
            subprocess.run(["umount", str(m)], capture_output=True, check=False)


def bind(source: Path, target: Path) -> None:
    sh("mount", "--bind", str(source), str(target))


def test_the_walk_counts_what_du_counts_and_crosses_no_mount(
    volume_tree: Path, workdir: Path
) -> None:
    expected = du(volume_tree)  # du -x: the tmpfs left out, the links not followed
    usage = measure(volume_tree)
    assert usage.complete
    assert (usage.used_bytes, usage.used_inodes) == expected
    assert usage.used_bytes < 3 << 20, "neither the tmpfs nor a symlink's target was counted"

    # a bind mount of the same filesystem has the same st_dev, so du -x would go in; the
    # walk sees another mount and neither counts nor enters it, as it does the tmpfs (so the
    # empty directory under it is hidden from both)
    hidden = (volume_tree / "bound").lstat().st_blocks * 512
    bind(workdir / "outside", volume_tree / "bound")
    assert du(volume_tree)[0] >= expected[0] + (4 << 20)
    again = measure(volume_tree)
    assert (again.used_bytes, again.used_inodes) == (expected[0] - hidden, expected[1] - 1)


def test_a_walk_on_a_real_tree_stops_at_its_bound_and_its_result_is_kept(
    volume_tree: Path,
) -> None:
    full = measure(volume_tree)
    cut = measure(volume_tree, Bounds(max_entries=3))
    assert "bound of 3 entries" in cut.stopped
    assert cut.used_inodes == 4 and cut.used_bytes <= full.used_bytes

    now = [0.0]
    cache = WalkCache(Bounds(), ttl=60.0, clock=lambda: now[0])
    first, walked = cache.measure("vol", volume_tree)
    assert walked and first == full
    (volume_tree / "data" / "c").write_bytes(os.urandom(1 << 20))
    assert cache.measure("vol", volume_tree) == (first, False)  # within its period
    now[0] = 60.0
    later, walked = cache.measure("vol", volume_tree)
    assert walked and later.used_inodes == full.used_inodes + 1
    assert later.used_bytes >= full.used_bytes + (1 << 20)


def test_node_stats_of_a_directory_volume_are_its_own_without_quotas(
    vols: Volumes, driver: DriverProcess
) -> None:
    """This host has no project quotas: the volume's usage is walked, its total is its
    capacity, and a neighbour's data does not show in it."""
    vid = vols.create("walked", 48 << 20)
    cap = mount_cap()
    staging = vols.stage(vid, cap)
    target = Path(vols.publish(vid, cap, vols.target_path("walked")))
    neighbour = vols.create("neighbour", 48 << 20)
    vols.stage(neighbour, cap)
    n_target = Path(vols.publish(neighbour, cap, vols.target_path("neighbour")))
    (n_target / "theirs").write_bytes(os.urandom(8 << 20))
    (target / "sub").mkdir()
    (target / "sub" / "mine").write_bytes(os.urandom(3 << 20))
    (target / "link").symlink_to("/")
    os.sync()

    reply = vols.stats(vid, str(target))
    by_unit = {u.unit: u for u in reply.usage}
    backing = find_backing_directory(driver.root, staging)
    assert backing is not None
    used, inodes = du(backing)
    bytes_ = by_unit[csi_pb2.VolumeUsage.BYTES]
    assert bytes_.total == 48 << 20
    assert bytes_.used == used and 3 << 20 <= used < 4 << 20
    assert 0 < bytes_.available <= bytes_.total - bytes_.used
    assert by_unit[csi_pb2.VolumeUsage.INODES].used == inodes == 4
    assert not reply.volume_condition.abnormal
