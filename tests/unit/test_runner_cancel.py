"""Commands die with the work they serve: a cancelled token, a passed deadline or a timeout
kills the child's whole process group, promptly, and says why in the error."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_driver.system.runner import (
    CANCELLED,
    DEADLINE_EXCEEDED,
    CancelToken,
    CommandError,
    SubprocessRunner,
    bound_to,
    current_token,
)


def _processes_with(marker: str) -> dict[int, int]:
    """pid -> process group of every live ``sleep <marker>``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            if cmdline.startswith(b"sleep\x00" + marker.encode()):
                found[int(entry.name)] = os.getpgid(int(entry.name))
        except (OSError, ProcessLookupError):
            continue
    return found


def _group_alive(pgid: int) -> bool:
    """Any process of group ``pgid`` still running (a zombie waiting for its reaper is dead)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


@pytest.fixture
def marker() -> Iterator[str]:
    """A unique sleep length, so the test finds its own processes; any left are killed."""
    value = f"30.{uuid.uuid4().int % 10**6:06d}"
    try:
        yield value
    finally:
        for pid in _processes_with(value):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)


def _tree(marker: str) -> list[str]:
    """A shell with a grandchild in the background and a child in the foreground, as a mount
    helper or an nsenter-ed program would have."""
    return ["sh", "-c", f"sleep {marker} & sleep {marker}; wait"]


class _Watcher:
    """Records the process groups of the marked processes while a command runs."""

    def __init__(self, marker: str) -> None:
        self.marker = marker
        self.groups: set[int] = set()
        self.pids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            for pid, pgid in _processes_with(self.marker).items():
                self.pids.add(pid)
                self.groups.add(pgid)
            time.sleep(0.02)

    def __enter__(self) -> _Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _assert_all_gone(watcher: _Watcher, within: float) -> float:
    """Seconds until every marked process and its group is gone (at most ``within``)."""
    assert len(watcher.pids) >= 2, "the command's processes were never seen running"
    start = time.monotonic()
    while _processes_with(watcher.marker) or any(_group_alive(g) for g in watcher.groups):
        assert time.monotonic() - start < within, (
            f"still running: {_processes_with(watcher.marker)}"
        )
        time.sleep(0.01)
    assert os.getpgrp() not in watcher.groups, "the child must lead a process group of its own"
    return time.monotonic() - start


def test_a_cancelled_command_dies_with_its_whole_process_group(marker: str) -> None:
    runner = SubprocessRunner()
    token = CancelToken()
    threading.Timer(0.2, token.cancel).start()
    with _Watcher(marker) as watcher, bound_to(token), pytest.raises(CommandError) as exc:
        start = time.monotonic()
        runner.run(_tree(marker))
    took = time.monotonic() - start
    assert exc.value.cancelled == CANCELLED and not exc.value.timed_out
    assert "was stopped" in str(exc.value)
    assert took < 1.0, f"the cancelled command returned after {took:.2f}s"
    _assert_all_gone(watcher, within=1.0)


def test_a_passed_deadline_kills_the_command(marker: str) -> None:
    runner = SubprocessRunner()
    with _Watcher(marker) as watcher, bound_to(CancelToken.within(0.3)):
        start = time.monotonic()
        with pytest.raises(CommandError) as exc:
            runner.run(_tree(marker))
        took = time.monotonic() - start
    assert exc.value.cancelled == DEADLINE_EXCEEDED
    assert 0.25 < took < 1.0
    _assert_all_gone(watcher, within=1.0)


def test_a_timeout_kills_the_whole_process_group(marker: str) -> None:
    runner = SubprocessRunner()
    with _Watcher(marker) as watcher:
        start = time.monotonic()
        with pytest.raises(CommandError) as exc:
            runner.run(_tree(marker), timeout=0.3)
        took = time.monotonic() - start
    assert exc.value.timed_out and exc.value.cancelled is None
    assert took < 1.0
    _assert_all_gone(watcher, within=1.0)


def test_nothing_starts_once_the_work_is_called_off(tmp_path: Path) -> None:
    token = CancelToken()
    token.cancel()
    flag = tmp_path / "ran"
    with bound_to(token), pytest.raises(CommandError) as exc:
        SubprocessRunner().run(["touch", str(flag)])
    assert exc.value.cancelled == CANCELLED
    assert not flag.exists()


def test_a_shielded_block_runs_to_its_end_and_the_token_comes_back() -> None:
    token = CancelToken()
    token.cancel()
    runner = SubprocessRunner()
    with bound_to(token):
        with bound_to(None):
            assert runner.run(["sh", "-c", "sleep 0.2; echo done"]).stdout == "done\n"
        assert current_token() is token
    assert current_token() is None


def test_a_token_belongs_to_its_thread() -> None:
    token = CancelToken()
    token.cancel()
    seen: list[object] = []
    with bound_to(token):
        worker = threading.Thread(target=lambda: seen.append(current_token()))
        worker.start()
        worker.join()
    assert seen == [None]


def test_input_and_output_still_flow_through_the_sliced_wait() -> None:
    runner = SubprocessRunner()
    with bound_to(CancelToken.within(30)):
        result = runner.run(["sh", "-c", "sleep 0.2; cat; echo err >&2"], input="x" * 200_000)
    assert result.stdout == "x" * 200_000 and result.stderr == "err\n"


def test_a_child_dies_with_the_driver(tmp_path: Path, marker: str) -> None:
    """A command in its own session is out of reach of a kill of the driver's process group;
    the kernel still kills it when the driver dies (as a container runtime kills them all)."""
    script = (
        "import sys\n"
        "from csi_driver.system.runner import SubprocessRunner\n"
        f"SubprocessRunner().run(['sleep', '{marker}'])\n"
    )
    driver = subprocess.Popen(
        [sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[2]
    )
    try:
        deadline = time.monotonic() + 10
        while not _processes_with(marker):
            assert time.monotonic() < deadline, "the command never started"
            time.sleep(0.02)
    finally:
        driver.kill()
        driver.wait()
    deadline = time.monotonic() + 2
    while _processes_with(marker):
        assert time.monotonic() < deadline, "the command outlived the killed driver"
        time.sleep(0.02)
