"""The in-process loop device lookup against ``losetup --associated`` on real loop devices.

Both must name the same devices for an image (with the same autoclear flag and backing file),
whatever happened to it after the attach: one device, two, none, the image renamed, another
file put at its path, the image unlinked, a device detached while something holds it open.
Every device these tests attach is detached by the ``loops`` fixture, also when a test fails
(only devices backed by files below the test's own directory, so another user's devices are
never touched).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_driver.system.loop import Loops
from csi_driver.system.runner import SubprocessRunner
from testkit.driver_process import loops_under
from tests.fake_runner import FakeRunner

pytestmark = pytest.mark.root


def run(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr}"
    return proc.stdout


class LoopFiles:
    """Images below ``workdir`` and their loop devices; :meth:`clean_up` detaches them all."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.held: list[int] = []

    def image(self, name: str) -> Path:
        path = self.workdir / name
        with open(path, "wb") as f:
            f.truncate(1 << 20)
        return path

    def attach(self, image: Path) -> str:
        return run("losetup", "--find", "--show", "--", str(image)).strip()

    def hold(self, device: str) -> int:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
        self.held.append(fd)
        return fd

    def release(self, fd: int) -> None:
        self.held.remove(fd)
        os.close(fd)

    def clean_up(self) -> None:
        for fd in self.held:
            os.close(fd)
        for device, _ in loops_under(str(self.workdir)):
            subprocess.run(["losetup", "--detach", device], timeout=60, check=False)


@pytest.fixture
def files(workdir: Path) -> Iterator[LoopFiles]:
    loop_files = LoopFiles(workdir)
    try:
        yield loop_files
    finally:
        loop_files.clean_up()


def by_losetup(image: Path) -> list[tuple[str, bool, str]]:
    """(device, autoclear, backing file) of ``image``'s devices, as ``losetup`` says."""
    if not image.exists():
        return []  # losetup refuses a path that names no file
    out = run(
        "losetup",
        "--list",
        "--json",
        "--output",
        "NAME,AUTOCLEAR,BACK-FILE",
        "--associated",
        str(image),
    )
    devices = json.loads(out)["loopdevices"] if out.strip() else []
    return sorted((d["name"], d["autoclear"] in (True, "1", 1), d["back-file"]) for d in devices)


def in_process(image: Path) -> list[tuple[str, bool, str]]:
    runner = FakeRunner()  # a lookup must run no command: this one would record it
    found = Loops(runner).devices_for(image)
    assert runner.calls == []
    return sorted((d.name, d.autoclear, d.backing_file) for d in found)


def same(image: Path) -> list[str]:
    """The names of ``image``'s devices, once both readers agree on everything about them."""
    want = by_losetup(image)
    assert in_process(image) == want
    return [name for name, _, _ in want]


def test_one_device_and_none(files: LoopFiles) -> None:
    image, other = files.image("disk.img"), files.image("other.img")
    assert same(image) == []
    device = files.attach(image)
    assert same(image) == [device]
    assert same(other) == []
    assert same(files.workdir / "absent.img") == []


def test_two_devices_on_one_image(files: LoopFiles) -> None:
    image = files.image("disk.img")
    first, second = files.attach(image), files.attach(image)
    assert first != second
    assert same(image) == sorted([first, second])


def test_a_renamed_image_keeps_its_device_and_a_new_file_at_its_path_has_none(
    files: LoopFiles,
) -> None:
    image = files.image("disk.img")
    device = files.attach(image)
    moved = image.with_name("moved.img")
    image.rename(moved)
    assert same(moved) == [device]
    assert in_process(moved)[0][2] == str(moved)  # the kernel shows the new name
    assert same(image) == []
    files.image("disk.img")  # another file at the old path: not that device's
    assert same(image) == []
    assert same(moved) == [device]


def test_an_unlinked_image_is_not_the_new_file_at_its_path(files: LoopFiles) -> None:
    image = files.image("disk.img")
    device = files.attach(image)
    image.unlink()
    assert in_process(image) == []
    files.image("disk.img")
    # losetup would match the device, too, if the filesystem gave the new file the freed inode
    # number; the driver never takes a device whose backing file was deleted
    assert in_process(image) == []
    assert [d for d, b in loops_under(str(files.workdir)) if b == str(image)] == [device]


def test_a_device_detached_while_held_open_is_autoclear_until_its_last_close(
    files: LoopFiles,
) -> None:
    image = files.image("disk.img")
    device = files.attach(image)
    fd = files.hold(device)
    run("losetup", "--detach", device)
    assert by_losetup(image) == [(device, True, str(image))]
    assert in_process(image) == by_losetup(image)
    files.release(fd)
    assert same(image) == []


def test_an_attach_and_a_detach_run_one_command_each(files: LoopFiles) -> None:
    image = files.image("disk.img")
    runner = FakeRunner(passthrough=SubprocessRunner())
    loops = Loops(runner)
    device = loops.attach(image)
    assert loops.attach(image) == device  # found again, not attached twice
    assert same(image) == [device]
    assert loops.detach_all(image) == [device]
    assert same(image) == []
    assert [argv[:2] for argv in runner.calls] == [
        ("losetup", "--find"),
        ("losetup", "--detach"),
    ]
