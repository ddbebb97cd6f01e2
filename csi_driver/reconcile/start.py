"""The reconcilers a configuration asks for, built and ready to start (app.py calls this only
when one is on, so a driver with both off imports none of this package)."""

from __future__ import annotations

import os
import socket

from prometheus_client import CollectorRegistry

from csi_driver.backends.base import Backend
from csi_driver.config import Config, Reconcile
from csi_driver.kubeapi import KubeApi
from csi_driver.locks import KeyLocks
from csi_driver.reconcile.events import Reporter
from csi_driver.reconcile.metrics import ReconcileCounters
from csi_driver.reconcile.periodic import Periodic

COMPONENT = "nodelocal-csi-reconciler"


def lease_name(driver_name: str) -> str:
    return "nodelocal-csi-reconcile-" + driver_name.replace(".", "-")


def build_reconcilers(
    config: Config,
    backend: Backend | None,
    locks: KeyLocks,
    registry: CollectorRegistry,
    api: KubeApi | None = None,
) -> list[Periodic]:
    """Raises ApiError when the in-cluster configuration is missing."""
    rc = config.reconcile
    api = api or KubeApi.in_cluster()
    reporter = Reporter(api, COMPONENT, config.node_id)
    counters = ReconcileCounters(registry)
    out: list[Periodic] = []
    if rc.node_loss is not Reconcile.OFF:
        from csi_driver.reconcile.lease import LeaderElection
        from csi_driver.reconcile.nodeloss import NodeLoss, NodeLossPolicy

        assert rc.namespace is not None
        # the Pod's name (its hostname) tells replicas on one node apart
        identity = f"{socket.gethostname()}_{os.getpid()}"
        election = LeaderElection(api, rc.namespace, lease_name(config.driver_name), identity)
        node_loss = NodeLoss(
            api,
            config.driver_name,
            config.topology_key,
            NodeLossPolicy(
                rc.node_loss_grace_seconds,
                rc.node_loss is Reconcile.DELETE,
                rc.node_loss_interval,
                rc.node_loss_max_nodes,
                rc.node_loss_max_percent,
            ),
            election,
            reporter,
            registry,
            counters,
        )
        # the Lease is renewed on a thread of its own every retry period, so that a round
        # that takes long never lets it lapse; a round runs every node_loss_interval while
        # this replica leads, and gives the Lease up when it stops
        out.append(Periodic("leader-election", election.retry_period, node_loss.elect))
        out.append(
            Periodic("node-loss", rc.node_loss_interval, node_loss.step, on_stop=election.release)
        )
    if rc.orphans is not Reconcile.OFF:
        from csi_driver.reconcile.orphans import OrphanPolicy, Orphans

        assert backend is not None
        orphans = Orphans(
            api,
            backend,
            locks,
            config.node_id,
            OrphanPolicy(
                rc.orphans_grace_seconds,
                rc.orphans is Reconcile.DELETE,
                interval=rc.orphans_interval,
            ),
            reporter,
            registry,
            counters,
        )
        out.append(Periodic("orphans", rc.orphans_interval, orphans.step))
    return out


__all__ = ["build_reconcilers", "lease_name"]
