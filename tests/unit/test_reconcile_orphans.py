"""Orphans (csi_driver/reconcile/orphans.py) with an in-memory API and backend: what may be
deleted, and that a failed or changed listing deletes nothing. The path through a real
cluster and the hostpath backend is tests/e2e/test_10_nodeloss.py."""

from __future__ import annotations

import dataclasses
from typing import Any, cast

from prometheus_client import CollectorRegistry

from csi_driver.backends.base import Backend
from csi_driver.kubeapi import KubeApi
from csi_driver.locks import KeyLocks
from csi_driver.model import AccessType, Volume
from csi_driver.reconcile.events import MAX_NAME, Reporter, event_name
from csi_driver.reconcile.metrics import ReconcileCounters
from csi_driver.reconcile.objects import Ref
from csi_driver.reconcile.orphans import OrphanPolicy, Orphans
from csi_driver.reconcile.periodic import stale_after
from tests.unit.reconcile_fakes import Clock, FakeApi

NODE = "n1"
PVS = "/api/v1/persistentvolumes"
GRACE = 100.0


class FakeBackend:
    def __init__(self, *volumes: Volume) -> None:
        self.volumes = {v.id: v for v in volumes}
        self.deleted: list[str] = []

    def list_volumes(self, after: str = "", limit: int = 0) -> list[Volume]:
        return sorted(self.volumes.values(), key=lambda v: v.id)

    def get_volume(self, volume_id: str) -> Volume | None:
        return self.volumes.get(volume_id)

    def delete_volume(self, volume_id: str) -> None:
        self.deleted.append(volume_id)
        self.volumes.pop(volume_id, None)


def _volume(n: int, name: str | None = None, **kw: Any) -> Volume:
    return Volume(
        id=f"v{n:032x}@{NODE}",
        name=name or f"pvc-{n}",
        capacity_bytes=1 << 20,
        access_type=AccessType.MOUNT,
        fs_type="",
        node_id=NODE,
        **kw,
    )


def _pv(volume: Volume) -> dict[str, Any]:
    return {
        "metadata": {"name": volume.name, "uid": "u-" + volume.name},
        "spec": {"csi": {"driver": "d", "volumeHandle": volume.id}},
    }


def _setup(
    delete: bool, *volumes: Volume, max_deletions: int = 10
) -> tuple[FakeApi, FakeBackend, Clock, Orphans, KeyLocks, CollectorRegistry]:
    api, clock, registry, locks = FakeApi(), Clock(), CollectorRegistry(), KeyLocks()
    backend = FakeBackend(*volumes)
    api.put_object("/api/v1/nodes", {"metadata": {"name": NODE, "uid": "node-uid"}})
    orphans = Orphans(
        cast(KubeApi, api),
        cast(Backend, backend),
        locks,
        NODE,
        OrphanPolicy(GRACE, delete, max_deletions, interval=GRACE),
        Reporter(cast(KubeApi, api), "test", NODE),
        registry,
        ReconcileCounters(registry),
        clock=clock,
    )
    return api, backend, clock, orphans, locks, registry


def _tick(orphans: Orphans, clock: Clock, seconds: float) -> None:
    clock.now += seconds
    orphans.step()


def test_a_volume_without_pv_past_the_grace_period_is_reported_and_kept_in_report_mode() -> None:
    kept, orphan = _volume(1), _volume(2)
    api, backend, clock, orphans, _, registry = _setup(False, kept, orphan)
    api.put_object(PVS, _pv(kept))
    _tick(orphans, clock, 0)
    assert not api.events
    _tick(orphans, clock, GRACE)
    _tick(orphans, clock, 10)
    assert [(e["involvedObject"]["kind"], e["reason"]) for e in api.events] == [
        ("Node", "OrphanedVolume")
    ]
    assert orphan.id in api.events[0]["message"]
    assert api.events[0]["involvedObject"]["uid"] == "node-uid"
    assert backend.deleted == []
    assert registry.get_sample_value("csi_driver_orphan_volumes") == 1
    assert registry.get_sample_value("csi_driver_orphan_bytes") == 1 << 20


def test_delete_mode_reclaims_only_the_orphan() -> None:
    kept, orphan = _volume(1), _volume(2)
    api, backend, clock, orphans, _, _ = _setup(True, kept, orphan)
    api.put_object(PVS, _pv(kept))
    _tick(orphans, clock, 0)
    _tick(orphans, clock, GRACE)
    assert backend.deleted == [orphan.id]
    assert [e["reason"] for e in api.events] == ["OrphanedVolume", "OrphanedVolumeDeleted"]


def test_a_failed_listing_deletes_nothing() -> None:
    api, backend, clock, orphans, _, registry = _setup(True, _volume(2))
    _tick(orphans, clock, 0)
    api.failing[PVS] = 403
    _tick(orphans, clock, GRACE)
    assert backend.deleted == [] and not api.events
    assert (
        registry.get_sample_value(
            "csi_driver_reconcile_runs_total", {"reconciler": "orphans", "result": "api_error"}
        )
        == 1
    )


def test_a_pv_appearing_before_the_deletion_saves_the_volume() -> None:
    orphan = _volume(2)
    api, backend, clock, orphans, _, _ = _setup(True, orphan)
    _tick(orphans, clock, 0)
    clock.now += GRACE
    real_handles = orphans.handles
    calls = []

    def handles_then_pv_appears() -> set[str]:
        calls.append(1)
        found = real_handles()
        if len(calls) == 1:  # the round's listing; the PV is made right after it
            api.put_object(PVS, _pv(orphan))
        return found

    orphans.handles = handles_then_pv_appears  # type: ignore[method-assign]
    orphans.step()
    assert backend.deleted == [] and len(calls) == 2


