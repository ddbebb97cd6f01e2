"""The system layer for mounts and filesystems, without root: a recording runner stands in for
mount/umount/blkid/mkfs, and a file in tmp_path stands in for /proc/self/mountinfo.

The real commands are exercised by tests/integration/test_node.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest

from csi_driver.system import filesystem as fsmod
from csi_driver.system.filesystem import FilesystemError, Filesystems, Signature
from csi_driver.system.mounter import (
    Mounter,
    MountError,
    UnsafePathError,
    canonical,
    check_options,
    parse_mountinfo,
)
from csi_driver.system.runner import DEFAULT_TIMEOUT, CommandError, CommandResult

MOUNTINFO = (
    b"22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard\n"
    b"30 22 0:39 / /tmp/with\\040space\\011tab rw,nosuid,nodev - tmpfs tmp\\134fs rw,size=10k\n"
    b"31 22 254:0 /srv/vols/v1 /mnt/target ro,noexec shared:5 master:2 - ext4 /dev/vda rw\n"
    b"32 31 0:6 /loop3 /mnt/target/dev rw - devtmpfs devtmpfs rw,mode=755\n"
    b"this line is not mountinfo\n"
    b"33 22 254:0 /srv/vols/v1 /mnt/other rw - ext4 /dev/vda rw\n"
)

Handler = Callable[[tuple[str, ...]], CommandResult | None]


class FakeRunner:
    """Records argv; ``handler`` may return a result, raise, or return None for success."""

    def __init__(self, handler: Handler | None = None) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.timeouts: list[float] = []
        self.handler = handler

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        check: bool = True,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> CommandResult:
        args = tuple(argv)
        self.calls.append(args)
        self.timeouts.append(timeout)
        result = self.handler(args) if self.handler else None
        if result is None:
            result = CommandResult(args, 0, "", "", 0.0)
        if check and result.returncode != 0:
            raise CommandError(args, result.returncode, result.stdout, result.stderr)
        return result


def result(argv: tuple[str, ...], rc: int = 0, out: str = "", err: str = "") -> CommandResult:
    return CommandResult(argv, rc, out, err, 0.0)


@pytest.fixture
def mountinfo(tmp_path: Path) -> Path:
    p = tmp_path / "mountinfo"
    p.write_bytes(MOUNTINFO)
    return p


# --- the mount table ----------------------------------------------------------------------


def test_parse_mountinfo_unescapes_and_splits_fields() -> None:
    entries = parse_mountinfo(MOUNTINFO)
    assert [e.mount_id for e in entries] == [22, 30, 31, 32, 33]  # the junk line is skipped
    tmp = entries[1]
    assert tmp.mount_point == "/tmp/with space\ttab"
    assert tmp.source == "tmp\\fs"
    assert (tmp.major, tmp.minor) == (0, 39)
    assert tmp.options == ("rw", "nosuid", "nodev")
    assert tmp.optional == ()
    assert tmp.super_options == ("rw", "size=10k")
    target = entries[2]
    assert target.optional == ("shared:5", "master:2")
    assert target.root == "/srv/vols/v1" and target.read_only
    assert target.key == (254, 0, "/srv/vols/v1")
    assert not entries[0].read_only


def test_mounts_at_and_is_mount_point(mountinfo: Path) -> None:
    m = Mounter(FakeRunner(), mountinfo=str(mountinfo))
    assert m.is_mount_point("/mnt/target")
    assert m.is_mount_point("/tmp/with space\ttab")
    assert not m.is_mount_point("/mnt")
    top = m.mount_at("/mnt/target")
    assert top is not None and top.mount_id == 31
    assert m.mount_at("/nowhere") is None
    # the same directory bind-mounted twice is found by its key
    assert [e.mount_point for e in m.mounts_with_key((254, 0, "/srv/vols/v1"))] == [
        "/mnt/target",
        "/mnt/other",
    ]


def test_key_of_a_path_below_a_mount(mountinfo: Path) -> None:
    m = Mounter(FakeRunner(), mountinfo=str(mountinfo))
    assert m.key_of("/srv/vols/v1") == (254, 0, "/srv/vols/v1")
    assert m.key_of("/mnt/target/x/y") == (254, 0, "/srv/vols/v1/x/y")
    assert m.key_of("/mnt/target/dev") == (0, 6, "/loop3")


def test_canonical_resolves_parents_but_not_the_last_component(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    (real / "leaf").symlink_to("/etc")
    assert canonical(str(tmp_path / "link" / "leaf")) == str(real / "leaf")


def test_options_with_commas_or_empty_are_refused() -> None:
    check_options(["noexec", "data=ordered"])
    for bad in (["a,remount"], [""], ["x\x00"], [" ro"]):
        with pytest.raises(ValueError, match="malformed mount option"):
            check_options(bad)


# --- mount commands -----------------------------------------------------------------------


def test_mount_builds_argv_with_options_and_end_of_options(tmp_path: Path, mountinfo: Path) -> None:
    runner = FakeRunner()
    m = Mounter(runner, mountinfo=str(mountinfo), timeout=7)
    m.mount("/dev/loop3", str(tmp_path), "ext4", ["noexec", "discard"])
    assert runner.calls == [
        ("mount", "-t", "ext4", "-o", "noexec,discard", "--", "/dev/loop3", str(tmp_path))
    ]
    assert runner.timeouts == [7]
    with pytest.raises(ValueError):
        m.mount("/dev/loop3", str(tmp_path), "ext4,bind")
    assert len(runner.calls) == 1


def test_read_only_bind_is_a_bind_then_a_remount(tmp_path: Path, mountinfo: Path) -> None:
    runner = FakeRunner()
    m = Mounter(runner, mountinfo=str(mountinfo))
    m.bind("/src", str(tmp_path), read_only=True, options=["noexec", "ro"])
    assert runner.calls == [
        ("mount", "--bind", "--", "/src", str(tmp_path)),
        ("mount", "-o", "remount,bind,ro,noexec", "--", str(tmp_path)),
    ]
    runner.calls.clear()
    m.bind("/src", str(tmp_path))
    assert runner.calls == [("mount", "--bind", "--", "/src", str(tmp_path))]


def test_failed_remount_removes_the_half_made_bind(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    target = tmp_path / "t"
    target.mkdir()

    def handler(argv: tuple[str, ...]) -> CommandResult | None:
        if argv[:2] == ("mount", "--bind"):
            info.write_bytes(f"40 1 8:1 /src {target} rw - ext4 /dev/sda1 rw\n".encode())
        elif "remount,bind,ro" in argv:
            return result(argv, 32, err="mount: permission denied")
        elif argv[0] == "umount":
            info.write_bytes(b"")
        return None

    info.write_bytes(b"")
    runner = FakeRunner(handler)
    m = Mounter(runner, mountinfo=str(info))
    with pytest.raises(MountError, match="permission denied"):
        m.bind("/src", str(target), read_only=True)
    assert runner.calls[-1] == ("umount", "--", str(target))
    assert not m.is_mount_point(str(target))


def test_unmount_is_idempotent_and_peels_stacked_mounts(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    target = tmp_path / "t"
    lines = [f"{40 + i} 1 8:1 / {target} rw - ext4 /dev/sda1 rw\n" for i in range(2)]
    info.write_text("".join(lines))

    def handler(argv: tuple[str, ...]) -> CommandResult | None:
        lines.pop()
        info.write_text("".join(lines))
        return None

    runner = FakeRunner(handler)
    m = Mounter(runner, mountinfo=str(info))
    assert m.unmount(str(target)) is True
    assert runner.calls == [("umount", "--", str(target))] * 2
    assert m.unmount(str(target)) is False
    assert len(runner.calls) == 2  # nothing mounted: no command run


def test_lazy_unmount_only_when_asked(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(f"40 1 8:1 / {tmp_path} rw - ext4 /dev/sda1 rw\n")

    def handler(argv: tuple[str, ...]) -> CommandResult | None:
        info.write_text("")
        return None

    runner = FakeRunner(handler)
    Mounter(runner, mountinfo=str(info)).unmount(str(tmp_path), lazy=True)
    assert runner.calls == [("umount", "--lazy", "--", str(tmp_path))]


def test_unmount_failure_while_still_mounted_is_reported(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(f"40 1 8:1 / {tmp_path} rw - ext4 /dev/sda1 rw\n")
    runner = FakeRunner(lambda argv: result(argv, 32, err=f"umount: {tmp_path}: target is busy."))
    with pytest.raises(MountError, match="target is busy"):
        Mounter(runner, mountinfo=str(info)).unmount(str(tmp_path))


def test_unmount_race_with_someone_else_is_fine(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(f"40 1 8:1 / {tmp_path} rw - ext4 /dev/sda1 rw\n")

    def handler(argv: tuple[str, ...]) -> CommandResult | None:
        info.write_text("")  # someone else unmounted it just before us
        return result(argv, 32, err="umount: not mounted.")

    assert Mounter(FakeRunner(handler), mountinfo=str(info)).unmount(str(tmp_path)) is True


def test_mount_timeout_is_reported_as_such(tmp_path: Path, mountinfo: Path) -> None:
    def handler(argv: tuple[str, ...]) -> CommandResult | None:
        raise CommandError(argv, None, timed_out=True)

    m = Mounter(FakeRunner(handler), mountinfo=str(mountinfo), timeout=3)
    with pytest.raises(MountError, match="timed out after 3 s"):
        m.mount("/dev/x", str(tmp_path), "xfs")


# --- targets ------------------------------------------------------------------------------


def test_dir_target_is_created_with_parents_and_mode(tmp_path: Path, mountinfo: Path) -> None:
    m = Mounter(FakeRunner(), mountinfo=str(mountinfo))
    target = tmp_path / "a" / "b"
    old = os.umask(0o022)
    try:
        m.make_dir_target(str(target))
        m.make_dir_target(str(target))  # again: fine
    finally:
        os.umask(old)
    assert target.is_dir() and (target.stat().st_mode & 0o777) == 0o750


def test_file_target_is_an_empty_regular_file(tmp_path: Path, mountinfo: Path) -> None:
    m = Mounter(FakeRunner(), mountinfo=str(mountinfo))
    target = tmp_path / "dev" / "blk"
    m.make_file_target(str(target))
    m.make_file_target(str(target))
    assert target.is_file() and target.stat().st_size == 0
    with pytest.raises(UnsafePathError, match="not a regular file"):
        m.make_file_target(str(tmp_path / "dev"))
    with pytest.raises(UnsafePathError, match="not a directory"):
        m.make_dir_target(str(target))


def test_symlinked_targets_are_refused_and_not_followed(tmp_path: Path, mountinfo: Path) -> None:
    runner = FakeRunner()
    m = Mounter(runner, mountinfo=str(mountinfo))
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("data")
    link = tmp_path / "link"
    link.symlink_to(victim)
    flink = tmp_path / "flink"
    flink.symlink_to(victim / "keep")
    calls: list[Callable[[], object]] = [
        lambda: m.make_dir_target(str(link)),
        lambda: m.make_file_target(str(flink)),
        lambda: m.remove_target(str(link)),
        lambda: m.bind("/src", str(link)),
        lambda: m.mount("/dev/x", str(link), "ext4"),
    ]
    for call in calls:
        with pytest.raises(UnsafePathError, match="symbolic link"):
            call()
    assert runner.calls == []
    assert link.is_symlink() and (victim / "keep").read_text() == "data"


def test_remove_target_removes_only_what_we_make(tmp_path: Path, mountinfo: Path) -> None:
    m = Mounter(FakeRunner(), mountinfo=str(mountinfo))
    d = tmp_path / "d"
    d.mkdir()
    f = tmp_path / "f"
    f.touch()
    m.remove_target(str(d))
    m.remove_target(str(f))
    assert not d.exists() and not f.exists()
    m.remove_target(str(d))  # gone already: fine

    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    data = tmp_path / "data"
    data.write_text("precious")
    with pytest.raises(UnsafePathError, match="not empty"):
        m.remove_target(str(full))
    with pytest.raises(UnsafePathError, match="not an empty file"):
        m.remove_target(str(data))
    assert (full / "x").exists() and data.read_text() == "precious"


def test_remove_target_refuses_a_mount_point(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    target = tmp_path / "t"
    target.mkdir()
    info.write_text(f"40 1 8:1 / {target} rw - ext4 /dev/sda1 rw\n")
    with pytest.raises(MountError, match="still a mount point"):
        Mounter(FakeRunner(), mountinfo=str(info)).remove_target(str(target))
    assert target.is_dir()


# --- filesystems --------------------------------------------------------------------------


@pytest.fixture
def any_block_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit tests have no block devices: let every path pass the block-device check."""
    monkeypatch.setattr(Filesystems, "_require_block_device", staticmethod(lambda _d: None))


