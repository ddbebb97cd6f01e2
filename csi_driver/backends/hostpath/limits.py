"""The size limits of directory volumes (project quotas, where the root allows them) and
what each directory volume holds.

A directory volume lives on the root's own filesystem, so its size can only be enforced where
that filesystem enforces project quotas: XFS mounted with ``prjquota``, or ext4 with the
``project`` and ``quota`` features mounted with ``prjquota`` (the rule is
:func:`~csi_driver.system.quota.enforcement_problem`). Each directory then gets a project
(its id kept in the volume's row) with a hard limit of the volume's size, and its usage is
the project's, read with one quotactl(2). Elsewhere sizes are accounted, not enforced, the
methods that set limits do nothing, and a volume's usage comes from a bounded, cached walk of
its directory (:mod:`csi_driver.system.usage_walk`). Block volumes need none of this: an image
is as big as it is.

A root remounted with ``prjquota`` after its volumes were made gets their limits at the next
start (:meth:`DirectoryLimits.ensure`), in the background (recovery.py): until a volume's
limit is in force its condition is abnormal and says so. The assignment is resumable: the
limit is set only after the whole tree has the project, so a limit that is not the volume's
size (none, after a kill or a failure in the walk) makes the next start walk again, and the
limit is set again at every start.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from csi_driver.backends.hostpath.layout import is_real_dir
from csi_driver.backends.hostpath.store import VolumeRow
from csi_driver.model import Usage
from csi_driver.system import fsinfo
from csi_driver.system.mounter import MountInfo
from csi_driver.system.quota import (
    ProjectQuota,
    QuotaError,
    QuotaState,
    enforcement_problem,
    project_of,
)
from csi_driver.system.usage_walk import WalkCache

log = logging.getLogger(__name__)


class DirectoryLimits:
    """Project quotas for the directory volumes of one root, or nothing where not enforced."""

    def __init__(self, quota: ProjectQuota | None, walks: WalkCache | None = None) -> None:
        self._quota = quota
        #: usages found by walking, where no quota counts them
        self._walks = walks or WalkCache()
        #: volumes (local ids) whose limit a start is applying in the background
        self._applying: set[str] = set()
        self._applying_lock = threading.Lock()

    @classmethod
    def of(
        cls,
        root: Path,
        mount: MountInfo,
        state_of: Callable[[str], QuotaState] | None = None,
        walks: WalkCache | None = None,
    ) -> DirectoryLimits:
        """The limits of the root mounted by ``mount``: enforced, or (logged) accounted only."""
        why = enforcement_problem(mount, state_of)
        if why is None:
            log.info(
                f"directory volume sizes are enforced with {mount.fs_type} project quotas",
                extra={"root": str(root), "mountpoint": mount.mount_point},
            )
            return cls(ProjectQuota(mount.mount_point, mount.source), walks)
        log.warning(
            f"directory volume sizes under {root} are accounted but not enforced: {why}; a"
            " volume's usage is found by walking its directory"
        )
        return cls(None, walks)

    @property
    def enforced(self) -> bool:
        return self._quota is not None

    def apply(self, path: Path, row: VolumeRow) -> None:
        """Give the new directory ``path`` of ``row`` its project and limit."""
        if self._quota is not None and row.project_id is not None:
            self._quota.assign(path, row.project_id)
            self._quota.set_limit(row.project_id, row.capacity_bytes)

    def resize(self, row: VolumeRow, size_bytes: int) -> None:
        if self._quota is not None and row.project_id is not None:
            self._quota.set_limit(row.project_id, size_bytes)

    def clear(self, row: VolumeRow) -> None:
        """Lift the limit of a removed volume's project (a failure is only logged)."""
        self._walks.forget(row.local_id)
        if self._quota is not None and row.project_id is not None:
            try:
                self._quota.set_limit(row.project_id, 0)
            except QuotaError as exc:
                log.warning(f"cannot clear the quota of project {row.project_id}: {exc}")

    def project_taken(self, project_id: int) -> bool:
        """Whether ``project_id`` is in use on the root's filesystem already (by another
        root there, the kubelet, the admin); an id that cannot be read is taken as free (its
        limit cannot be set either, which the volume's condition shows)."""
        if self._quota is None:
            return False
        try:
            return self._quota.in_use(project_id)
        except QuotaError as exc:
            log.warning(f"cannot tell whether project {project_id} is in use: {exc}")
            return False

    def will_ensure(self, locals_: Iterable[str]) -> None:
        """Mark volumes whose limit :meth:`ensure` is yet to apply: abnormal until then."""
        with self._applying_lock:
            self._applying.update(locals_)

    def ensure(
        self, path: Path, row: VolumeRow, stopping: Callable[[], bool] | None = None
    ) -> None:
        """Give a directory volume's tree its project where the directory lacks it (a root
        remounted with prjquota after the volume was made) or its limit is not the volume's
        size (an assignment a kill or a failure cut short: the limit comes after the walk),
        and set its limit again; a failure is only logged (and shown by :meth:`problem`)."""
        try:
            if self._quota is None or row.project_id is None or not is_real_dir(path):
                return
            if project_of(path) != (row.project_id, True) or not self._has_limit(row):
                log.info(f"applying the size limit of {row.local_id} (project {row.project_id})")
                self._quota.assign(path, row.project_id, stopping)
            self._quota.set_limit(row.project_id, row.capacity_bytes)
        except QuotaError as exc:
            log.error(f"cannot apply the size limit of {row.local_id}: {exc}")
        finally:
            self.ensured(row.local_id)

    def _has_limit(self, row: VolumeRow) -> bool:
        assert self._quota is not None and row.project_id is not None
        try:
            hard = self._quota.usage(row.project_id).hard_bytes
        except QuotaError:
            return False
        return hard == _in_blocks(row.capacity_bytes)

    def ensured(self, local: str) -> None:
        """The background pass is done with volume ``local`` (see :meth:`will_ensure`)."""
        with self._applying_lock:
            self._applying.discard(local)

    def problem(self, path: Path, row: VolumeRow) -> str | None:
        """Why the limit of the directory ``path`` of ``row`` is not in force, if it should be."""
        if self._quota is None or row.project_id is None:
            return None
        with self._applying_lock:
            applying = row.local_id in self._applying
        if applying:
            return (
                f"the size limit of {path} is not in force yet: the driver is applying it"
                f" (project {row.project_id}) after its start"
            )
        try:
            project = project_of(path)
        except QuotaError as exc:
            return str(exc)
        if project != (row.project_id, True):
            return (
                f"the size limit of {path} is not applied (project {project[0]}); restarting"
                " the driver applies it"
            )
        return _limit_problem(self._quota, path, row.project_id, row.capacity_bytes)

    def usage(self, path: Path, row: VolumeRow) -> Usage:
        """What the directory volume ``row`` at ``path`` holds, against its size: its
        project's usage where quotas count it, else what a walk of ``path`` found (at most
        once per the walks' period; a walk that hit its bound is logged and its count, a
        lower bound, reported). Raises :class:`~csi_driver.system.fsinfo.FsInfoError` or
        :class:`~csi_driver.system.usage_walk.WalkError` when ``path`` cannot be read."""
        room = fsinfo.usage(path)
        if self._quota is not None and row.project_id is not None:
            try:
                project = self._quota.usage(row.project_id)
                return within(row.capacity_bytes, project.used_bytes, project.used_inodes, room)
            except QuotaError as exc:
                log.warning(f"cannot read the quota usage of {row.local_id}, walking it: {exc}")
        tree, walked = self._walks.measure(row.local_id, path)
        if walked and not tree.complete:
            log.warning(
                f"the usage of volume {row.local_id} is at least what was counted: the walk of"
                f" {path} stopped early ({tree.stopped}) after {tree.used_inodes} entries and"
                f" {tree.used_bytes} bytes"
            )
        return within(row.capacity_bytes, tree.used_bytes, tree.used_inodes, room)