def test_the_relisting_failing_deletes_nothing() -> None:
    orphan = _volume(2)
    api, backend, clock, orphans, _, _ = _setup(True, orphan)
    _tick(orphans, clock, 0)
    clock.now += GRACE
    real_handles = orphans.handles
    calls = []

    def second_fails() -> set[str]:
        calls.append(1)
        if len(calls) == 2:
            api.failing[PVS] = 500
        return real_handles()

    orphans.handles = second_fails  # type: ignore[method-assign]
    orphans.step()
    assert backend.deleted == []


def test_busy_published_and_inline_volumes_are_not_deleted() -> None:
    busy = _volume(1)
    published = _volume(2, published_nodes=frozenset({NODE}))
    inline = _volume(3, name="csi-" + "ab" * 32)
    api, backend, clock, orphans, locks, _ = _setup(True, busy, published, inline)
    _tick(orphans, clock, 0)
    with locks.hold(busy.id):  # a CSI call on it is running
        _tick(orphans, clock, GRACE)
    assert backend.deleted == []
    assert [e["reason"] for e in api.events] == ["OrphanedVolume"]  # busy one only
    _tick(orphans, clock, 1)
    assert backend.deleted == [busy.id]


def test_a_volume_changed_since_the_listing_is_not_deleted() -> None:
    orphan = _volume(2)
    _, backend, clock, orphans, _, _ = _setup(True, orphan)
    _tick(orphans, clock, 0)
    clock.now += GRACE
    real_handles = orphans.handles
    calls = []

    def resized() -> set[str]:
        calls.append(1)
        if len(calls) == 2:  # expanded between the round's listing and the deletion
            backend.volumes[orphan.id] = dataclasses.replace(orphan, capacity_bytes=2 << 20)
        return real_handles()

    orphans.handles = resized  # type: ignore[method-assign]
    orphans.step()
    assert backend.deleted == []


def test_deletions_per_round_are_bounded() -> None:
    volumes = [_volume(n) for n in range(1, 6)]
    _, backend, clock, orphans, _, _ = _setup(True, *volumes, max_deletions=2)
    _tick(orphans, clock, 0)
    _tick(orphans, clock, GRACE)
    assert len(backend.deleted) == 2


def test_an_outage_is_not_counted_toward_the_grace_period() -> None:
    orphan = _volume(2)
    api, backend, clock, orphans, _, _ = _setup(True, orphan)
    _tick(orphans, clock, 0)  # seen once without a PV
    api.failing[PVS] = 503
    for _ in range(4):  # the PV listing fails for twice the grace period
        _tick(orphans, clock, GRACE / 2)
    del api.failing[PVS]
    _tick(orphans, clock, 1)  # the first good listing: the clock starts again
    assert backend.deleted == [] and not api.events
    _tick(orphans, clock, GRACE)
    assert backend.deleted == [orphan.id]


def test_a_gap_between_complete_listings_starts_the_clock_again() -> None:
    orphan = _volume(2)
    _, backend, clock, orphans, _, _ = _setup(True, orphan)
    _tick(orphans, clock, 0)
    _tick(orphans, clock, stale_after(GRACE) + 1)  # no round completed meanwhile
    assert backend.deleted == []
    _tick(orphans, clock, GRACE)
    assert backend.deleted == [orphan.id]


def test_no_node_event_without_the_nodes_uid() -> None:
    api, _, clock, orphans, _, _ = _setup(False, _volume(2), _volume(3))
    api.failing["/api/v1/nodes"] = 500
    _tick(orphans, clock, 0)
    _tick(orphans, clock, GRACE)
    assert not api.events, "an Event with no uid is one kubectl describe never shows"
    del api.failing["/api/v1/nodes"]
    orphans._node_event("OrphanedVolume", "x")  # the next Event asks again
    assert [e["involvedObject"]["uid"] for e in api.events] == ["node-uid"]


def test_event_names_fit_whatever_the_objects_name() -> None:
    long = "a" * 253
    name = event_name(long)
    assert len(name) <= MAX_NAME and name.startswith("a" * 200)
    assert event_name("pv-1").startswith("pv-1.") and len(event_name("pv-1")) == 4 + 17
    stem = event_name("x" * 235 + ".yyyy").rsplit(".", 1)[0]
    assert stem == "x" * 235, "no name part may end in a dot"
    api = FakeApi()
    Reporter(cast(KubeApi, api), "test", NODE).event(Ref("Node", long, "u"), "R", "m")
    assert len(api.events[0]["metadata"]["name"]) <= MAX_NAME
    assert api.events[0]["involvedObject"]["name"] == long


def test_both_reconcilers_share_one_registry() -> None:
    """Counters are registered once: a second reconciler on the registry adds its label."""
    api, _, clock, orphans, _, registry = _setup(False, _volume(2))
    from csi_driver.reconcile.lease import LeaderElection
    from csi_driver.reconcile.nodeloss import NodeLoss, NodeLossPolicy

    counters = orphans._metrics._counters
    kube = cast(KubeApi, api)
    loss = NodeLoss(
        kube,
        "d",
        "k",
        NodeLossPolicy(GRACE, False),
        LeaderElection(kube, "ns", "l", "me", clock=clock),
        Reporter(kube, "test", NODE),
        registry,
        counters,
        clock=clock,
    )
    _tick(orphans, clock, 0)
    loss.elect()
    loss.step()
    for reconciler in ("orphans", "node_loss"):
        assert (
            registry.get_sample_value(
                "csi_driver_reconcile_runs_total", {"reconciler": reconciler, "result": "ok"}
            )
            == 1
        )
