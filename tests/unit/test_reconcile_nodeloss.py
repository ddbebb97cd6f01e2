"""Node loss (csi_driver/reconcile/nodeloss.py): what is decided on which listing, with an
in-memory API. The path through a real API server is tests/e2e/test_10_nodeloss.py."""

from __future__ import annotations

import threading
import time
from typing import Any, cast

import pytest
from prometheus_client import CollectorRegistry

from csi_driver.kubeapi import KubeApi
from csi_driver.reconcile.events import Reporter
from csi_driver.reconcile.lease import LeaderElection
from csi_driver.reconcile.metrics import ReconcileCounters
from csi_driver.reconcile.nodeloss import (
    PROVISIONER_FINALIZER,
    NodeLoss,
    NodeLossPolicy,
    actions_for,
    lost_volumes,
    too_many_lost,
)
from csi_driver.reconcile.objects import affinity_node, node_ids, pv_facts
from csi_driver.reconcile.periodic import Periodic, stale_after, stop_all
from tests.unit.reconcile_fakes import Clock, FakeApi

DRIVER = "nodelocal.csi.dev"
KEY = f"topology.{DRIVER}/node"
PVS = "/api/v1/persistentvolumes"
NODES = "/api/v1/nodes"
GRACE = 60.0
CLAIMS = "/api/v1/namespaces/app/persistentvolumeclaims"
CLAIM = f"{CLAIMS}/data"


def _affinity(*nodes: str) -> dict[str, Any]:
    return {
        "required": {
            "nodeSelectorTerms": [
                {"matchExpressions": [{"key": KEY, "operator": "In", "values": list(nodes)}]}
            ]
        }
    }


def _pv(
    name: str,
    node: str,
    *,
    phase: str = "Bound",
    policy: str = "Delete",
    driver: str = DRIVER,
    claim: str | None = "data",
    finalizers: tuple[str, ...] = ("kubernetes.io/pv-protection", PROVISIONER_FINALIZER),
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "csi": {"driver": driver, "volumeHandle": f"v{'0' * 32}@{node}"},
        "nodeAffinity": _affinity(node),
        "persistentVolumeReclaimPolicy": policy,
    }
    if claim:
        spec["claimRef"] = {"name": claim, "namespace": "app", "uid": f"uid-{claim}"}
    return {
        "metadata": {"name": name, "uid": f"uid-{name}", "finalizers": list(finalizers)},
        "spec": spec,
        "status": {"phase": phase},
    }


def _node(name: str, node_id: str = "") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "uid": f"uid-{name}"}
    if node_id:
        meta["labels"] = {KEY: node_id}
    return {"metadata": meta}


def _loss(
    api: FakeApi,
    clock: Clock,
    registry: CollectorRegistry,
    delete: bool,
    interval: float = GRACE,
    max_lost_nodes: int = 3,
    identity: str = "me",
) -> NodeLoss:
    kube = cast(KubeApi, api)
    return NodeLoss(
        kube,
        DRIVER,
        KEY,
        NodeLossPolicy(GRACE, delete, interval=interval, max_lost_nodes=max_lost_nodes),
        LeaderElection(kube, "ns", "lease", identity, clock=clock),
        Reporter(kube, "test", "host"),
        registry,
        ReconcileCounters(registry),
        clock=clock,
    )


def _setup(
    delete: bool, interval: float = GRACE, max_lost_nodes: int = 3
) -> tuple[FakeApi, Clock, NodeLoss, CollectorRegistry]:
    api, clock, registry = FakeApi(), Clock(), CollectorRegistry()
    loss = _loss(api, clock, registry, delete, interval, max_lost_nodes)
    api.put_object(NODES, _node("alive"))
    api.put_object(PVS, _pv("pv-alive", "alive"))
    api.put_object(PVS, _pv("pv-lost", "gone"))
    api.put_object(
        "/api/v1/namespaces/app/persistentvolumeclaims",
        {"metadata": {"name": "data", "uid": "uid-data"}},
    )
    return api, clock, loss, registry


def _tick(loss: NodeLoss, clock: Clock, seconds: float) -> None:
    clock.now += seconds
    loss.elect()  # the election thread's tick, then the round thread's
    loss.step()


def _runs(registry: CollectorRegistry, result: str) -> float:
    value = registry.get_sample_value(
        "csi_driver_reconcile_runs_total", {"reconciler": "node_loss", "result": result}
    )
    return value or 0.0


