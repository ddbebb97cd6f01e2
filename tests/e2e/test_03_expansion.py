"""Scenario 3: online expansion while the Pod keeps running.

What "grows" means here. The hostpath backend's filesystem volumes are directories on the
node's filesystem; their size is enforced only on XFS with project quotas, which this host's
kernel lacks (that case runs in the VM lane). So for a filesystem volume the observable growth
is the driver's: the PV and the PVC's status capacity reach the new size (ControllerExpandVolume
by csi-resizer, NodeExpandVolume by the kubelet on the live mount) and the driver accounts the
extra bytes, so its published CSIStorageCapacity drops by exactly the growth. A raw block volume
is a sparse image on a loop device, so its growth is visible inside the Pod: the device gets
bigger while the same container keeps running.
"""

from __future__ import annotations

import time
from typing import Any

from .conftest import DRIVER_NAMESPACE, Release
from .kube import STORAGE_CLASS, Kube, quantity, unique, wait_until

MiB = 1024 * 1024


def _capacity(kube: Kube) -> int:
    items = [
        c
        for c in kube.items(kube.storage.list_namespaced_csi_storage_capacity, DRIVER_NAMESPACE)
        if c["storageClassName"] == STORAGE_CLASS
    ]
    assert len(items) == 1
    return quantity(items[0]["capacity"])


def _stable_capacity(kube: Kube) -> int:
    """The published capacity once two readings 6 s apart (more than the 5 s poll) agree."""

    def stable() -> tuple[int] | None:
        first = _capacity(kube)
        time.sleep(6)
        return (first,) if _capacity(kube) == first else None

    result: tuple[int] = wait_until("a stable CSIStorageCapacity", stable, 60)
    return result[0]


def _expand(ns: Kube, claim: str, size: str) -> None:
    ns.core.patch_namespaced_persistent_volume_claim(
        claim, ns.namespace, {"spec": {"resources": {"requests": {"storage": size}}}}
    )


def _resized(ns: Kube, claim: str, size_bytes: int) -> Any:
    """The PVC once its status capacity reached size_bytes and no resize condition is left."""

    def done() -> Any:
        pvc = ns.read_pvc(claim)
        cap = quantity(pvc["status"]["capacity"]["storage"])
        pending = [c["type"] for c in pvc["status"].get("conditions", [])]
        return pvc if cap >= size_bytes and not pending else None

    try:
        return wait_until(f"PVC {claim} resized to {size_bytes} bytes", done, 180)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nPVC events:\n{ns.events(claim)}") from None


def _same_container(ns: Kube, pod: str, before: Any) -> None:
    after = ns.read_pod(pod)
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    old, new = before["status"]["containerStatuses"][0], after["status"]["containerStatuses"][0]
    assert new["restartCount"] == 0
    assert new["containerID"] == old["containerID"]
    assert new["state"]["running"]["startedAt"] == old["state"]["running"]["startedAt"]


def test_filesystem_volume_expands_online(driver: Release, ns: Kube) -> None:
    drv = Kube(ns.api, DRIVER_NAMESPACE)
    claim = unique("grow")
    ns.pvc(claim, "32Mi")
    pod = unique("grow-pod")
    ns.pod_with_claim(pod, claim, "echo before > /data/f && sleep 3600")
    before = ns.wait_running(pod)
    pv_name = ns.wait_pvc_bound(claim)["spec"]["volumeName"]
    free_before = _stable_capacity(drv)

    _expand(ns, claim, "96Mi")
    pvc = _resized(ns, claim, 96 * MiB)
    assert quantity(pvc["status"]["capacity"]["storage"]) == 96 * MiB
    assert quantity(ns.read_pv(pv_name)["spec"]["capacity"]["storage"]) == 96 * MiB
    # The driver accounts the growth against its capacity (hostpath.capacityBytes is set).
    wait_until(
        "CSIStorageCapacity lower by the growth",
        lambda: _capacity(drv) == free_before - 64 * MiB,
        60,
    )
    _same_container(ns, pod, before)
    out = ns.exec(pod, "cat /data/f && echo after >> /data/f && cat /data/f")
    assert out.split() == ["before", "before", "after"]


def test_block_volume_grows_inside_the_running_pod(driver: Release, ns: Kube) -> None:
    claim = unique("grow-blk")
    ns.pvc(claim, "32Mi", block=True)
    pod = unique("grow-blk-pod")
    ns.pod_with_claim(pod, claim, block=True)
    before = ns.wait_running(pod)
    ns.wait_pvc_bound(claim)
    assert int(ns.exec(pod, "blockdev --getsize64 /dev/xvda").strip()) == 32 * MiB
    ns.exec(pod, "printf marker-before-resize | dd of=/dev/xvda conv=fsync 2>/dev/null")

    _expand(ns, claim, "80Mi")
    _resized(ns, claim, 80 * MiB)
    wait_until(
        "the device in the pod at the new size",
        lambda: int(ns.exec(pod, "blockdev --getsize64 /dev/xvda").strip()) == 80 * MiB,
        60,
    )
    _same_container(ns, pod, before)
    head = ns.exec(pod, "dd if=/dev/xvda bs=20 count=1 2>/dev/null").strip()
    assert head == "marker-before-resize"
    # The new tail is usable: write past the old end and read it back.
    ns.exec(pod, "printf tail-after-resize | dd of=/dev/xvda bs=1M seek=70 conv=fsync 2>/dev/null")
    tail = ns.exec(pod, "dd if=/dev/xvda bs=1M skip=70 count=1 2>/dev/null | head -c 17").strip()
    assert tail == "tail-after-resize"
