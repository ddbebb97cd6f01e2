"""Project quotas without quotas: which mounts enforce them (XFS and ext4, from the mount
options and the kernel's word, here a stand-in), how the directory limits choose between a
quota and a walk, and the failures of the quota calls. Real quotas: tests/vm."""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from csi_driver.backends.hostpath import limits as limits_mod
from csi_driver.backends.hostpath.backend import HostPathBackend
from csi_driver.backends.hostpath.limits import DirectoryLimits, within
from csi_driver.backends.hostpath.store import (
    FIRST_PROJECT_ID,
    KUBELET_PROJECT_IDS,
    State,
    Store,
    StoreError,
    VolumeRow,
)
from csi_driver.model import AccessType, Usage, VolumeCondition, VolumeSpec
from csi_driver.system import quota as quota_mod
from csi_driver.system.mounter import MountInfo
from csi_driver.system.quota import (
    ProjectQuota,
    ProjectUsage,
    QuotaError,
    QuotaState,
    enforcement_problem,
    enforces_project_quota,
    quota_state,
    set_project,
)
from csi_driver.system.runner import SubprocessRunner
from csi_driver.system.usage_walk import Bounds, WalkCache, measure
from csi_driver.units import MiB

ENFORCING = QuotaState(accounting=True, enforcing=True)
COUNTING = QuotaState(accounting=True, enforcing=False)


def mount(fs_type: str, *super_options: str) -> MountInfo:
    return MountInfo(1, 0, 7, 1, "/", "/srv", ("rw",), (), fs_type, "/dev/loop1", super_options)


def kernel(state: QuotaState) -> object:
    asked: list[str] = []

    def state_of(device: str) -> QuotaState:
        asked.append(device)
        return state

    state_of.asked = asked  # type: ignore[attr-defined]
    return state_of


def test_xfs_enforces_with_prjquota_or_pquota_only() -> None:
    assert enforces_project_quota(mount("xfs", "rw", "attr2", "inode64", "prjquota"))
    assert enforces_project_quota(mount("xfs", "rw", "pquota"))
    assert not enforces_project_quota(mount("xfs", "rw", "pqnoenforce"))
    assert not enforces_project_quota(mount("xfs", "rw", "usrquota"))
    assert enforcement_problem(mount("xfs", "rw", "prjquota"), lambda d: ENFORCING) is None
    why = enforcement_problem(mount("xfs", "rw", "pqnoenforce"), lambda d: COUNTING)
    assert why is not None and "XFS mounted without prjquota" in why


def test_ext4_enforces_only_with_prjquota_and_the_kernel_agreeing() -> None:
    state_of = kernel(ENFORCING)
    assert enforcement_problem(mount("ext4", "rw", "relatime", "prjquota"), state_of) is None  # type: ignore[arg-type]
    assert state_of.asked == ["/dev/loop1"]  # type: ignore[attr-defined]
    # the project feature, usage counted, but no prjquota: not enforced, and no need to ask
    state_of = kernel(COUNTING)
    why = enforcement_problem(mount("ext4", "rw", "relatime"), state_of)  # type: ignore[arg-type]
    assert why is not None and "ext4 mounted without prjquota" in why
    assert "mkfs.ext4 -O quota,project" in why
    assert state_of.asked == []  # type: ignore[attr-defined]
    # usrquota and grpquota are no project quotas
    assert not enforces_project_quota(mount("ext4", "rw", "usrquota", "grpquota"))
    assert not enforces_project_quota(mount("ext4", "rw", "pquota"))  # an XFS spelling


def test_ext4_with_prjquota_the_kernel_does_not_enforce_is_not_taken() -> None:
    """ext4 takes prjquota without the quota feature and never turns project quotas on."""
    for state in (QuotaState(False, False), COUNTING):

        def state_of(device: str, s: QuotaState = state) -> QuotaState:
            return s

        why = enforcement_problem(mount("ext4", "rw", "prjquota"), state_of)
        assert why is not None and "kernel does not enforce project quotas on /dev/loop1" in why
        assert "quota feature" in why

    def unreadable(device: str) -> QuotaState:
        raise QuotaError(f"cannot read the quota state of {device}: Permission denied")

    why = enforcement_problem(mount("ext4", "rw", "prjquota"), unreadable)
    assert why is not None and "Permission denied" in why