def test_a_node_missing_past_the_grace_period_is_reported_once_and_nothing_deleted() -> None:
    api, clock, loss, registry = _setup(delete=False)
    _tick(loss, clock, 0)
    assert not api.events, "reported before the grace period ran out"
    _tick(loss, clock, GRACE + 1)
    _tick(loss, clock, 5)
    reasons = [(e["involvedObject"]["kind"], e["reason"]) for e in api.events]
    assert reasons == [("PersistentVolume", "NodeLost"), ("PersistentVolumeClaim", "NodeLost")]
    assert "pv-lost" in api.events[0]["involvedObject"]["name"]
    assert api.deletes() == []
    assert registry.get_sample_value("csi_driver_lost_node_volumes") == 1


def test_with_delete_the_claim_goes_then_the_released_pv() -> None:
    api, clock, loss, _ = _setup(delete=True)
    _tick(loss, clock, 0)
    _tick(loss, clock, GRACE + 1)
    assert api.deletes() == ["/api/v1/namespaces/app/persistentvolumeclaims/data"]
    assert ("DELETE", api.deletes()[0], "uid-data") in api.writes  # on condition of its uid
    api.objects[PVS]["pv-lost"]["status"]["phase"] = "Released"
    _tick(loss, clock, 5)
    assert api.deletes()[-1] == f"{PVS}/pv-lost"
    patch = next(b for m, p, b in api.writes if m == "PATCH")
    assert PROVISIONER_FINALIZER not in patch["metadata"]["finalizers"]
    assert "kubernetes.io/pv-protection" in patch["metadata"]["finalizers"]
    assert "pv-alive" in api.objects[PVS]


def test_a_retained_pv_is_reported_but_kept() -> None:
    api, clock, loss, _ = _setup(delete=True)
    api.put_object(PVS, _pv("pv-lost", "gone", phase="Released", policy="Retain", claim=None))
    _tick(loss, clock, 0)
    _tick(loss, clock, GRACE + 1)
    assert api.deletes() == []
    assert [e["reason"] for e in api.events] == ["NodeLost"]


def test_a_failed_listing_decides_nothing() -> None:
    api, clock, loss, registry = _setup(delete=True)
    _tick(loss, clock, 0)
    api.failing[NODES] = 500
    _tick(loss, clock, GRACE + 1)
    assert api.deletes() == [] and not api.events
    assert (
        registry.get_sample_value(
            "csi_driver_reconcile_runs_total", {"reconciler": "node_loss", "result": "api_error"}
        )
        == 1
    )


def test_a_node_that_returns_is_forgotten() -> None:
    api, clock, loss, _ = _setup(delete=True)
    _tick(loss, clock, 0)
    _tick(loss, clock, GRACE - 1)
    api.put_object(NODES, _node("gone"))
    _tick(loss, clock, 2)
    del api.objects[NODES]["gone"]
    _tick(loss, clock, 2)  # missing again: the grace period starts over
    assert api.deletes() == [] and not api.events


def test_pvs_of_other_drivers_and_unclear_affinity_are_left_alone() -> None:
    api, clock, loss, _ = _setup(delete=True)
    del api.objects[PVS]["pv-lost"]
    api.put_object(PVS, _pv("pv-other", "gone", driver="other.csi.dev"))
    odd = _pv("pv-two-nodes", "gone")
    odd["spec"]["nodeAffinity"] = _affinity("gone", "alive")
    api.put_object(PVS, odd)
    _tick(loss, clock, 0)
    _tick(loss, clock, GRACE + 1)
    assert api.deletes() == [] and not api.events


def test_a_follower_does_nothing() -> None:
    api, clock, loss, _ = _setup(delete=True)
    api.put_object(
        "/apis/coordination.k8s.io/v1/namespaces/ns/leases",
        {
            "metadata": {"name": "lease"},
            "spec": {"holderIdentity": "other", "leaseDurationSeconds": 15, "renewTime": "t1"},
        },
    )
    _tick(loss, clock, 0)
    _tick(loss, clock, 10)
    assert not api.events and api.deletes() == []


def test_affinity_and_actions_rules() -> None:
    assert affinity_node({"nodeAffinity": _affinity("n1")}, KEY) == "n1"
    assert affinity_node({"nodeAffinity": _affinity("n1", "n2")}, KEY) == ""
    assert affinity_node({"nodeAffinity": "junk"}, KEY) == ""
    assert affinity_node({}, KEY) == ""
    facts = pv_facts(_pv("p", "n"), KEY)
    assert facts is not None and facts.node == "n"
    assert [a.kind for a in actions_for(facts)] == ["delete_pvc"]
    assert pv_facts({"metadata": {"name": "x"}, "spec": {}}, KEY) is None
    since: dict[str, float] = {}
    assert lost_volumes({"n"}, [facts], since, 0.0, 1.0) == [] and since == {}


