"""Leader election through a Lease (csi_driver/reconcile/lease.py), two candidates on one
in-memory API: one leads at a time, a silent leader is replaced after the lease duration, a
leader that cannot renew stops leading before anyone else may start."""

from __future__ import annotations

from typing import Any, cast

from csi_driver.kubeapi import KubeApi
from csi_driver.reconcile.lease import LeaderElection
from tests.unit.reconcile_fakes import Clock, FakeApi

LEASES = "/apis/coordination.k8s.io/v1/namespaces/ns/leases"


def _pair() -> tuple[FakeApi, Clock, LeaderElection, LeaderElection]:
    api, clock = FakeApi(), Clock()
    stamps = iter(range(10_000))
    a, b = (
        LeaderElection(
            cast(KubeApi, api),
            "ns",
            "l",
            who,
            lease_seconds=15,
            clock=clock,
            stamp=lambda: f"t{next(stamps)}",
        )
        for who in ("a", "b")
    )
    return api, clock, a, b


def test_one_leads_the_other_waits_then_takes_over_a_silent_leader() -> None:
    api, clock, a, b = _pair()
    assert a.step() and not b.step()
    for _ in range(5):
        clock.now += 3
        assert a.step() and not b.step()
    assert api.objects[LEASES]["l"]["spec"]["holderIdentity"] == "a"
    clock.now += 14  # a stops renewing; b has seen the record unchanged for 14 s
    assert not b.step()
    assert not a.leading(), "a leader past its renew deadline must stop acting"
    clock.now += 2
    assert b.step()
    spec = api.objects[LEASES]["l"]["spec"]
    assert spec["holderIdentity"] == "b" and spec["leaseTransitions"] == 1
    assert not a.step(), "the old leader must see it lost the lease"


def test_a_failing_api_ends_leadership_after_the_renew_deadline() -> None:
    api, clock, a, _ = _pair()
    assert a.step()
    api.failing[LEASES] = 500
    clock.now += 5
    assert a.step()  # within the renew deadline (10 s): still leading
    clock.now += 6
    assert not a.step()


def test_release_lets_the_other_take_over_at_once() -> None:
    _, clock, a, b = _pair()
    assert a.step() and not b.step()
    a.release()
    clock.now += 1
    assert b.step()


def test_two_candidates_writing_at_once_one_wins() -> None:
    """Both read the expired Lease; the second PUT carries a stale resourceVersion (409)."""
    api, clock, a, b = _pair()
    assert a.step()
    assert not b.step()
    c = LeaderElection(cast(KubeApi, api), "ns", "l", "c", lease_seconds=15, clock=clock)
    assert not c.step()
    clock.now += 16  # a went silent; b and c both see the Lease expired
    real_replace = api.replace
    interleaved: list[int] = []

    def c_writes_first(path: str, body: Any) -> Any:
        if not interleaved:
            interleaved.append(1)
            assert c.step(), "c's own write lands first"
        return real_replace(path, body)

    api.replace = c_writes_first  # type: ignore[method-assign]
    assert not b.step(), "b's write was made on a Lease c has changed since"
    assert c.leading() and not b.leading()
    assert api.objects[LEASES]["l"]["spec"]["holderIdentity"] == "c"


def test_no_write_after_release() -> None:
    api, clock, a, _ = _pair()
    assert a.step()
    a.release()
    writes = len(api.writes)
    clock.now += 1
    assert not a.step() and len(api.writes) == writes
    assert api.objects[LEASES]["l"]["spec"]["holderIdentity"] == ""
