"""HostPathBackend for real, as root: real directories, sparse images, loop devices, copies.

Every test works on a root below the lane's ``workdir`` fixture, whose finaliser fails the
test if a mount or a loop device backed by a file below it is left behind. Our own
finaliser detaches every block volume through the backend first, so a leak the backend
causes shows up as that failure. Data is checked byte for byte: written through a loop
device and read back from the image, copied by a snapshot, restored, cloned, and still
there after a restart.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from csi_driver import ids
from csi_driver.backends.hostpath.backend import HostPathBackend
from csi_driver.backends.hostpath.layout import IMAGE_NAME
from csi_driver.errors import (
    CsiError,
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
)
from csi_driver.model import (
    AccessType,
    AttachmentKind,
    ContentSource,
    Parameters,
    SourceKind,
    Volume,
    VolumeSpec,
)
from csi_driver.units import MiB
from testkit.hostpath_backends import Backends

NODE = "it-node"
pytestmark = pytest.mark.root


def run(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr}"
    return proc.stdout


def device_size(device: str) -> int:
    return int(run("blockdev", "--getsize64", device))


def loops_of(image: Path) -> list[str]:
    out = run("losetup", "--list", "--noheadings", "--output", "NAME", "--associated", str(image))
    return out.split()


class Env(Backends):
    """Backends on one root; a new one is a restart. Finalised by :meth:`teardown`."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir / "root", NODE, 512 * MiB)
        self.workdir = workdir

    def teardown(self) -> None:
        backend = self.current or (self.open() if (self.root / "state.db").exists() else None)
        if backend is not None:
            for volume in backend.list_volumes():
                if volume.access_type is AccessType.BLOCK:
                    backend.detach(volume.id)
        self.close()

    def data(self, volume: Volume) -> Path:
        path = self.root / "volumes" / volume.id.partition("@")[0]
        return path / IMAGE_NAME if volume.access_type is AccessType.BLOCK else path


@pytest.fixture
def env(workdir: Path) -> Iterator[Env]:
    e = Env(workdir)
    try:
        yield e
    finally:
        e.teardown()


def spec(
    name: str, size: int, access: AccessType = AccessType.MOUNT, source: ContentSource | None = None
) -> VolumeSpec:
    return VolumeSpec(name, size, access, "", content_source=source)


