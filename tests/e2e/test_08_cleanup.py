"""Scenario 8: deleting a PVC removes the volume from the node; helm uninstall leaves no
driver objects behind."""

from __future__ import annotations

import time

from .cluster import Cluster
from .conftest import DRIVER_NAMESPACE, RELEASE, Release, Timings, driver_registered, helm_values
from .hostvol import files_named
from .kube import DRIVER_NAME, SNAPSHOT_GROUP, SNAPSHOT_VERSION, Kube, unique, wait_until

INSTANCE = f"app.kubernetes.io/instance={RELEASE}"


def test_deleting_pvc_removes_the_volume_from_the_node(driver: Release, ns: Kube) -> None:
    claim = unique("gone")
    marker = unique("marker")
    ns.pvc(claim, "16Mi")
    pod = unique("gone-pod")
    ns.pod_with_claim(pod, claim, f"echo x > /data/{marker} && sleep 3600")
    ns.wait_running(pod)
    pv_name = ns.wait_pvc_bound(claim)["spec"]["volumeName"]
    root = driver.cluster.hostpath_root
    assert files_named(root, marker), "the volume's data is not under the hostpath root"
    ns.delete_pod(pod)
    ns.delete_pvc(claim)
    ns.wait_pv_gone(pv_name)
    wait_until("the volume's data gone from the node", lambda: not files_named(root, marker), 60)


def test_helm_uninstall_leaves_no_driver_objects(
    release: Release, cluster: Cluster, timings: Timings
) -> None:
    release.install(helm_values(cluster))
    kube = Kube(cluster.api_client(), DRIVER_NAMESPACE)
    # Capacity objects exist while installed; the uninstall must take them along.
    wait_until(
        "CSIStorageCapacity published",
        lambda: kube.items(kube.storage.list_namespaced_csi_storage_capacity, DRIVER_NAMESPACE),
        120,
    )
    t0 = time.monotonic()
    release.uninstall()
    timings.record("helm_uninstall", time.monotonic() - t0)

    from kubernetes import client

    rbac = client.RbacAuthorizationV1Api(kube.api)
    names = [d["metadata"]["name"] for d in kube.items(kube.storage.list_csi_driver)]
    assert DRIVER_NAME not in names
    for call in (
        kube.storage.list_storage_class,
        kube.apps.list_daemon_set_for_all_namespaces,
        kube.apps.list_deployment_for_all_namespaces,
        kube.core.list_service_account_for_all_namespaces,
        kube.core.list_config_map_for_all_namespaces,
        rbac.list_cluster_role,
        rbac.list_cluster_role_binding,
        rbac.list_role_for_all_namespaces,
        rbac.list_role_binding_for_all_namespaces,
    ):
        left = kube.items(call, label_selector=INSTANCE)
        assert not left, f"{call.__name__}: {[o['metadata']['name'] for o in left]}"
    classes = kube.custom.list_cluster_custom_object(
        SNAPSHOT_GROUP, SNAPSHOT_VERSION, "volumesnapshotclasses"
    )["items"]
    assert not [c for c in classes if c.get("driver") == DRIVER_NAME]
    assert not kube.items(kube.core.list_namespaced_pod, DRIVER_NAMESPACE)
    # Owned by the DaemonSet: the garbage collector removes the capacity objects.
    wait_until(
        "CSIStorageCapacity objects gone",
        lambda: not kube.items(kube.storage.list_csi_storage_capacity_for_all_namespaces),
        120,
    )
    # The registrar removed its socket on SIGTERM, so the kubelet unregistered the driver.
    wait_until("CSINode without the driver", lambda: not driver_registered(kube.storage), 120)
    socket = cluster.kubelet_dir / "plugins_registry" / f"{DRIVER_NAME}-reg.sock"
    assert not socket.exists()
