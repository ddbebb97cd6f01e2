"""The bounded walk that measures a directory volume where no quota counts it: what it
counts, what it never follows, where it stops, what it keeps, and that it leaves no
descriptor open. Real mounts inside a walked tree: tests/integration/test_usage_walk.py."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from csi_driver.system.usage_walk import Bounds, WalkCache, WalkError, measure, walk


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def by_lstat(top: Path) -> tuple[int, int]:
    """What the walk should find, counted another way: every inode once, by lstat."""
    seen: dict[int, int] = {top.lstat().st_ino: top.lstat().st_blocks}
    for dirpath, dirs, files in os.walk(top):
        for name in dirs + files:
            st = os.lstat(os.path.join(dirpath, name))
            seen[st.st_ino] = st.st_blocks
    return sum(seen.values()) * 512, len(seen)


def tree(top: Path) -> Path:
    (top / "a" / "b").mkdir(parents=True)
    (top / "a" / "b" / "big").write_bytes(os.urandom(300_000))
    (top / "a" / "small").write_bytes(b"x" * 10)
    (top / "empty").touch()
    with open(top / "sparse", "wb") as f:
        f.truncate(64 << 20)  # 64 MiB long, nothing allocated
    os.link(top / "a" / "small", top / "hardlink")
    os.mkfifo(top / "fifo")
    return top


def test_bytes_are_allocated_blocks_and_every_inode_counts_once(tmp_path: Path) -> None:
    top = tree(tmp_path / "v")
    before = open_fds()
    usage = measure(top)
    assert usage.complete and usage.stopped == ""
    assert (usage.used_bytes, usage.used_inodes) == by_lstat(top)
    assert usage.used_inodes == 8  # top, a, b, big, small (twice linked), empty, sparse, fifo
    assert usage.used_bytes < 1 << 20, "the sparse file's length is not its usage"
    assert open_fds() == before


def test_symlinks_are_counted_as_themselves_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "huge").write_bytes(os.urandom(1 << 20))
    top = tmp_path / "v"
    top.mkdir()
    (top / "to-dir").symlink_to(outside)
    (top / "to-file").symlink_to(outside / "huge")
    (top / "dangling").symlink_to(tmp_path / "nothing")
    usage = measure(top)
    assert usage.used_inodes == 4
    assert usage.used_bytes < 1 << 20
    assert (usage.used_bytes, usage.used_inodes) == by_lstat(top)


def test_the_top_must_be_a_real_directory(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "d")
    (tmp_path / "file").touch()
    # O_NOFOLLOW with O_DIRECTORY: a symlink is "not a directory" (or "too many links")
    link = (errno.ENOTDIR, errno.ELOOP)
    for bad, codes in (("link", link), ("file", (errno.ENOTDIR,)), ("gone", (errno.ENOENT,))):
        with pytest.raises(WalkError, match="cannot open directory") as exc:
            measure(tmp_path / bad)
        assert exc.value.errno in codes


def test_a_walk_stops_at_its_entry_bound_and_says_so(tmp_path: Path) -> None:
    top = tmp_path / "v"
    top.mkdir()
    for i in range(20):
        (top / f"f{i}").write_bytes(b"x")
    before = open_fds()
    usage = measure(top, Bounds(max_entries=5))
    assert not usage.complete and "bound of 5 entries" in usage.stopped
    assert usage.used_inodes == 6  # the top and five entries: a lower bound
    assert measure(top, Bounds(max_entries=20)).complete
    assert open_fds() == before


def test_a_walk_stops_at_its_depth_bound_with_no_descriptor_left(tmp_path: Path) -> None:
    deep = tmp_path / "v"
    path = deep
    for i in range(10):
        path = path / f"d{i}"
    path.mkdir(parents=True)
    before = open_fds()
    usage = measure(deep, Bounds(max_depth=3))
    assert "bound of 3 nested directories" in usage.stopped
    assert usage.used_inodes == 4
    assert measure(deep, Bounds(max_depth=11)).used_inodes == 11
    assert open_fds() == before


def test_a_walk_stops_when_its_time_is_up(tmp_path: Path) -> None:
    top = tmp_path / "v"
    top.mkdir()
    for i in range(600):
        (top / f"f{i}").touch()
    ticks = iter(range(10_000))
    usage = measure(top, Bounds(max_seconds=0.5), clock=lambda: float(next(ticks)))
    assert "ran out of its 0.5 s" in usage.stopped
    assert 1 < usage.used_inodes < 601


def test_a_failing_visitor_leaves_no_descriptor_open(tmp_path: Path) -> None:
    tree(tmp_path / "v")
    before = open_fds()

    def fail(_dir: int, name: str, _st: os.stat_result) -> None:
        if name == "big":
            raise RuntimeError("stop here")

    fd = os.open(tmp_path / "v", os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(RuntimeError, match="stop here"):
            walk(fd, fail)
    finally:
        os.close(fd)
    assert open_fds() == before


def test_the_cache_keeps_a_walk_for_its_period_per_key(tmp_path: Path) -> None:
    now = [100.0]
    cache = WalkCache(Bounds(), ttl=60.0, clock=lambda: now[0])
    top = tmp_path / "v"
    top.mkdir()
    first, walked = cache.measure("v1", top)
    assert walked and first.used_inodes == 1
    (top / "new").touch()
    assert cache.measure("v1", top) == (first, False)
    other, walked = cache.measure("v2", top)  # another key walks for itself
    assert walked and other.used_inodes == 2
    now[0] += 59.0
    assert cache.measure("v1", top) == (first, False)
    now[0] += 1.0
    again, walked = cache.measure("v1", top)
    assert walked and again.used_inodes == 2
    (top / "newer").touch()
    cache.forget("v1")
    assert cache.measure("v1", top)[0].used_inodes == 3


# --- what a failure inside the tree means ------------------------------------------------------


def failing_open(monkeypatch: pytest.MonkeyPatch, name: str, code: int) -> None:
    """os.open of the entry ``name`` (relative to a directory descriptor) fails with ``code``."""
    real_open = os.open

    def fake(path: str, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if path == name and dir_fd is not None:
            raise OSError(code, os.strerror(code))
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", fake)


@pytest.mark.parametrize("code", [errno.ENOENT, errno.ENOTDIR, errno.ELOOP])
def test_a_directory_that_vanishes_mid_walk_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    top = tree(tmp_path / "v")
    failing_open(monkeypatch, "b", code)
    usage = measure(top)
    assert usage.complete, usage.stopped
    assert usage.used_inodes == 6  # b and big are gone for the walk: the rest counted


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EACCES])
def test_a_directory_that_cannot_be_opened_ends_the_walk_incomplete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    top = tree(tmp_path / "v")
    before = open_fds()
    failing_open(monkeypatch, "b", code)
    usage = measure(top)
    assert not usage.complete
    assert usage.stopped == f"it stopped: b could not be read: {os.strerror(code)}"
    assert open_fds() == before


def test_a_listing_that_fails_ends_the_walk_incomplete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    top = tree(tmp_path / "v")
    real_scandir = os.scandir
    calls = [0]

    def scandir(fd: int) -> object:
        calls[0] += 1
        if calls[0] == 2:  # the first directory below the top
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real_scandir(fd)

    monkeypatch.setattr(os, "scandir", scandir)
    usage = measure(top)
    assert "could not be read: Too many open files" in usage.stopped


def test_a_walk_stops_when_asked(tmp_path: Path) -> None:
    top = tmp_path / "v"
    top.mkdir()
    for i in range(600):
        (top / f"f{i}").touch()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        stopped = walk(fd, lambda *_: None, stopping=lambda: True)
    finally:
        os.close(fd)
    assert stopped == "it was asked to stop"


# --- how many walks run at once ----------------------------------------------------------------


def test_only_max_walks_walk_at_once_the_others_get_what_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from csi_driver.system import usage_walk

    top = tmp_path / "v"
    top.mkdir()
    now = [0.0]
    cache = WalkCache(Bounds(max_seconds=0.2), ttl=10.0, clock=lambda: now[0], max_walks=1)
    kept, _ = cache.measure("v1", top)
    now[0] = 20.0  # what is kept is stale now
    inside, release = threading.Event(), threading.Event()
    real_measure = usage_walk.measure

    def slow(path: Path, bounds: Bounds, clock: object) -> object:
        inside.set()
        release.wait(10)
        return real_measure(path, bounds)

    monkeypatch.setattr(usage_walk, "measure", slow)
    walker = threading.Thread(target=cache.measure, args=("v2", top))
    walker.start()
    try:
        assert inside.wait(10)
        (top / "new").touch()
        assert cache.measure("v1", top) == (kept, False)  # the slot is taken: the old result
        usage, new = cache.measure("v3", top)  # nothing kept: waits a walk's time, in vain
        assert new and usage.stopped == "too many walks were running at once"
    finally:
        release.set()
        walker.join(10)
    monkeypatch.setattr(usage_walk, "measure", real_measure)
    assert cache.measure("v1", top)[0].used_inodes == 2  # a free slot: walked again


# --- NodeGetVolumeStats measures with no descriptor of the mount held --------------------------


def test_the_stats_walk_runs_after_the_mount_is_let_go(monkeypatch: pytest.MonkeyPatch) -> None:
    """A walk can take seconds; an unmount of the path meanwhile must not find it busy."""
    import contextlib
    from collections.abc import Iterator

    from csi_driver import model
    from csi_driver.proto import csi_pb2
    from csi_driver.services.volume_stats import VolumeStats

    holding = [False]
    walked_while_holding: list[bool] = []
    volume = model.Volume("v@n", "v", 8 << 20, model.AccessType.MOUNT, "xfs", "n")

    class Backend:
        def volume_condition(self, volume_id: str) -> model.VolumeCondition:
            return model.VolumeCondition.healthy()

        def locate(self, volume_id: str) -> None:
            return None

        def volume_usage(self, volume_id: str) -> model.Usage:
            walked_while_holding.append(holding[0])
            return model.Usage(8 << 20, 1 << 20, 7 << 20, 10, 2, 8)

    class Fs:
        def usage(self, path: str) -> model.Usage:
            return model.Usage(100 << 30, 50 << 30, 50 << 30)

    class Ephemeral:
        def volume_or_ephemeral(self, volume_id: str) -> model.Volume:
            return volume

    @contextlib.contextmanager
    def volume_at(*args: object, **kwargs: object) -> Iterator[tuple[object, str]]:
        holding[0] = True
        try:
            yield object(), "/proc/self/fd/99"
        finally:
            holding[0] = False

    stats = VolumeStats.__new__(VolumeStats)
    stats._backend = Backend()  # type: ignore[assignment]
    stats._fs = Fs()  # type: ignore[assignment]
    stats._ephemeral = Ephemeral()  # type: ignore[assignment]
    monkeypatch.setattr(stats, "_check_volume_path", lambda *a: None)
    monkeypatch.setattr(stats, "_volume_at", volume_at)
    monkeypatch.setattr(stats, "_node_problem", lambda *a: None)
    reply = stats.stats(csi_pb2.NodeGetVolumeStatsRequest(volume_id="v@n", volume_path="/k/v"))
    assert walked_while_holding == [False]
    by_unit = {u.unit: u for u in reply.usage}
    assert by_unit[csi_pb2.VolumeUsage.BYTES].total == 8 << 20  # the volume's, not the fs's
