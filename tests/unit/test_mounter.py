"""The system layer for mounts and filesystems, without root: a recording runner stands in for
blkid/mkfs, a file in tmp_path for /proc/self/mountinfo, a fake for the kernel's mount calls.

The real commands are exercised by tests/integration/test_node.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from csi_driver import callmemo
from csi_driver.system import filesystem as fsmod
from csi_driver.system import mountflags
from csi_driver.system.confined import Jail, PathMissing, PathRefused
from csi_driver.system.filesystem import FilesystemError, Filesystems, Signature
from csi_driver.system.mountcalls import (
    MOUNT_ATTR__ATIME,
    MOUNT_ATTR_NOATIME,
    MOUNT_ATTR_NOSUID,
    MOUNT_ATTR_RDONLY,
    Attributes,
    MountCalls,
)
from csi_driver.system.mounter import Mounter, MountError, covering, parse_mountinfo
from csi_driver.system.runner import CommandResult
from tests.fake_runner import FakeRunner, result

MOUNTINFO = (
    b"22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard\n"
    b"30 22 0:39 / /tmp/with\\040space\\011tab rw,nosuid,nodev - tmpfs tmp\\134fs rw,size=10k\n"
    b"31 22 254:0 /srv/vols/v1 /mnt/target ro,noexec shared:5 master:2 - ext4 /dev/vda rw\n"
    b"32 31 0:6 /loop3 /mnt/target/dev rw - devtmpfs devtmpfs rw,mode=755\n"
    b"this line is not mountinfo\n"
    b"33 22 254:0 /srv/vols/v1 /mnt/other rw - ext4 /dev/vda rw\n"
)


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
    m = Mounter(mountinfo=str(mountinfo))
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
    m = Mounter(mountinfo=str(mountinfo))
    assert m.key_of("/srv/vols/v1") == (254, 0, "/srv/vols/v1")
    assert m.key_of("/mnt/target/x/y") == (254, 0, "/srv/vols/v1/x/y")
    assert m.key_of("/mnt/target/dev") == (0, 6, "/loop3")


def test_a_removed_directory_still_counts_as_the_same_mount(mountinfo: Path) -> None:
    entry = parse_mountinfo(b"40 22 254:0 /srv/vols/v1//deleted /mnt/x rw - ext4 /dev/vda rw\n")[0]
    assert entry.shows((254, 0, "/srv/vols/v1"))
    assert not entry.shows((254, 0, "/srv/vols/v2"))
    assert not entry.shows(None)


# --- mount flags --------------------------------------------------------------------------


def test_flags_are_split_checked_and_sorted_by_owner() -> None:
    flags = mountflags.parse(["noexec,nosuid", "discard", "defaults", "noexec"])
    assert flags == ["noexec", "nosuid", "discard"]
    assert mountflags.per_mount(flags) == ["noexec", "nosuid"]
    assert mountflags.per_filesystem(flags) == ["discard"]


@pytest.mark.parametrize(
    "bad",
    ["bind", "remount", "loop=/dev/loop0", "x-mount.mkdir", "a,,b", "with space", "a" * 300],
)
def test_operations_and_malformed_flags_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        mountflags.parse([bad])


def test_missing_flags_read_negations_from_mountinfo() -> None:
    assert mountflags.missing(["noexec", "nodev"], ("rw", "noexec")) == ["nodev"]
    assert mountflags.missing(["exec"], ("rw", "noexec")) == ["exec"]
    assert mountflags.missing(["ro"], ("rw",)) == ["ro"]


def test_attributes_set_and_clear_bits() -> None:
    a = Attributes.of(["ro", "nosuid", "noatime"])
    assert a.set & MOUNT_ATTR_RDONLY and a.set & MOUNT_ATTR_NOSUID
    assert a.set & MOUNT_ATTR__ATIME == MOUNT_ATTR_NOATIME and a.clear & MOUNT_ATTR__ATIME
    b = Attributes.of(["ro", "rw"])  # the last word wins
    assert not b.set & MOUNT_ATTR_RDONLY and b.clear & MOUNT_ATTR_RDONLY
    with pytest.raises(ValueError):
        Attributes.of(["discard"])


# --- confined paths -----------------------------------------------------------------------


def test_paths_outside_the_base_are_refused(tmp_path: Path) -> None:
    jail = Jail(str(tmp_path / "kubelet"))
    (tmp_path / "kubelet").mkdir()
    for bad in ("/etc", str(tmp_path / "kubelet"), str(tmp_path / "kubeletx" / "a"), "/"):
        with pytest.raises(PathRefused), jail.resolve(bad):
            pass


def test_symlinked_parents_and_files_on_the_way_are_refused(tmp_path: Path) -> None:
    base = tmp_path / "kubelet"
    (base / "pods").mkdir(parents=True)
    (base / "link").symlink_to("/etc")
    (base / "file").write_text("x")
    jail = Jail(str(base))
    for bad in (base / "link" / "x", base / "file" / "x", base / "link" / "a" / "b"):
        with pytest.raises(PathRefused), jail.resolve(str(bad), create_parents=True):
            pass
    assert not Path("/etc/x").exists() and not Path("/etc/a").exists()
    with pytest.raises(PathRefused), jail.resolve(str(base / "pods" / ("n" * 256))):
        pass


def test_missing_parents_are_made_only_when_asked(tmp_path: Path) -> None:
    base = tmp_path / "kubelet"
    base.mkdir()
    jail = Jail(str(base))
    target = base / "pods" / "uid" / "volume"
    with pytest.raises(PathMissing), jail.resolve(str(target)):
        pass
    assert not (base / "pods").exists()
    with jail.resolve(str(target), create_parents=True) as where:
        assert where.path == str(target) and where.lstat() is None
        assert where.make_dir(0o750) is True
        assert where.make_dir(0o750) is False  # it exists now
        assert not where.remove_empty("v1")  # not tagged: somebody else's, left alone
        where.tag("v1")
        assert not where.remove_empty("v2")  # made for another volume
        assert where.remove_empty("v1")
    assert (base / "pods" / "uid").is_dir() and not target.exists()


def test_the_last_component_is_never_followed(tmp_path: Path) -> None:
    base = tmp_path / "kubelet"
    base.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (base / "leaf").symlink_to(outside)
    jail = Jail(str(base))
    with jail.resolve(str(base / "leaf")) as where:
        with pytest.raises(PathRefused):
            where.make_dir(0o750)
        with pytest.raises(PathRefused):
            where.make_file(0o640)
        with pytest.raises(PathRefused):
            where.open()
        assert not where.remove_empty("v1")
    assert (base / "leaf").is_symlink() and outside.is_dir()


def test_only_empty_files_and_directories_are_removed(tmp_path: Path) -> None:
    base = tmp_path / "kubelet"
    base.mkdir()
    (base / "data").write_text("keep")
    (base / "full").mkdir()
    (base / "full" / "x").write_text("keep")
    jail = Jail(str(base))
    for name in ("data", "full"):
        with jail.resolve(str(base / name)) as where:
            where.tag("v1")
            assert not where.is_empty()
            assert not where.remove_empty("v1")
    assert (base / "data").read_text() == "keep" and (base / "full" / "x").exists()


def test_the_walk_crosses_a_mount_only_right_below_the_base(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tmp_path / "kubelet"
    (base / "pods" / "uid" / "volumes").mkdir(parents=True)
    ids = {str(base): 1, str(base / "pods"): 2, str(base / "pods" / "uid"): 2}
    ids[str(base / "pods" / "uid" / "volumes")] = 3  # something mounted here

    def fake_mount_id(fd: int) -> int:
        return ids[os.readlink(f"/proc/self/fd/{fd}")]

    monkeypatch.setattr("csi_driver.system.confined.mount_id", fake_mount_id)
    jail = Jail(str(base))
    with jail.resolve(str(base / "pods" / "uid" / "target")) as where:
        assert where.path == str(base / "pods" / "uid" / "target")
    with (
        pytest.raises(PathRefused, match="mount point"),
        jail.resolve(str(base / "pods" / "uid" / "volumes" / "target")),
    ):
        pass


def test_a_symlinked_base_has_one_canonical_spelling(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    jail = Jail(str(tmp_path / "link"))
    assert jail.canonical(str(tmp_path / "link" / "pods" / "t")) == str(real / "pods" / "t")
    assert jail.canonical(str(real / "pods" / "t")) == str(real / "pods" / "t")


# --- unmounting only one's own mounts -----------------------------------------------------


class FakeCalls(MountCalls):
    def __init__(self, table: Path) -> None:
        self.table = table
        self.unmounted: list[str] = []

    def unmount(self, path: str, *, lazy: bool = False) -> None:
        self.unmounted.append(path)
        lines = self.table.read_bytes().splitlines(keepends=True)
        self.table.write_bytes(b"".join(lines[:-1]))


def test_unmount_stops_at_a_mount_that_is_not_ours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tmp_path / "kubelet"
    (base / "t").mkdir(parents=True)
    table = tmp_path / "mountinfo"
    table.write_bytes(
        f"50 22 254:0 /theirs {base}/t rw - ext4 /dev/vda rw\n"
        f"51 50 254:0 /ours {base}/t rw - ext4 /dev/vda rw\n".encode()
    )
    calls = FakeCalls(table)
    m = Mounter(calls, mountinfo=str(table))
    ids = iter([51, 50])
    monkeypatch.setattr("csi_driver.system.mounter.mount_id", lambda fd: next(ids))
    with callmemo.call() as memo, Jail(str(base)).resolve(str(base / "t")) as where:
        memo["lvm report"] = "LV open"
        assert m.unmount(where, lambda e: e.root == "/ours") is True
        assert memo == {}  # an unmount changes what lvm2 says of the device: forgotten
        assert m.unmount(where, lambda e: e.root == "/ours") is False
    assert calls.unmounted == [f"{base}/t"]
    assert m.mount_at(f"{base}/t") is not None  # theirs is still there


def test_unmount_refuses_when_the_path_leads_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tmp_path / "kubelet"
    (base / "t").mkdir(parents=True)
    table = tmp_path / "mountinfo"
    table.write_bytes(f"51 22 254:0 /ours {base}/t rw - ext4 /dev/vda rw\n".encode())
    calls = FakeCalls(table)
    monkeypatch.setattr("csi_driver.system.mounter.mount_id", lambda fd: 99)
    with Jail(str(base)).resolve(str(base / "t")) as where, pytest.raises(MountError):
        Mounter(calls, mountinfo=str(table)).unmount(where, lambda e: True)
    assert calls.unmounted == []


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
def test_block_device_size_and_read_only_flag(tmp_path: Path) -> None:
    """Error paths only: the size and the read-only flag are asked in-process (no program);
    tests/integration/test_node.py sets and reads the flag of a real loop device."""
    fs = Filesystems(FakeRunner())
    sized = tmp_path / "sized"
    sized.write_bytes(b"\0" * 4096)  # the size is read by seeking to the end, in-process
    assert fs.block_device_size(str(sized)) == 4096
    with pytest.raises(FilesystemError, match="No such file"):
        fs.block_device_size(str(tmp_path / "missing"))
    with pytest.raises(FilesystemError, match=r"reading the read-only flag of .*sized failed"):
        fs.is_read_only(str(sized))  # a regular file has no such flag (ENOTTY)
    with pytest.raises(FilesystemError, match=r"setting the read-only flag of .*missing failed"):
        fs.set_read_only(str(tmp_path / "missing"), True)


def test_usage_reports_bytes_and_inodes(tmp_path: Path) -> None:
    usage = Filesystems.usage(str(tmp_path))
    st = os.statvfs(tmp_path)
    assert usage.total_bytes == st.f_blocks * st.f_frsize > 0
    assert 0 <= usage.used_bytes <= usage.total_bytes
    assert 0 <= usage.available_bytes <= usage.total_bytes
    with pytest.raises(FilesystemError, match="statvfs"):
        Filesystems.usage(str(tmp_path / "missing"))


def test_covering_picks_the_longest_then_the_topmost_mount() -> None:
    table = parse_mountinfo(
        b"1 0 8:1 / / rw - ext4 /dev/sda1 rw\n"
        b"2 1 8:2 / /var rw - ext4 /dev/sda2 rw\n"
        b"3 2 7:0 / /var/lib rw - xfs /dev/loop0 rw\n"
        b"4 2 7:1 / /var/lib rw - xfs /dev/loop1 rw\n"
    )
    assert covering(table, "/var/lib/x").source == "/dev/loop1"  # type: ignore[union-attr]
    assert covering(table, "/var/libx").source == "/dev/sda2"  # type: ignore[union-attr]
    assert covering(table, "/etc").source == "/dev/sda1"  # type: ignore[union-attr]
    assert covering(table[1:], "/etc") is None
