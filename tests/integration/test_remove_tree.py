"""Removing a volume's directory tree in-process, on a real filesystem, as root.

What ``rm -r -f --one-file-system --preserve-root=all`` promised is kept: everything below is
removed, symlinks are removed and never followed, and nothing mounted inside is entered (a
bind mount of the same filesystem included, which ``st_dev`` alone would not tell): the
removal fails, naming the mount, and what is mounted there survives. Through the backend the
failure is DeleteVolume's FAILED_PRECONDITION (in use), the volume stays ``deleting`` and the
retry after the unmount finishes it. Every mount is undone in a ``finally``; the ``workdir``
fixture fails a test that leaves one.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_driver.backends.hostpath.backend import HostPathBackend
from csi_driver.backends.hostpath.store import State
from csi_driver.errors import CsiError
from csi_driver.model import AccessType, VolumeSpec
from csi_driver.system import fsinfo
from csi_driver.system.runner import SubprocessRunner
from csi_driver.units import MiB

pytestmark = pytest.mark.root

DEPTH = 1500  # deeper than the descriptors a process may hold by default (1024)


def run(*argv: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr}"


@contextlib.contextmanager
def mounted(*argv: str) -> Iterator[None]:
    """``mount argv...`` (its last argument the mount point), unmounted in any case."""
    run("mount", *argv)
    try:
        yield
    finally:
        run("umount", argv[-1])


def fill(tree: Path, outside: Path) -> None:
    """Nested directories and files, a deep chain, and symlinks leading outside."""
    (tree / "a" / "b" / "c").mkdir(parents=True)
    (tree / "a" / "f").write_text("f")
    (tree / "a" / "b" / "c" / "g").write_text("g")
    (tree / "empty").mkdir()
    os.mkfifo(tree / "a" / "fifo")
    os.symlink(outside, tree / "to-dir")
    os.symlink(outside / "kept", tree / "a" / "to-file")
    os.symlink("/nonexistent/x", tree / "dangling")
    fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(DEPTH):
            os.mkdir("d", dir_fd=fd)
            nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        with open(os.open("bottom", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd), "w") as f:
            f.write("deep")
    finally:
        os.close(fd)


@pytest.fixture
def outside(workdir: Path) -> Path:
    place = workdir / "outside"
    place.mkdir()
    (place / "kept").write_text("outside data")
    return place


def test_a_tree_is_removed_and_symlink_targets_survive(workdir: Path, outside: Path) -> None:
    tree = workdir / "tree"
    tree.mkdir()
    fill(tree, outside)
    fsinfo.remove_tree(tree)
    assert not os.path.lexists(tree)
    assert (outside / "kept").read_text() == "outside data"
    fsinfo.remove_tree(tree)  # gone already: nothing to do
    (workdir / "file").write_text("x")
    fsinfo.remove_tree(workdir / "file")
    assert not os.path.lexists(workdir / "file")


@pytest.mark.parametrize("kind", ["bind", "tmpfs"])
def test_a_mount_inside_is_not_crossed(workdir: Path, outside: Path, kind: str) -> None:
    tree = workdir / "tree"
    point = tree / "a" / "mnt"
    point.mkdir(parents=True)
    (tree / "a" / "f").write_text("f")
    (tree / "z").write_text("z")
    source = ["--bind", str(outside)] if kind == "bind" else ["-t", "tmpfs", "tmpfs"]
    with mounted(*source, str(point)):
        (point / "inside").write_text("mounted data")
        with pytest.raises(fsinfo.TreeNotRemoved, match=f"skipping {point}: a mount point"):
            fsinfo.remove_tree(tree)
        assert (point / "inside").read_text() == "mounted data"
        assert (outside / "kept").read_text() == "outside data"
        # everything else is gone; what holds the mount is left
        assert sorted(os.listdir(tree)) == ["a"]
        assert os.listdir(tree / "a") == ["mnt"]
    fsinfo.remove_tree(tree)
    assert not os.path.lexists(tree)
    assert (outside / "inside").exists() == (kind == "bind")


def test_a_mount_point_itself_is_refused_untouched(workdir: Path, outside: Path) -> None:
    point = workdir / "point"
    point.mkdir()
    with mounted("--bind", str(outside), str(point)):
        with pytest.raises(fsinfo.TreeNotRemoved, match="is a mount point"):
            fsinfo.remove_tree(point)
        assert (point / "kept").read_text() == "outside data"


def test_delete_volume_fails_on_a_mount_inside_and_its_retry_finishes(
    workdir: Path, outside: Path
) -> None:
    backend = HostPathBackend(workdir / "root", 64 * MiB, "it-node", SubprocessRunner())
    try:
        volume = backend.create_volume(VolumeSpec("pvc-mounted", MiB, AccessType.MOUNT, ""))
        local = volume.id.partition("@")[0]
        directory = backend.root / "volumes" / local
        fill(directory, outside)
        point = directory / "mnt"
        point.mkdir()
        with mounted("--bind", str(outside), str(point)):
            # a mount the volume's own path does not show (so not "in use"): only the
            # removal meets it
            with pytest.raises(CsiError) as failure:
                backend.delete_volume(volume.id)
            assert failure.value.code is grpc.StatusCode.FAILED_PRECONDITION
            assert f"cannot delete volume {local}" in failure.value.message
            assert "a mount point" in failure.value.message
            assert (point / "kept").read_text() == "outside data"
            row = backend._store.volume(local)
            assert row is not None and row.state is State.DELETING
        backend.delete_volume(volume.id)
        assert backend._store.volume(local) is None
        assert not os.path.lexists(directory)
        assert (outside / "kept").read_text() == "outside data"
    finally:
        backend.close()