def within(capacity: int, used_bytes: int, used_inodes: int, room: Usage) -> Usage:
    """A directory volume's usage: its size is its capacity, what it may still take is what
    is left of it but never more than its filesystem (``room``) has free; its inodes are
    limited by the filesystem's alone."""
    return Usage(
        total_bytes=capacity,
        used_bytes=used_bytes,
        available_bytes=max(0, min(capacity - used_bytes, room.available_bytes)),
        total_inodes=used_inodes + room.available_inodes,
        used_inodes=used_inodes,
        available_inodes=room.available_inodes,
    )


def _in_blocks(size: int) -> int:
    """``size`` as set_limit sets it: whole 512-byte basic blocks."""
    return -(-size // 512) * 512


def _limit_problem(quota: ProjectQuota, path: Path, project_id: int, capacity: int) -> str | None:
    """A limit that is not the volume's size (none at all: a start that failed or was killed
    before it set it; another: a limit changed by hand), or a volume holding more than its
    limit: a root remounted with ``prjquota`` after the volume outgrew its size
    (:meth:`DirectoryLimits.ensure` then applies a limit below its usage). Writes then fail
    until data is deleted. A volume merely full (at its limit) is not abnormal: its usage
    says so. One quotactl(2)."""
    try:
        project = quota.usage(project_id)
    except QuotaError as exc:
        log.debug(f"cannot read the usage of {path}: {exc}")
        return None
    used, hard = project.used_bytes, project.hard_bytes
    if hard and used > hard:
        return (
            f"volume directory {path} holds {used} bytes, more than its size limit of {hard}"
            " bytes: writes to it fail (ENOSPC 'No space left on device' on XFS, EDQUOT 'Disk"
            " quota exceeded' on ext4); delete data in it or expand the volume"
        )
    if hard != _in_blocks(capacity):
        return (
            f"the size limit of {path} (project {project_id}) is {hard or 'no'} bytes, not the"
            f" volume's {capacity} bytes; restarting the driver sets it"
        )
    return None
