"""Scenario 7b: a volume broken behind the driver's back reaches the Pod as an event.

The kubelet runs with the CSIVolumeHealth feature gate (nodeconfig.py), so the condition the
driver gives in NodeGetVolumeStats becomes a Warning event ``VolumeConditionAbnormal`` on each
Pod using the volume: the node-side path of docs/deploy.md ("Volume health"), which needs
nothing from the chart. The volume's directory under the hostpath root is renamed away while a
Pod uses it, then put back.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .cluster import Cluster
from .conftest import Release, Timings
from .hostvol import files_named
from .kube import Kube, unique, wait_until


def test_a_missing_volume_directory_is_an_event_on_the_pod(
    driver: Release, cluster: Cluster, ns: Kube, timings: Timings
) -> None:
    claim, pod = unique("health"), unique("health-pod")
    marker = unique("marker")
    ns.pvc(claim, "16Mi")
    ns.pod_with_claim(pod, claim, f"touch /data/{marker} && sleep 3600")
    ns.wait_running(pod)
    (found,) = wait_until(
        "the Pod's marker under the hostpath root",
        lambda: files_named(cluster.hostpath_root, marker) or None,
    )
    volume_dir = found.parent
    assert not ns.events_about(pod, "VolumeConditionAbnormal")

    aside = volume_dir.with_name(volume_dir.name + ".aside")
    t0 = time.monotonic()
    os.rename(volume_dir, aside)
    try:
        (event,) = wait_until(
            "a VolumeConditionAbnormal event on the Pod",
            lambda: ns.events_about(pod, "VolumeConditionAbnormal") or None,
            timeout=120,
        )
        timings.record("volume_broken_to_pod_event", time.monotonic() - t0)
    finally:
        os.rename(aside, volume_dir)
    assert event["type"] == "Warning"
    message = event["message"]
    # "Volume <the Pod's volume name>: <the driver's condition>"
    assert message.startswith("Volume data: backing directory "), message
    assert f"/{volume_dir.name} is missing" in message, message
    assert Path(volume_dir, marker).exists(), "put back as it was"
    ns.delete_pod(pod)
    ns.delete_pvc(claim)