@pytest.mark.usefixtures("any_block_device")
def test_probe_distinguishes_blank_filesystem_other_data_and_errors() -> None:
    outputs = {
        "/dev/blank": (2, "", ""),
        "/dev/ext4": (0, "DEVNAME=/dev/ext4\nTYPE=ext4\nUSAGE=filesystem\n", ""),
        "/dev/pv": (0, "TYPE=LVM2_member\nUSAGE=raid\n", ""),
        "/dev/gpt": (0, "PTUUID=abc\nPTTYPE=gpt\n", ""),
        "/dev/bad": (4, "", "blkid: error: /dev/bad: Input/output error"),
        "/dev/ambivalent": (8, "", ""),
    }

    def handler(argv: tuple[str, ...]) -> CommandResult:
        rc, out, err = outputs[argv[-1]]
        return result(argv, rc, out, err)

    runner = FakeRunner(handler)
    fs = Filesystems(runner)
    assert fs.probe("/dev/blank") is None
    assert fs.probe("/dev/ext4") == Signature("ext4", "filesystem")
    assert fs.probe("/dev/ext4") is not None and fs.probe("/dev/ext4").is_filesystem  # type: ignore[union-attr]
    pv = fs.probe("/dev/pv")
    assert pv == Signature("LVM2_member", "raid") and not pv.is_filesystem
    assert fs.probe("/dev/gpt") == Signature("gpt", "partition table")
    with pytest.raises(FilesystemError, match="Input/output error"):
        fs.probe("/dev/bad")
    with pytest.raises(FilesystemError, match="status 8"):
        fs.probe("/dev/ambivalent")
    assert runner.calls[0] == ("blkid", "-p", "-o", "export", "--", "/dev/blank")