def tree(path: Path) -> dict[str, tuple[object, ...]]:
    """Everything that a copy must keep, per relative path."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                content: object = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                content = None
            xattrs = (
                {}
                if stat.S_ISLNK(st.st_mode)
                else {k: os.getxattr(p, k) for k in os.listxattr(p) if k.startswith("user.")}
            )
            out[str(p.relative_to(path))] = (
                stat.S_IFMT(st.st_mode),
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                content,
                tuple(sorted(xattrs.items())),
            )
    return out


def fill_tree(path: Path, version: bytes) -> None:
    (path / "dir" / "deeper").mkdir(parents=True, exist_ok=True)
    (path / "dir" / "deeper" / "data.bin").write_bytes(version + os.urandom(300_000))
    (path / "owned").write_bytes(b"owned by 1234:5678")
    os.chown(path / "owned", 1234, 5678)
    os.chmod(path / "owned", 0o640)
    os.setxattr(path / "owned", "user.note", b"kept")
    if not (path / "link").is_symlink():
        os.symlink("dir/deeper/data.bin", path / "link")


# --- directory and block volumes ---------------------------------------------------------------


def test_directory_volume_lifecycle(env: Env) -> None:
    backend = env.open()
    volume = backend.create_volume(spec("dir-vol", 8 * MiB))
    attachment = backend.attach(volume.id)
    assert attachment.kind is AttachmentKind.DIRECTORY
    assert Path(attachment.path) == env.data(volume)
    assert stat.S_IMODE(os.stat(attachment.path).st_mode) == 0o777
    (Path(attachment.path) / "file").write_bytes(b"payload")
    backend.detach(volume.id)
    assert (Path(attachment.path) / "file").read_bytes() == b"payload"
    backend.delete_volume(volume.id)
    assert not env.data(volume).exists()
    assert backend.get_volume(volume.id) is None
    backend.delete_volume(volume.id)  # again: still fine


def test_block_volume_reads_and_writes_through_its_loop_device(env: Env) -> None:
    backend = env.open()
    volume = backend.create_volume(spec("blk", 16 * MiB + 4096, AccessType.BLOCK))
    image = env.data(volume)
    assert volume.capacity_bytes == 16 * MiB + 4096 == image.stat().st_size
    assert image.stat().st_blocks * 512 < MiB, "the image must be sparse"
    before = os.urandom(4096)
    with image.open("r+b") as f:
        f.seek(5 * MiB)
        f.write(before)

    attachment = backend.attach(volume.id)
    assert attachment.kind is AttachmentKind.BLOCK_DEVICE
    device = attachment.path
    assert stat.S_ISBLK(os.stat(device).st_mode)
    assert backend.attach(volume.id) == attachment, "attach must be idempotent"
    assert loops_of(image) == [device]
    assert device_size(device) == volume.capacity_bytes

    fd = os.open(device, os.O_RDWR)
    try:
        assert os.pread(fd, 4096, 5 * MiB) == before
        after = os.urandom(8192)
        os.pwrite(fd, after, 9 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    with image.open("rb") as f:
        f.seek(9 * MiB)
        assert f.read(8192) == after

    backend.detach(volume.id)
    assert loops_of(image) == []
    backend.detach(volume.id)
    backend.delete_volume(volume.id)
    assert not image.exists() and not image.parent.exists()


def test_an_attachment_survives_a_restart(env: Env) -> None:
    backend = env.open()
    volume = backend.create_volume(spec("blk", 8 * MiB, AccessType.BLOCK))
    device = backend.attach(volume.id).path
    backend = env.open()
    assert backend.attach(volume.id).path == device
    assert loops_of(env.data(volume)) == [device]
    backend.detach(volume.id)
    assert loops_of(env.data(volume)) == []


def test_expanding_a_block_volume_grows_its_loop_device(env: Env) -> None:
    backend = env.open()
    volume = backend.create_volume(spec("blk", 8 * MiB, AccessType.BLOCK))
    device = backend.attach(volume.id).path
    payload = os.urandom(MiB)
    fd = os.open(device, os.O_RDWR)
    try:
        os.pwrite(fd, payload, 7 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    grown = backend.expand_volume(volume.id, 20 * MiB)
    assert grown.capacity_bytes == 20 * MiB == env.data(volume).stat().st_size
    assert device_size(device) == 8 * MiB, "the loop device keeps its size until refreshed"
    backend.refresh_attachment(volume.id)
    assert device_size(device) == 20 * MiB
    fd = os.open(device, os.O_RDONLY)
    try:
        assert os.pread(fd, MiB, 7 * MiB) == payload
        assert os.pread(fd, MiB, 19 * MiB) == bytes(MiB)
    finally:
        os.close(fd)
    assert backend.expand_volume(volume.id, 10 * MiB).capacity_bytes == 20 * MiB  # no shrink
    assert env.data(volume).stat().st_size == 20 * MiB
    backend.detach(volume.id)


# --- snapshots, restores, clones ---------------------------------------------------------------


def test_directory_snapshot_restore_and_clone_keep_every_byte(env: Env) -> None:
    backend = env.open()
    source = backend.create_volume(spec("src", 16 * MiB))
    fill_tree(env.data(source), b"v1")
    at_snapshot = tree(env.data(source))
    snap = backend.create_snapshot("snap", source.id, {})
    assert tree(env.root / "snapshots" / snap.id.partition("@")[0]) == at_snapshot

    fill_tree(env.data(source), b"v2")  # the source moves on
    now = tree(env.data(source))
    assert now != at_snapshot

    restored = backend.create_volume(
        spec("restored", 32 * MiB, source=ContentSource(SourceKind.SNAPSHOT, snap.id))
    )
    clone = backend.create_volume(
        spec("clone", 16 * MiB, source=ContentSource(SourceKind.VOLUME, source.id))
    )
    assert tree(env.data(restored)) == at_snapshot
    assert tree(env.data(clone)) == now
    assert restored.capacity_bytes == 32 * MiB

    backend.delete_volume(source.id)  # a snapshot does not depend on its volume
    again = backend.create_volume(
        spec("again", 16 * MiB, source=ContentSource(SourceKind.SNAPSHOT, snap.id))
    )
    assert tree(env.data(again)) == at_snapshot


def test_block_snapshot_restore_and_clone_keep_every_byte(env: Env) -> None:
    backend = env.open()
    source = backend.create_volume(spec("src", 16 * MiB, AccessType.BLOCK))
    device = backend.attach(source.id).path
    first = os.urandom(2 * MiB)
    fd = os.open(device, os.O_RDWR)
    try:
        os.pwrite(fd, first, 3 * MiB)
        os.fsync(fd)
        snap = backend.create_snapshot("snap", source.id, {})  # taken while attached
        second = os.urandom(2 * MiB)
        os.pwrite(fd, second, 3 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    snap_image = env.root / "snapshots" / snap.id.partition("@")[0] / IMAGE_NAME
    assert snap_image.stat().st_size == 16 * MiB and snap.size_bytes == 16 * MiB

    restored = backend.create_volume(
        spec("restored", 24 * MiB, AccessType.BLOCK, ContentSource(SourceKind.SNAPSHOT, snap.id))
    )
    clone = backend.create_volume(
        spec("clone", 16 * MiB, AccessType.BLOCK, ContentSource(SourceKind.VOLUME, source.id))
    )
    for volume, expected in ((restored, first), (clone, second)):
        dev = backend.attach(volume.id).path
        assert device_size(dev) == volume.capacity_bytes
        fd = os.open(dev, os.O_RDONLY)
        try:
            assert os.pread(fd, 2 * MiB, 3 * MiB) == expected
            assert os.pread(fd, MiB, 0) == bytes(MiB)
        finally:
            os.close(fd)
        backend.detach(volume.id)
    assert env.data(restored).stat().st_size == 24 * MiB
    assert env.data(restored).stat().st_blocks * 512 < 8 * MiB, "the copy stays sparse"
    backend.detach(source.id)


# --- restart, capacity -------------------------------------------------------------------------


def test_a_restart_loses_nothing(env: Env) -> None:
    backend = env.open(capacity=256 * MiB)
    d = backend.create_volume(spec("d", 8 * MiB))
    b = backend.create_volume(spec("b", 8 * MiB, AccessType.BLOCK))
    (env.data(d) / "f").write_bytes(b"kept")
    backend.set_published(d.id, NODE, True)
    snap = backend.create_snapshot("snap", d.id, {})
    volumes, snapshots = backend.list_volumes(), backend.list_snapshots()
    capacity = backend.capacity(Parameters())

    backend = env.open(capacity=256 * MiB)
    assert backend.list_volumes() == volumes
    assert backend.list_snapshots() == snapshots
    assert backend.capacity(Parameters()) == capacity
    assert (env.data(d) / "f").read_bytes() == b"kept"
    assert backend.get_snapshot(snap.id) == snap
    assert env.data(b).stat().st_size == 8 * MiB
    assert backend.health() is None


def test_a_restart_rolls_back_creations_nobody_was_given(env: Env) -> None:
    """A kill after the storage was built but before CreateVolume/CreateSnapshot answered leaves
    ``creating`` rows; if the CO never retries, the restart must not keep them forever."""
    from csi_driver.backends.hostpath.store import State

    backend = env.open(capacity=256 * MiB)
    empty = backend.capacity(Parameters())
    d = backend.create_volume(spec("half-done", 16 * MiB))
    b = backend.create_volume(spec("half-done-block", 8 * MiB, AccessType.BLOCK))
    snap = backend.create_snapshot("half-snap", d.id, {})
    (env.data(d) / "f").write_bytes(b"x" * 4096)
    for volume in (d, b):
        backend._store.set_volume_state(volume.id.partition("@")[0], State.CREATING)
    backend._store.set_snapshot_state(snap.id.partition("@")[0], State.CREATING)

    backend = env.open(capacity=256 * MiB)
    assert backend.list_volumes() == [] and backend.list_snapshots() == []
    assert not env.data(d).exists() and not env.data(b).parent.exists()
    assert not (env.root / "snapshots" / snap.id.partition("@")[0]).exists()
    assert backend.capacity(Parameters()) == empty
    # the CO's late retry still gets its volume, built afresh
    again = backend.create_volume(spec("half-done", 16 * MiB))
    assert again.id == d.id and not (env.data(again) / "f").exists()


def test_running_out_of_capacity_is_resource_exhausted(env: Env) -> None:
    backend = env.open(capacity=32 * MiB)
    backend.create_volume(spec("a", 24 * MiB, AccessType.BLOCK))
    with pytest.raises(ResourceExhausted):
        backend.create_volume(spec("b", 16 * MiB))
    with pytest.raises(ResourceExhausted):
        backend.create_volume(spec("c", 16 * MiB, AccessType.BLOCK))
    assert len(list((env.root / "volumes").iterdir())) == 1
    assert backend.capacity(Parameters()) == 8 * MiB
    backend.create_volume(spec("b", 8 * MiB))
    assert backend.capacity(Parameters()) == 0


# --- hostile ids and planted links -------------------------------------------------------------

HOSTILE_IDS = [
    f"v{'0' * 32}@../../outside",
    f"v../../../outside@{NODE}",
    "../outside",
    "../../outside/secret",
    f"v{'a' * 32}/../../../outside@{NODE}",
    f"v{'0' * 32}@{NODE}/../..",
    f"v{'0' * 32}@{NODE}\x00",
    f"s{'0' * 32}@{NODE}",  # a snapshot id where a volume id belongs
    "/etc/passwd",
    f"v{'0' * 31}@{NODE}",
    "",
]


def outside_state(workdir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(workdir)): p.read_bytes() if p.is_file() else b""
        for p in workdir.rglob("*")
        if not p.is_relative_to(workdir / "root")
    }


def lookups_of(backend: HostPathBackend, bad: str) -> list[Callable[[], object]]:
    """Every call that must answer NOT_FOUND for an id that names nothing of ours."""
    return [
        lambda: backend.attach(bad),
        lambda: backend.volume_condition(bad),
        lambda: backend.expand_volume(bad, 16 * MiB),
        lambda: backend.set_published(bad, NODE, True),
        lambda: backend.create_snapshot(f"s-{len(bad)}", bad, {}),
        lambda: backend.create_volume(
            spec("x", 8 * MiB, source=ContentSource(SourceKind.VOLUME, bad))
        ),
        lambda: backend.create_volume(
            spec("y", 8 * MiB, source=ContentSource(SourceKind.SNAPSHOT, bad))
        ),
    ]


def test_hand_made_ids_never_touch_anything_outside_the_root(env: Env) -> None:
    outside = env.workdir / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"do not touch")
    backend = env.open()
    real = backend.create_volume(spec("real", 8 * MiB))
    before = outside_state(env.workdir)
    for bad in HOSTILE_IDS:
        assert backend.get_volume(bad) is None
        assert backend.get_snapshot(bad) is None
        backend.delete_volume(bad)
        backend.delete_snapshot(bad)
        backend.detach(bad)
        backend.refresh_attachment(bad)
        for call in lookups_of(backend, bad):
            with pytest.raises(NotFound):
                call()
    assert outside_state(env.workdir) == before
    assert [v.id for v in backend.list_volumes()] == [real.id]


def test_planted_links_are_removed_never_followed(env: Env) -> None:
    outside = env.workdir / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"do not touch")
    backend = env.open()
    d = backend.create_volume(spec("d", 8 * MiB))
    b = backend.create_volume(spec("b", 8 * MiB, AccessType.BLOCK))
    # a pod plants a link to the host inside its volume
    os.symlink(outside, env.data(d) / "escape")
    snap = backend.create_snapshot("snap", d.id, {})
    snap_dir = env.root / "snapshots" / snap.id.partition("@")[0]
    assert (snap_dir / "escape").is_symlink() and not (snap_dir / "secret").exists()
    # someone swaps a block volume's image for a link to a host file
    env.data(b).unlink()
    os.symlink(outside / "secret", env.data(b))
    with pytest.raises(FailedPrecondition, match="missing"):
        backend.attach(b.id)
    assert backend.volume_condition(b.id).abnormal
    backend.delete_volume(d.id)
    backend.delete_volume(b.id)
    backend.delete_snapshot(snap.id)
    # a link where a volume directory belongs, with no volume, pointing at a directory whose
    # image some other user of the host has attached: swept at start, the device left alone
    host_image = outside / IMAGE_NAME
    with host_image.open("wb") as f:
        f.truncate(4 * MiB)
    host_device = run("losetup", "--find", "--show", str(host_image)).strip()
    try:
        planted = env.root / "volumes" / ids.volume_id_for("planted", NODE).partition("@")[0]
        os.symlink(outside, planted)
        env.open()
        assert not os.path.lexists(planted)
        assert loops_of(host_image) == [host_device]
    finally:
        run("losetup", "--detach", host_device)
    assert (outside / "secret").read_bytes() == b"do not touch"
    assert sorted(p.name for p in outside.iterdir()) == [IMAGE_NAME, "secret"]


# --- volumes in use ----------------------------------------------------------------------------


def test_a_mounted_volume_is_not_deleted(env: Env) -> None:
    backend = env.open()
    d = backend.create_volume(spec("d", 8 * MiB))
    b = backend.create_volume(spec("b", 32 * MiB, AccessType.BLOCK))
    (env.data(d) / "f").write_bytes(b"in use")
    target = env.workdir / "target"
    target.mkdir()
    fs_mount = env.workdir / "fs"
    fs_mount.mkdir()
    run("mount", "--bind", str(env.data(d)), str(target))
    try:
        with pytest.raises(FailedPrecondition, match="still in use"):
            backend.delete_volume(d.id)
    finally:
        run("umount", str(target))
    assert (env.data(d) / "f").read_bytes() == b"in use"
    device = backend.attach(b.id).path
    run("mkfs.ext4", "-q", device)
    run("mount", device, str(fs_mount))
    try:
        with pytest.raises(FailedPrecondition, match="still in use"):
            backend.delete_volume(b.id)
    finally:
        run("umount", str(fs_mount))
    assert loops_of(env.data(b)) == [device]
    backend.delete_volume(d.id)
    # attached, nothing mounted: still staged on this node (a block volume's stage is its loop
    # device), so still in use until the node detaches it
    with pytest.raises(FailedPrecondition, match=f"staged on this node as {device}"):
        backend.delete_volume(b.id)
    assert loops_of(env.data(b)) == [device]
    backend.detach(b.id)
    backend.delete_volume(b.id)
    assert backend.list_volumes() == []
    assert not os.path.lexists(env.data(b))


def test_errors_carry_csi_codes_not_exceptions_of_the_host(env: Env) -> None:
    backend = env.open()
    b = backend.create_volume(spec("b", 8 * MiB, AccessType.BLOCK))
    env.data(b).unlink()
    with pytest.raises(CsiError):
        backend.expand_volume(b.id, 16 * MiB)
    assert backend.volume_condition(b.id).abnormal