@pytest.mark.parametrize("fs_type", ["btrfs", "tmpfs", "ext3", "f2fs", ""])
def test_other_filesystems_have_no_enforced_sizes(fs_type: str) -> None:
    why = enforcement_problem(mount(fs_type, "rw", "prjquota"), lambda d: ENFORCING)
    assert why is not None and "which has no project quotas" in why


def test_quota_calls_check_their_arguments_before_the_kernel() -> None:
    quota = ProjectQuota("/srv", "/dev/loop1")
    for bad in (0, -1, 2**32 - 1, 2**32):
        with pytest.raises(QuotaError, match=r"outside 1\.\."):
            quota.set_limit(bad, MiB)
        with pytest.raises(QuotaError, match=r"outside 1\.\."):
            quota.usage(bad)
    with pytest.raises(QuotaError, match="cannot be negative"):
        quota.set_limit(5, -1)
    with pytest.raises(QuotaError, match="device of /srv is not known"):
        ProjectQuota("/srv").set_limit(5, MiB)


def test_quota_calls_on_what_is_no_quota_device_fail_with_the_kernels_reason(
    tmp_path: Path,
) -> None:
    missing = str(tmp_path / "no-such-device")
    nowhere = str(tmp_path / "no-mount-point")  # never the host's own filesystems
    with pytest.raises(QuotaError, match=f"limit of project 5 on {missing}") as exc:
        ProjectQuota(nowhere, missing).set_limit(5, MiB)
    assert exc.value.errno is not None
    with pytest.raises(QuotaError, match=f"quota state of {missing}"):
        quota_state(missing, nowhere)


def test_assign_refuses_a_symlink_and_reports_a_filesystem_without_projects(
    tmp_path: Path,
) -> None:
    quota = ProjectQuota(str(tmp_path), "/dev/loop1")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(QuotaError, match="cannot open directory"):
        quota.assign(tmp_path / "link", 7)
    with pytest.raises(QuotaError, match=r"outside 1\.\."):
        quota.assign(tmp_path / "real", 0)


def test_set_project_on_a_descriptor_that_takes_no_attributes_says_so() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(QuotaError, match="project id of the pipe"):
            set_project(r, 7, False, "the pipe")
    finally:
        os.close(r)
        os.close(w)


# --- the directory limits: a quota, or a walk -------------------------------------------------


def row(local: str = "v1", capacity: int = 8 * MiB, project: int | None = 1000001) -> VolumeRow:
    return VolumeRow(
        local_id=local,
        name="n",
        state=State.READY,
        capacity_bytes=capacity,
        access_type=AccessType.MOUNT,
        fs_type="ext4",
        project_id=project,
    )


def test_limits_choose_from_the_mount_and_say_why_not(caplog: pytest.LogCaptureFixture) -> None:
    enforced = DirectoryLimits.of(
        Path("/srv/r"), mount("ext4", "rw", "prjquota"), lambda d: ENFORCING
    )
    assert enforced.enforced
    with caplog.at_level(logging.WARNING):
        limits = DirectoryLimits.of(Path("/srv/r"), mount("ext4", "rw"), lambda d: COUNTING)
    assert not limits.enforced
    assert "accounted but not enforced" in caplog.text and "without prjquota" in caplog.text
    assert "found by walking" in caplog.text


def test_without_quotas_a_volume_usage_is_walked_and_kept(tmp_path: Path) -> None:
    now = [0.0]
    walks = WalkCache(Bounds(), ttl=30.0, clock=lambda: now[0])
    limits = DirectoryLimits(None, walks)
    volume = tmp_path / "v1"
    volume.mkdir()
    (volume / "f").write_bytes(b"x" * 10_000)
    first = limits.usage(volume, row())
    walked = measure(volume)
    assert first.total_bytes == 8 * MiB
    assert (first.used_bytes, first.used_inodes) == (walked.used_bytes, 2)
    (volume / "g").write_bytes(b"y" * 10_000)
    assert limits.usage(volume, row()).used_inodes == 2  # kept for the period
    now[0] = 31.0
    assert limits.usage(volume, row()).used_inodes == 3
    limits.clear(row())  # a deleted volume's walk is forgotten
    (volume / "h").write_bytes(b"z")
    assert limits.usage(volume, row()).used_inodes == 4


class BrokenQuota(ProjectQuota):
    def usage(self, project_id: int) -> object:  # type: ignore[override]
        raise QuotaError("cannot read the usage of project 1000001 on /dev/loop1: No such device")