def test_an_outage_is_not_counted_as_time_missing() -> None:
    api, clock, loss, registry = _setup(delete=True)
    _tick(loss, clock, 0)  # "gone" seen missing once
    api.failing[NODES] = 503
    for _ in range(4):  # twice the grace period without a complete listing
        _tick(loss, clock, GRACE / 2)
    del api.failing[NODES]
    _tick(loss, clock, 1)  # the first good listing starts the clock again
    assert api.deletes() == [] and not api.events
    assert _runs(registry, "api_error") == 4
    _tick(loss, clock, GRACE)
    assert api.deletes() == [CLAIM]


def test_a_gap_between_complete_listings_starts_the_clock_again() -> None:
    api, clock, loss, _ = _setup(delete=True, interval=10.0)
    _tick(loss, clock, 0)
    # no round ran meanwhile (a stall, a crash), for longer than the grace period
    _tick(loss, clock, max(stale_after(10.0), GRACE) + 1)
    assert api.deletes() == [] and not api.events


def test_a_slow_listing_is_no_gap() -> None:
    """Each listing takes longer than the stale bound; the rounds themselves follow on time."""
    api, clock, loss, registry = _setup(delete=True, interval=2.0)

    def slow() -> None:
        clock.now += stale_after(2.0) + 4
        loss.elect()  # the election thread renews meanwhile

    api.on_list[PVS] = slow
    for _ in range(4):
        _tick(loss, clock, 2)
    assert api.deletes() == [CLAIM]
    assert _runs(registry, "ok") == 4


def test_an_empty_node_listing_decides_nothing() -> None:
    api, clock, loss, registry = _setup(delete=True)
    _tick(loss, clock, 0)
    api.objects[NODES].clear()  # complete, but no Node at all: every PV would look lost
    _tick(loss, clock, GRACE + 1)
    _tick(loss, clock, GRACE + 1)
    assert api.deletes() == [] and not api.events
    assert _runs(registry, "api_error") == 2


def test_a_node_known_by_its_topology_label_is_present() -> None:
    """The PV names the node id (--node-id); the Node's name may differ from it."""
    api, clock, loss, _ = _setup(delete=True)
    api.put_object(NODES, _node("host-7.example", node_id="gone"))
    _tick(loss, clock, 0)
    _tick(loss, clock, GRACE + 1)
    assert api.deletes() == [] and not api.events
    assert node_ids([_node("a", node_id="b"), _node("c")], KEY) == {"a", "b", "c"}
    assert node_ids([{"metadata": {}}], KEY) is None


@pytest.mark.parametrize(("missing", "held"), [(3, False), (4, True)])
def test_many_nodes_missing_at_once_hold_the_round(missing: int, held: bool) -> None:
    api, clock, loss, registry = _setup(delete=True)
    for i in range(50):  # enough present nodes that only the count matters
        api.put_object(NODES, _node(f"alive-{i}"))
    for i in range(1, missing):
        api.put_object(PVS, _pv(f"pv-lost-{i}", f"gone-{i}", claim=None, phase="Released"))
    _tick(loss, clock, 0)
    _tick(loss, clock, GRACE + 1)
    assert bool(api.deletes()) is not held
    assert (_runs(registry, "held") == 2) is held


def test_too_many_lost_by_share() -> None:
    policy = NodeLossPolicy(GRACE, True, max_lost_nodes=100, max_lost_percent=50)
    assert not too_many_lost(1, 1, policy)  # two nodes, one lost: 50 %
    assert too_many_lost(2, 1, policy)
    assert not too_many_lost(0, 0, policy)


def test_a_node_back_just_before_the_deletion_saves_the_claim() -> None:
    api, clock, loss, _ = _setup(delete=True)
    _tick(loss, clock, 0)
    # the round's listings say "gone" is missing; it is back by the time of the deletion
    api.on_list[PVS] = lambda: api.put_object(NODES, _node("gone"))
    _tick(loss, clock, GRACE + 1)
    assert CLAIM not in api.deletes()


def test_a_node_back_under_its_label_just_before_the_deletion_saves_the_claim() -> None:
    api, clock, loss, _ = _setup(delete=True)
    _tick(loss, clock, 0)
    api.on_list[PVS] = lambda: api.put_object(NODES, _node("renamed", node_id="gone"))
    _tick(loss, clock, GRACE + 1)
    assert api.deletes() == []
    assert (NODES, True) in api.lists  # the label lookup lists metadata only


