"""The size limits of directory volumes: XFS project quotas, where the root allows them.

A directory volume lives on the root's own filesystem, so its size can only be enforced when
that filesystem is XFS mounted with ``prjquota``: each directory gets a project (its id kept
in the volume's row) with a hard limit of the volume's size. Elsewhere sizes are accounted,
not enforced, and every method here does nothing. Block volumes need none of this: an image
is as big as it is.

A root remounted with ``prjquota`` after its volumes were made gets their limits at the next
start (:meth:`DirectoryLimits.ensure`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from csi_driver.backends.hostpath.layout import is_real_dir
from csi_driver.backends.hostpath.store import VolumeRow
from csi_driver.system.mounter import MountInfo
from csi_driver.system.quota import (
    QuotaError,
    XfsProjectQuota,
    enforces_project_quota,
    project_of,
    quotable_path,
)
from csi_driver.system.runner import Runner

log = logging.getLogger(__name__)


class DirectoryLimits:
    """Project quotas for the directory volumes of one root, or nothing where not enforced."""

    def __init__(self, quota: XfsProjectQuota | None) -> None:
        self._quota = quota

    @classmethod
    def of(cls, runner: Runner, root: Path, volumes_dir: Path, mount: MountInfo) -> DirectoryLimits:
        """The limits of the root mounted by ``mount``: enforced, or (logged) accounted only."""
        enforced = enforces_project_quota(mount)
        if enforced and quotable_path(volumes_dir):
            log.info(
                "directory volume sizes are enforced with XFS project quotas",
                extra={"root": str(root), "mountpoint": mount.mount_point},
            )
            return cls(XfsProjectQuota(runner, mount.mount_point, mount.source))
        why = (
            f"its path {str(volumes_dir)!r} holds characters xfs_quota cannot take"
            if enforced
            else f"it is on {mount.fs_type} without enforced project quotas (XFS mounted with"
            " prjquota would enforce them)"
        )
        log.warning(f"directory volume sizes under {root} are accounted but not enforced: {why}")
        return cls(None)

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
        if self._quota is not None and row.project_id is not None:
            try:
                self._quota.set_limit(row.project_id, 0)
            except QuotaError as exc:
                log.warning(f"cannot clear the quota of project {row.project_id}: {exc}")

    def ensure(self, path: Path, row: VolumeRow) -> None:
        """Give a directory volume its project and limit if it lacks them (a root remounted
        with prjquota after the volume was made); a failure is only logged."""
        if self._quota is None or row.project_id is None or not is_real_dir(path):
            return
        try:
            if project_of(path) == (row.project_id, True):
                return
            log.info(f"applying the size limit of {row.local_id} (project {row.project_id})")
            self._quota.assign(path, row.project_id)
            self._quota.set_limit(row.project_id, row.capacity_bytes)
        except QuotaError as exc:
            log.error(f"cannot apply the size limit of {row.local_id}: {exc}")

    def problem(self, path: Path, row: VolumeRow) -> str | None:
        """Why the limit of the directory ``path`` of ``row`` is not in force, if it should be."""
        if self._quota is None or row.project_id is None:
            return None
        try:
            project = project_of(path)
        except QuotaError as exc:
            return str(exc)
        if project != (row.project_id, True):
            return (
                f"the size limit of {path} is not applied (project {project[0]}); restarting"
                " the driver applies it"
            )
        return _over_limit(self._quota, path, row.project_id)


def _over_limit(quota: XfsProjectQuota, path: Path, project_id: int) -> str | None:
    """A volume holding more than its limit: a root remounted with ``prjquota`` after the
    volume outgrew its size (:meth:`DirectoryLimits.ensure` then applies a limit below its
    usage), or a limit changed by hand. Writes then fail until data is deleted. A volume
    merely full (at its limit) is not abnormal: its usage says so. One quotactl(2), no
    xfs_quota."""
    try:
        used, hard = quota.usage(project_id)
    except QuotaError as exc:
        log.debug(f"cannot read the usage of {path}: {exc}")
        return None
    if hard and used > hard:
        return (
            f"volume directory {path} holds {used} bytes, more than its size limit of {hard}"
            " bytes: writes to it fail with 'Disk quota exceeded'; delete data in it or"
            " expand the volume"
        )
    return None