def test_an_unreadable_quota_usage_falls_back_to_a_walk(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    limits = DirectoryLimits(BrokenQuota("/srv", "/dev/loop1"))
    (tmp_path / "f").write_bytes(b"x" * 5000)
    with caplog.at_level(logging.WARNING):
        usage = limits.usage(tmp_path, row())
    assert usage.used_inodes == 2 and usage.used_bytes == measure(tmp_path).used_bytes
    assert "walking it" in caplog.text


def test_a_volume_is_as_big_as_its_capacity_and_never_has_more_room_than_its_filesystem() -> None:
    room = Usage(total_bytes=100 * MiB, used_bytes=0, available_bytes=3 * MiB, available_inodes=50)
    u = within(8 * MiB, 2 * MiB, 7, room)
    assert (u.total_bytes, u.used_bytes, u.available_bytes) == (8 * MiB, 2 * MiB, 3 * MiB)
    assert (u.total_inodes, u.used_inodes, u.available_inodes) == (57, 7, 50)
    roomy = Usage(total_bytes=100 * MiB, used_bytes=0, available_bytes=90 * MiB)
    assert within(8 * MiB, 2 * MiB, 1, roomy).available_bytes == 6 * MiB
    assert within(8 * MiB, 9 * MiB, 1, roomy).available_bytes == 0  # over its size


# --- quotactl by a descriptor of the mount point, the device path as the fallback -------------


def quotactl_calls(
    monkeypatch: pytest.MonkeyPatch, fd_error: OSError | None
) -> list[tuple[str, str]]:
    """quotactl_fd and quotactl by path replaced by recorders; the first fails with
    ``fd_error`` when given."""
    calls: list[tuple[str, str]] = []

    def by_fd(cmd: int, mountpoint: str, qid: int, buf: object) -> None:
        calls.append(("fd", mountpoint))
        if fd_error is not None:
            raise fd_error

    def by_path(cmd: int, device: str, qid: int, buf: object) -> None:
        calls.append(("device", device))

    monkeypatch.setattr(quota_mod, "_quotactl_fd", by_fd)
    monkeypatch.setattr(quota_mod, "_quotactl_dev", by_path)
    return calls


def test_quotactl_goes_by_the_mount_point_first(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = quotactl_calls(monkeypatch, None)
    ProjectQuota("/srv/r", "/dev/mapper/vg-lv").set_limit(5, MiB)
    assert calls == [("fd", "/srv/r")]  # the device node is never needed


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSYS, "Function not implemented"),  # a kernel before 5.14
        OSError(errno.EPERM, "Operation not permitted"),  # a seccomp profile without it
        OSError(errno.ENOENT, "No such file or directory", "/srv/r"),  # no mount point here
    ],
)
def test_quotactl_falls_back_to_the_device_path(
    monkeypatch: pytest.MonkeyPatch, error: OSError
) -> None:
    calls = quotactl_calls(monkeypatch, error)
    ProjectQuota("/srv/r", "/dev/loop1").set_limit(5, MiB)
    assert calls == [("fd", "/srv/r"), ("device", "/dev/loop1")]


def test_a_quota_error_by_the_mount_point_is_the_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = quotactl_calls(monkeypatch, OSError(errno.ESRCH, "No such process"))
    with pytest.raises(QuotaError, match="No such process") as exc:
        ProjectQuota("/srv/r", "/dev/loop1").set_limit(5, MiB)
    assert exc.value.errno == errno.ESRCH and calls == [("fd", "/srv/r")]


