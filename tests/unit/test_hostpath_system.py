"""The system pieces under the hostpath backend, without root: reading a project id, mount-table
lookups from a file standing in for mountinfo (the quota rules: tests/unit/test_project_quota.py).

Loop devices: tests/unit/test_loop.py; real ones: tests/integration/test_loop.py and
tests/integration/test_hostpath_backend.py; real quotas: tests/vm.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from csi_driver.system import fsinfo
from csi_driver.system.quota import QuotaError, project_of


def test_project_of_reads_the_inode_and_never_follows_a_link(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    assert project_of(tmp_path / "d") == (0, False)
    (tmp_path / "link").symlink_to(tmp_path / "d")
    with pytest.raises(QuotaError):
        project_of(tmp_path / "link")


MOUNTINFO = (
    b"22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
    b"40 22 7:1 / /srv rw - xfs /dev/loop1 rw,attr2,prjquota\n"
    b"41 40 7:2 / /srv/inner rw - ext4 /dev/loop2 rw\n"
    b"42 40 7:3 / /srv/inner rw - btrfs /dev/loop3 rw\n"
    b"43 22 254:0 /srv-data/vol /mnt/bind rw - ext4 /dev/vda rw\n"
)


def test_mount_of_picks_the_deepest_topmost_mount(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_bytes(MOUNTINFO)
    assert fsinfo.mount_of("/srv/a/b", str(info)).fs_type == "xfs"
    assert fsinfo.mount_of("/srv", str(info)).super_options[-1] == "prjquota"
    assert fsinfo.mount_of("/srv/inner/x", str(info)).fs_type == "btrfs"
    assert fsinfo.mount_of("/srvx", str(info)).fs_type == "ext4"
    assert fsinfo.fs_type_of("/", str(info)) == "ext4"


def test_mounts_showing_finds_binds_of_a_directory_and_below(tmp_path: Path) -> None:
    d = tmp_path / "vol"
    (d / "sub").mkdir(parents=True)
    st = d.stat()
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    info = tmp_path / "mountinfo"
    info.write_bytes(
        (
            f"22 1 {dev} / / rw - ext4 /dev/vda rw\n"
            f"50 22 {dev} {d} /mnt/staged rw - ext4 /dev/vda rw\n"
            f"51 22 {dev} {d}/sub /mnt/subpath rw - ext4 /dev/vda rw\n"
            f"52 22 {dev} {d}x /mnt/other rw - ext4 /dev/vda rw\n"
            f"53 22 99:9 {d} /mnt/elsewhere rw - ext4 /dev/vdb rw\n"
        ).encode()
    )
    assert fsinfo.mounts_showing(d, str(info)) == ["/mnt/staged", "/mnt/subpath"]


def test_space_and_missing_paths(tmp_path: Path) -> None:
    room = fsinfo.usage(tmp_path)
    assert 0 < room.available_bytes <= room.total_bytes
    assert 0 < room.used_inodes <= room.total_inodes
    with pytest.raises(fsinfo.FsInfoError):
        fsinfo.usage(tmp_path / "missing")


def test_wipe_zeroes_data_in_place_and_never_follows_links(tmp_path: Path) -> None:
    from csi_driver.system import extents

    volume = tmp_path / "vol"
    (volume / "sub").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep me")
    (volume / "sub" / "link").symlink_to(outside)
    data = volume / "sub" / "data"
    data.write_bytes(b"secret" * 100_000)
    sparse = volume / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(64 << 20)
        f.seek(32 << 20)
        f.write(b"secret")
    os.mkfifo(volume / "fifo")
    extents.wipe(volume)
    assert data.read_bytes() == bytes(600_000)
    with open(sparse, "rb") as f:
        f.seek(32 << 20)
        assert f.read(6) == bytes(6)
    assert os.stat(sparse).st_blocks * 512 < 8 << 20  # holes stayed holes
    assert outside.read_bytes() == b"keep me"
