"""Scenario 6: VolumeSnapshot of a PVC and a PVC restored from it with the same data.

The snapshot CRDs come from the external-snapshotter release the sidecars are built from; the
snapshot-controller runs with --enable-distributed-snapshotting next to the cluster (conftest)
and csi-snapshotter runs in the node pods (the chart's node deployment mode).
"""

from __future__ import annotations

from typing import Any

from .conftest import Release
from .kube import (
    SNAPSHOT_CLASS,
    SNAPSHOT_GROUP,
    SNAPSHOT_VERSION,
    Kube,
    gone,
    unique,
    wait_until,
)


def _snapshot_status(ns: Kube, name: str) -> Any:
    obj = ns.custom.get_namespaced_custom_object(
        SNAPSHOT_GROUP, SNAPSHOT_VERSION, ns.namespace, "volumesnapshots", name
    )
    status = obj.get("status") or {}
    if status.get("error"):
        raise AssertionError(f"snapshot {name} failed: {status['error']}")
    return status if status.get("readyToUse") else None


def test_snapshot_and_restore(driver: Release, ns: Kube) -> None:
    source = unique("src")
    ns.pvc(source, "32Mi")
    writer = unique("snap-writer")
    ns.pod_with_claim(
        writer,
        source,
        "dd if=/dev/urandom of=/data/payload bs=64k count=8 2>/dev/null && sync && sleep 3600",
    )
    ns.wait_running(writer)
    digest = ns.exec(writer, "sha256sum /data/payload | cut -d' ' -f1").strip()

    snap = unique("snap")
    ns.custom.create_namespaced_custom_object(
        SNAPSHOT_GROUP,
        SNAPSHOT_VERSION,
        ns.namespace,
        "volumesnapshots",
        {
            "apiVersion": f"{SNAPSHOT_GROUP}/{SNAPSHOT_VERSION}",
            "kind": "VolumeSnapshot",
            "metadata": {"name": snap},
            "spec": {
                "volumeSnapshotClassName": SNAPSHOT_CLASS,
                "source": {"persistentVolumeClaimName": source},
            },
        },
    )
    status = wait_until(
        f"VolumeSnapshot {snap} readyToUse", lambda: _snapshot_status(ns, snap), 180
    )
    content = status["boundVolumeSnapshotContentName"]

    # The source changes after the snapshot: the restore must show the old bytes.
    ns.exec(writer, "echo after-snapshot > /data/payload && sync")
    restored = unique("restored")
    ns.pvc(
        restored,
        "32Mi",
        data_source={"apiGroup": SNAPSHOT_GROUP, "kind": "VolumeSnapshot", "name": snap},
    )
    reader = unique("snap-reader")
    ns.pod_with_claim(reader, restored)
    ns.wait_running(reader)
    ns.wait_pvc_bound(restored)
    assert ns.exec(reader, "sha256sum /data/payload | cut -d' ' -f1").strip() == digest
    # Two volumes, not one: writing the restored one leaves the source alone.
    ns.exec(reader, "echo restored-only > /data/mark")
    assert ns.exec(writer, "test -e /data/mark || echo absent").strip() == "absent"

    ns.custom.delete_namespaced_custom_object(
        SNAPSHOT_GROUP, SNAPSHOT_VERSION, ns.namespace, "volumesnapshots", snap
    )
    wait_until(
        f"VolumeSnapshotContent {content} deleted",
        lambda: gone(
            ns.custom.get_cluster_custom_object,
            SNAPSHOT_GROUP,
            SNAPSHOT_VERSION,
            "volumesnapshotcontents",
            content,
        ),
        120,
    )