def test_the_enforcement_check_asks_the_kernel_by_the_mount_point(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[str] = []

    def by_fd(cmd: int, mountpoint: str, qid: int, buf: ctypes.Array[ctypes.c_char]) -> None:
        asked.append(mountpoint)
        buf[2] = bytes([0x30])  # flags: project accounting and enforcement

    monkeypatch.setattr(quota_mod, "_quotactl_fd", by_fd)
    monkeypatch.setattr(quota_mod, "_quotactl_dev", lambda *a: pytest.fail("by path"))
    assert enforcement_problem(mount("xfs", "rw", "prjquota")) is None
    assert asked == ["/srv"]


# --- applying a limit at start: resumable, visible until done ---------------------------------


class FakeKernel:
    """Project ids kept per inode and limits per project, as the kernel would; set_project
    fails once on the entry named ``fail_on``, set_limit fails while ``limit_fails``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.projects: dict[int, tuple[int, bool]] = {}
        self.limits: dict[int, int] = {}
        self.fail_on = ""
        self.limit_fails = False
        monkeypatch.setattr(quota_mod, "set_project", self.set_project)
        monkeypatch.setattr(quota_mod, "project_of", self.project_of)
        monkeypatch.setattr(limits_mod, "project_of", self.project_of)

    def set_project(self, fd: int, project_id: int, inherit: bool, what: str | Path) -> None:
        if str(what) == self.fail_on:
            self.fail_on = ""
            raise QuotaError(f"cannot set project {project_id} on {what}: Input/output error")
        self.projects[os.fstat(fd).st_ino] = (project_id, inherit)

    def project_of(self, path: str | Path) -> tuple[int, bool]:
        return self.projects.get(os.lstat(path).st_ino, (0, False))

    def quota(self) -> ProjectQuota:
        kernel = self

        class Quota(ProjectQuota):
            def set_limit(self, project_id: int, hard_bytes: int) -> None:
                if kernel.limit_fails:
                    raise QuotaError(f"cannot set the limit of project {project_id}: I/O error")
                kernel.limits[project_id] = hard_bytes

            def usage(self, project_id: int) -> ProjectUsage:
                held = int(project_id in kernel.limits)
                return ProjectUsage(0, held, kernel.limits.get(project_id, 0))

        return Quota("/srv", "/dev/loop1")


def test_an_assignment_cut_short_is_visible_and_finished_by_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = FakeKernel(monkeypatch)
    volume = tmp_path / "v1"
    (volume / "a" / "b").mkdir(parents=True)
    (volume / "a" / "b" / "data").write_bytes(b"x" * 100)
    limits = DirectoryLimits(kernel.quota())
    kernel.fail_on = "data"
    limits.will_ensure(["v1"])
    pending = limits.problem(volume, row())
    assert pending is not None and "not in force yet" in pending
    limits.ensure(volume, row())  # fails deep in the tree
    assert kernel.project_of(volume) == (1000001, True), "the top first: new files inherit"
    assert kernel.project_of(volume / "a" / "b" / "data") == (0, False)
    assert 1000001 not in kernel.limits, "the limit marks a finished walk"
    why = limits.problem(volume, row())
    assert why is not None and "is no bytes, not the volume's" in why
    limits.ensure(volume, row())  # the next start walks again
    assert kernel.project_of(volume) == (1000001, True)
    assert kernel.project_of(volume / "a" / "b" / "data") == (1000001, False)
    assert kernel.limits[1000001] == 8 * MiB
    assert limits.problem(volume, row()) is None


def test_a_limit_not_set_after_the_assignment_is_reported_and_set_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = FakeKernel(monkeypatch)
    volume = tmp_path / "v1"
    volume.mkdir()
    limits = DirectoryLimits(kernel.quota())
    kernel.limit_fails = True  # as a kill between assign and set_limit would leave it
    limits.ensure(volume, row())
    assert kernel.project_of(volume) == (1000001, True)
    why = limits.problem(volume, row())
    assert why is not None and "is no bytes, not the volume's 8388608 bytes" in why
    kernel.limit_fails = False
    limits.ensure(volume, row())  # walked again, then the limit set
    assert kernel.limits[1000001] == 8 * MiB and limits.problem(volume, row()) is None
    kernel.fail_on = str(volume)  # a finished one is not walked again: only the limit set
    limits.ensure(volume, row())
    assert kernel.fail_on == str(volume)
    kernel.limits[1000001] = MiB  # changed by hand
    why = limits.problem(volume, row())
    assert why is not None and "is 1048576 bytes" in why


def test_entries_that_vanish_during_an_assignment_are_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = FakeKernel(monkeypatch)
    volume = tmp_path / "v1"
    (volume / "d").mkdir(parents=True)
    for name in ("gone", "swapped", "kept"):
        (volume / "d" / name).write_bytes(b"x")
    real_open = os.open

    def racing_open(path: str, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if path == "gone":
            raise FileNotFoundError(errno.ENOENT, "No such file or directory")
        if path == "swapped":
            raise OSError(errno.ELOOP, "Too many levels of symbolic links")
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", racing_open)
    kernel.quota().assign(volume, 7)
    assert kernel.project_of(volume) == (7, True)
    assert kernel.project_of(volume / "d" / "kept") == (7, False)


def test_an_assignment_that_cannot_read_an_entry_fails_and_sets_no_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = FakeKernel(monkeypatch)
    volume = tmp_path / "v1"
    (volume / "d").mkdir(parents=True)
    real_open = os.open

    def full_table(path: str, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if path == "d":
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", full_table)
    with pytest.raises(QuotaError, match="Too many open files"):
        kernel.quota().assign(volume, 7)
    limits = DirectoryLimits(kernel.quota())
    limits.ensure(volume, row(project=7))
    assert 7 not in kernel.limits
    why = limits.problem(volume, row(project=7))
    assert why is not None and "is no bytes" in why


# --- project ids: never one the filesystem uses, never the kubelet's --------------------------


def test_project_ids_skip_those_in_use_and_the_kubelets(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    try:
        taken = {FIRST_PROJECT_ID, FIRST_PROJECT_ID + 1}  # another root on the filesystem

        def insert(local: str) -> int | None:
            fresh = dataclasses.replace(row(local), state=State.CREATING, project_id=None)
            made = store.insert_volume(
                fresh, with_project_id=True, project_taken=taken.__contains__
            )
            return made.project_id

        assert insert("v1") == FIRST_PROJECT_ID + 2
        assert insert("v2") == FIRST_PROJECT_ID + 3
        last = KUBELET_PROJECT_IDS.start - 1
        store.insert_volume(dataclasses.replace(row("v3"), project_id=None), with_project_id=False)
        with store._transaction() as cur:  # as after 48,573 more volumes
            cur.execute("UPDATE volumes SET project_id = ? WHERE local_id = 'v2'", (last,))
        assert insert("v4") == KUBELET_PROJECT_IDS.stop  # past the kubelet's range
        taken.update(range(KUBELET_PROJECT_IDS.stop + 1, KUBELET_PROJECT_IDS.stop + 2000))
        with pytest.raises(StoreError, match="no free project id"):
            insert("v5")
    finally:
        store.close()


def test_a_project_is_in_use_when_it_holds_anything_or_has_a_limit() -> None:
    usages = {
        1: ProjectUsage(0, 0, 0),
        2: ProjectUsage(0, 1, 0),
        3: ProjectUsage(0, 0, 512),
        4: ProjectUsage(4096, 1, 0),
    }

    class Quota(ProjectQuota):
        def usage(self, project_id: int) -> ProjectUsage:
            if project_id == 5:
                raise QuotaError("never seen", errno=errno.ENOENT)  # XFS
            if project_id == 6:
                raise QuotaError("cannot read", errno=errno.EIO)
            return usages[project_id]

    quota = Quota("/srv", "/dev/loop1")
    assert [quota.in_use(i) for i in (1, 2, 3, 4, 5)] == [False, True, True, True, False]
    with pytest.raises(QuotaError):
        quota.in_use(6)
    assert not DirectoryLimits(quota).project_taken(6)  # then its limit fails visibly


# --- limits applied at start: in the background, the volume abnormal meanwhile ----------------


def test_a_start_serves_at_once_while_limits_are_applied_in_the_background(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = FakeKernel(monkeypatch)
    inside, release = threading.Event(), threading.Event()
    slow = [False]

    class Quota(type(kernel.quota())):  # type: ignore[misc]
        def assign(
            self, directory: Path, project_id: int, stopping: Callable[[], bool] | None = None
        ) -> None:
            if slow[0]:
                inside.set()
                release.wait(30)  # a huge tree
            super().assign(directory, project_id, stopping)

    monkeypatch.setattr(limits_mod, "enforcement_problem", lambda mount, state_of: None)
    monkeypatch.setattr(limits_mod, "ProjectQuota", Quota)
    root = tmp_path / "root"
    backend = HostPathBackend(root, 64 * MiB, "unit-node", SubprocessRunner())
    try:
        volume = backend.create_volume(VolumeSpec("d", 4 * MiB, AccessType.MOUNT, ""))
        assert backend.volume_condition(volume.id) == VolumeCondition.healthy()
        backend.close()
        kernel.projects.clear()  # as a root remounted with prjquota finds it
        kernel.limits.clear()
        slow[0] = True
        started = time.monotonic()
        backend = HostPathBackend(root, 64 * MiB, "unit-node", SubprocessRunner())
        assert time.monotonic() - started < 5, "the start waits for no walk"
        assert inside.wait(10)
        condition = backend.volume_condition(volume.id)
        assert condition.abnormal and "not in force yet" in condition.message
        assert not backend.wait_for_background(0.1)
        release.set()
        assert backend.wait_for_background(10)
        assert backend.volume_condition(volume.id) == VolumeCondition.healthy()
        assert 4 * MiB in kernel.limits.values()
    finally:
        release.set()
        backend.close()
