"""Scenario 5: generic ephemeral volumes and CSI inline ephemeral volumes.

Both are created with their Pod and gone after it: the generic one as a PVC owned by the Pod
(garbage-collected, then its PV deleted by the provisioner), the inline one by the driver's
NodeUnpublishVolume. "Gone" is checked on the node: a marker written through the Pod's volume
is no longer anywhere under the driver's hostpath root.
"""

from __future__ import annotations

from .conftest import Release
from .hostvol import files_named
from .kube import DRIVER_NAME, STORAGE_CLASS, Kube, gone, unique, wait_until


def test_generic_ephemeral_volume(driver: Release, ns: Kube) -> None:
    pod = unique("gen-eph")
    marker = unique("marker")
    ns.pod(
        pod,
        f"echo hello > /scratch/{marker} && sleep 3600",
        volumes=[
            {
                "name": "scratch",
                "ephemeral": {
                    "volumeClaimTemplate": {
                        "spec": {
                            "accessModes": ["ReadWriteOnce"],
                            "storageClassName": STORAGE_CLASS,
                            "resources": {"requests": {"storage": "16Mi"}},
                        }
                    }
                },
            }
        ],
        mounts=[{"name": "scratch", "mountPath": "/scratch"}],
    )
    ns.wait_running(pod)
    claim = f"{pod}-scratch"
    pvc = ns.wait_pvc_bound(claim)
    owners = [(o["kind"], o["name"]) for o in pvc["metadata"].get("ownerReferences", [])]
    assert owners == [("Pod", pod)]
    pv_name = pvc["spec"]["volumeName"]
    assert ns.exec(pod, f"cat /scratch/{marker}").strip() == "hello"
    root = driver.cluster.hostpath_root
    assert files_named(root, marker), "the marker is not on the node under the hostpath root"

    ns.delete_pod(pod)
    wait_until(
        f"PVC {claim} garbage-collected",
        lambda: gone(ns.core.read_namespaced_persistent_volume_claim, claim, ns.namespace),
        120,
    )
    ns.wait_pv_gone(pv_name)
    wait_until("the volume's data gone from the node", lambda: not files_named(root, marker), 60)


def test_csi_inline_ephemeral_volume(driver: Release, ns: Kube) -> None:
    pod = unique("inline")
    marker = unique("marker")
    ns.pod(
        pod,
        f"echo inline > /scratch/{marker} && sleep 3600",
        volumes=[
            {
                "name": "scratch",
                "csi": {"driver": DRIVER_NAME, "volumeAttributes": {"size": "16Mi"}},
            }
        ],
        mounts=[{"name": "scratch", "mountPath": "/scratch"}],
    )
    ns.wait_running(pod)
    assert ns.exec(pod, f"cat /scratch/{marker}").strip() == "inline"
    # A real mount of its own inside the pod, not a directory of the container's rootfs.
    mounts = ns.exec(pod, "cat /proc/mounts")
    assert any(line.split()[1] == "/scratch" for line in mounts.splitlines())
    root = driver.cluster.hostpath_root
    assert files_named(root, marker), "the inline volume's data is not under the hostpath root"
    # No PVC or PV exists for an inline volume.
    assert not ns.items(ns.core.list_namespaced_persistent_volume_claim, ns.namespace)

    ns.delete_pod(pod)
    wait_until("the inline volume gone from the node", lambda: not files_named(root, marker), 60)
