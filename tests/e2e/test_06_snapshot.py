"""Scenario 6: VolumeSnapshot of a PVC and a PVC restored from it with the same data.

The snapshot CRDs come from the external-snapshotter release the sidecars are built from; the
snapshot-controller runs with --enable-distributed-snapshotting next to the cluster (conftest)
and csi-snapshotter runs in the node pods (the chart's node deployment mode).
"""

from __future__ import annotations

from .conftest import Release
from .kube import SNAPSHOT_GROUP, Kube, unique


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
    ns.snapshot(snap, source)
    status = ns.wait_snapshot_ready(snap)
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

    ns.delete_snapshot(snap, content)