def test_probe_refuses_what_is_not_a_block_device(tmp_path: Path) -> None:
    runner = FakeRunner()
    fs = Filesystems(runner)
    with pytest.raises(FilesystemError, match="not a block device"):
        fs.probe(str(tmp_path))
    with pytest.raises(FilesystemError, match="No such file"):
        fs.probe(str(tmp_path / "missing"))
    assert runner.calls == []  # blkid's "nothing found" would have looked like a blank device


@pytest.mark.usefixtures("any_block_device")
def test_format_only_a_blank_device() -> None:
    holds: dict[str, str] = {"/dev/used": "TYPE=xfs\nUSAGE=filesystem\n"}

    def handler(argv: tuple[str, ...]) -> CommandResult | None:
        if argv[0] == "blkid":
            text = holds.get(argv[-1])
            return result(argv, 0, text) if text else result(argv, 2)
        return None

    runner = FakeRunner(handler)
    fs = Filesystems(runner)
    fs.format("/dev/blank", "ext4")
    fs.format("/dev/blank", "xfs")
    assert [c for c in runner.calls if c[0] != "blkid"] == [
        ("mkfs.ext4", "-q", "-m", "0", "-E", "nodiscard", "/dev/blank"),
        ("mkfs.xfs", "-q", "-K", "/dev/blank"),
    ]
    n = len(runner.calls)
    with pytest.raises(FilesystemError, match="already holds xfs"):
        fs.format("/dev/used", "ext4")
    with pytest.raises(FilesystemError, match="supported: ext2, ext3, ext4, xfs"):
        fs.format("/dev/blank", "zfs")
    assert not any(c[0].startswith("mkfs") for c in runner.calls[n:])


