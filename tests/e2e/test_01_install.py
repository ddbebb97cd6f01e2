"""Scenario 1: helm install of the chart with the hostpath backend.

Driver pods Ready, the CSINode object lists the driver (registration through the registrar
sidecar and the kubelet's plugin watcher), CSIStorageCapacity objects published for the node.
"""

from __future__ import annotations

from typing import Any

from .cluster import NODE_NAME
from .conftest import DRIVER_NAMESPACE, HOSTPATH_CAPACITY, Release, chart_default
from .kube import DRIVER_NAME, STORAGE_CLASS, TOPOLOGY_KEY, Kube, quantity, raw, wait_until


def _kube(driver: Release) -> Kube:
    return Kube(driver.cluster.api_client(), DRIVER_NAMESPACE)


def test_driver_pods_ready(driver: Release) -> None:
    kube = _kube(driver)
    ds = kube.items(kube.apps.list_namespaced_daemon_set, DRIVER_NAMESPACE)
    deploy = kube.items(kube.apps.list_namespaced_deployment, DRIVER_NAMESPACE)
    assert [d["metadata"]["name"] for d in ds] == ["e2e-nodelocal-csi-node"]
    assert [d["metadata"]["name"] for d in deploy] == ["e2e-nodelocal-csi-controller"]
    assert ds[0]["status"]["desiredNumberScheduled"] == 1
    assert ds[0]["status"].get("numberReady") == 1, driver.diagnose()
    assert deploy[0]["status"].get("readyReplicas") == 1, driver.diagnose()
    pods = kube.items(kube.core.list_namespaced_pod, DRIVER_NAMESPACE)
    assert len(pods) == 2
    for pod in pods:
        assert pod["spec"]["nodeName"] == NODE_NAME
        for status in pod["status"]["containerStatuses"]:
            assert status["ready"], f"{pod['metadata']['name']}/{status['name']} not ready"
            assert status["restartCount"] == 0, driver.diagnose()


def test_csinode_lists_driver(driver: Release) -> None:
    kube = _kube(driver)
    node = raw(kube.storage.read_csi_node, NODE_NAME)
    entries = [d for d in node["spec"]["drivers"] if d["name"] == DRIVER_NAME]
    assert len(entries) == 1
    assert entries[0]["nodeID"] == NODE_NAME
    assert entries[0]["topologyKeys"] == [TOPOLOGY_KEY]
    # The kubelet copies the driver's accessible topology onto the Node's labels.
    labels = raw(kube.core.read_node, NODE_NAME)["metadata"]["labels"]
    assert labels.get(TOPOLOGY_KEY) == NODE_NAME


def test_registration_was_done_by_the_real_registrar(driver: Release) -> None:
    """The registrar in the node pod is the upstream release the chart pins, and the kubelet
    told it the registration succeeded (which is when the CSINode entry above appears)."""
    kube = _kube(driver)
    release = chart_default("sidecars", "registrar", "image").rpartition(":")[2]
    (pod,) = kube.items(
        kube.core.list_namespaced_pod,
        DRIVER_NAMESPACE,
        label_selector="app.kubernetes.io/component=node",
    )
    log = kube.logs(pod["metadata"]["name"], "node-driver-registrar")
    assert f'version="{release}"' in log, log[-2000:]
    assert "Received NotifyRegistrationStatus call" in log, log[-2000:]
    assert 'status="plugin_registered:true"' in log, log[-2000:]


def test_csidriver_object(driver: Release) -> None:
    kube = _kube(driver)
    spec = raw(kube.storage.read_csi_driver, DRIVER_NAME)["spec"]
    assert spec["attachRequired"] is False
    assert spec["storageCapacity"] is True
    assert sorted(spec["volumeLifecycleModes"]) == ["Ephemeral", "Persistent"]


def test_storage_capacity_published(driver: Release) -> None:
    kube = _kube(driver)

    def capacities() -> list[Any]:
        items = kube.items(kube.storage.list_namespaced_csi_storage_capacity, DRIVER_NAMESPACE)
        return [c for c in items if c["storageClassName"] == STORAGE_CLASS and c.get("capacity")]

    found = wait_until("CSIStorageCapacity for the hostpath class", capacities, 120)
    assert len(found) == 1
    cap = found[0]
    assert cap["nodeTopology"]["matchLabels"] == {TOPOLOGY_KEY: NODE_NAME}
    # hostpath.capacityBytes, nothing allocated yet.
    assert quantity(cap["capacity"]) == HOSTPATH_CAPACITY
    # Owned by the node DaemonSet (--capacity-ownerref-level=1: one level up from the pod), so
    # the garbage collector removes it with the release.
    owners = [(o["kind"], o["name"]) for o in cap["metadata"].get("ownerReferences", [])]
    assert owners == [("DaemonSet", "e2e-nodelocal-csi-node")]
