"""Scenario 7: attachRequired true.

The chart is reinstalled with csiDriver.attachRequired=true (the field is immutable in a
CSIDriver, so no upgrade), which adds csi-attacher to the controller Deployment. A Pod using a
PVC then needs a VolumeAttachment, attached by csi-attacher (ControllerPublishVolume) before the
kubelet mounts the volume and starts the Pod; deleting the Pod detaches it again.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from .cluster import NODE_NAME, Cluster
from .conftest import DRIVER_NAMESPACE, Release, Timings, helm_values
from .kube import DRIVER_NAME, Kube, raw, unique, wait_until


@pytest.fixture(scope="module")
def attach_driver(release: Release, cluster: Cluster, timings: Timings) -> Iterator[Release]:
    seconds = release.install(helm_values(cluster, csiDriver={"attachRequired": True}))
    timings.record("helm_install_attach", seconds)
    yield release
    release.uninstall()


def _attachments(ns: Kube, pv_name: str) -> list[Any]:
    return [
        va
        for va in ns.items(ns.storage.list_volume_attachment)
        if va["spec"]["source"].get("persistentVolumeName") == pv_name
    ]


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_controller_runs_the_attacher(attach_driver: Release) -> None:
    kube = Kube(attach_driver.cluster.api_client(), DRIVER_NAMESPACE)
    deploy = raw(
        kube.apps.read_namespaced_deployment, "e2e-nodelocal-csi-controller", DRIVER_NAMESPACE
    )
    assert "csi-attacher" in [c["name"] for c in deploy["spec"]["template"]["spec"]["containers"]]
    assert deploy["status"].get("readyReplicas") == 1
    assert raw(kube.storage.read_csi_driver, DRIVER_NAME)["spec"]["attachRequired"] is True


def test_volume_attached_before_pod_starts(attach_driver: Release, ns: Kube) -> None:
    claim = unique("att")
    ns.pvc(claim, "16Mi")
    pod = unique("att-pod")
    ns.pod_with_claim(pod, claim, "echo attached > /data/x && sleep 3600")
    running = ns.wait_running(pod)
    pv_name = ns.wait_pvc_bound(claim)["spec"]["volumeName"]

    attachments = _attachments(ns, pv_name)
    assert len(attachments) == 1
    va = attachments[0]
    assert va["spec"]["attacher"] == DRIVER_NAME
    assert va["spec"]["nodeName"] == NODE_NAME
    assert va["status"]["attached"] is True
    assert "attachError" not in va["status"]
    # Attached before the container started: the kubelet waits for status.attached.
    started = running["status"]["containerStatuses"][0]["state"]["running"]["startedAt"]
    assert _time(va["metadata"]["creationTimestamp"]) <= _time(started)
    assert ns.exec(pod, "cat /data/x").strip() == "attached"

    ns.delete_pod(pod)
    wait_until(
        "VolumeAttachment removed after the pod is gone",
        lambda: not _attachments(ns, pv_name),
        120,
    )
