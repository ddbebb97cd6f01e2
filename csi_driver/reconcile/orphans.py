"""Orphans: storage on this node that no PersistentVolume names (every node plugin).

A PV deleted with reclaim policy ``Retain``, a crash of an older release between CreateVolume
and the PV's creation, a volume made by hand through the CSI socket: each leaves storage that
holds capacity nobody sees. Each round compares the backend's own listing (only what this
driver made: LVs with its name and tags, hostpath volumes in its database) with the
``volumeHandle`` of every PV in the cluster, whatever its driver or node: a handle anywhere
protects the volume.

Safety, in the order it is applied:

- nothing is decided on a listing that failed or could be partial (kubeapi's ``list_all`` is
  complete or an error): the round ends and every candidate's clock starts again, as it does
  after a gap of more than a few intervals (:func:`~csi_driver.reconcile.periodic.stale_after`)
  since the last complete listing
  (a round that raised, a stalled thread): time nobody could observe never counts toward the
  grace period;
- a volume is a candidate only while no PV names it, no ControllerPublishVolume recorded it
  as published (under the chart ControllerPublish is not used, so this never holds a volume
  back there: a volume still staged or published on the node is protected by the backend's
  DeleteVolume refusing it), and it is not an inline ephemeral volume (CSI name
  ``csi-<64 hex>``, the kubelet's form for them: it lives as long as its Pod, which
  NodeUnpublishVolume ends; the name form is the kubelet's convention, not a mark of ours);
- it is reported (log line, Event on the Node, ``csi_driver_orphan_volumes``) once it has been
  a candidate without a break for the grace period, measured on this process's monotonic
  clock (a restart starts again: that only delays);
- with ``delete`` (the chart's ``orphans.delete``), at most ``max_deletions`` per round, each
  under the volume's lock (the one CreateVolume and DeleteVolume take, so no CSI call on it
  runs meanwhile) after listing the PVs again and reading the volume again: a PV made since,
  or a change of the volume, cancels the deletion.

What remains: a provisioner that called CreateVolume, then stayed away for the whole grace
period, and creates the PV in the instant between the second listing and the deletion. The
PV then names a volume that is gone; its Pod fails to start with NOT_FOUND. docs/operations.md.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from csi_driver.backends.base import Backend
from csi_driver.errors import CsiError
from csi_driver.kubeapi import ApiError, KubeApi, quote
from csi_driver.locks import KeyLocks
from csi_driver.model import Volume
from csi_driver.reconcile.events import Reporter
from csi_driver.reconcile.metrics import ReconcileCounters, ReconcileMetrics, gauge
from csi_driver.reconcile.objects import Ref
from csi_driver.reconcile.periodic import stale_after

log = logging.getLogger(__name__)

_INLINE_NAME = re.compile(r"csi-[0-9a-f]{64}\Z")


@dataclass(frozen=True)
class OrphanPolicy:
    grace_seconds: float
    delete: bool
    max_deletions: int = 10
    interval: float = 300.0


def is_candidate(volume: Volume, handles: set[str], node_id: str) -> bool:
    return (
        volume.id not in handles
        and volume.node_id == node_id
        and not volume.published_nodes
        and not _INLINE_NAME.fullmatch(volume.name)
    )


def due_orphans(
    volumes: Iterable[Volume],
    handles: set[str],
    node_id: str,
    first_seen: dict[str, float],
    now: float,
    grace_seconds: float,
) -> list[Volume]:
    """The candidates seen without a break for ``grace_seconds``; ``first_seen`` (volume id →
    first seen as a candidate) is brought up to date."""
    candidates = {v.id: v for v in volumes if is_candidate(v, handles, node_id)}
    for volume_id in list(first_seen):
        if volume_id not in candidates:
            del first_seen[volume_id]
    due = []
    for volume_id, volume in sorted(candidates.items()):
        since = first_seen.setdefault(volume_id, now)
        if now - since >= grace_seconds:
            due.append(volume)
    return due


class Orphans:
    def __init__(
        self,
        api: KubeApi,
        backend: Backend,
        locks: KeyLocks,
        node_id: str,
        policy: OrphanPolicy,
        reporter: Reporter,
        registry: CollectorRegistry,
        counters: ReconcileCounters,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._api = api
        self._backend = backend
        self._locks = locks
        self._node = node_id
        self._policy = policy
        self._reporter = reporter
        self._clock = clock
        self._metrics = ReconcileMetrics(counters, "orphans")
        self._count = gauge(
            registry,
            "csi_driver_orphan_volumes",
            "Volumes on this node that no PersistentVolume has named for the grace period.",
        )
        self._bytes = gauge(
            registry,
            "csi_driver_orphan_bytes",
            "Capacity held by the volumes of csi_driver_orphan_volumes.",
        )
        self._first_seen: dict[str, float] = {}
        self._reported: set[str] = set()
        self._node_uid: str | None = None
        self._last_good: float | None = None

    def handles(self) -> set[str]:
        """Every PV's volumeHandle, from a complete listing (or ApiError)."""
        found: set[str] = set()
        for pv in self._api.list_all("/api/v1/persistentvolumes"):
            spec = pv.get("spec")
            csi = spec.get("csi") if isinstance(spec, dict) else None
            handle = csi.get("volumeHandle") if isinstance(csi, dict) else None
            if isinstance(handle, str):
                found.add(handle)
        return found

    def step(self) -> None:
        now = self._clock()
        if self._last_good is not None and now - self._last_good > stale_after(
            self._policy.interval
        ):
            self._first_seen.clear()
        try:
            handles = self.handles()
        except ApiError as exc:
            log.warning("orphans: cannot list PVs; nothing done", extra={"error": str(exc)})
            self._first_seen.clear()  # an outage is no evidence: the grace period starts again
            self._metrics.run("api_error")
            return
        volumes = self._backend.list_volumes()
        due = due_orphans(
            volumes,
            handles,
            self._node,
            self._first_seen,
            now,
            self._policy.grace_seconds,
        )
        self._last_good = self._clock()  # the end of the listing: its own length is no gap
        self._count.set(len(due))
        self._bytes.set(sum(v.capacity_bytes for v in due))
        self._reported &= {v.id for v in due}
        for volume in due:
            self._report(volume)
        if self._policy.delete:
            for volume in due[: self._policy.max_deletions]:
                if not self._reclaim(volume):
                    break
        self._metrics.run("ok")

    def _report(self, volume: Volume) -> None:
        if volume.id in self._reported:
            return
        self._reported.add(volume.id)
        what = "it will be deleted" if self._policy.delete else "orphans.delete is off: it is kept"
        message = (
            f"volume {volume.id} ({volume.name}, {volume.capacity_bytes} bytes) has had no"
            f" PersistentVolume for more than {self._policy.grace_seconds:g}s; {what}"
        )
        log.warning(
            "orphaned volume",
            extra={
                "volume_id": volume.id,
                "volume_name": volume.name,
                "bytes": volume.capacity_bytes,
            },
        )
        self._metrics.action("report")
        self._node_event("OrphanedVolume", message)

    def _node_event(self, reason: str, message: str) -> None:
        """An Event on this Node, which ``kubectl describe node`` finds by the Node's uid: when
        the uid cannot be read, no Event is written (the log line and the metric carry the
        finding) and the next Event asks again."""
        if not self._node_uid:
            try:
                node = self._api.get(f"/api/v1/nodes/{quote(self._node)}")
                meta = node.get("metadata")
                uid = meta.get("uid") if isinstance(meta, dict) else None
                self._node_uid = uid if isinstance(uid, str) and uid else None
            except ApiError as exc:
                log.info("orphans: cannot read this Node", extra={"error": str(exc)})
        if not self._node_uid:
            log.warning(
                "orphans: no Event written: this Node's uid is unknown", extra={"reason": reason}
            )
            return
        self._reporter.event(Ref("Node", self._node, self._node_uid), reason, message)

    def _reclaim(self, volume: Volume) -> bool:
        """Delete one orphan after checking again under its lock; False ends the round."""
        try:
            return self._reclaim_locked(volume)
        except CsiError as exc:  # a CSI call holds the volume, or the backend refused
            log.warning(
                "orphans: volume not deleted; next round retries",
                extra={"volume_id": volume.id, "error": str(exc)},
            )
            self._metrics.action("skip")
            return True

    def _reclaim_locked(self, volume: Volume) -> bool:
        with self._locks.hold(volume.id):
            try:
                handles = self.handles()
            except ApiError as exc:
                log.warning(
                    "orphans: cannot list PVs again; nothing deleted", extra={"error": str(exc)}
                )
                self._metrics.action("api_error")
                return False
            current = self._backend.get_volume(volume.id)
            if (
                current is None
                or current != volume
                or not is_candidate(current, handles, self._node)
            ):
                log.info("orphans: volume changed; not deleted", extra={"volume_id": volume.id})
                self._first_seen.pop(volume.id, None)
                self._metrics.action("skip")
                return True
            self._backend.delete_volume(volume.id)
        self._first_seen.pop(volume.id, None)
        log.warning(
            "deleted an orphaned volume", extra={"volume_id": volume.id, "volume_name": volume.name}
        )
        self._metrics.action("delete_volume")
        self._node_event(
            "OrphanedVolumeDeleted",
            f"deleted volume {volume.id} ({volume.name}, {volume.capacity_bytes} bytes):"
            f" no PersistentVolume named it for more than {self._policy.grace_seconds:g}s",
        )
        return True


__all__ = ["OrphanPolicy", "Orphans", "due_orphans", "is_candidate"]