def test_resize_commands_per_filesystem() -> None:
    runner = FakeRunner()
    fs = Filesystems(runner)
    fs.resize("/dev/loop1", "/mnt/a", "ext4")
    fs.resize("/dev/loop1", "/mnt/a", "xfs")
    assert runner.calls == [("resize2fs", "/dev/loop1"), ("xfs_growfs", "/mnt/a")]
    assert runner.timeouts == [fsmod.RESIZE_TIMEOUT] * 2
    with pytest.raises(FilesystemError, match="not supported"):
        fs.resize("/dev/loop1", "/mnt/a", "vfat")


@pytest.mark.usefixtures("any_block_device")
def test_block_device_size_and_read_only_flag() -> None:
    def handler(argv: tuple[str, ...]) -> CommandResult:
        if argv[1] == "--getsize64":
            return result(argv, 0, "1073741824\n" if argv[2] == "/dev/a" else "garbage")
        if argv[1] == "--getro":
            return result(argv, 0, "1\n")
        return result(argv, 1, err="blockdev: cannot open")

    fs = Filesystems(FakeRunner(handler))
    assert fs.block_device_size("/dev/a") == 1 << 30
    with pytest.raises(FilesystemError, match="garbage"):
        fs.block_device_size("/dev/b")
    assert fs.is_read_only("/dev/a") is True
    with pytest.raises(FilesystemError, match="cannot open"):
        fs.set_read_only("/dev/a", True)


def test_usage_reports_bytes_and_inodes(tmp_path: Path) -> None:
    usage = Filesystems.usage(str(tmp_path))
    st = os.statvfs(tmp_path)
    assert usage.total_bytes == st.f_blocks * st.f_frsize > 0
    assert 0 <= usage.used_bytes <= usage.total_bytes
    assert 0 <= usage.available_bytes <= usage.total_bytes
    with pytest.raises(FilesystemError, match="statvfs"):
        Filesystems.usage(str(tmp_path / "missing"))
