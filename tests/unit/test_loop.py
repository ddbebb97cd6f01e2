"""Loop devices without root: decoding ``struct loop_info64``, matching an image by device and
inode number, and the steps of attaching, detaching and resizing over a stand-in for the
kernel's table of bound devices (the only way to reach them here).

Real loop devices, compared with ``losetup --associated``: tests/integration/test_loop.py.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from csi_driver.system import loopinfo
from csi_driver.system.loop import LoopError, Loops, associated
from csi_driver.system.runner import CommandError
from tests.fake_runner import FakeRunner, result


def raw_status(
    dev: int, ino: int, flags: int = 0, name: bytes = b"/x/disk.img", offset: int = 0
) -> bytes:
    return loopinfo.LOOP_INFO64.pack(dev, ino, 0, offset, 0, 3, 0, 0, flags, name, b"", b"", 0, 0)


def status_of(path: Path, autoclear: bool = False) -> loopinfo.LoopStatus:
    st = os.stat(path)
    flags = loopinfo.LO_FLAGS_AUTOCLEAR if autoclear else 0
    return loopinfo.parse_status(raw_status(st.st_dev, st.st_ino, flags, os.fsencode(path)))


class Kernel:
    """The bound loop devices, as :func:`loopinfo.bound` would list them; ``losetup`` calls
    through :attr:`runner` change it as the real ones would."""

    def __init__(self, free: str = "/dev/loop9") -> None:
        self.devices: dict[str, tuple[Path, loopinfo.LoopStatus]] = {}
        self.free = free
        self.listed = 0
        self.runner = FakeRunner(lambda argv: result(argv, out=self._losetup(argv)))

    def bind(self, name: str, image: Path, autoclear: bool = False) -> None:
        self.devices[name] = (image, status_of(image, autoclear))

    def bound(self) -> list[loopinfo.BoundLoop]:
        self.listed += 1
        return [
            loopinfo.BoundLoop(name, str(image), status)
            for name, (image, status) in sorted(self.devices.items())
        ]

    def _losetup(self, argv: tuple[str, ...]) -> str:
        if "--find" in argv:
            self.bind(self.free, Path(argv[-1]))
            return self.free + "\n"
        if "--detach" in argv:
            self.devices.pop(argv[-1], None)
        return ""


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(b"")
    return path


def test_parse_status_reads_the_backing_file_numbers_and_flags() -> None:
    name = b"/var/lib/some/quite/long/path/that/goes/on/and/on/beyond/63/bytes/disk.img"
    got = loopinfo.parse_status(
        raw_status(0x801, 4242, loopinfo.LO_FLAGS_AUTOCLEAR, name[:63], offset=512)
    )
    assert (got.backing_device, got.backing_inode, got.offset) == (0x801, 4242, 512)
    assert got.autoclear and got.file_name == name[:63].decode()
    assert not loopinfo.parse_status(raw_status(1, 2, loopinfo.LO_FLAGS_READ_ONLY)).autoclear
    assert loopinfo.LOOP_INFO64.size == 232  # sizeof(struct loop_info64)


def test_an_image_is_matched_by_device_and_inode_never_by_name(tmp_path: Path) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    a.write_bytes(b"")
    b.write_bytes(b"")
    st = os.stat(a)
    devices = [
        loopinfo.BoundLoop("/dev/loop1", str(a), status_of(a)),
        loopinfo.BoundLoop("/dev/loop2", str(a), status_of(b)),  # same name, other file
        loopinfo.BoundLoop("/dev/loop3", f"{a} (deleted)", status_of(a, autoclear=True)),
        loopinfo.BoundLoop(  # same inode on another filesystem
            "/dev/loop4",
            str(a),
            loopinfo.parse_status(raw_status(st.st_dev + 1, st.st_ino)),
        ),
    ]
    got = associated(devices, st)
    # loop3's file was deleted: its inode number, now a's, belonged to another file
    assert [(d.name, d.backing_file, d.autoclear) for d in got] == [("/dev/loop1", str(a), False)]


def test_a_renamed_image_keeps_its_devices_and_a_new_file_at_its_path_has_none(
    image: Path,
) -> None:
    kernel = Kernel()
    kernel.bind("/dev/loop1", image)
    loops = Loops(kernel.runner, kernel.bound)
    moved = image.with_name("moved.img")
    image.rename(moved)
    assert loops.devices_for(image) == []  # no file there: the kernel is not even asked
    assert kernel.listed == 0
    assert [d.name for d in loops.devices_for(moved)] == ["/dev/loop1"]
    image.write_bytes(b"")
    assert loops.devices_for(image) == []
    assert kernel.runner.calls == []


def sysfs(root: Path, bound: dict[str, str], unbound: tuple[str, ...] = ()) -> Path:
    """A /sys/block with ``bound`` devices (name -> backing file) and ``unbound`` ones."""
    for name, backing in bound.items():
        (root / name / "loop").mkdir(parents=True)
        (root / name / "loop" / "backing_file").write_text(backing + "\n")
    for name in unbound:
        (root / name).mkdir(parents=True)
    return root


def failing(err: int, on: str) -> Callable[[str], loopinfo.LoopStatus]:
    def status(device: str) -> loopinfo.LoopStatus:
        if device == on:
            raise OSError(err, os.strerror(err), device)
        return loopinfo.parse_status(raw_status(1, int(device.removeprefix("/dev/loop"))))

    return status


@pytest.mark.parametrize("err", [errno.ENXIO, errno.ENOENT, errno.ENODEV])
def test_a_device_detached_while_being_read_is_not_bound(tmp_path: Path, err: int) -> None:
    block = sysfs(
        tmp_path,
        {"loop10": "/a (deleted)", "loop2": "/b", "loop3": "/c"},
        unbound=("loop0", "loop-control", "loopx", "vda"),
    )
    got = loopinfo.bound(str(block), "/dev", failing(err, "/dev/loop3"))
    assert [(d.name, d.backing_file, d.status.backing_inode) for d in got] == [
        ("/dev/loop2", "/b", 2),
        ("/dev/loop10", "/a (deleted)", 10),
    ]


def test_any_other_failure_to_read_a_device_is_raised(tmp_path: Path, image: Path) -> None:
    block = sysfs(tmp_path / "block", {"loop1": "/a", "loop2": "/b"})
    status = failing(errno.EACCES, "/dev/loop2")
    with pytest.raises(PermissionError):
        loopinfo.bound(str(block), "/dev", status)
    loops = Loops(FakeRunner(), lambda: loopinfo.bound(str(block), "/dev", status))
    with pytest.raises(LoopError, match=r"cannot list the loop devices of .*disk\.img"):
        loops.devices_for(image)


def test_attach_reuses_a_live_device_and_skips_one_that_is_clearing(image: Path) -> None:
    kernel = Kernel()
    kernel.bind("/dev/loop1", image, autoclear=True)
    kernel.bind("/dev/loop2", image)
    assert Loops(kernel.runner, kernel.bound).attach(image) == "/dev/loop2"
    assert kernel.runner.calls == []

    kernel = Kernel()
    kernel.bind("/dev/loop1", image, autoclear=True)
    assert Loops(kernel.runner, kernel.bound).attach(image) == "/dev/loop9"
    assert kernel.runner.calls == [
        ("losetup", "--find", "--show", "--direct-io=off", "--", str(image))
    ]


def test_attach_rejects_odd_losetup_output(image: Path) -> None:
    runner = FakeRunner(lambda argv: result(argv, out="something else"))
    with pytest.raises(LoopError, match="instead of a loop device"):
        Loops(runner, list).attach(image)


def test_detach_and_refresh_touch_every_device_of_the_image(image: Path) -> None:
    kernel = Kernel()
    kernel.bind("/dev/loop1", image)
    kernel.bind("/dev/loop2", image, autoclear=True)
    loops = Loops(kernel.runner, kernel.bound)
    assert loops.refresh(image) == ["/dev/loop1"]
    assert kernel.runner.calls == [("losetup", "--set-capacity", "/dev/loop1")]
    assert loops.detach_all(image) == ["/dev/loop1", "/dev/loop2"]
    assert kernel.runner.calls[1:] == [
        ("losetup", "--detach", "/dev/loop1"),
        ("losetup", "--detach", "/dev/loop2"),
    ]
    assert kernel.devices == {}


def test_detach_waits_a_little_for_a_device_held_open_elsewhere(
    image: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kernel = Kernel()
    kernel.bind("/dev/loop1", image, autoclear=True)
    kernel.runner = FakeRunner()  # held open: the detach leaves it, clearing itself
    looks = []

    def bound() -> list[loopinfo.BoundLoop]:
        looks.append(1)
        return kernel.bound() if len(looks) < 4 else []

    assert Loops(kernel.runner, bound).detach_all(image, settle=5.0) == ["/dev/loop1"]
    assert len(looks) == 4  # looked again until the holder let go
    assert kernel.runner.calls == [("losetup", "--detach", "/dev/loop1")]

    # a holder that never lets go: given up on after ``settle``, and said so
    assert Loops(kernel.runner, kernel.bound).detach_all(image, settle=0.1) == ["/dev/loop1"]
    assert "still open elsewhere" in caplog.text


def test_a_missing_image_has_no_devices_and_costs_nothing(tmp_path: Path) -> None:
    kernel = Kernel()
    loops = Loops(kernel.runner, kernel.bound)
    (tmp_path / "file").write_bytes(b"")
    assert loops.detach_all(tmp_path / "gone.img") == []
    assert loops.devices_for(tmp_path / "file" / "below.img") == []
    assert kernel.runner.calls == [] and kernel.listed == 0


def test_an_image_that_cannot_be_looked_at_is_an_error(tmp_path: Path) -> None:
    long_name = tmp_path / ("x" * 300)
    with pytest.raises(LoopError, match="cannot look at") as caught:
        Loops(FakeRunner(), list).devices_for(long_name)
    assert caught.value.errno == errno.ENAMETOOLONG


def test_losetup_failure_names_the_image(image: Path) -> None:
    def fail(argv: tuple[str, ...]) -> None:
        raise CommandError(argv, 1, "", "losetup: failed to set up loop device")

    with pytest.raises(LoopError, match=r"disk\.img"):
        Loops(FakeRunner(fail), list).attach(image)
