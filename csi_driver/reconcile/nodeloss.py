"""Node loss: the PersistentVolumes of Nodes that are gone (controller Deployment, one leader).

A node-local volume's PV names its node in its required node affinity, by the driver's
topology key and the node plugin's node id (--node-id), so a StatefulSet Pod bound to it can
only run there: when the Node object is deleted for good, the Pod stays Pending for ever.
Each round lists every Node (metadata only) and every PV (complete listings, or nothing is
done). A node id counts as present while a Node has that name or carries the topology label
with that value. The reconciler remembers since when a node some PV of this driver names has
been missing (on this process's monotonic clock: a restart or a new leader starts the clock
again, which only delays). A round whose listing failed, or that lists no Node at all, or a
gap of more than a few intervals since the end of the last complete listing
(:func:`~csi_driver.reconcile.periodic.stale_after`), forgets every clock: what was not
observed is never counted as time missing. Once a node has been missing
for the grace period, each of its PVs is reported once (log line, Event on the PV and on its
PVC, the ``csi_driver_lost_node_volumes`` gauge).

When more nodes are missing at once than ``max_lost_nodes``, or more than
``max_lost_percent`` of the nodes (listed plus missing), the round is held: nothing is
reported or deleted (``csi_driver_reconcile_runs_total{result="held"}``), because losing many
nodes at once is likelier a fault of the listing, or of the cluster, than of the machines.

With ``delete`` (the chart's ``nodeLoss.deletePVCs``), the reconciler also:

1. deletes the PV's bound PVC, on condition of the uid the PV's claimRef names (a PVC of the
   same name made since is never touched), so a StatefulSet makes a new one that binds
   elsewhere; the PVC's ``kubernetes.io/pvc-protection`` finalizer keeps it until no Pod uses
   it (the Pod garbage collector removes Pods of deleted Nodes). A claim already being deleted,
   gone, or replaced is left alone, and a claim deleted once is remembered (no second DELETE,
   no second Event while it waits for its finalizer);
2. deletes a PV that is no longer bound and whose reclaim policy is ``Delete``. No provisioner
   can delete its storage (that is done on the node that is gone), so the external
   provisioner's finalizer ``external-provisioner.volume.kubernetes.io/finalizer`` is removed
   first (a merge patch conditioned on the resourceVersion read; without one, nothing is
   patched), then the PV is deleted on condition of its uid; ``kubernetes.io/pv-protection``
   is left to the controller manager, which drops it once the PV is unbound. A ``Retain`` PV
   is reported and left: its owner asked to decide about it.

Just before each deletion the node is looked up again (by name, and by its topology label):
only an answer of "no such Node" lets the deletion go ahead. Leadership is renewed on a thread
of its own (start.py), so a slow round does not lose it; the round checks it before each
report and each write.

A node that comes back (a Node object of that name or label appears again) is forgotten at
once, and nothing is done for it: PVCs already deleted stay deleted, which is why this is
opt-in.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Set
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry

from csi_driver.kubeapi import ApiError, KubeApi, quote
from csi_driver.reconcile.events import Reporter
from csi_driver.reconcile.lease import LeaderElection
from csi_driver.reconcile.metrics import ReconcileCounters, ReconcileMetrics, gauge
from csi_driver.reconcile.objects import PvFacts, node_ids, pv_facts
from csi_driver.reconcile.periodic import stale_after

log = logging.getLogger(__name__)

PROVISIONER_FINALIZER = "external-provisioner.volume.kubernetes.io/finalizer"
NODES = "/api/v1/nodes"
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?\Z")


@dataclass(frozen=True)
class NodeLossPolicy:
    grace_seconds: float
    delete: bool
    interval: float = 30.0
    #: more missing nodes than this at once hold the round
    max_lost_nodes: int = 3
    #: ... and so do more than this share of the nodes (listed plus missing), in percent
    max_lost_percent: float = 50.0


@dataclass(frozen=True)
class Action:
    kind: str  # "delete_pvc" or "delete_pv"
    pv: PvFacts


def lost_volumes(
    node_names: set[str],
    pvs: Iterable[PvFacts],
    missing_since: dict[str, float],
    now: float,
    grace_seconds: float,
) -> list[PvFacts]:
    """The PVs whose node has been missing for ``grace_seconds``; ``missing_since`` (node →
    first seen missing) is brought up to date: nodes that exist again, or that no PV names any
    more, are forgotten."""
    by_node: dict[str, list[PvFacts]] = {}
    for pv in pvs:
        if pv.node:
            by_node.setdefault(pv.node, []).append(pv)
    for node in list(missing_since):
        if node in node_names or node not in by_node:
            del missing_since[node]
    lost: list[PvFacts] = []
    for node, on_node in sorted(by_node.items()):
        if node in node_names:
            continue
        since = missing_since.setdefault(node, now)
        if now - since >= grace_seconds:
            lost.extend(on_node)
    return lost


def too_many_lost(missing: int, listed: int, policy: NodeLossPolicy) -> bool:
    """Whether ``missing`` nodes gone at once, beside ``listed`` present, is past the limits."""
    if missing == 0:
        return False
    share = 100.0 * missing / (missing + listed)
    return missing > policy.max_lost_nodes or share > policy.max_lost_percent


def actions_for(pv: PvFacts, claims_done: Set[str] = frozenset()) -> list[Action]:
    """What releasing one lost PV takes now (nothing for what is already on its way, nor for
    a claim this process deleted already)."""
    if pv.deleting:
        return []
    if pv.phase == "Bound" and pv.claim is not None and pv.claim.uid:
        return [] if pv.claim.uid in claims_done else [Action("delete_pvc", pv)]
    if pv.phase in ("Released", "Available", "Failed") and pv.reclaim_policy == "Delete":
        return [Action("delete_pv", pv)]
    return []


class NodeLoss:
    def __init__(
        self,
        api: KubeApi,
        driver_name: str,
        topology_key: str,
        policy: NodeLossPolicy,
        election: LeaderElection,
        reporter: Reporter,
        registry: CollectorRegistry,
        counters: ReconcileCounters,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._api = api
        self._driver = driver_name
        self._key = topology_key
        self._policy = policy
        self._election = election
        self._reporter = reporter
        self._clock = clock
        self._metrics = ReconcileMetrics(counters, "node_loss")
        self._lost = gauge(
            registry,
            "csi_driver_lost_node_volumes",
            "PersistentVolumes of this driver whose Node has been gone past the grace period.",
        )
        self._leader = gauge(
            registry,
            "csi_driver_reconcile_leader",
            "1 while this controller leads the reconcilers.",
        )
        self._missing_since: dict[str, float] = {}
        self._reported: set[str] = set()
        #: uids of the claims deleted (or found deleting, gone or replaced) by this process
        self._claims_done: set[str] = set()
        self._last_good: float | None = None
        self._was_leading = False

    def elect(self) -> None:
        """The election thread's tick: renew (or try to take) the Lease."""
        self._leader.set(1 if self._election.step() else 0)

    def step(self) -> None:
        """The round thread's tick: a round while this process leads."""
        if not self._election.leading():
            if self._was_leading:  # another replica decides; a new term starts afresh
                self._forget()
                self._reported.clear()
                self._claims_done.clear()
                self._metrics.run("not_leader")
            self._was_leading = False
            return
        self._was_leading = True
        self.round()

    def _forget(self) -> None:
        self._missing_since.clear()
        self._last_good = None

    def round(self) -> None:
        now = self._clock()
        if self._last_good is not None and now - self._last_good > stale_after(
            self._policy.interval
        ):
            self._forget()  # unobserved time never counts as time missing
        try:
            nodes = self._api.list_all(NODES, metadata_only=True)
            items = self._api.list_all("/api/v1/persistentvolumes")
        except ApiError as exc:
            log.warning(
                "node loss: cannot list Nodes and PVs; nothing done", extra={"error": str(exc)}
            )
            self._forget()
            self._metrics.run("api_error")
            return
        present = node_ids(nodes, self._key)
        if present is None or not nodes:
            log.warning("node loss: a Node listing that is empty or has a nameless Node; ignored")
            self._forget()
            self._metrics.run("api_error")
            return
        ours = [
            f for f in (pv_facts(i, self._key) for i in items) if f and f.driver == self._driver
        ]
        lost = lost_volumes(present, ours, self._missing_since, now, self._policy.grace_seconds)
        self._last_good = self._clock()  # the end of the listing: its own length is no gap
        if too_many_lost(len(self._missing_since), len(nodes), self._policy):
            log.warning(
                "node loss: too many nodes missing at once; nothing done",
                extra={
                    "missing": len(self._missing_since),
                    "listed": len(nodes),
                    "max_lost_nodes": self._policy.max_lost_nodes,
                    "max_lost_percent": self._policy.max_lost_percent,
                },
            )
            self._lost.set(len(lost))
            self._metrics.run("held")
            return
        self._lost.set(len(lost))
        self._reported &= {pv.uid for pv in lost}
        self._claims_done &= {pv.claim.uid for pv in lost if pv.claim is not None}
        for pv in lost:
            if not self._election.leading():
                self._metrics.run("not_leader")
                return
            self._report(pv)
            if self._policy.delete:
                for action in actions_for(pv, self._claims_done):
                    if not self._election.leading():
                        self._metrics.run("not_leader")
                        return
                    self._act(action)
        self._metrics.run("ok")

    def _report(self, pv: PvFacts) -> None:
        if pv.uid in self._reported:
            return
        self._reported.add(pv.uid)
        what = (
            "its claim will be deleted so that its Pods can start elsewhere"
            if self._policy.delete
            else "nodeLoss.deletePVCs is off: nothing is changed"
        )
        message = (
            f"node {pv.node!r} of volume {pv.handle!r} is gone (its Node object was deleted more"
            f" than {self._policy.grace_seconds:g}s ago); the data is lost with it; {what}"
        )
        log.warning(
            "volume on a lost node",
            extra={
                "pv": pv.name,
                "node": pv.node,
                "volume_id": pv.handle,
                "claim": f"{pv.claim.namespace}/{pv.claim.name}" if pv.claim else "",
            },
        )
        self._metrics.action("report")
        self._reporter.event(pv.ref, "NodeLost", message)
        if pv.claim is not None and pv.phase == "Bound":
            self._reporter.event(pv.claim, "NodeLost", f"PersistentVolume {pv.name}: {message}")

    def node_gone(self, node: str) -> bool:
        """Asked again just before a deletion: no Node has that name, and none carries the
        topology label with that value. ApiError when the API cannot say."""
        try:
            self._api.get(f"{NODES}/{quote(node)}")
            return False
        except ApiError as exc:
            if exc.status != 404:
                raise
        if not _LABEL_VALUE.match(node):  # no label can hold it
            return True
        labelled = self._api.list_all(
            NODES, {"labelSelector": f"{self._key}={node}"}, metadata_only=True
        )
        return not labelled

    def _act(self, action: Action) -> None:
        pv = action.pv
        try:
            if not self.node_gone(pv.node):
                log.warning(
                    "node loss: the node is back; nothing done",
                    extra={"pv": pv.name, "node": pv.node},
                )
                self._missing_since.pop(pv.node, None)
                self._metrics.action("skip")
                return
            done = self._delete_claim(pv) if action.kind == "delete_pvc" else self._delete_pv(pv)
        except ApiError as exc:
            log.warning(
                "node loss: could not act; next round retries",
                extra={"action": action.kind, "pv": pv.name, "error": str(exc)},
            )
            self._metrics.action("api_error")
            return
        self._metrics.action(action.kind if done else "skip")

    def _delete_claim(self, pv: PvFacts) -> bool:
        """Delete the PV's claim; False when there was nothing to delete (gone, replaced,
        being deleted already): no Event then, and no retry."""
        claim = pv.claim
        assert claim is not None
        path = (
            f"/api/v1/namespaces/{quote(claim.namespace)}"
            f"/persistentvolumeclaims/{quote(claim.name)}"
        )
        current = self._get_or_none(path)
        meta = current.get("metadata") if current is not None else None
        if (
            not isinstance(meta, dict)
            or meta.get("uid") != claim.uid
            or meta.get("deletionTimestamp")
        ):
            self._claims_done.add(claim.uid)
            return False
        deleted = self._delete(path, claim.uid)
        self._claims_done.add(claim.uid)
        if not deleted:
            return False
        log.warning(
            "deleted the claim of a volume on a lost node",
            extra={"pv": pv.name, "claim": f"{claim.namespace}/{claim.name}"},
        )
        self._reporter.event(
            pv.ref,
            "ClaimDeleted",
            f"deleted PVC {claim.namespace}/{claim.name} of this volume: its node {pv.node!r}"
            " is gone",
        )
        return True

    def _delete_pv(self, pv: PvFacts) -> bool:
        path = f"/api/v1/persistentvolumes/{quote(pv.name)}"
        if PROVISIONER_FINALIZER in pv.finalizers:
            if not pv.resource_version:  # a patch without a precondition could land anywhere
                log.warning(
                    "node loss: a PV without resourceVersion; not patched", extra={"pv": pv.name}
                )
                return False
            kept = [f for f in pv.finalizers if f != PROVISIONER_FINALIZER]
            self._api.merge_patch(
                path, {"metadata": {"finalizers": kept, "resourceVersion": pv.resource_version}}
            )
        if not self._delete(path, pv.uid):
            return False
        log.warning("deleted a volume of a lost node", extra={"pv": pv.name, "node": pv.node})
        return True

    def _get_or_none(self, path: str) -> dict[str, Any] | None:
        try:
            return self._api.get(path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def _delete(self, path: str, uid: str) -> bool:
        """False when there was nothing to delete: gone (404), or the name now another
        object's (409 on the uid precondition)."""
        try:
            self._api.delete(path, uid=uid)
        except ApiError as exc:
            if exc.status in (404, 409):
                return False
            raise
        return True


__all__ = [
    "Action",
    "NodeLoss",
    "NodeLossPolicy",
    "actions_for",
    "lost_volumes",
    "too_many_lost",
]