def test_a_terminating_claim_is_deleted_once_with_one_event() -> None:
    api, clock, loss, _ = _setup(delete=True)
    api.finalized.add(CLAIM)  # pvc-protection keeps it while a Pod uses it; the PV stays Bound
    _tick(loss, clock, 0)
    for _ in range(10):
        _tick(loss, clock, GRACE + 1)
    assert api.deletes() == [CLAIM]
    assert [e["reason"] for e in api.events].count("ClaimDeleted") == 1
    # a new leader (a fresh process) finds the claim being deleted: no DELETE, no Event
    api.writes.clear()
    api.events.clear()
    loss._election.release()  # the old leader stops; a new one takes over at once
    fresh = _loss(api, clock, CollectorRegistry(), delete=True, identity="next")
    _tick(fresh, clock, 1)
    _tick(fresh, clock, GRACE + 1)
    assert fresh._election.leading()
    assert api.deletes() == []
    assert "ClaimDeleted" not in [e["reason"] for e in api.events]


def test_a_claim_already_gone_gets_no_event() -> None:
    api, clock, loss, _ = _setup(delete=True)
    del api.objects[CLAIMS]["data"]
    _tick(loss, clock, 0)
    _tick(loss, clock, GRACE + 1)
    _tick(loss, clock, 1)
    assert api.deletes() == []
    assert [e["reason"] for e in api.events] == ["NodeLost", "NodeLost"]


def test_a_pv_without_resource_version_is_not_patched() -> None:
    api, clock, loss, _ = _setup(delete=True)
    api.objects[PVS]["pv-lost"]["status"]["phase"] = "Released"
    api.on_list[PVS] = lambda: api.objects[PVS]["pv-lost"]["metadata"].update(resourceVersion="")
    _tick(loss, clock, 0)
    _tick(loss, clock, GRACE + 1)
    assert [m for m, _, _ in api.writes if m in ("PATCH", "DELETE")] == []


def test_leadership_lost_during_a_round_stops_reporting() -> None:
    api, clock, loss, registry = _setup(delete=False)
    _tick(loss, clock, 0)
    clock.now += GRACE + 1
    loss.elect()

    def slow_listing() -> None:  # the round outlasts the renew deadline, with no renewal
        clock.now += 11

    api.on_list[PVS] = slow_listing
    loss.step()
    assert not api.events
    assert _runs(registry, "not_leader") == 1


def test_the_lease_is_renewed_while_a_long_round_runs() -> None:
    """Real threads and clock: the round's listing takes longer than the renew deadline."""
    api, registry = FakeApi(), CollectorRegistry()
    kube = cast(KubeApi, api)
    election = LeaderElection(kube, "ns", "lease", "me", lease_seconds=1)  # deadline 0.67 s
    loss = NodeLoss(
        kube,
        DRIVER,
        KEY,
        NodeLossPolicy(0.0, True, interval=0.05),
        election,
        Reporter(kube, "test", "host"),
        registry,
        ReconcileCounters(registry),
    )
    api.put_object(NODES, _node("alive"))
    api.put_object(PVS, _pv("pv-lost", "gone"))
    api.put_object(CLAIMS, {"metadata": {"name": "data", "uid": "uid-data"}})
    ready = threading.Event()
    api.on_list[PVS] = lambda: time.sleep(1.0) if ready.is_set() else None
    threads = [
        Periodic("leader-election", election.retry_period, loss.elect),
        Periodic("node-loss", 0.05, loss.step, on_stop=election.release),
    ]
    try:
        threads[0].start()
        deadline = time.monotonic() + 5
        while not election.leading() and time.monotonic() < deadline:
            time.sleep(0.02)
        ready.set()
        threads[1].start()
        while CLAIM not in api.deletes() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop_all(threads, 3.0)
    assert CLAIM in api.deletes()
    assert _runs(registry, "not_leader") == 0
    assert (
        api.objects["/apis/coordination.k8s.io/v1/namespaces/ns/leases"]["lease"]["spec"][
            "holderIdentity"
        ]
        == ""
    ), "the Lease is given up at stop"


def test_the_lease_has_a_thread_of_its_own(tmp_path: Any) -> None:
    from csi_driver.cli import parse_config
    from csi_driver.locks import KeyLocks
    from csi_driver.reconcile.start import build_reconcilers

    config = parse_config(
        [
            *("--mode", "controller", "--endpoint", f"unix://{tmp_path}/csi.sock"),
            *("--node-id", "n1", "--node-loss", "delete", "--reconcile-namespace", "ns"),
            *("--node-loss-interval", "45", "--node-loss-grace-period", "600"),
        ],
        env={},
    )
    built = build_reconcilers(
        config, None, KeyLocks(), CollectorRegistry(), api=cast(KubeApi, FakeApi())
    )
    assert [(p.name, p.interval) for p in built] == [("leader-election", 3.0), ("node-loss", 45)]
