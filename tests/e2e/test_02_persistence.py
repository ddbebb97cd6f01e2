"""Scenario 2: a WaitForFirstConsumer PVC and a Pod.

The PVC waits for its consumer, then binds to a PV pinned to this node; a Pod writes a file,
is deleted, and a new Pod reads the same bytes back.
"""

from __future__ import annotations

import time

from .cluster import NODE_NAME
from .conftest import Release, Timings
from .kube import DRIVER_NAME, TOPOLOGY_KEY, Kube, quantity, unique

WRITE = (
    "dd if=/dev/urandom of=/data/payload bs=64k count=16 2>/dev/null && sync && "
    "sha256sum /data/payload | cut -d' ' -f1 > /data/payload.sha256 && cat /data/payload.sha256"
)


def test_wffc_pvc_binds_on_this_node_and_data_survives_the_pod(
    driver: Release, ns: Kube, timings: Timings
) -> None:
    claim = unique("data")
    ns.pvc(claim, "64Mi")
    # WaitForFirstConsumer: nothing is provisioned before a Pod uses the claim.
    time.sleep(3)
    pvc = ns.read_pvc(claim)
    assert pvc["status"]["phase"] == "Pending"
    assert not pvc["spec"].get("volumeName")
    assert "WaitForFirstConsumer" in ns.events(claim)

    writer = unique("writer")
    t0 = time.monotonic()
    ns.pod_with_claim(writer, claim)
    ns.wait_running(writer)
    timings.record("pod_created_to_running_pending_wffc_pvc", time.monotonic() - t0)

    pvc = ns.wait_pvc_bound(claim)
    assert quantity(pvc["status"]["capacity"]["storage"]) == 64 * 1024 * 1024
    # The selected-node annotation the scheduler set is the node the PV is pinned to.
    assert pvc["metadata"]["annotations"]["volume.kubernetes.io/selected-node"] == NODE_NAME
    pv = ns.read_pv(pvc["spec"]["volumeName"])
    assert pv["spec"]["csi"]["driver"] == DRIVER_NAME
    terms = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
    assert terms == [
        {"matchExpressions": [{"key": TOPOLOGY_KEY, "operator": "In", "values": [NODE_NAME]}]}
    ]

    digest = ns.exec(writer, WRITE).strip()
    assert len(digest) == 64
    ns.delete_pod(writer)

    reader = unique("reader")
    ns.pod_with_claim(reader, claim)
    ns.wait_running(reader)
    assert ns.exec(reader, "sha256sum /data/payload | cut -d' ' -f1").strip() == digest
    assert ns.exec(reader, "cat /data/payload.sha256").strip() == digest
    # The next pod sees the same volume, not a copy: a change made now is visible there.
    ns.exec(reader, "echo changed > /data/second")
    ns.delete_pod(reader)
    third = unique("third")
    ns.pod_with_claim(third, claim)
    ns.wait_running(third)
    assert ns.exec(third, "cat /data/second").strip() == "changed"


def test_pod_start_times(driver: Release, ns: Kube, timings: Timings) -> None:
    """The lane's latency measures: PVC creation to a Running Pod (provisioning, binding,
    staging, publishing), then a Pod starting on the already provisioned volume."""
    claim = unique("warm")
    first = unique("first")
    t0 = time.monotonic()
    ns.pvc(claim, "16Mi")
    ns.pod_with_claim(first, claim, "echo ok > /data/ok && sleep 3600")
    ns.wait_running(first)
    timings.record("pvc_created_to_pod_running", time.monotonic() - t0)
    ns.delete_pod(first)
    t0 = time.monotonic()
    second = unique("second")
    ns.pod_with_claim(second, claim)
    ns.wait_running(second)
    timings.record("pod_created_to_running_with_bound_pvc", time.monotonic() - t0)
    assert ns.exec(second, "cat /data/ok").strip() == "ok"
